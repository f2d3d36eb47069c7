"""The routed experts' fp32 CPU GEMM forms side by side: `expert_swiglu` (which pads the runs into one
`bmm` when that at most doubles the rows) against `grouped_mm` alone (one GEMM per expert), forward +
backward of one MoE layer's experts, for even and skewed loads.

    python benchmarks/bench_expert_gemm.py [--experts 32 --dim 512 --width 256 --rows 4096]
"""

import argparse
import time

import torch

from machine import cpu_name

from fewchips import ops



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rows", type=int, default=4096, help="token copies (tokens x top-k)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    E, D, Fd, N = args.experts, args.dim, args.width, args.rows
    g = torch.Generator().manual_seed(0)
    w1 = (torch.randn(E, 2 * Fd, D, generator=g) * 0.02).requires_grad_()
    w2 = (torch.randn(E, D, Fd, generator=g) * 0.02).requires_grad_()
    gy = torch.randn(N, D, generator=g)

    def timed(fn, x, c):
        best = float("inf")
        for _ in range(args.repeats + 1):
            xx = x.detach().requires_grad_()
            t = time.perf_counter()
            fn(xx, c, w1, w2).backward(gy)
            best = min(best, time.perf_counter() - t)
            w1.grad = w2.grad = None
        return best * 1e3

    print(f"{E} experts, {D} -> 2x{Fd} -> {D}, {N} rows, fp32, forward + backward, best of {args.repeats}; "
          f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}")
    cases = [("even", torch.full((E,), N // E))]
    for skew in (0.5, 1.0):
        p = torch.rand(E, generator=g) ** skew
        cases.append((f"skew {skew}", torch.distributions.Multinomial(N - 8 * E, p / p.sum()).sample().long() + 8))
    for name, c in cases:
        x = torch.randn(int(c.sum()), D, generator=g)
        pad = E * int(c.max()) / int(c.sum())
        form = "padded bmm" if pad <= 2 else "grouped_mm"
        print(f"  {name:9s} (padding {pad:.2f}x): expert_swiglu ({form}) {timed(ops.expert_swiglu, x, c):6.1f} ms   "
              f"grouped_mm {timed(ops._grouped_swiglu, x, c):6.1f} ms")


if __name__ == "__main__":
    main()
