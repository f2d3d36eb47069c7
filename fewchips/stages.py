"""How a model's decoder layers are cut into pipeline stages, and which pipeline rank holds each:
shared by the trainer's pipeline (`parallel.pipeline`) and the planner (`plan`), so both speak the
same layout. Plain Python: the planner does not import torch.

Stages are contiguous runs of decoder layers. The last stage also runs the output head and the MTP
module (about four layers' work on V3), so layers are split by cost (`layer_costs`, `balanced_split`),
not count. V schedules (DualPipeV, ZBV) put two stages on each rank in a V: rank r holds stages r and
2·pp−1−r, so the embedding and the head + MTP share rank 0.
"""

from __future__ import annotations

import functools

V_SCHEDULES = ("dualpipev", "zbv")


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule in V_SCHEDULES + ("interleaved1f1b",) else 1


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous runs of decoder layers, as even as the count allows (the first runs take the extra)."""
    if n_stages > n_layers:
        raise ValueError(f"{n_stages} pipeline stages for {n_layers} decoder layers: at most one stage per layer")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (s < extra)
        out.append(range(start, start + n))
        start += n
    return out


def layer_costs(cfg, seq_len: int = 0) -> tuple[list[float], float]:
    """Forward FLOPs per token of each decoder layer (activated matmuls, and causal attention at
    `seq_len`), and what the last stage adds: the output head and each MTP depth (a MoE layer, its
    projection and the head again). The cost model of a balanced split."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * qk if cfg.q_lora_rank else D * H * qk
    kv = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attn = 2 * (q + kv + H * cfg.v_head_dim * D) + 2 * H * (qk + cfg.v_head_dim) * seq_len / 2
    moe = 2 * (3 * D * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
               + D * cfg.n_routed_experts)
    dense = 2 * 3 * D * cfg.intermediate_size
    costs = [attn + (moe if cfg.is_moe_layer(i) else dense) for i in range(cfg.num_hidden_layers)]
    head = 2 * D * cfg.vocab_size
    extra = head + cfg.num_nextn_predict_layers * (attn + moe + 2 * 2 * D * D + head)
    return costs, extra


def balanced_split(costs: list[float], extra: float, owners: list[int]) -> list[range]:
    """Contiguous runs of layers, one per stage (at least one layer each), that even out the work of the
    ranks (`owners[s]` holds stage s; the last stage also does `extra`). Local search from the even
    split: shift any run of consecutive boundaries by one layer while that lowers the ranks' work,
    busiest first. (Cached: the planner asks for the same split for many layouts.)"""
    return list(_balanced_split(tuple(costs), extra, tuple(owners)))


@functools.lru_cache(maxsize=256)
def _balanced_split(costs: tuple[float, ...], extra: float, owners: tuple[int, ...]) -> tuple[range, ...]:
    n, n_stages = len(costs), len(owners)
    cuts = [r.stop for r in split_layers(n, n_stages)][:-1]       # stage s is layers [cuts[s-1], cuts[s])
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def load(cuts):
        bounds = [0, *cuts, n]
        work = [0.0] * (max(owners) + 1)
        for s in range(n_stages):
            work[owners[s]] += prefix[bounds[s + 1]] - prefix[bounds[s]] + (extra if s == n_stages - 1 else 0.0)
        return max(work), sorted(work, reverse=True)

    def valid(c):
        return all(a < b for a, b in zip((0, *c), (*c, n)))

    best = load(cuts)
    improved = True
    while improved:
        improved = False
        for k1 in range(len(cuts)):
            for k2 in range(k1, len(cuts)):
                for step in (-1, 1):
                    new = [c + step if k1 <= i <= k2 else c for i, c in enumerate(cuts)]
                    if valid(new) and (cand := load(new)) < best:
                        cuts, best, improved = new, cand, True
    bounds = [0, *cuts, n]
    return tuple(range(bounds[s], bounds[s + 1]) for s in range(n_stages))


def stage_ranks(pp: int, n_stages: int, schedule: str) -> list[int]:
    """The pipeline rank that holds each stage: a V for V schedules, round robin otherwise."""
    if schedule in V_SCHEDULES:
        return [s if s < pp else 2 * pp - 1 - s for s in range(n_stages)]
    return [s % pp for s in range(n_stages)]
