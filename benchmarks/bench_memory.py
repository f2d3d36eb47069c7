"""Peak memory per rank of `fewchips train` at 1, 2 and 4 processes: what each rank holds above an idle
interpreter after building the model (from scratch, or `--init` from a model directory), after one
training step (AdamW's moments included) and after the export. A parameter-heavy MoE config (params,
grads and two fp32 moments dominate), gloo on the CPU, the real trainer under torchrun.

    python benchmarks/bench_memory.py                      # layouts 1, ep2, dp2xep2, pp2xep2; scratch and --init
    python benchmarks/bench_memory.py --layouts 1 dp2xep2 --code /path/to/other/checkout   # another version

Peak RSS is the process's high-water mark (getrusage), read after each phase, so each figure includes
the phases before it; "idle" is the resident size after imports, before the trainer starts. Peak CUDA
memory is printed too when the run is on a GPU. With `--code`, that checkout's `fewchips` runs (only
the whole run's peak is read when its trainer has no `build` to time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAYOUTS = {"1": (1, []), "ep2": (2, ["--ep", "2"]), "dp2xep2": (4, ["--ep", "2", "--dp", "2"]),
           "ep4": (4, ["--ep", "4"]), "pp2xep2": (4, ["--pp", "2", "--ep", "2", "--microbatches", "4"])}
# ~157M parameters, 96% of them routed experts: 600 MiB of fp32 weights, 2.4 GiB with grads and AdamW
SHAPE = ["--set", "hidden_size=256", "--set", "num_hidden_layers=6", "--set", "n_routed_experts=64",
         "--set", "moe_intermediate_size=512", "--set", "num_experts_per_tok=4", "--set", "n_group=4",
         "--set", "topk_group=2", "--vocab-size", "2048"]
RUN = ["--steps", "1", "--batch-size", "8", "--seq-len", "64", "--dtype", "fp32", "--no-plots", "--no-progress",
       "--eval-every", "1000", "--eval-batches", "1", "--val-fraction", "0.2", "--threads", "1"]


def mib(kib: int) -> float:
    return kib / 1024


def rss_now_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def worker(out_dir: str, argv: list[str]):
    """One rank: run `fewchips train argv`, reading the peak RSS after each phase."""
    import torch

    import fewchips.cli
    from fewchips.train import trainer as T
    rec = {"idle_mib": mib(rss_now_kib())}

    def peak():
        rec_ = mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        if torch.cuda.is_available():
            rec_ = (rec_, torch.cuda.max_memory_allocated() / 2**20)
        return rec_

    def after(name, phase):
        orig = getattr(T.Trainer, name, None)
        if orig is None:
            return

        def wrapped(self, *a, **k):
            out = orig(self, *a, **k)
            rec.setdefault(phase, peak())
            return out

        setattr(T.Trainer, name, wrapped)

    after("build", "build")
    after("train_step", "step")
    after("export", "export")
    code = fewchips.cli.main(["train", *argv])
    rec["peak"] = peak()
    rec["code"] = code
    with open(os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(rec, f)


def run(n: int, flags: list[str], argv: list[str], tmp: str, code_dir: str) -> list[dict]:
    out = tempfile.mkdtemp(dir=tmp)
    env = {**os.environ, "PYTHONPATH": code_dir + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else \
        [sys.executable]
    p = subprocess.run([*cmd, os.path.abspath(__file__), "--worker", out, "--", *argv, *flags], env=env,
                       capture_output=True, text=True, cwd=tmp)          # not this checkout's folder: --code wins
    if p.returncode:
        raise SystemExit(f"{' '.join(argv + flags)} failed:\n{p.stderr[-3000:]}")
    res = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(n)]
    run_out = argv[argv.index("--out") + 1]
    if not run_out.endswith("init"):                # checkpoints of GBs: keep only the --init model
        shutil.rmtree(run_out, ignore_errors=True)
    return res


def above_idle(r: dict, phase: str):
    v = r.get(phase)
    if v is None:
        return None
    return (v[0] if isinstance(v, list) else v) - r["idle_mib"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=["1", "ep2", "dp2xep2", "pp2xep2"], choices=list(LAYOUTS))
    ap.add_argument("--code", default=ROOT, help="the checkout whose fewchips runs (default: this one)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.rest)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from train_utils import write_corpus
    tmp = tempfile.mkdtemp(prefix="bench-memory-")
    data = write_corpus(os.path.join(tmp, "data"), n_files=24)
    base = ["--data", data, *RUN]
    init_dir = os.path.join(tmp, "init")
    run(1, [], [*base, *SHAPE, "--out", init_dir], tmp, ROOT)      # a model directory to start from (this code)
    print(f"{'layout':<10} {'start':<8} {'ranks':>5}  peak MiB above idle, worst rank: {'build':>8} {'step':>8} "
          f"{'export':>8}   vs 1 process (step)")
    one = {}
    for start in ("scratch", "init"):
        for name in args.layouts:
            n, flags = LAYOUTS[name]
            how = [*SHAPE] if start == "scratch" else ["--init", init_dir]
            res = run(n, flags, [*base, *how, "--out", os.path.join(tmp, f"{start}-{name}")], tmp, args.code)
            worst = {ph: max((above_idle(r, ph) or 0.0) for r in res) for ph in ("build", "step", "export", "peak")}
            if name == "1":
                one[start] = worst["peak"]
            ratio = worst["peak"] / one[start] if start in one else float("nan")
            print(f"{name:<10} {start:<8} {n:>5}  {'':32}{worst['build']:>8.0f} {worst['step']:>8.0f} "
                  f"{worst['export']:>8.0f}   {ratio:.2f}  (idle {res[0]['idle_mib']:.0f} MiB)", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
