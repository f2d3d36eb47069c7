"""`fewchips plan --search`: the fewest GPUs of one kind, and the layout, that fit a model.

Training: every expert-parallel degree that divides the routed experts, every power-of-two pipeline
depth the model can take under the schedule, and for each the smallest data-parallel degree whose
worst GPU fits (memory falls as dp grows only through ZeRO sharding, so the smallest is found by
bisection). The answer is the layout with the fewest GPUs; among equals, the one with the most
memory to spare. Serving: the layouts `fewchips serve` runs (--ep N: the routed experts split, all
else and the MLA cache replicated), the smallest N whose ranks hold their weights (FP8 under --fp8)
and one context of --seq tokens per --micro-batch sequence.
"""

from __future__ import annotations

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
        return search_serve(cfg, gpu, seq, micro_batch, fp8)
    has_moe = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    eps = [d for d in range(1, cfg.n_routed_experts + 1) if cfg.n_routed_experts % d == 0] if has_moe else [1]
    pps = [1 << k for k in range(0, 12) if (1 << k) <= cfg.num_hidden_layers]
    best, tried = None, 0
    for ep in eps:
        for pp in pps:
            try:
                est.gpu_split(cfg, dp=1, ep=ep, pp=pp, zero=zero, schedule=schedule)
            except ValueError:
                continue
            lo, hi = 1, MAX_DP
            ok_hi, worst_hi = _fits(p, est.gpu_split(cfg, dp=hi, ep=ep, pp=pp, zero=zero, schedule=schedule),
                                    seq, micro_batch, fp8, capacity)
            tried += 1
            if not ok_hi:
                continue
            while lo < hi:                                   # smallest dp that fits
                mid = (lo + hi) // 2
                ok, _ = _fits(p, est.gpu_split(cfg, dp=mid, ep=ep, pp=pp, zero=zero, schedule=schedule),
                              seq, micro_batch, fp8, capacity)
                tried += 1
                lo, hi = (lo, mid) if ok else (mid + 1, hi)
            split = est.gpu_split(cfg, dp=lo, ep=ep, pp=pp, zero=zero, schedule=schedule)
            _, worst = _fits(p, split, seq, micro_batch, fp8, capacity)
            key = (split.gpus, worst)
            if best is None or key < best[0]:
                best = (key, split, worst)
    out = {"mode": "train", "gpu": gpu.name, "capacity_gib": gpu.memory_gib, "seq": seq,
           "micro_batch": micro_batch, "fp8": fp8, "zero": zero, "schedule": schedule, "layouts_tried": tried,
           "memory": memory}
    if best is None:
        return {**out, "gpus": None}
    _, split, worst = best
    return {**out, "gpus": split.gpus, "dp": split.dp, "ep": split.ep, "pp": split.pp,
            "worst_gpu_gib": worst / est.GIB}


def search_serve(cfg: ModelConfig, gpu: GPU, seq: int, sequences: int, fp8: bool) -> dict:
    """The fewest ranks of `fewchips serve --ep N` whose every rank holds its weights (the non-expert ones
    whole, 1/N of the routed experts; the MTP module too, which a GPU server loads) and the MLA cache for
    `sequences` contexts of `seq` tokens (BF16, replicated on every rank: attention is)."""
    capacity = gpu.memory_gib * est.GIB
    mtp = cfg.num_nextn_predict_layers > 0
    cache = cfg.kv_cache_bytes_per_token(2, mtp=mtp) * seq * sequences
    out = {"mode": "serve", "gpu": gpu.name, "capacity_gib": gpu.memory_gib, "seq": seq, "sequences": sequences,
           "fp8": fp8, "kv_gib": cache / est.GIB, "gpus": None}
    has_moe = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    for ep in ([d for d in range(1, cfg.n_routed_experts + 1) if cfg.n_routed_experts % d == 0] if has_moe else [1]):
        held = est.serving_weight_bytes(cfg, ep, fp8, mtp=mtp)
        need = held["total"] + cache
        if need <= capacity:
            return {**out, "gpus": ep, "ep": ep, "weights_gib": held["total"] / est.GIB,
                    "experts_gib": held["experts"] / est.GIB, "rest_gib": held["rest"] / est.GIB,
                    "need_gib": need / est.GIB}
    held = est.serving_weight_bytes(cfg, cfg.n_routed_experts if has_moe else 1, fp8, mtp=mtp)
    return {**out, "rest_gib": held["rest"] / est.GIB, "need_gib": (held["rest"] + cache) / est.GIB}


def render_search(found: dict) -> str:
    prec = "FP8" if found["fp8"] else "BF16"
    if found["mode"] == "serve":
        what = (f"serving ({prec} weights; {found['sequences']} context(s) of {found['seq']} tokens in the MLA cache, "
                f"{found['kv_gib']:,.2f} GiB on every rank)")
        if found["gpus"] is None:
            return (f"{what}: no --ep fits on {found['gpu']} ({found['capacity_gib']:g} GiB): the weights every rank "
                    f"holds whole ({found['rest_gib']:,.1f} GiB) and the cache need {found['need_gib']:,.1f} GiB")
        return (f"{what}: {found['gpus']} x {found['gpu']} at the fewest, as fewchips serve --ep {found['ep']}; each "
                f"rank holds {found['weights_gib']:,.1f} GiB of weights ({found['rest_gib']:,.1f} GiB whole + "
                f"{found['experts_gib']:,.1f} GiB of experts, 1/{found['ep']} of them): {found['need_gib']:,.1f} of "
                f"{found['capacity_gib']:g} GiB")
    held = ("as fewchips train holds it" if found.get("memory") == "fewchips"
            else f"the report's recipe, ZeRO-{found['zero']}")
    what = (f"training ({prec}, micro-batch {found['micro_batch']} x {found['seq']} tokens, {held}, "
            f"{found['schedule']})")
    if found["gpus"] is None:
        return (f"{what}: no layout fits on {found['gpu']} ({found['capacity_gib']:g} GiB) with dp up to "
                f"{MAX_DP}; {found['layouts_tried']} layouts tried. Try --fp8, a shorter --seq or a larger GPU")
    return (f"{what}: {found['gpus']} x {found['gpu']} at the fewest, as dp {found['dp']} x ep {found['ep']} x "
            f"pp {found['pp']}; worst GPU {found['worst_gpu_gib']:,.1f} of {found['capacity_gib']:g} GiB "
            f"({found['layouts_tried']} layouts tried; pp powers of two)")
