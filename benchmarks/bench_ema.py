"""The parameter EMA's cost per training step (arXiv 2412.19437 §3.2.3; goal: under 2% of the step).
Two trainers in one process on the same data and settings, one with `--ema 0.999`: blocks of steps of
each, interleaved, the EMA's block ending with its last update in (so its background averaging, which
overlaps the next step's forward, is all counted). Prints the median ratio of per-step times, and the
averaging alone (the lerp over this process's parameters, timed in the foreground) for scale.

    python benchmarks/bench_ema.py [--preset tiny] [--pairs 8] [--block 4]   (demo settings: 16 x 256 tokens)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    import torch

    from fewchips import ModelConfig
    from fewchips.train import TrainConfig, Trainer
    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp(prefix="bench_ema_")
    cfg = ModelConfig.from_preset(args.preset)

    def trainer(name, **kw):
        tc = TrainConfig(out=os.path.join(tmp, name), cache_dir=os.path.join(tmp, "cache"), max_corpus_mb=1.0,
                         steps=1000, batch_size=args.batch_size, seq_len=args.seq_len, dtype="fp32", threads=2,
                         plots=False, progress=False, save_every=10**6, eval_every=10**6, **kw)
        return Trainer(cfg, tc, log=lambda *a, **k: None)

    plain, ema = trainer("plain"), trainer("ema", ema=0.999)
    for t in (plain, ema):                       # warm-up
        t.train_step()
    ema.ema.wait()

    def block(t):
        t0 = time.perf_counter()
        for _ in range(args.block):
            t.train_step()
        if t.ema is not None:
            t.ema.wait()
        return (time.perf_counter() - t0) / args.block

    ratios, a_times, b_times = [], [], []
    for i in range(args.pairs):
        order = (plain, ema) if i % 2 == 0 else (ema, plain)
        times = {id(t): block(t) for t in order}
        a, b = times[id(plain)], times[id(ema)]
        a_times.append(a)
        b_times.append(b)
        ratios.append(b / a)
    lerp = []
    for _ in range(5):
        t0 = time.perf_counter()
        ema.ema.update()
        ema.ema.wait()
        lerp.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in ema.model.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads, fp32")
    print(f"{args.preset}: {n_params:,} parameters, EMA {ema.ema.nbytes() / 2**20:.0f} MiB on the host; "
          f"{args.batch_size} x {args.seq_len} tokens per step, blocks of {args.block} steps, {args.pairs} pairs")
    print(f"step: {statistics.median(a_times) * 1e3:.0f} ms without, {statistics.median(b_times) * 1e3:.0f} ms with "
          f"the EMA; overhead median {100 * (statistics.median(ratios) - 1):+.1f}% "
          f"(pairs: {', '.join(f'{100 * (r - 1):+.1f}' for r in ratios)})")
    print(f"the averaging alone, in the foreground: {statistics.median(lerp) * 1e3:.1f} ms "
          f"({100 * statistics.median(lerp) / statistics.median(a_times):.1f}% of a step)")


if __name__ == "__main__":
    main()
