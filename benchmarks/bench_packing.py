"""SFT packing at scale: best-fit decreasing (`fewchips.train.chat.pack_plan`, O(n log n)) on 1M synthetic
sample lengths, against first-fit in the given order (what `pack` did before, O(n x rows)) on a sample
of them, with the rows each needs. Lengths are log-normal around 300 tokens (a chat SFT set's shape),
cut at the row length 4,097 (--seq-len 4096).

    python benchmarks/bench_packing.py                     # 1M samples; first-fit on 20K (it grows quadratically)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def first_fit(lengths: list[int], L: int) -> int:
    """Rows used by first-fit in the given order (the previous packer)."""
    room: list[int] = []
    for n in lengths:
        for r, free in enumerate(room):
            if free >= n:
                room[r] -= n
                break
        else:
            room.append(L - n)
    return len(room)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--first-fit-samples", type=int, default=20_000)
    ap.add_argument("--seq-len", type=int, default=4096)
    args = ap.parse_args()
    from fewchips.train.chat import pack_plan
    L = args.seq_len + 1
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(np.log(300), 0.8, args.samples).astype(int) + 8, L).tolist()
    t0 = time.perf_counter()
    rows = pack_plan(lengths, L)
    bfd_s = time.perf_counter() - t0
    fill = sum(lengths) / (len(rows) * L)
    print(f"best-fit decreasing: {args.samples:,} samples ({sum(lengths):,} tokens) into {len(rows):,} rows of {L} "
          f"in {bfd_s:.1f} s ({fill:.1%} of the tokens are data)")
    sub = lengths[:args.first_fit_samples]
    t0 = time.perf_counter()
    ff_rows = first_fit(sub, L)
    ff_s = time.perf_counter() - t0
    bfd_sub = len(pack_plan(sub, L))
    print(f"on the first {len(sub):,}: first-fit {ff_rows:,} rows in {ff_s:.1f} s; "
          f"best-fit decreasing {bfd_sub:,} rows")


if __name__ == "__main__":
    main()
