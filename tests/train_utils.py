"""Helpers for the training tests: a small synthetic Python-like corpus and a tiny trainer config."""

import os
import random

from model_utils import tiny_config

WORDS = ["value", "items", "count", "name", "result", "data", "index", "total", "node", "key"]


def write_corpus(root, n_files=12, funcs=25, seed=0):
    """n_files small .py files of repetitive code (so a tiny model learns it in seconds)."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    for f in range(n_files):
        parts = []
        for i in range(funcs):
            a, b = rng.sample(WORDS, 2)
            parts.append(f"def get_{a}_{i}(self, {b}):\n    \"\"\"Return the {a} of {b}.\"\"\"\n"
                         f"    if {b} is None:\n        return {rng.randint(0, 9)}\n    return self.{a} + {b}\n\n")
        with open(os.path.join(root, f"mod_{f:02d}.py"), "w") as fh:
            fh.write("".join(parts))
    return str(root)


def micro_config(**kw):
    return tiny_config(vocab_size=384, **kw)


def train_config(out, data, **kw):
    from fewchips.train import TrainConfig
    base = dict(out=str(out), data=str(data), steps=20, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=2,
                log_every=1, eval_every=10, eval_batches=2, save_every=1000, plots=False, progress=False,
                val_fraction=0.1, dtype="fp32", threads=1)
    base.update(kw)
    return TrainConfig(**base)


def quiet(*a, **k):
    pass
