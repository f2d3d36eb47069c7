"""The report's FP8 validation at our scale: train the same model, same data and seed, with the FP8
recipe (emulated on CPU, `apply_fp8(model, "emulate")`) and without, and compare validation loss.

    python benchmarks/fp8_validation.py --preset tiny --steps 300 --out runs/fp8_validation
    python benchmarks/fp8_validation.py --runs fp8 ...          # one run (e.g. two processes side by side)
    python benchmarks/fp8_validation.py --plot-only ...         # combine finished runs

Writes OUT/{baseline,fp8}/metrics.jsonl, OUT/fp8_vs_baseline.png (both validation-loss curves) and
OUT/summary.json. The baseline is FP32 (autocast off), which is at least as precise as the paper's BF16.
`--runs fp8,fp8-full` compares the FP8 recipe with and without its FP8-cached activations.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def run(kind: str, args):
    from fewchips.config import ModelConfig
    from fewchips.fp8 import apply_fp8
    from fewchips.train.config import TrainConfig
    from fewchips.train.trainer import Trainer

    cfg = ModelConfig.from_preset(args.preset)
    tc = TrainConfig(out=os.path.join(args.out, kind), data=args.data, cache_dir=os.path.join(args.out, "cache"),
                     steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                     eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=10**9,
                     log_every=10, plots=False, progress=False, overwrite=True, dtype="fp32",
                     threads=args.threads, seed=args.seed, max_corpus_mb=args.max_corpus_mb,
                     **({"bias_update_speed": args.bias_update_speed} if args.bias_update_speed is not None else {}))
    trainer = Trainer(cfg, tc)
    if kind in ("fp8", "fp8-full"):     # fp8: activations cached in FP8 (the default); fp8-full: not
        names = apply_fp8(trainer.model, backend="emulate", cache_activations=kind == "fp8")
        print(f"fp8: {len(names)} modules converted")
    t0 = time.time()
    out = trainer.train()
    out["seconds"] = time.time() - t0
    with open(os.path.join(args.out, kind, "result.json"), "w") as f:
        json.dump(out, f, indent=2, default=float)
    return out


def read_val(path):
    steps, vals = [], []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "val_loss" in r:
                steps.append(r["step"])
                vals.append(r["val_loss"])
    return steps, vals


def plot(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: read_val(os.path.join(args.out, k, "metrics.jsonl")) for k in ("baseline", "fp8")}
    (sb, vb), (s8, v8) = curves["baseline"], curves["fp8"]
    rel = (v8[-1] - vb[-1]) / vb[-1]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot(sb, vb, label="FP32 baseline", marker="o", ms=3)
    ax.plot(s8, v8, label="FP8 recipe (emulated)", marker="s", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{args.preset} preset: final val loss {vb[-1]:.4f} vs {v8[-1]:.4f} ({100 * rel:+.3f}%)")
    ax.legend()
    common = [s for s in s8 if s in sb]
    ax2.plot(common, [100 * (v8[s8.index(s)] - vb[sb.index(s)]) / vb[sb.index(s)] for s in common], marker="o", ms=3)
    ax2.axhline(0.25, ls="--", c="gray")
    ax2.axhline(-0.25, ls="--", c="gray")
    ax2.set_xlabel("step")
    ax2.set_ylabel("relative difference, FP8 vs baseline (%)")
    fig.tight_layout()
    png = os.path.join(args.out, "fp8_vs_baseline.png")
    fig.savefig(png, dpi=120)
    summary = {"preset": args.preset, "steps": sb[-1], "baseline_val_loss": vb[-1], "fp8_val_loss": v8[-1],
               "relative_difference": rel, "png": png}
    for k in ("baseline", "fp8"):
        p = os.path.join(args.out, k, "result.json")
        if os.path.exists(p):
            summary[f"{k}_seconds"] = json.load(open(p)).get("seconds")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--data", default=None, help="a text corpus (default: the Python standard library's .py files)")
    p.add_argument("--max-corpus-mb", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bias-update-speed", type=float, default=None,
                   help="the balancing bias's γ (default: the trainer's, the paper's 0.001); larger keeps the "
                        "routing out of the early collapse that otherwise dominates short comparisons")
    p.add_argument("--seed", type=int, default=0, help="init, data order and FIM seed (both runs use the same)")
    p.add_argument("--out", default="runs/fp8_validation")
    p.add_argument("--runs", default="baseline,fp8",
                   help="comma-separated: baseline, fp8 (activations cached in FP8), fp8-full (kept in fp32)")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    from fewchips.runtime import keep_freed_memory
    keep_freed_memory()       # as `fewchips train` does
    if not args.plot_only:
        for kind in args.runs.split(","):
            run(kind, args)
    if all(os.path.exists(os.path.join(args.out, k, "metrics.jsonl")) for k in ("baseline", "fp8")):
        plot(args)


if __name__ == "__main__":
    main()
