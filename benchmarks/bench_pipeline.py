"""Training throughput per parallel layout on CPU processes (gloo), through the real trainer
(`fewchips train` under torchrun), with each rank's idle share and the all-to-all share of a step.

    python benchmarks/bench_pipeline.py                       # tiny preset at 8 layers, 2-process layouts
    python benchmarks/bench_pipeline.py --layouts one pp2-dualpipev --steps 3

Layouts (one thread per process; a machine with fewer cores than processes measures contention):
    one              1 process
    dp2, ep2         2 processes, data or expert parallel
    pp2-<schedule>   2 pipeline stages: dualpipev, 1f1b, zbv, interleaved1f1b
    pp2-ep2-dualpipev, pp2-dp2-1f1b   4 processes

Measured per rank, over the timed steps: the step time (`Trainer.train_step`), the time spent waiting
in the pipeline's point-to-point receives and sends (torch's `_wait_batch_p2p`: the bubble plus the
transfers), and the time inside the experts' all-to-alls. The predicted bubble share is `fewchips
plan`'s formula (report Table 2) with F : B : W = 1 : 2 : 1, for 1F1B and DualPipeV.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {
    "one": (1, []),
    "dp2": (2, ["--dp", "2"]),
    "ep2": (2, ["--ep", "2"]),
    "pp2-dualpipev": (2, ["--pp", "2", "--pp-schedule", "dualpipev"]),
    "pp2-1f1b": (2, ["--pp", "2", "--pp-schedule", "1f1b"]),
    "pp2-zbv": (2, ["--pp", "2", "--pp-schedule", "zbv"]),
    "pp2-interleaved1f1b": (2, ["--pp", "2", "--pp-schedule", "interleaved1f1b"]),
    "pp2-ep2-dualpipev": (4, ["--pp", "2", "--ep", "2", "--pp-schedule", "dualpipev"]),
    "pp2-dp2-1f1b": (4, ["--pp", "2", "--dp", "2", "--pp-schedule", "1f1b"]),
}


def worker(out_dir: str, warmup: int, argv: list[str], overlap: bool = True):
    """One rank: run `fewchips train argv` with timers around the step, the pipeline waits and the
    all-to-alls; write this rank's numbers to out_dir/rank{R}.json. overlap=False: every dispatch is
    waited before the shared experts run."""
    import torch.distributed.pipelining.schedules as S

    from fewchips.cli import main
    from fewchips.parallel.expert_parallel import ExpertParallelExperts, comm_seconds
    from fewchips.train.trainer import Trainer

    ExpertParallelExperts.overlap = overlap

    rec = {"step_s": [], "wait_s": [], "a2a_s": []}
    wait = [0.0]
    orig_wait, orig_step = S._wait_batch_p2p, Trainer.train_step

    def timed_wait(work):
        t0 = time.perf_counter()
        try:
            return orig_wait(work)
        finally:
            wait[0] += time.perf_counter() - t0

    def timed_step(self):
        wait[0] = 0.0
        comm_seconds(self.model, reset=True)
        t0 = time.perf_counter()
        r = orig_step(self)
        rec["step_s"].append(time.perf_counter() - t0)
        rec["wait_s"].append(wait[0])
        rec["a2a_s"].append(comm_seconds(self.model))
        return r

    S._wait_batch_p2p = timed_wait
    Trainer.train_step = timed_step
    code = main(["train", *argv])
    rank = int(os.environ.get("RANK", "0"))
    timed = {k: v[warmup:] for k, v in rec.items()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "code": code, **timed}, f)


def predicted_bubble(layout: str, microbatches: int) -> float | None:
    from fewchips.config import ModelConfig
    from fewchips.plan import estimate as est
    if not layout.startswith("pp2") or not layout.endswith(("1f1b", "dualpipev")) or "interleaved" in layout:
        return None
    schedule = "dualpipev" if layout.endswith("dualpipev") else "1f1b"
    cfg = ModelConfig.from_preset("v3")                       # the formula depends on pp and M only
    layout_ = est.gpu_split(cfg, gpus=2, pp=2, schedule=schedule)
    return next(t.value for t in est.bubble_terms(layout_, microbatches) if t.name == "bubble fraction")


def run_layout(name: str, args) -> dict:
    n, extra = LAYOUTS[name]
    out = tempfile.mkdtemp(prefix=f"bench-pipeline-{name}-")
    train = ["--preset", args.preset, "--out", os.path.join(out, "run"), "--steps", str(args.warmup + args.steps),
             "--batch-size", str(args.batch), "--seq-len", str(args.seq), "--threads", "1", "--dtype", args.dtype,
             "--no-plots", "--no-progress", "--eval-every", "100000", "--save-every", "100000",
             "--eval-batches", "1", "--log-every", "1", "--max-corpus-mb", str(args.corpus_mb), "--seed", "0",
             "--set", f"num_hidden_layers={args.layers}"]
    if "--pp" in extra:
        train += ["--microbatches", str(args.microbatches), "--pp-overlap", args.pp_overlap]
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); "
            f"import bench_pipeline as b; b.worker({out!r}, {args.warmup}, {train + extra!r}, {not args.no_overlap})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if n == 1:
        cmd = [sys.executable, "-c", code]
    else:
        script = os.path.join(out, "worker.py")
        with open(script, "w") as f:
            f.write(code + "\n")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script]
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(n)]
    if any(r["code"] for r in ranks):              # a rank's trainer refused or failed: its words, not a ZeroDivision
        raise SystemExit(f"{name}: fewchips train exited {[r['code'] for r in ranks]}:\n{p.stderr[-3000:]}")
    step = max(sum(r["step_s"]) / len(r["step_s"]) for r in ranks)       # the slowest rank sets the pace
    res = {"layout": name, "procs": n, "step_s": step, "tokens_per_s": args.batch * args.seq / step,
           "idle_share": [sum(r["wait_s"]) / sum(r["step_s"]) for r in ranks],
           "a2a_share": [sum(r["a2a_s"]) / sum(r["step_s"]) for r in ranks],
           "predicted_bubble": predicted_bubble(name, args.microbatches), "wall_s": time.time() - t0}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=["one", "dp2", "ep2", "pp2-1f1b", "pp2-dualpipev", "pp2-zbv"],
                    choices=list(LAYOUTS))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (the preset's width)")
    ap.add_argument("--batch", type=int, default=16, help="global batch, sequences")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--microbatches", type=int, default=8, help="pipeline micro-batches per step")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--corpus-mb", type=float, default=2.0, help="bundled corpus read (data preparation time)")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--no-overlap", action="store_true", help="wait for each dispatch before the shared experts run")
    ap.add_argument("--pp-overlap", choices=["auto", "on", "off"], default="auto",
                    help="fewchips train --pp-overlap: DualPipeV's paired chunks on two threads (auto: CUDA only)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    rows = []
    for name in args.layouts:
        r = run_layout(name, args)
        rows.append(r)
        pred = "-" if r["predicted_bubble"] is None else f"{r['predicted_bubble']:.1%}"
        print(f"{name:<22} procs {r['procs']}  step {r['step_s']:.2f} s  {r['tokens_per_s']:>7,.0f} tok/s  "
              f"idle {' / '.join(f'{x:.1%}' for x in r['idle_share'])}  (predicted bubble {pred})  "
              f"all-to-all {' / '.join(f'{x:.1%}' for x in r['a2a_share'])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
