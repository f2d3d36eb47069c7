"""Preparing pre-training data: peak RSS and MB/s of `fewchips data prepare` at several corpus sizes
and worker counts, next to the raw `tokenizers` encode_batch rate on the same text with the same
threads; 2 torchrun ranks against one process; `fewchips train --steps 1` end to end.

    python benchmarks/bench_data.py --sizes 1 10 100 1000 --workers 1 2 --ranks --train 1 160

The corpus is synthetic .jsonl (documents of 1-8 KB built from this Python's standard-library lines,
shuffled), written once under --work. Each measurement runs in a fresh process (`--one`), so its
peak RSS (getrusage: the command's own process and, separately, the largest of its workers or ranks)
is its own. The tokenizer (a 32k byte-level BPE, as a small model would use) is trained once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RAW_CAP = 128 * 2**20
sys.path.insert(0, HERE)


def stdlib_lines() -> list[str]:
    from fewchips.train.sources import read_documents
    lines = []
    for _, text in read_documents(None):
        lines.extend(line for line in text.splitlines() if line.strip())
    return lines


def write_corpus(folder: str, mb: float, seed: int = 0) -> str:
    """.jsonl files of at most 64 MB holding `mb` MB of text (kept if already there)."""
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return folder
    os.makedirs(folder, exist_ok=True)
    rng, lines = random.Random(seed), stdlib_lines()
    target, written, part, f = int(mb * 2**20), 0, 0, None
    while written < target:
        if f is None or f.tell() > 64 * 2**20:
            if f:
                f.close()
            f = open(os.path.join(folder, f"part-{part:04d}.jsonl"), "w")
            part += 1
        n = rng.randint(20, 160)
        text = "\n".join(rng.choice(lines) for _ in range(n))
        f.write(json.dumps({"text": text}) + "\n")
        written += len(text.encode())
    f.close()
    open(done, "w").close()
    return folder


def tokenizer(work: str) -> str:
    path = os.path.join(work, "tokenizer.json")
    if not os.path.exists(path):
        from fewchips.train.tokenizer import train_tokenizer
        rng, lines = random.Random(1), stdlib_lines()
        docs = ["\n".join(rng.choice(lines) for _ in range(80)) for _ in range(4000)]
        train_tokenizer(docs, 32768).save(path)
    return path


def peak_mib() -> tuple[float, float]:
    """(this process, the largest waited-for child) peak RSS in MiB."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def one(args):
    """A single measurement in this fresh process; prints one JSON line."""
    import shutil
    out = os.path.join(args.work, "out")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if args.one == "prepare":
        from fewchips.cli import main
        rc = main(["data", "prepare", "--data", args.corpus, "--out", out, "--tokenizer", args.tok, "--data-workers",
                   str(args.w), "--no-progress", "--val-fraction", "0.01"])
    elif args.one == "train":
        from fewchips.cli import main
        rc = main(["train", "--preset", "tiny", "--vocab-size", "32768", "--data", args.corpus, "--tokenizer", args.tok,
                   "--out", out, "--steps", "1", "--batch-size", "2", "--seq-len", "64", "--no-plots", "--no-progress",
                   "--eval-every", "1", "--eval-batches", "1", "--val-fraction", "0.01", "--threads", "2",
                   "--data-workers", str(args.w)])
    elif args.one in ("ranks", "ranks-train"):
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fewchips"]
               + (["data", "prepare", "--data", args.corpus, "--out", out, "--tokenizer", args.tok,
                   "--data-workers", "1", "--no-progress", "--val-fraction", "0.01"] if args.one == "ranks" else
                  ["train", "--preset", "tiny", "--vocab-size", "32768", "--data", args.corpus, "--tokenizer", args.tok,
                   "--out", out, "--steps", "1", "--batch-size", "2", "--seq-len", "64", "--no-plots", "--no-progress",
                   "--eval-every", "1", "--eval-batches", "1", "--val-fraction", "0.01", "--threads", "1",
                   "--data-workers", "1"]))
        rc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True).returncode
    elif args.one == "bpe":                                   # the tokenizer on its default sample (100 MB)
        from fewchips.train.data import TOKENIZER_SAMPLE_MB, trained_tokenizer
        from fewchips.train.prepare import PrepareConfig, Solo
        from fewchips.train.sources import parse_sources, plan_units
        src, pc = parse_sources(args.corpus), PrepareConfig()
        os.makedirs(out, exist_ok=True)
        trained_tokenizer(src, plan_units(src), pc, 32768, TOKENIZER_SAMPLE_MB, os.path.join(out, "t.json"),
                          Solo(), print)
        rc = 0
    else:                                                     # the raw encode_batch rate on the same text
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(args.tok)
        texts, nbytes = [], 0
        for f in sorted(os.listdir(args.corpus)):
            for line in open(os.path.join(args.corpus, f)) if f.endswith(".jsonl") else ():
                if nbytes < RAW_CAP:                  # the rate, measured on the first RAW_CAP bytes
                    texts.append(json.loads(line)["text"])
                    nbytes += len(texts[-1].encode())
        t0 = time.perf_counter()
        for i in range(0, len(texts), 1024):
            tok.encode_batch(texts[i:i + 1024], add_special_tokens=False)
        rc = 0
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    main_mib, child_mib = peak_mib()
    print(json.dumps({"rc": rc, "seconds": dt, "main_mib": main_mib, "child_mib": child_mib,
                      **({"mb": nbytes / 2**20} if args.one == "raw" else {})}))


