"""The NCCL path end to end on one GPU, in a few minutes: `python benchmarks/device_parallel.py`.

One process, a one-rank NCCL group (two ranks cannot share one GPU under NCCL), the same code as N:
  1. fp32: the parallelized model (expert all-to-all, FSDP2) gives the single-process loss and gradients,
     and the MoE stats come back from every layer, as in one process
  2. all-to-all dispatch/combine round trip on NCCL, exact
  3. bf16 mixed precision (FSDP param_dtype, fp32 reduce): loss close to fp32 and falling on a repeated batch
  4. sharded checkpoint save -> load -> same loss; export to a Hugging Face directory -> same loss
  5. throughput of the small preset (bf16): tokens/s and all-to-all share
Prints one JSON line per check and exits non-zero if any fails; skips (exit 0) without CUDA.
Writes results.json under $OUT when set.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def run_checks(cpu: bool, on_row=None) -> tuple[list[dict], bool]:
    """The five checks in this process (one-rank group: NCCL, or gloo with cpu=True); every row is
    printed and handed to on_row(rows so far) as soon as it is measured. Returns (rows, all passed)."""
    import torch.distributed as dist
    from model_utils import lm_loss, random_model, tiny_config, train_step

    from fewchips import DeepseekV3, ModelConfig, from_pretrained
    from fewchips.parallel import (ExpertParallelExperts, init_parallel, parallelize,
                                   shutdown)
    from fewchips.checkpoint import sharded as pckpt
    from fewchips.parallel.expert_parallel import comm_seconds

    results, ok = [], True

    def report(name, passed, **kw):
        nonlocal ok
        ok &= bool(passed)
        row = {"check": name, "passed": bool(passed), **kw}
        results.append(row)
        print(json.dumps(row), flush=True)
        if on_row:
            on_row(results)

    par = init_parallel(ep=1, backend="gloo" if cpu else "nccl", timeout_s=120)
    dev = par.device
    cfg = tiny_config()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=g).to(dev)

    # 1. fp32 parity
    ref = random_model(cfg).train().to(dev)
    model = parallelize(copy.deepcopy(ref), par)
    loss, stats = lm_loss(model, ids)
    loss.backward()
    ref_loss, ref_stats = lm_loss(ref, ids)
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    worst = max(((p.grad.full_tensor() - ref_grads[n].grad).abs().max() /
                 (ref_grads[n].grad.abs().max() + 1e-30)).item() for n, p in model.named_parameters())
    report("fp32_parity", abs(loss.item() - ref_loss.item()) < 1e-4 and worst < 1e-3
           and torch.equal(stats.load.cpu(), ref_stats.load.cpu()),
           loss=loss.item(), ref_loss=ref_loss.item(), grad_rel_err=worst, moe_layers=stats.load.shape[0])

    # 2. all-to-all round trip on NCCL
    E, K, D, M = 8, 3, 16, 64
    mod = ExpertParallelExperts(E, torch.zeros(E, 2, D, device=dev), torch.zeros(E, D, 1, device=dev), par)
    experts_MK = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(M)])
    x = torch.arange(M * D, device=dev, dtype=torch.float32).view(M, D)
    flat = experts_MK.reshape(-1)
    order = flat.argsort(stable=True)
    y_sorted = mod.exchange(x[order // K], torch.bincount(flat, minlength=E),
                            lambda xl, c: xl + torch.repeat_interleave(torch.arange(E, device=dev), c)[:, None].float())
    y = torch.zeros_like(x).index_add_(0, order // K, y_sorted)
    report("a2a_roundtrip", torch.equal(y, K * x + experts_MK.sum(1, keepdim=True).float()))

    # 3. bf16 mixed precision
    bf = parallelize(random_model(cfg).train().to(dev), par, param_dtype=torch.bfloat16)
    opt = torch.optim.AdamW(bf.parameters(), lr=3e-3)
    losses = [train_step(bf, opt, ids, par) for _ in range(8)]
    report("bf16_mixed_precision", abs(losses[0] - ref_loss.item()) < 5e-2 and losses[-1] < losses[0] - 0.1,
           losses=[round(v, 4) for v in losses])

    # 4. sharded checkpoint + export
    with tempfile.TemporaryDirectory() as tmp:
        ck = os.path.join(tmp, "ckpt")
        pckpt.save(ck, bf, opt, extra={"step": 8})
        with torch.no_grad():
            before = lm_loss(bf, ids)[0].item()
        fresh = parallelize(random_model(cfg, seed=5).train().to(dev), par, param_dtype=torch.bfloat16)
        opt2 = torch.optim.AdamW(fresh.parameters(), lr=3e-3)
        extra = pckpt.load(ck, fresh, opt2)
        with torch.no_grad():
            after = lm_loss(fresh, ids)[0].item()
        pckpt.export_hf(ck, os.path.join(tmp, "hf"))
        hf = from_pretrained(os.path.join(tmp, "hf")).to(dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            exported = lm_loss(hf, ids)[0].item()
        # CUDA's index_add_ sums with atomics (order varies), so bf16 reruns differ in the last bits
        report("checkpoint", extra["step"] == 8 and abs(after - before) < 2e-2 and abs(exported - before) < 5e-2,
               before=before, after_load=after, exported_autocast=exported)

    # 5. small-preset throughput
    scfg = ModelConfig.from_preset("tiny" if cpu else "small")
    big = parallelize(DeepseekV3(scfg).init_weights(generator=torch.Generator().manual_seed(0)).to(dev).train(),
                      par, param_dtype=torch.bfloat16)
    opt = torch.optim.AdamW(big.parameters(), lr=1e-4)
    B, T = (2, 64) if cpu else (8, 1024)
    ids = torch.randint(0, scfg.vocab_size, (B, T + 1), device=dev)      # windows: T inputs
    train_step(big, opt, ids, par)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    comm_seconds(big, reset=True)
    t0, n = time.perf_counter(), 5
    for _ in range(n):
        out = train_step(big, opt, ids, par)
    sync()
    dt = (time.perf_counter() - t0) / n
    report("small_throughput", out == out, tokens_per_s=B * T / dt, step_s=dt,
           a2a_share=comm_seconds(big) / (dt * n),
           peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None)

    dist.barrier()
    shutdown()
    return results, ok


def main() -> int:
    cpu = "--cpu" in sys.argv          # a dry run of the same checks with gloo on CPU (tiny preset)
    if not torch.cuda.is_available() and not cpu:
        print("device_parallel: no CUDA device; skipped")
        return 0

    def save(rows):                    # after every check: a crash or timeout keeps what was measured
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "results.json"), "w") as f:
                json.dump(rows, f, indent=1)
    _, ok = run_checks(cpu, save)
    print("device_parallel:", "all checks passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
