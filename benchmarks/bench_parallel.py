"""Expert-parallel training throughput on CPU processes (gloo): tokens/s and the share of the step
spent in the dispatch/combine all-to-alls, at 1, 2 and 4 processes (ep = processes, dp = 1).

    python benchmarks/bench_parallel.py                      # small preset, 1/2/4 processes
    python benchmarks/bench_parallel.py --preset tiny --procs 1 2 --steps 2
    python benchmarks/bench_parallel.py --procs 2 --compare-overlap --pairs 5   # dispatch overlap on vs off

Each process gets cores // processes threads, so the numbers show what splitting one machine's
cores into ranks costs and how much of the step the all-to-all takes - not multi-machine scaling.
The all-to-all share is the time ranks are blocked in all-to-alls (exposed communication): with
the dispatch overlapped (the default), the shared experts run while the rows travel.
The global batch (--batch sequences of --seq tokens) is the same at every process count.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args):
    import torch
    import torch.distributed as dist

    from fewchips import DeepseekV3, ModelConfig
    from fewchips.parallel import init_parallel, parallelize, shutdown
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from model_utils import train_step          # the trainer's step pieces on a dp x ep model
    from fewchips.parallel.expert_parallel import comm_seconds, expert_modules

    n = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // n))
    par = init_parallel(ep=n, timeout_s=1800)
    cfg = ModelConfig.from_preset(args.preset, max_position_embeddings=max(args.seq, 256))
    model = DeepseekV3(cfg).init_weights(generator=torch.Generator().manual_seed(0))
    model = parallelize(model.train(), par)
    for m in expert_modules(model):
        m.overlap = not args.no_overlap
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    times, comms = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)   # windows: seq inputs
        comm_seconds(model, reset=True)
        dist.barrier()
        t0 = time.perf_counter()
        train_step(model, opt, ids, par)
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
            comms.append(comm_seconds(model))
    t = torch.tensor([sum(times), sum(comms)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)   # the slowest rank sets the pace
    if par.is_main:
        step_s = t[0].item() / len(times)
        print(json.dumps({"procs": n, "step_s": step_s, "tokens_per_s": args.batch * args.seq / step_s,
                          "a2a_share": t[1].item() / t[0].item()}), flush=True)
    shutdown()


def launch(n, argv):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *argv], env=env,
                                      stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL, text=True))
    out = procs[0].communicate()[0]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{n} processes: exit codes {codes}")
    return json.loads(out.strip().splitlines()[-1])


def compare_overlap(args, argv):
    """Interleaved runs, overlap on then off, `--pairs` times per process count: the median of the
    per-pair step-time ratios (off / on), and each mode's median exposed all-to-all share."""
    import statistics
    print(f"{args.preset} preset, global batch {args.batch} x {args.seq}, {os.cpu_count()} cores, "
          f"{args.pairs} interleaved pairs, dispatch overlapped with the shared experts vs not")
    rows = []
    for n in args.procs:
        on, off = [], []
        for _ in range(args.pairs):
            on.append(launch(n, argv))
            off.append(launch(n, argv + ["--no-overlap"]))
        ratio = statistics.median(b["step_s"] / a["step_s"] for a, b in zip(on, off))
        row = {"procs": n, "speedup_median": ratio,
               "step_s_on": statistics.median(r["step_s"] for r in on),
               "step_s_off": statistics.median(r["step_s"] for r in off),
               "a2a_share_on": statistics.median(r["a2a_share"] for r in on),
               "a2a_share_off": statistics.median(r["a2a_share"] for r in off)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=4, help="global batch (sequences); divisible by every --procs")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores // processes)")
    ap.add_argument("--no-overlap", action="store_true", help="wait for the dispatch before the shared experts run")
    ap.add_argument("--compare-overlap", action="store_true",
                    help="interleaved pairs of runs with and without the overlap at each --procs; "
                         "prints the median ratio")
    ap.add_argument("--pairs", type=int, default=3, help="pairs of runs for --compare-overlap")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args()
    if args.worker:
        return worker(args)
    argv = [a for a in sys.argv[1:] if a not in ("--worker", "--compare-overlap", "--no-overlap")]
    if args.compare_overlap:
        return compare_overlap(args, argv)
    rows = []
    print(f"{args.preset} preset, global batch {args.batch} x {args.seq} tokens, {os.cpu_count()} cores, "
          f"threads/process {args.threads or 'cores // processes'}, AdamW training step (forward + backward + step)")
    print(f"{'procs':>5} {'step s':>8} {'tokens/s':>9} {'all-to-all share':>17}")
    for n in args.procs:
        row = launch(n, argv)
        rows.append(row)
        print(f"{n:>5} {row['step_s']:>8.2f} {row['tokens_per_s']:>9.0f} {row['a2a_share']:>16.1%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
