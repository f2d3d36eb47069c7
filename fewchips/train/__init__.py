"""Training: data (documents → tokenizer → memory-mapped shards → sampler), the V3 recipe (trainer),
and plots. `fewchips train` is the command-line front end. What needs torch loads on first use."""

import importlib

from .config import TrainConfig, TrainError

_LAZY = {"Trainer": "trainer", "train": "trainer"}

__all__ = ["TrainConfig", "Trainer", "TrainError", "train"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fewchips.train' has no attribute {name!r}")
