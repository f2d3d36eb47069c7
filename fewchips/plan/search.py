"""`fewchips plan --search`: the fewest GPUs of one kind, and the layout, that fit a model.

Training: every expert-parallel degree that divides the routed experts, every power-of-two pipeline
depth the model can take under the schedule, and for each the smallest data-parallel degree whose
worst GPU fits (memory falls as dp grows only through ZeRO sharding, so the smallest is found by
bisection). The answer is the layout with the fewest GPUs; among equals, the one with the most
memory to spare. Serving: the weights (FP8 under --fp8) and one context of --seq tokens per
--micro-batch sequence in the MLA cache.
"""

from __future__ import annotations

import math

from fewchips.config import ModelConfig
from fewchips.plan import estimate as est
from fewchips.plan.gpus import GPU

MAX_DP = 1 << 14


def search(cfg: ModelConfig, gpu: GPU, mode: str = "train", seq: int = 4096, micro_batch: int = 1,
           fp8: bool = False, zero: int = 1, schedule: str = "dualpipev", memory: str = "report",
           bf16_moments: bool = False) -> dict:
    """`memory`: whose accounting a layout must fit, the report's recipe or what fewchips train holds
    (`estimate.training_memory`)."""
    def _fits(p, layout, seq, micro_batch, fp8, capacity) -> tuple[bool, float]:
        worst = max(s.total for s in est.training_memory(p, layout, seq, micro_batch, fp8, memory, bf16_moments))
        return worst <= capacity, worst

    p = est.count_params(cfg)
    capacity = gpu.memory_gib * est.GIB
    if mode == "serve":
        kv = est.serving_terms(p, gpu, 1, seq, fp8)
        weights = next(t.value for t in kv if t.name == "serving weights")
        per_token = next(t.value for t in kv if t.name == "KV cache per token")
        need = weights + per_token * seq * micro_batch
        n = max(1, math.ceil(need / capacity))
        return {"mode": "serve", "gpu": gpu.name, "gpus": n, "weights_gib": weights / est.GIB,
                "kv_gib": per_token * seq * micro_batch / est.GIB, "need_gib": need / est.GIB,
                "capacity_gib": gpu.memory_gib, "seq": seq, "sequences": micro_batch, "fp8": fp8}
    has_moe = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    eps = [d for d in range(1, cfg.n_routed_experts + 1) if cfg.n_routed_experts % d == 0] if has_moe else [1]
    pps = [1 << k for k in range(0, 12) if (1 << k) <= cfg.num_hidden_layers]
    best, tried = None, 0
    for ep in eps:
        for pp in pps:
            try:
                est.make_layout(cfg, dp=1, ep=ep, pp=pp, zero=zero, schedule=schedule)
            except ValueError:
                continue
            lo, hi = 1, MAX_DP
            ok_hi, worst_hi = _fits(p, est.make_layout(cfg, dp=hi, ep=ep, pp=pp, zero=zero, schedule=schedule),
                                    seq, micro_batch, fp8, capacity)
            tried += 1
            if not ok_hi:
                continue
            while lo < hi:                                   # smallest dp that fits
                mid = (lo + hi) // 2
                ok, _ = _fits(p, est.make_layout(cfg, dp=mid, ep=ep, pp=pp, zero=zero, schedule=schedule),
                              seq, micro_batch, fp8, capacity)
                tried += 1
                lo, hi = (lo, mid) if ok else (mid + 1, hi)
            layout = est.make_layout(cfg, dp=lo, ep=ep, pp=pp, zero=zero, schedule=schedule)
            _, worst = _fits(p, layout, seq, micro_batch, fp8, capacity)
            key = (layout.gpus, worst)
            if best is None or key < best[0]:
                best = (key, layout, worst)
    out = {"mode": "train", "gpu": gpu.name, "capacity_gib": gpu.memory_gib, "seq": seq,
           "micro_batch": micro_batch, "fp8": fp8, "zero": zero, "schedule": schedule, "layouts_tried": tried,
           "memory": memory}
    if best is None:
        return {**out, "gpus": None}
    _, layout, worst = best
    return {**out, "gpus": layout.gpus, "dp": layout.dp, "ep": layout.ep, "pp": layout.pp,
            "worst_gpu_gib": worst / est.GIB}


def render_search(found: dict) -> str:
    prec = "FP8" if found["fp8"] else "BF16"
    if found["mode"] == "serve":
        return (f"serving: {found['gpus']} x {found['gpu']} ({found['capacity_gib']:g} GiB each) hold the "
                f"{prec} weights ({found['weights_gib']:,.1f} GiB) and {found['sequences']} context(s) of "
                f"{found['seq']} tokens in the MLA cache ({found['kv_gib']:,.2f} GiB): {found['need_gib']:,.1f} GiB")
    held = "as fewchips train holds it" if found.get("memory") == "fewchips" else f"the report's recipe, ZeRO-{found['zero']}"
    what = (f"training ({prec}, micro-batch {found['micro_batch']} x {found['seq']} tokens, {held}, "
            f"{found['schedule']})")
    if found["gpus"] is None:
        return (f"{what}: no layout fits on {found['gpu']} ({found['capacity_gib']:g} GiB) with dp up to "
                f"{MAX_DP}; {found['layouts_tried']} layouts tried. Try --fp8, a shorter --seq or a larger GPU")
    return (f"{what}: {found['gpus']} x {found['gpu']} at the fewest, as dp {found['dp']} x ep {found['ep']} x "
            f"pp {found['pp']}; worst GPU {found['worst_gpu_gib']:,.1f} of {found['capacity_gib']:g} GiB "
            f"({found['layouts_tried']} layouts tried; pp powers of two)")
