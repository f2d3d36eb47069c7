"""Per-chunk pipeline times on one GPU, and the bubble `fewchips plan` predicts from them.

One pipeline chunk (a run of MoE decoder layers of --preset, the experts local: ep 1) on one
micro-batch: F (forward), B (full backward: input and weight gradients), I (input gradient only,
what the next stage waits for) and W = B - I (the weight gradient a zero-bubble schedule defers).
The report's Table 2 gives every schedule's bubble in these terms; `fewchips plan --fbw F,B,W` takes
them. This script prints the measured times and the bubble share for 1F1B, ZB1P and DualPipeV at
pp 2..16, next to the 1 : 2 : 1 FLOP-ratio guess the planner uses without measurements.

    python benchmarks/device_pipeline.py --json $OUT/pipeline_gpu.json    # one GPU, bf16 autocast
    python benchmarks/device_pipeline.py --cpu                            # smoke run: tiny preset

Exits 0 with a message when no CUDA device is present (and --cpu is not given). A multi-rank pipeline
needs several GPUs (NCCL cannot put two ranks on one device); this measures what one device can.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]          # the device machine has no installed fewchips


def measure(dev, preset: str, layers: int, rows: int, seq: int, repeats: int) -> dict:
    """F, B, I and W of one chunk of `layers` MoE layers of `preset` (bf16 autocast on CUDA, fp32 on
    CPU), medians over `repeats` after two warm-ups, and the bubble shares they give; printed as it goes."""
    from fewchips import DeepseekV3, ModelConfig
    from fewchips.plan.estimate import GPUSplit, bubble_terms

    amp = torch.bfloat16 if dev.type == "cuda" else None
    cfg = ModelConfig.from_preset(preset, max_position_embeddings=max(seq, 256))
    torch.manual_seed(0)
    model = DeepseekV3(cfg).init_weights().to(dev).train()
    first = cfg.first_k_dense_replace
    chunk = list(model.model.layers)[first:first + layers]
    if len(chunk) < layers:
        raise SystemExit(f"{preset} has {len(chunk)} MoE layers, fewer than --layers {layers}")
    params = [p for layer in chunk for p in layer.parameters()]
    pos = torch.arange(seq, device=dev).expand(rows, seq)
    cos, sin = model.rotary(pos)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def forward(h):
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            bal = torch.zeros((), device=dev)
            for layer in chunk:
                h, st = layer(h, cos, sin, with_stats=True)
                bal = bal + st.seq_balance.float()
        return h, bal

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    F, B, Ig = [], [], []
    for i in range(repeats + 2):
        h0 = torch.randn(rows, seq, cfg.hidden_size, device=dev, requires_grad=True)
        grad = torch.randn(rows, seq, cfg.hidden_size, device=dev)
        out = {}
        f = timed(lambda: out.update(y=forward(h0)))
        y, bal = out["y"]
        # input gradient only (what the previous stage waits for), keeping the graph for W
        i_t = timed(lambda: torch.autograd.grad((y, bal), (h0,), (grad.to(y.dtype), torch.ones_like(bal)),
                                                retain_graph=True))
        out2 = {}
        f2 = timed(lambda: out2.update(y=forward(h0)))
        y2, bal2 = out2["y"]
        b = timed(lambda: torch.autograd.grad((y2, bal2), (h0, *params), (grad.to(y2.dtype), torch.ones_like(bal2)),
                                              allow_unused=True))
        if i >= 2:                                  # the first two warm up kernels and the allocator
            F.append((f + f2) / 2)
            B.append(b)
            Ig.append(i_t)
    f, b, i_med = (statistics.median(x) * 1e3 for x in (F, B, Ig))
    w = max(b - i_med, 0.0)
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "preset": preset,
           "layers_per_chunk": layers, "rows": rows, "seq": seq, "dtype": "bf16 autocast" if amp else "fp32",
           "F_ms": f, "B_ms": b, "I_ms": i_med, "W_ms": w, "B_over_F": b / f, "W_over_F": w / f, "bubble": []}
    print(json.dumps({k: v for k, v in res.items() if k != "bubble"}))
    M = 32
    for sched in ("1f1b", "zb1p", "dualpipev"):
        for pp in (2, 4, 8, 16):
            layout = GPUSplit(gpus=pp, dp=1, ep=1, pp=pp, schedule=sched)
            meas = bubble_terms(layout, M, (f, b, w))[1].value
            guess = bubble_terms(layout, M)[1].value
            row = {"schedule": sched, "pp": pp, "microbatches": M, "bubble_share_measured": meas,
                   "bubble_share_flop_ratio": guess}
            res["bubble"].append(row)
            print(json.dumps(row))
    print(f"fewchips plan --fbw {f:.3g},{b:.3g},{w:.3g}   (per-chunk ms: F, B, W)")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="smoke run on CPU (tiny preset, fp32, short sequences)")
    ap.add_argument("--preset", default=None, help="default: small on GPU, tiny on CPU")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers in the chunk")
    ap.add_argument("--rows", type=int, default=None, help="sequences per micro-batch (default 4 GPU, 2 CPU)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048 GPU, 64 CPU)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("device_pipeline: no CUDA device; nothing measured (use --cpu for a smoke run)")
        return 0
    dev = torch.device("cpu" if args.cpu else "cuda")
    torch.set_num_threads(2)
    res = measure(dev, args.preset or ("tiny" if args.cpu else "small"), args.layers,
                  args.rows or (2 if args.cpu else 4), args.seq or (64 if args.cpu else 2048), args.repeats)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
