"""Device check for serving over ranks (issue 25): `fewchips serve --ep N` under torchrun with NCCL, one
rank per GPU, against one process on the same model: greedy tokens equal, logprobs close (bf16: 2e-2),
and the per-rank weights each rank reports; then the same with `--weights fp8` (E4M3 linears on the FP8
GEMM, E4M3 experts) and N redundant experts re-placed every 4 forward calls, against one process with
`--weights fp8`. Needs 2+ GPUs; `--cpu-smoke` runs the same script on gloo
with 2 CPU processes (what was checked here, without a GPU).

    PYTHONUNBUFFERED=1 python benchmarks/device_serve_ranks.py --json $OUT/serve_ranks.json
    python benchmarks/device_serve_ranks.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


PASSES = {"": ([], []),                                        # tag: (flags of both servers, of the ranked one)
          "fp8_replicas_": (["--weights", "fp8"], ["--redundant-experts", "{n}", "--rebalance-every", "4"])}


def measure(n: int, cpu: bool, passes=tuple(PASSES), ranked: bool = True) -> dict:
    """For each pass: one `fewchips serve` process, then (ranked) `torchrun --nproc_per_node=n ... --ep n`,
    on the same prompts; tokens, logprobs, seconds and what each rank holds. ranked=False: the one-process
    server only (what one GPU can check)."""
    import httpx
    import torch

    from inference_utils import save_tiny_model_dir
    result = {"ranks": n, "device": "cpu" if cpu else torch.cuda.get_device_name(0)}
    device = "cpu" if cpu else "auto"
    model_dir = save_tiny_model_dir(tempfile.mkdtemp(prefix="serve_ranks_"), n_routed_experts=8 * max(n, 1))
    prompts = [list(range(5, 5 + k)) for k in (3, 17, 40, 9, 70, 1)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = ["-m", "fewchips", "serve", "--model", model_dir, "--max-len", "128", "--max-batch", "8",
             "--max-prefill-tokens", "32", "--speculative", "none", "--model-name", "m", "--device", device]

    def answers(cmd):
        proc = subprocess.Popen([sys.executable, *cmd, "--port", str(port)], env={**os.environ, "PYTHONPATH": ROOT},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
                got = list(pool.map(lambda p: httpx.post(
                    f"http://127.0.0.1:{port}/v1/completions", timeout=300,
                    json={"model": "m", "prompt": p, "max_tokens": 12, "temperature": 0, "logprobs": 0}).json(),
                    prompts))
            seconds = time.perf_counter() - t0
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=60)
        lps = [g["choices"][0]["logprobs"] for g in got]
        return [x["tokens"] for x in lps], [x["token_logprobs"] for x in lps], seconds, out

    for tag in passes:
        extra, rank_extra = PASSES[tag][0], [a.format(n=n) for a in PASSES[tag][1]]
        one = answers([*serve, *extra])
        result[f"{tag}seconds_one_process"] = one[2]
        result[f"{tag}tokens_one_process"] = sum(map(len, one[0]))
        if not ranked:
            continue
        ranked_ = answers(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *serve, *extra,
                           *rank_extra, "--ep", str(n)])
        result[f"{tag}tokens_equal"] = one[0] == ranked_[0]
        result[f"{tag}max_logprob_diff"] = max(abs(a - b) for x, y in zip(one[1], ranked_[1]) for a, b in zip(x, y))
        result[f"{tag}seconds_ranked"] = ranked_[2]
        result[f"{tag}held"] = [line for line in ranked_[3].splitlines() if "MiB of weights" in line]
        result[f"{tag}replicas"] = [line for line in ranked_[3].splitlines() if line.startswith("expert replicas")]
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    n = 2 if args.cpu_smoke else torch.cuda.device_count()
    if n < 2:
        result = {"ranks": n, "device": torch.cuda.get_device_name(0) if n else "cpu",
                  "skipped": f"needs 2+ GPUs, found {n}"}
    else:
        result = measure(n, args.cpu_smoke)
    print(json.dumps(result, indent=2))
    if args.json:
        json.dump(result, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
