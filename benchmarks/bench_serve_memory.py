"""Peak memory per rank of `fewchips serve` in one process and at --ep 2 / --ep 4 under torchrun (gloo,
CPU): each rank's high-water RSS (VmHWM) and its anonymous memory (RssAnon: without the checkpoint's
file pages, which safetensors maps and the kernel may drop) after start-up and one answered request,
against what it should hold: the non-expert weights whole + 1/N of the routed experts + the latent cache.
A parameter-heavy MoE config (hidden 256, 6 layers with the first dense, 64 routed experts of width 512,
top-4, MTP 1, vocab 2,048: ~157M parameters, 96% routed experts), random weights saved in fp32.

    python benchmarks/bench_serve_memory.py [--layouts 1 2 4] [--weights fp8]

`--weights fp8` serves the same fp32 checkpoint with its linears and experts block-quantised to E4M3 on
load (1 byte per weight + 4 per 128x128 block); the expected figure is then the planner's
(`fewchips.plan.estimate.serving_weight_bytes`, which `fewchips plan --search serve` uses).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def make_model(path):
    import torch

    from fewchips import DeepseekV3, ModelConfig, save_pretrained
    from fewchips.train.tokenizer import save_tokenizer, train_tokenizer
    cfg = ModelConfig.from_preset("tiny", hidden_size=256, num_hidden_layers=6, n_routed_experts=64,
                                  moe_intermediate_size=512, num_experts_per_tok=4, n_group=4, topk_group=2,
                                  vocab_size=2048)
    with torch.device("meta"):
        model = DeepseekV3(cfg)
    model.to_empty(device="cpu")
    model.init_weights(0.02, seed=0)
    save_pretrained(model, path)
    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 50], 2048)
    save_tokenizer(tok, path)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    return cfg, total, experts


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def workers(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's workers (or {0: parent} for one process)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if ppid == parent and b"RANK" in env:
            out[int(env[b"RANK"])] = int(pid)
    return out or {0: parent}


def run(n: int, model_dir: str, weights: str = "dense"):
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = ["-m", "fewchips", "serve", "--model", model_dir, "--port", str(port), "--max-len", "512",
             "--max-batch", "8", "--threads", "1", "--device", "cpu", "--speculative", "none", "--model-name", "m",
             "--weights", weights]
    cmd = [sys.executable, *serve] if n == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *serve, "--ep", str(n)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300,
                       json={"model": "m", "prompt": "def f(x):", "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        return {rank: (status_kib(pid, "VmHWM") / 1024, status_kib(pid, "RssAnon") / 1024)
                for rank, pid in sorted(workers(proc.pid).items())}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def idle_mib() -> float:
    """An interpreter with torch, fastapi and fewchips imported: what every rank pays before any weight."""
    code = ("import torch, fastapi, uvicorn, fewchips.inference.server, fewchips.inference.ranks\n"
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon:')))")
    return int(subprocess.check_output([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT})) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--weights", default="dense", choices=["dense", "fp8"])
    args = ap.parse_args()
    from fewchips.plan.estimate import serving_weight_bytes
    tmp = tempfile.mkdtemp(prefix="bench_serve_memory_")
    cfg, total, experts = make_model(tmp)
    idle = idle_mib()
    cache = 8 * 512 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4 / 2**20
    print(f"{total / 1e6:.0f}M parameters ({experts / total:.0%} routed experts), fp32 checkpoint served "
          f"{'as FP8 E4M3 (linears and experts)' if args.weights == 'fp8' else 'in fp32'}; cache {cache:.1f} MiB "
          f"(8 requests x 512 tokens); an idle interpreter with the server imported: {idle:.0f} MiB anonymous")
    print(f"{'layout':>8} {'rank':>4} {'peak RSS':>9} {'anonymous':>10} {'above idle':>11} {'expected':>9}  (MiB; "
          f"expected = non-expert weights + experts / N + cache; peak RSS also counts the checkpoint's mapped pages)")
    for n in args.layouts:
        expected = serving_weight_bytes(cfg, n, fp8=args.weights == "fp8", dtype_bytes=4, mtp=False)["total"] / 2**20 \
            + cache
        for rank, (peak, anon) in run(n, tmp, args.weights).items():
            print(f"{'1 proc' if n == 1 else f'ep {n}':>8} {rank:>4} {peak:>9,.0f} {anon:>10,.0f} "
                  f"{anon - idle:>11,.0f} {expected:>9,.0f}")


if __name__ == "__main__":
    main()
