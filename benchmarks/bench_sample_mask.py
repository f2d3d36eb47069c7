"""Attention over packed samples: the varlen path (`ops.varlen_attention`, each sample alone) against
the dense block-diagonal mask it replaced (explicit scores up to 512 tokens, SDPA with a [T, T] mask
beyond, as `causal_attention` chose), forward + backward, one row of T tokens of the `small`
preset's attention shapes (8 heads, q/k 96, v 64), samples of 64-1024 tokens. Peak RSS above the
process's start (each variant in its own fresh process) and the time, median of interleaved pairs.

    python benchmarks/bench_sample_mask.py [--lengths 512,2048,4096] [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def one(kind: str, T: int):
    import torch
    import torch.nn.functional as F

    from fewchips import ops

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(T)
    lengths, left = [], T
    while left > 0:
        n = min(left, int(torch.randint(64, 1025, (), generator=g)))
        lengths.append(n)
        left -= n
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    q, k = (torch.randn(1, 8, T, 96, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(1, 8, T, 64, generator=g).requires_grad_()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if kind == "varlen":
        o = ops.varlen_attention(q, k, v, 0.1, seg)
    elif T <= ops.CPU_EXPLICIT_ATTENTION_MAX_T:   # what causal_attention did for packed rows before:
        allowed = ops.sample_mask(seg)[:, None]       # explicit scores with a float [T, T] mask
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
        o = torch.matmul((torch.matmul(q * 0.1, k.transpose(-2, -1)) + mask).softmax(-1), v)
    else:                                             # or SDPA with the boolean [T, T] mask
        o = F.scaled_dot_product_attention(q, k, F.pad(v, (0, 32)), attn_mask=ops.sample_mask(seg)[:, None],
                                           scale=0.1)[..., :64]
    o.sum().backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"s": dt, "peak_mib": (peak - base) / 1024, "samples": len(lengths)}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="512,2048,4096")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args.one[0], int(args.one[1]))
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split(":")[1].splitlines()[0].strip()
    print(f"{cpu}, 2 threads, fp32")
    for T in map(int, args.lengths.split(",")):
        res = {"dense": [], "varlen": []}
        for _ in range(args.pairs):
            for kind in ("dense", "varlen"):
                out = subprocess.run([sys.executable, __file__, "--one", kind, str(T)], capture_output=True, text=True,
                                     check=True).stdout
                res[kind].append(json.loads(out))
        d, v = ({k: statistics.median(r[k] for r in res[n]) for k in ("s", "peak_mib")} for n in ("dense", "varlen"))
        print(f"T={T} ({res['dense'][0]['samples']} samples): "
              f"dense mask {d['peak_mib']:.0f} MiB {d['s'] * 1e3:.0f} ms, "
              f"varlen {v['peak_mib']:.0f} MiB {v['s'] * 1e3:.0f} ms => "
              f"{d['peak_mib'] / max(v['peak_mib'], 1e-9):.1f}x less memory, {d['s'] / v['s']:.2f}x the speed")


if __name__ == "__main__":
    main()
