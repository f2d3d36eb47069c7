"""FP8 (DeepSeek-V3 block-wise recipe) versus BF16 on one Hopper GPU: GEMMs, a linear layer and the
grouped experts forward+backward at DeepSeek-V3 shapes, and whole training steps of a ~1.5B MoE.

    python benchmarks/device_fp8.py                 # a few minutes on an H100/H200; JSON to $OUT or runs/
    python benchmarks/device_fp8.py --cpu-smoke     # tiny shapes, emulated, on CPU: checks the script itself

Without CUDA (and without --cpu-smoke) it prints one line and exits 0. Every section is timed with
CUDA events after warm-up; a section that fails is recorded with its error and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fewchips.config import ModelConfig                                          # noqa: E402
from fewchips.fp8 import FP8Linear, FP8RoutedExperts, apply_fp8, fp8_linear       # noqa: E402
from fewchips.fp8.gemm import fast_path_available, fp8_mm                         # noqa: E402
from fewchips.fp8.quant import BLOCK, TILE, quantize                              # noqa: E402
from fewchips.model import DeepseekV3, RoutedExperts                              # noqa: E402


def timed(fn, device, warmup=3, iters=10):
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def section(results, name, path):
    def deco(fn):
        t0 = time.time()
        try:
            results[name] = fn()
        except Exception as e:                                    # noqa: BLE001 - record and go on
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        print(f"== {name} ({time.time() - t0:.1f}s)\n{json.dumps(results[name], indent=1, default=str)[:3000]}",
              flush=True)
        with open(path, "w") as f:                                # after every section: a timeout keeps the rest
            json.dump(results, f, indent=1, default=str)
        return fn
    return deco


def correctness(dev, backend):
    """Relative error of the fast path against the emulation (y, dx, dw) and of FP8 against fp32."""
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(512, 1024, device=dev, generator=g)
    w = torch.randn(768, 1024, device=dev, generator=g) * 0.02
    dy = torch.randn(512, 768, device=dev, generator=g)
    outs = {}
    for b in ("emulate", backend):
        xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fp8_linear(xb, wb, b)
        y.backward(dy)
        outs[b] = (y, xb.grad, wb.grad)
    ref = x @ w.t()
    return {"y": rel(outs[backend][0], outs["emulate"][0]), "dx": rel(outs[backend][1], outs["emulate"][1]),
            "dw": rel(outs[backend][2], outs["emulate"][2]), "fp8_vs_fp32_y": rel(outs[backend][0], ref)}


def gemm_case(dev, backend, m, k, n, b_block, it):
    a = torch.randn(m, k, device=dev)
    bm = torch.randn(n, k, device=dev) * 0.02
    aq, as_ = quantize(a, TILE)
    bq, bs = quantize(bm, b_block)
    a16, b16 = a.bfloat16(), bm.bfloat16()
    t16 = timed(lambda: a16 @ b16.t(), dev, **it)
    t8 = timed(lambda: fp8_mm(aq, as_, bq, bs, b_block, torch.bfloat16, backend), dev, **it)
    tq = timed(lambda: quantize(a16, TILE), dev, **it)
    fl = 2 * m * k * n
    return {"shape_MKN": [m, k, n], "bf16_tflops": fl / t16 / 1e12, "fp8_tflops": fl / t8 / 1e12,
            "speedup": t16 / t8, "quantise_1x128_ms": tq * 1e3, "bf16_ms": t16 * 1e3, "fp8_ms": t8 * 1e3}


def gemm_cases(dev, backend, M, D, FD, FE, it):
    """The V3 GEMMs (hidden D, dense FFN FD, expert FFN FE; M tokens), operands pre-quantised."""
    return {"dense up  x[M,7168] W[18432,7168]": gemm_case(dev, backend, M, D, FD, BLOCK, it),
            "dense down x[M,18432] W[7168,18432]": gemm_case(dev, backend, M, FD, D, BLOCK, it),
            "expert up x[M,7168] W[2048,7168]": gemm_case(dev, backend, M, D, FE, BLOCK, it),
            "wgrad dense up dy^T[18432,M] x^T[7168,M]": gemm_case(dev, backend, FD, M, D, TILE, it)}


def quantise_cost(dev, M, D, FD, it):
    out = {}
    cq = torch.compile(quantize, dynamic=False)
    for name, shape, block in (("activation 1x128", (M, D), TILE), ("weight 128x128", (FD, D), BLOCK)):
        x = torch.randn(*shape, device=dev, dtype=torch.bfloat16)
        te = timed(lambda: quantize(x, block), dev, **it)
        tc = timed(lambda: cq(x, block), dev, **it)
        q1, s1 = quantize(x, block)
        q2, s2 = cq(x, block)
        same = torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)
        gbps = x.numel() * 3 / 1e9                                  # read bf16 + write fp8, ideal
        out[name] = {"shape": list(shape), "eager_ms": te * 1e3, "compiled_ms": tc * 1e3,
                     "compiled_GBps_ideal": gbps / tc, "bitwise_equal": same}
    return out


def linear_case(dev, backend, M, k, n, it):
    x = torch.randn(M, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, n, device=dev, dtype=torch.bfloat16)
    lin = torch.nn.Linear(k, n, bias=False, device=dev)                          # fp32 master weight
    f8 = FP8Linear.from_linear(lin, backend)

    def step(layer):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            y = layer(x)
        y.backward(dy)
        x.grad = lin.weight.grad = None
    t16, t8 = timed(lambda: step(lin), dev, **it), timed(lambda: step(f8), dev, **it)
    fl = 6 * M * k * n
    return {"shape_MKN": [M, k, n], "bf16_tflops": fl / t16 / 1e12, "fp8_tflops": fl / t8 / 1e12,
            "speedup": t16 / t8, "bf16_ms": t16 * 1e3, "fp8_ms": t8 * 1e3}


def experts_case(dev, backend, M, D, FE, E, it):
    """SwiGLU over E local experts, ~2 copies of each of M tokens, a little imbalance; bf16 against FP8."""
    ex = RoutedExperts(E, D, FE).to(dev)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.006)
    torch.nn.init.normal_(ex.down_proj, std=0.006)
    per = M * 2 // E                                                # 2 copies per token on average
    counts = torch.full((E,), per, device=dev)
    counts[0] += per // 2
    counts[1] -= per // 2                                           # a little imbalance
    x = torch.randn(int(counts.sum()), D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(x.shape[0], D, device=dev, dtype=torch.bfloat16)
    ex16 = RoutedExperts(E, D, FE).to(dev).bfloat16()
    with torch.no_grad():
        ex16.gate_up_proj.copy_(ex.gate_up_proj)
        ex16.down_proj.copy_(ex.down_proj)
    f8 = FP8RoutedExperts.from_experts(ex, backend)

    def step(mod):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            y = mod.expert_ffn(x, counts)
        y.backward(dy)
        x.grad = None
        for p_ in mod.parameters():
            p_.grad = None
    t16, t8 = timed(lambda: step(ex16), dev, **it), timed(lambda: step(f8), dev, **it)
    fl = 6 * x.shape[0] * 3 * D * FE
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        err = rel(f8.expert_ffn(x, counts), ex16.expert_ffn(x, counts))
    return {"experts": E, "rows": x.shape[0], "bf16_tflops": fl / t16 / 1e12, "fp8_tflops": fl / t8 / 1e12,
            "speedup": t16 / t8, "bf16_ms": t16 * 1e3, "fp8_ms": t8 * 1e3, "fp8_vs_bf16_rel_err": err,
            "note": "the FP8 path runs one block-wise scaled_mm per expert (torch has no block-wise grouped GEMM)"}


def train_run(model, ids, dev, fp8_backend=None, warmup=2, iters=5):
    """Whole training steps of `model` (autocast bf16, fp32 master weights, AdamW) on one repeated batch of
    windows ids [B, T+1]: the median step, and every step's loss (warm-up first). fp8_backend: the FP8
    recipe applied first."""
    if fp8_backend:
        apply_fp8(model, fp8_backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    losses = []

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = timed(step, dev, warmup=warmup, iters=iters)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    return {"params": sum(p_.numel() for p_ in model.parameters()), "tokens": tokens, "step_s": t,
            "tok_per_s": tokens / t, "losses": losses,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "runs"), help="folder for device_fp8.json")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, emulated, on CPU")
    p.add_argument("--skip-step", action="store_true", help="skip the whole-model training steps")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per GEMM / per training step")
    args = p.parse_args()

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("device_fp8: no CUDA device; nothing to measure (use --cpu-smoke to check the script)")
        return 0
    dev = torch.device("cpu" if smoke else "cuda")
    fast, why = (False, "cpu smoke") if smoke else fast_path_available(dev)
    backend = "scaled_mm" if fast else "emulate"
    M = 256 if smoke else args.tokens
    D, FD, FE = (256, 384, 128) if smoke else (7168, 18432, 2048)       # hidden, dense FFN, expert FFN
    results = {"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__,
               "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(dev) if not smoke else "cpu",
               "capability": list(torch.cuda.get_device_capability(dev)) if not smoke else None,
               "fast_path": fast, "fast_path_reason": why, "backend": backend}
    print(json.dumps(results, indent=1), flush=True)
    it = dict(warmup=1, iters=2) if smoke else {}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "device_fp8.json")

    @section(results, "correctness: fast path vs emulation (relative error)", path)
    def _():
        return correctness(dev, backend)

    @section(results, "gemm only (operands pre-quantised)", path)
    def _():
        return gemm_cases(dev, backend, M, D, FD, FE, it)

    @section(results, "quantisation cost: eager PyTorch vs torch.compile (the fusion the fast path needs)", path)
    def _():
        return quantise_cost(dev, M, D, FD, it)

    @section(results, "linear forward+backward (autocast bf16, fp32 master weight, quantisation included)", path)
    def _():
        return {"dense up 7168->18432": linear_case(dev, backend, M, D, FD, it),
                "dense down 18432->7168": linear_case(dev, backend, M, FD, D, it)}

    @section(results, "grouped experts forward+backward (SwiGLU, 32 local experts, 7168x2048)", path)
    def _():
        return experts_case(dev, backend, M, D, FE, 8 if smoke else 32, it)

    if not args.skip_step:
        @section(results, "training step (~1.5B-parameter MoE, AdamW, autocast bf16)", path)
        def _():
            if smoke:
                cfg = ModelConfig.from_preset("tiny", num_nextn_predict_layers=0)
                B, T = 2, 64
            else:
                cfg = ModelConfig(vocab_size=32768, hidden_size=2048, num_hidden_layers=12, intermediate_size=5632,
                                  num_attention_heads=16, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128,
                                  qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1,
                                  moe_intermediate_size=1024, n_routed_experts=16, n_shared_experts=1,
                                  num_experts_per_tok=4, n_group=4, topk_group=2, rope_scaling=None,
                                  max_position_embeddings=4096, num_nextn_predict_layers=0)
                B, T = args.tokens // 2048, 2048
            out = {}
            for kind in ("bf16", "fp8"):
                torch.manual_seed(0)
                model = DeepseekV3(cfg).to(dev).init_weights()
                ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev)
                r = train_run(model, ids, dev, backend if kind == "fp8" else None, warmup=2, iters=1 if smoke else 5)
                out[kind] = {**{k: v for k, v in r.items() if k != "losses"}, "first_losses": r["losses"][:3]}
                del model
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            out["speedup"] = out["bf16"]["step_s"] / out["fp8"]["step_s"]
            return out

    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