def measure(kind: str, corpus: str, tok: str, work: str, w: int = 1) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(w)} if kind == "raw" else dict(os.environ)
    p = subprocess.run([sys.executable, __file__, "--one", kind, "--corpus", corpus, "--tok", tok, "--work", work,
                        "--w", str(w)], env=env, capture_output=True, text=True)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise SystemExit(f"{kind} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}") from None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_data")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 100])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (the median is printed)")
    ap.add_argument("--ranks", action="store_true", help="also 2 torchrun ranks x 1 worker against 1 process x 2")
    ap.add_argument("--train", type=float, nargs="*", default=[], help="sizes to run `fewchips train --steps 1` on")
    ap.add_argument("--bpe", type=float, nargs="*", default=[], help="sizes to train the BPE on (its 100 MB sample)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--tok", help=argparse.SUPPRESS)
    ap.add_argument("--w", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    from machine import cpu_name
    os.makedirs(args.work, exist_ok=True)
    tok = tokenizer(args.work)
    print(f"# {cpu_name()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; tokenizer: 32k byte-level BPE")
    print("| corpus MB | what | workers/threads | seconds | MB/s | vs raw encode_batch "
          "| peak RSS MiB (main / largest child) |")
    print("|---|---|---|---|---|---|---|")
    import statistics
    for mb in args.sizes:
        corpus = write_corpus(os.path.join(args.work, f"corpus-{mb:g}MB"), mb)
        real_mb = sum(len(json.loads(line)["text"].encode()) for f in sorted(os.listdir(corpus)) if f.endswith(".jsonl")
                      for line in open(os.path.join(corpus, f))) / 2**20 if mb <= 200 else mb
        kinds = [("raw", w) for w in args.workers] + [("prepare", w) for w in args.workers]
        kinds += [("ranks", 1)] if args.ranks else []
        kinds += [("train", max(args.workers)), ("ranks-train", 1)] if mb in args.train else []
        kinds += [("bpe", 1)] if mb in args.bpe else []
        runs = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for k in kinds:
                runs[k].append(measure(k[0], corpus, tok, args.work, k[1]))
        for (kind, w), rs in runs.items():
            sec = statistics.median(r["seconds"] for r in rs)
            rate = statistics.median(r["mb"] / r["seconds"] for r in rs) if kind == "raw" else real_mb / sec
            w_ref = max(args.workers) if kind.startswith("ranks") else w
            pairs = runs.get(("raw", w_ref)) if kind not in ("raw", "bpe") else None   # each round's raw run
            ratio = statistics.median((real_mb / r["seconds"]) / (p["mb"] / p["seconds"])
                                      for r, p in zip(rs, pairs)) if pairs else None       # median of the pairs
            what = {"raw": "tokenizers encode_batch (text in memory)", "prepare": "fewchips data prepare",
                    "ranks": "torchrun 2 ranks x 1 worker: data prepare",
                    "train": "fewchips train --steps 1 (all of it)",
                    "ranks-train": "torchrun 2 ranks: fewchips train --steps 1",
                    "bpe": "BPE (32k) trained on the 100 MB sample"}[kind]
            print(f"| {real_mb:,.1f} | {what} | {2 if kind.startswith('ranks') else w} | {sec:.1f} | {rate:.2f} | "
                  f"{f'{ratio:.2f}x' if ratio else '-'} | {max(r['main_mib'] for r in rs):,.0f} / "
                  f"{max(r['child_mib'] for r in rs):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
