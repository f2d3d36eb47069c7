"""Back-of-the-envelope planning for a DeepSeek-V3-style model: parameters, FLOPs, memory, time.

Every number comes with the formula that produced it (`Term.formula`, printed by `--explain`).
Parameters are counted from the real module tree on the meta device, never from a separate formula;
the FLOPs, memory and time follow from those counts and the config.

Conventions (arXiv 2412.19437 §3):
- FLOPs per token: a matmul with N weights costs 2N FLOPs per token forward; backward costs twice
  the forward (input and weight gradients), so training = 3 x forward. Causal attention at sequence
  length S attends to (S+1)/2 positions on average. Recomputation is not counted (that is what makes
  it *model* FLOPs utilisation).
- Training memory, as in the report: working weights in BF16 (or FP8 for the linears the recipe runs
  in FP8), gradients accumulated in FP32, FP32 master weights and BF16 AdamW moments (8 bytes per
  parameter) sharded over data parallelism by ZeRO-1.
- Parallelism: gpus = dp x ep x pp and no tensor parallelism (the report's layout). Expert
  parallelism shards the routed experts of each layer over `ep` GPUs that each run their own data,
  so non-expert weights have dp x ep data-parallel replicas and expert weights have dp.
- Pipeline schedules (report §3.2.1, Table 2), with F, B, W the time of a chunk's forward, full
  backward and weight-gradient backward, and F&B an overlapped forward/backward pair:
      1f1b       stage s keeps pp - s micro-batches in flight;     bubble (PP-1)(F+B)
      zb1p       as 1F1B, the weight gradients fill the bubble;    bubble (PP-1)(F+B-2W)
      dualpipe   each GPU holds two stages (2x parameters), PP+1 stage activations; bubble (PP/2-1)(F&B+B-3W)
      dualpipev  the cut-in-half DualPipe: pp GPUs hold 2pp chunks in a V (1x parameters), 2pp+1 chunk
                 activations; bubble (PP-1)(F&B+B-3W) with PP = pp GPUs (torch's ScheduleDualPipeV)
  Embedding on the first stage; head and MTP on the last (under dualpipev both on GPU 0). Unless
  measured times are given, F : B : W = 1 : 2 : 1 (FLOPs) and F&B = F + B.
- Memory is in GiB (2^30 bytes); a GPU's vendor capacity is read as GiB (see gpus.py).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field

from fewchips.config import ModelConfig
from fewchips.plan.gpus import GPU
from fewchips.stages import balanced_split, layer_costs, stage_ranks

GIB = 2 ** 30

# DeepSeek-V3 report, Table 1: pre-training on 14.8T tokens took 2,664K H800 GPU-hours.
REPORT_PRETRAIN_GPU_HOURS = 2_664_000
REPORT_TOKENS = 14.8e12
REPORT_SEQ = 4096
REPORT_PRICE = 2.0    # USD per H800 GPU-hour, the report's rental assumption

# Bytes per parameter for training state, as in the report (section 3.3.3).
GRAD_BYTES = 4        # FP32 gradient accumulation
MASTER_BYTES = 4      # FP32 master weights (in the optimizer)
MOMENT_BYTES = 2 + 2  # BF16 AdamW first and second moments
FP8_WEIGHT_BYTES = 1 + 4 / (128 * 128)   # E4M3 plus one FP32 scale per 128x128 block
FP8_ACT_BYTES = 1 + 4 / 128              # E4M3 plus one FP32 scale per 1x128 tile
E5M6_BYTES = 1.5                          # the attention output kept for o_proj's backward (report 3.3)

# Parameter categories; the routed experts are the only ones activated sparsely.
FP8_LINEARS = ("attention", "dense_ffn", "shared_experts", "routed_experts")   # the report runs these in FP8


@dataclass
class Term:
    """One line of the plan: a value and the formula behind it."""
    name: str
    value: float
    formula: str = ""
    unit: str = ""


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}
_NUMBER = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?|\.[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgtp]?)\s*$",
                     re.IGNORECASE)


def parse_count(text, what: str = "value") -> float:
    """'14.8T', '500B', '2,664K', '2e12', '4096' -> a positive number. K/M/B/T are 1e3/1e6/1e9/1e12
    (B is billions, not bytes)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _NUMBER.match(str(text))
        if not m:
            raise ValueError(f"{what}: cannot read {text!r}; use a number with an optional K/M/B/T "
                             f"suffix, e.g. 14.8T, 500B, 2e12")
        digits = m.group(1).replace(",", "").replace("_", "")
        try:
            value = float(digits) * _SUFFIX[m.group(2).lower()]
        except ValueError:
            raise ValueError(f"{what}: cannot read {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what}: must be a positive finite number, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Parameters, from the module tree
# ---------------------------------------------------------------------------------------------

@dataclass
class Block:
    """A unit the pipeline places whole: the embedding, one decoder layer, the head, one MTP layer."""
    name: str
    kind: str                      # embedding | dense | moe | head | mtp
    params: dict[str, int] = field(default_factory=dict)

    def total(self, cats=None) -> int:
        return sum(v for k, v in self.params.items() if cats is None or k in cats)


@dataclass
class Params:
    cfg: ModelConfig
    blocks: list[Block]
    counts: dict[str, int]         # DeepseekV3.num_parameters()

    def sum(self, cat: str, part: str = "main") -> int:
        return sum(b.params.get(cat, 0) for b in self.blocks if (b.kind == "mtp") == (part == "mtp"))

    @property
    def active_fraction(self) -> float:
        return self.cfg.num_experts_per_tok / self.cfg.n_routed_experts

    def matmul_active(self, part: str = "main") -> float:
        """Weights a token multiplies by (embedding lookup and norms excluded; top-k experts only)."""
        cats = ("attention", "dense_ffn", "shared_experts", "router", "mtp_proj", "other")
        n = sum(self.sum(c, part) for c in cats) + self.sum("routed_experts", part) * self.active_fraction
        return n + (self.head_matmul if part == "main" else 0)

    @property
    def head_matmul(self) -> int:
        return self.cfg.vocab_size * self.cfg.hidden_size   # a matmul whether or not it is tied


def _category(name: str, ndim: int) -> tuple[str, str]:
    """(block, category) of a parameter from its name in the module tree."""
    if name.startswith("model.embed_tokens."):
        return "embedding", "embedding"
    if name.startswith("lm_head.") or name.startswith("model.norm."):
        return "head", "head" if ndim >= 2 else "norm"
    m = re.match(r"^(model\.layers|mtp)\.(\d+)\.(.*)$", name)
    if not m:
        return "other", "other"
    block = ("layer " if m.group(1) == "model.layers" else "mtp ") + m.group(2)
    rest = m.group(3)
    if ndim < 2:
        return block, "norm"
    for prefix, cat in (("self_attn.", "attention"), ("mlp.experts.", "routed_experts"),
                        ("mlp.gate.", "router"), ("mlp.shared_experts.", "shared_experts"),
                        ("mlp.", "dense_ffn"), ("eh_proj.", "mtp_proj")):
        if rest.startswith(prefix):
            return block, cat
    return block, "other"


def count_params(cfg: ModelConfig) -> Params:
    """Build the model on the meta device (no memory) and sort its parameters into blocks."""
    return _count_params_cached(json.dumps(cfg.to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=8)
def _count_params_cached(cfg_json: str) -> Params:
    import torch

    from fewchips.model import DeepseekV3    # here: plan.estimate stays torch-free (fewchips plan)

    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    with torch.device("meta"):
        model = DeepseekV3(cfg)
    blocks: dict[str, Block] = {"embedding": Block("embedding", "embedding")}
    for i in range(cfg.num_hidden_layers):
        blocks[f"layer {i}"] = Block(f"layer {i}", "moe" if cfg.is_moe_layer(i) else "dense")
    blocks["head"] = Block("head", "head")
    for k in range(cfg.num_nextn_predict_layers):
        blocks[f"mtp {k}"] = Block(f"mtp {k}", "mtp")
    for name, p in model.named_parameters():
        b, cat = _category(name, p.ndim)
        blk = blocks.setdefault(b, Block(b, "other"))
        blk.params[cat] = blk.params.get(cat, 0) + p.numel()
    params = Params(cfg, list(blocks.values()), model.num_parameters())
    main = sum(b.total() for b in params.blocks if b.kind != "mtp")
    assert main == params.counts["total"], (main, params.counts)   # the blocks cover the whole model
    return params


def param_terms(p: Params) -> list[Term]:
    c = p.counts
    cfg = p.cfg
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    routed = p.sum("routed_experts")
    return [
        Term("total", c["total"], "sum of numel() over the module tree on the meta device, MTP excluded"),
        Term("activated per token", c["active"],
             f"total - routed experts x (1 - {K}/{E}) = {human(c['total'])} - {human(routed)} x {1 - K / E:.4f}"
             f" (embedding and head included)"),
        Term("embedding", c["embedding"], f"vocab x hidden = {cfg.vocab_size} x {cfg.hidden_size}"),
        Term("output head", c["head"], "vocab x hidden" + (" (tied: 0 extra)" if cfg.tie_word_embeddings else "")),
        Term("routed experts", routed, f"{E} experts x 3 x hidden x moe_intermediate x MoE layers"),
        Term("MTP", c["mtp"], f"{cfg.num_nextn_predict_layers} MTP layer(s): a decoder block + eh_proj + norms; "
             "embedding and head shared with the main model"),
        Term("MTP activated", c["mtp_active"], f"MTP - its routed experts x (1 - {K}/{E})"),
    ]


# ---------------------------------------------------------------------------------------------
# FLOPs per token
# ---------------------------------------------------------------------------------------------

def attention_core_flops(cfg: ModelConfig, seq: int) -> float:
    """Forward FLOPs per token per layer of softmax(QK^T)V, causal: 2 H (d_qk + d_v) (S+1)/2."""
    return 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq + 1) / 2


def flops_terms(p: Params, seq: int) -> list[Term]:
    """Forward FLOPs per token, term by term; training is 3x each (see module docstring)."""
    cfg = p.cfg
    L, H, n_mtp = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_nextn_predict_layers
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    core = attention_core_flops(cfg, seq)
    terms = [
        Term("attention projections", 2 * p.sum("attention"),
             f"2 x {human(p.sum('attention'))} MLA projection weights"),
        Term("attention core", L * core,
             f"{L} layers x 2 x {H} heads x ({cfg.qk_head_dim} + {cfg.v_head_dim}) x (S+1)/2, S = {seq} (causal)"),
        Term("dense FFN", 2 * p.sum("dense_ffn"), f"2 x {human(p.sum('dense_ffn'))} dense SwiGLU weights"),
        Term("shared experts", 2 * p.sum("shared_experts"), f"2 x {human(p.sum('shared_experts'))}"),
        Term("routed experts", 2 * p.sum("routed_experts") * K / E,
             f"2 x {human(p.sum('routed_experts'))} x {K}/{E} (top-{K} of {E})"),
        Term("router", 2 * p.sum("router"), f"2 x {human(p.sum('router'))}"),
        Term("output head", 2 * p.head_matmul, f"2 x vocab x hidden = 2 x {cfg.vocab_size} x {cfg.hidden_size}"),
    ]
    if n_mtp:
        mtp = 2 * p.matmul_active("mtp") + n_mtp * (2 * p.head_matmul + core)
        terms.append(Term("MTP", mtp, f"{n_mtp} x (2 x ({human(p.matmul_active('mtp') / n_mtp)} activated MTP weights"
                          f" + {human(p.head_matmul)} shared head) + attention core)"))
    return terms


@dataclass
class Flops:
    terms: list[Term]
    seq: int

    @property
    def forward(self) -> float:
        return sum(t.value for t in self.terms)

    @property
    def forward_main(self) -> float:
        return sum(t.value for t in self.terms if t.name != "MTP")

    @property
    def training(self) -> float:
        return 3 * self.forward

    @property
    def training_main(self) -> float:
        return 3 * self.forward_main


def flops_per_token(p: Params, seq: int) -> Flops:
    return Flops(flops_terms(p, seq), seq)


# ---------------------------------------------------------------------------------------------
# The GPU split (dp x ep x pp) and training memory
# ---------------------------------------------------------------------------------------------

SCHEDULES = ("dualpipev", "dualpipe", "1f1b", "zb1p")


@dataclass
class GPUSplit:
    """How the planner spreads a training run over GPUs (the trainer's own placement is `train.layout`)."""
    gpus: int
    dp: int
    ep: int
    pp: int
    zero: int = 1
    schedule: str = "dualpipev"

    def __str__(self):
        sched = f" ({self.schedule})" if self.pp > 1 else ""
        return f"{self.gpus} GPUs = dp {self.dp} x ep {self.ep} x pp {self.pp}{sched}, ZeRO-{self.zero}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def gpu_split(cfg: ModelConfig, gpus: int | None = None, dp: int | None = None, ep: int | None = None,
              pp: int | None = None, zero: int = 1, schedule: str = "dualpipev") -> GPUSplit:
    """Fill in what was not given (gpus = dp x ep x pp) and reject splits the model cannot take."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    for name, v in (("--gpus", gpus), ("--dp", dp), ("--ep", ep), ("--pp", pp)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero must be 0, 1, 2 or 3, got {zero!r}")
    ep, pp = ep or 1, pp or 1
    has_moe = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    E = cfg.n_routed_experts
    if ep > 1 and not has_moe:
        raise ValueError(f"--ep {ep}: this model has no MoE layers to shard; use --ep 1")
    if has_moe and E % ep:
        ok = ", ".join(str(d) for d in _divisors(E))
        raise ValueError(f"--ep {ep} does not divide the {E} routed experts; use one of {ok}")
    L = cfg.num_hidden_layers
    if pp > L:
        raise ValueError(f"--pp {pp} is more pipeline stages than the model's {L} layers")
    if schedule == "dualpipev" and pp > 1 and 2 * pp > L:
        raise ValueError(f"--pp {pp} with dualpipev needs {2 * pp} chunks of at least one decoder layer, more than "
                         f"the model's {L} layers; use --pp-schedule 1f1b")
    if gpus is None:
        gpus = (dp or 1) * ep * pp
    if dp is None:
        if gpus % (ep * pp):
            raise ValueError(f"{gpus} GPUs cannot be split into ep x pp = {ep} x {pp} = {ep * pp} "
                             f"(gpus must equal dp x ep x pp)")
        dp = gpus // (ep * pp)
    if dp * ep * pp != gpus:
        raise ValueError(f"dp x ep x pp = {dp} x {ep} x {pp} = {dp * ep * pp}, but --gpus is {gpus}")
    return GPUSplit(gpus, dp, ep, pp, zero, schedule)


def pipeline_stages(p: Params, owners: list[int], seq: int) -> list[list[Block]]:
    """The trainer's cut (`fewchips.stages.balanced_split`): contiguous decoder layers per stage, split
    so that every GPU (`owners[s]` holds stage s) does about the same work. The embedding joins the
    first stage, and the MTP module and the head join the last."""
    by_kind = {b.name: b for b in p.blocks}
    decoder = [b for b in p.blocks if b.kind in ("dense", "moe")]
    runs = balanced_split(*layer_costs(p.cfg, seq), owners)
    stages = [[decoder[i] for i in r] for r in runs]
    stages[0].insert(0, by_kind["embedding"])
    stages[-1] += [b for b in p.blocks if b.kind == "mtp"] + [by_kind["head"]]
    return stages


def device_blocks(p: Params, split: GPUSplit, seq: int) -> list[list[Block]]:
    """The blocks each pipeline GPU holds under the split's schedule (a block twice under DualPipe)."""
    pp = split.pp
    if pp == 1 or split.schedule in ("1f1b", "zb1p"):
        return pipeline_stages(p, list(range(pp)), seq)
    if split.schedule == "dualpipe":        # GPU r: stage r of one direction, stage pp-1-r of the other
        stages = pipeline_stages(p, list(range(pp)), seq)
        return [stages[r] + stages[pp - 1 - r] for r in range(pp)]
    owners = stage_ranks(pp, 2 * pp, "dualpipev")   # dualpipev: chunks r and 2pp-1-r in a V
    chunks = pipeline_stages(p, owners, seq)
    return [chunks[r] + chunks[2 * pp - 1 - r] for r in range(pp)]


def activations_in_flight(split: GPUSplit, gpu: int) -> tuple[float, str]:
    """Micro-batches of the GPU's own layers whose activations wait for their backward (Table 2)."""
    pp, sched = split.pp, split.schedule
    if pp == 1:
        return 1.0, "1 micro-batch (no pipeline)"
    if sched in ("1f1b", "zb1p"):
        return float(pp - gpu), f"{pp - gpu} micro-batch(es) in flight ({sched} stage {gpu} of {pp})"
    if sched == "dualpipe":
        return (pp + 1) / 2, f"PP+1 = {pp + 1} stage activations, each half this GPU's layers (DualPipe)"
    return (2 * pp + 1) / 2, f"2pp+1 = {2 * pp + 1} chunk activations, each half this GPU's layers (DualPipeV)"


def bubble_terms(split: GPUSplit, microbatches: int, fbw: tuple[float, ...] | None = None) -> list[Term]:
    """The pipeline's idle time per step (report Table 2) and its share of the step, from per-chunk
    F, B, W (and F&B) times; FLOP ratios 1 : 2 : 1 unless measured times are given."""
    F, B, W, FB = (tuple(fbw) + (None,) * 4)[:4] if fbw else (1.0, 2.0, 1.0, None)
    FB = F + B if FB is None else FB
    pp, M, sched = split.pp, microbatches, split.schedule
    if pp == 1:
        return [Term("bubble", 0.0, "no pipeline"), Term("bubble fraction", 0.0, "no pipeline")]
    if sched == "1f1b":
        bubble, formula = (pp - 1) * (F + B), f"(PP-1)(F+B) = {pp - 1} x ({F:g}+{B:g})"
    elif sched == "zb1p":
        bubble, formula = (pp - 1) * (F + B - 2 * W), f"(PP-1)(F+B-2W) = {pp - 1} x ({F:g}+{B:g}-2x{W:g})"
    elif sched == "dualpipe":
        bubble = (pp / 2 - 1) * (FB + B - 3 * W)
        formula = f"(PP/2-1)(F&B+B-3W) = {pp / 2 - 1:g} x ({FB:g}+{B:g}-3x{W:g})"
    else:
        bubble = (pp - 1) * (FB + B - 3 * W)
        formula = f"(PP-1)(F&B+B-3W) = {pp - 1} x ({FB:g}+{B:g}-3x{W:g}) (DualPipeV on {pp} GPUs)"
    chunks = 2 if sched == "dualpipev" else 1
    work = M * chunks * (F + B)
    unit = "per-chunk times" if fbw else "in units of a chunk's forward (F : B : W = 1 : 2 : 1 by FLOPs)"
    return [Term("bubble", bubble, f"{formula}, {unit}"),
            Term("bubble fraction", bubble / (bubble + work),
                 f"bubble / (bubble + {M} micro-batches x {chunks} chunk(s) x (F+B))")]


def activation_bytes_per_token(cfg: ModelConfig, kind: str, fp8: bool, mtp: bool = False) -> list[Term]:
    """Bytes one layer keeps per token for its backward, with the report's recompute choices:
    RMSNorms and MLA up-projections are recomputed, the SwiGLU output is recomputed from its inputs,
    linear inputs are cached in FP8 (1x128 tiles) under --fp8, the attention output in E5M6."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    lin = FP8_ACT_BYTES if fp8 else 2
    lin_name = "FP8" if fp8 else "BF16"
    out: list[Term] = []
    if kind == "mtp":              # an MTP block is a MoE block plus its two inputs
        kind, mtp = "moe", True
    if kind in ("dense", "moe"):
        q_lat = cfg.q_lora_rank or 0
        lat = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        o_bytes = E5M6_BYTES if fp8 else 2
        attn = 2 * D + 2 * (q_lat + lat) + o_bytes * H * cfg.v_head_dim + 4 * H
        out.append(Term("attention", attn, f"residual 2x{D} + latents 2x({q_lat}+{lat}) + output "
                        f"{o_bytes}x{H}x{cfg.v_head_dim} ({'E5M6' if fp8 else 'BF16'}) + softmax stats 4x{H}"))
    if kind == "dense":
        F = cfg.intermediate_size
        out.append(Term("dense FFN", 2 * D + lin * 2 * F,
                        f"residual 2x{D} + SwiGLU inputs {lin:.3g}x2x{F} ({lin_name})"))
    if kind == "moe":
        K, E, F = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.moe_intermediate_size
        Fs = F * cfg.n_shared_experts
        moe = 2 * D + 4 * E + lin * K * (D + 2 * F) + lin * 2 * Fs
        out.append(Term("MoE", moe, f"residual 2x{D} + router scores 4x{E} + {K} dispatched copies x "
                        f"{lin:.3g}x({D} input + 2x{F} SwiGLU inputs) + shared SwiGLU inputs "
                        f"{lin:.3g}x2x{Fs} ({lin_name})"))
    if mtp:
        out.append(Term("MTP inputs", 2 * 2 * D, f"embedding and hidden state 2x2x{D} (their norms recomputed)"))
    return out


@dataclass
class StageMemory:
    stage: int
    blocks: list[str]
    terms: list[Term]          # bytes per GPU

    @property
    def total(self) -> float:
        return sum(t.value for t in self.terms)

    @property
    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.value)


def training_memory(p: Params, split: GPUSplit, seq: int, micro_batch: int, fp8: bool, memory: str = "report",
                    bf16_moments: bool = False, accumulate: bool = True) -> list[StageMemory]:
    """Bytes per GPU on every pipeline stage (the plan reports the worst). `memory`: "report", the report's
    recipe (BF16 working weights, FP32 masters and BF16 moments under ZeRO-`split.zero`); "fewchips",
    what `fewchips train` holds (`_fewchips_terms`). `accumulate`: a step has several micro-batches."""
    if memory == "fewchips":
        return [StageMemory(s, [b.name for b in blocks], _fewchips_terms(p, split, s, blocks, seq, micro_batch, fp8,
                                                                          bf16_moments, accumulate))
                for s, blocks in enumerate(device_blocks(p, split, seq))]
    if memory != "report":
        raise ValueError(f"--memory must be fewchips or report, got {memory!r}")
    cfg = p.cfg
    dense_dp = split.dp * split.ep          # replicas of non-expert weights
    expert_dp = split.dp                     # replicas of each expert
    tokens = micro_batch * seq
    n_heads = 1 + cfg.num_nextn_predict_layers
    out = []
    for s, blocks in enumerate(device_blocks(p, split, seq)):
        w = g = o = 0.0                        # bytes per GPU
        n_dense = n_expert = 0.0
        for b in blocks:
            for cat, n in b.params.items():
                per_gpu = n / split.ep if cat == "routed_experts" else n
                replicas = expert_dp if cat == "routed_experts" else dense_dp
                wbytes = FP8_WEIGHT_BYTES if (fp8 and cat in FP8_LINEARS) else 2
                w += per_gpu * wbytes / (replicas if split.zero >= 3 else 1)
                g += per_gpu * GRAD_BYTES / (replicas if split.zero >= 2 else 1)
                o += per_gpu * (MASTER_BYTES + MOMENT_BYTES) / (replicas if split.zero >= 1 else 1)
                if cat == "routed_experts":
                    n_expert += per_gpu
                else:
                    n_dense += per_gpu
        in_flight, flight_txt = activations_in_flight(split, s)
        act = 0.0
        for b in blocks:
            if b.kind in ("dense", "moe", "mtp"):
                kind = "moe" if "routed_experts" in b.params else "dense"
                per_token = activation_bytes_per_token(cfg, kind, fp8, mtp=b.kind == "mtp")
                act += sum(t.value for t in per_token) * tokens * in_flight
        shard = {0: "not sharded", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}
        params_txt = f"{human(n_dense)} non-expert + {human(n_expert)} expert params on this GPU"
        terms = [
            Term("weights", w, f"{params_txt}; BF16 2 B" + (", FP8 linears 1 B + block scales" if fp8 else "")
                 + ("; / replicas (ZeRO-3)" if split.zero >= 3 else "")),
            Term("gradients", g, f"{params_txt} x {GRAD_BYTES} B (FP32 accumulation)"
                 + ("; / replicas (ZeRO-2)" if split.zero >= 2 else "")),
            Term("optimizer state", o, f"{params_txt} x {MASTER_BYTES + MOMENT_BYTES} B (FP32 master + BF16 Adam m, v)"
                 + (f" / {dense_dp} non-expert, / {expert_dp} expert replicas ({shard[split.zero]})"
                    if split.zero >= 1 else " (not sharded)")),
            Term("activations", act, f"per-token layer bytes (see --explain activations) x {micro_batch} x {seq} tokens"
                 f" x {flight_txt}"),
        ]
        if any(b.kind == "head" for b in blocks):
            terms.append(Term("logits", 4 * tokens * cfg.vocab_size * n_heads,
                              f"FP32 logits 4 x {micro_batch} x {seq} x {cfg.vocab_size} x {n_heads} head(s)"
                              f" (main{' + MTP' if n_heads > 1 else ''})"))
        out.append(StageMemory(s, [b.name for b in blocks], terms))
    return out


def _activation_terms(p: Params, split: GPUSplit, s: int, blocks, seq: int, micro_batch: int, fp8: bool) -> list[Term]:
    cfg, tokens = p.cfg, micro_batch * seq
    n_heads = 1 + cfg.num_nextn_predict_layers
    in_flight, flight_txt = activations_in_flight(split, s)
    act = 0.0
    for b in blocks:
        if b.kind in ("dense", "moe", "mtp"):
            kind = "moe" if "routed_experts" in b.params else "dense"
            act += (sum(t.value for t in activation_bytes_per_token(cfg, kind, fp8, mtp=b.kind == "mtp"))
                    * tokens * in_flight)
    terms = [Term("activations", act, f"per-token layer bytes (see --explain activations) x {micro_batch} x "
                  f"{seq} tokens x {flight_txt}")]
    if any(b.kind == "head" for b in blocks):
        terms.append(Term("logits", 4 * tokens * cfg.vocab_size * n_heads,
                          f"FP32 logits 4 x {micro_batch} x {seq} x {cfg.vocab_size} x {n_heads} head(s)"
                          f" (main{' + MTP' if n_heads > 1 else ''})"))
    return terms


def _fewchips_terms(p: Params, split: GPUSplit, s: int, blocks, seq: int, micro_batch: int, fp8: bool,
                    bf16_moments: bool, accumulate: bool) -> list[Term]:
    """What `fewchips train` holds on one GPU, term by term: FSDP2-sharded FP32 masters, gradients and
    AdamW moments, BF16 gathered weights, unsharded accumulated gradients (docs/plan.md says why each)."""
    dense_dp, expert_dp = split.dp * split.ep, split.dp
    shard = full = largest_layer = largest_tensor = 0.0
    for b in blocks:
        layer = 0.0
        for cat, n in b.params.items():
            local = n / split.ep if cat == "routed_experts" else n
            replicas = expert_dp if cat == "routed_experts" else dense_dp
            if split.pp > 1 and b.kind == "embedding":
                replicas = 1                              # whole inside a stage: two stage roots share it
            shard += local / replicas
            full += local
            layer += local
            per_tensor = n / (p.cfg.n_routed_experts * 3) if cat == "routed_experts" else n
            largest_tensor = max(largest_tensor, per_tensor)
        largest_layer = max(largest_layer, layer)
    moment = 4 if bf16_moments else 8
    unsharded_grads = accumulate or split.pp > 1
    gathered = full if split.pp > 1 else 2 * largest_layer
    terms = [
        Term("weights", 4 * shard, f"{human(shard)} params held (FSDP shard of this GPU's {human(full)}) x 4 B FP32"),
        Term("gradients", 4 * (full if unsharded_grads else shard),
             f"{human(full if unsharded_grads else shard)} x 4 B FP32 "
             + ("(unsharded until the step's last backward: accumulation / a pipeline stage's one reduce-scatter)"
                if unsharded_grads else "(reduce-scattered each backward)")),
        Term("optimizer state", moment * shard, f"{human(shard)} x {moment} B (AdamW m, v in "
             f"{'BF16, --bf16-moments' if bf16_moments else 'FP32, the trainer default'})"),
        Term("gathered weights", 2 * gathered, f"{human(gathered)} x 2 B BF16 all-gathered for compute ("
             + ("the stage's weights, kept for the step" if split.pp > 1 else "a layer and the prefetched next")
             + ")" + ("; FP8 GEMMs quantise them per call" if fp8 else "")),
        *_activation_terms(p, split, s, blocks, seq, micro_batch, fp8),
    ]
    if s == 0:
        terms.append(Term("export buffer", 4 * largest_tensor, f"rank 0 assembles one tensor at a time: the largest, "
                          f"{human(largest_tensor)} x 4 B (files stream from host memory)"))
    return terms


# ---------------------------------------------------------------------------------------------
# Serving, time and cost
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _param_shapes(cfg_json: str) -> tuple:
    import torch

    from fewchips.model import DeepseekV3    # here: plan.estimate stays torch-free (fewchips plan)
    with torch.device("meta"):
        model = DeepseekV3(ModelConfig.from_dict(json.loads(cfg_json)))
    return tuple((n, tuple(t.shape)) for n, t in [*model.named_parameters(), *model.named_buffers()])


def _fp8_bytes(rows: int, cols: int) -> int:
    return rows * cols + 4 * math.ceil(rows / 128) * math.ceil(cols / 128)    # E4M3 + an FP32 scale per block


def serving_weight_bytes(cfg: ModelConfig, ep: int = 1, fp8: bool = False, redundant: int = 0,
                         dtype_bytes: int = 2, mtp: bool = True) -> dict:
    """The weight bytes one rank of `fewchips serve --ep N` holds (what it reports at start-up): every
    tensor whole except the routed experts, of which E/N own plus R/N replicas per MoE layer. fp8
    (`--weights fp8`): the recipe's linears and experts as E4M3 with 128x128 FP32 scales (gate and up
    quantised apart, as the release stores them), the router bias FP32, the rest in the model dtype."""
    from fewchips.fp8.recipe import is_fp8_linear    # here: plan.estimate stays torch-free (fewchips plan)
    slots = cfg.n_routed_experts // ep + redundant // ep
    out = {"experts": 0, "rest": 0}
    for name, shape in _param_shapes(json.dumps(cfg.to_dict(), sort_keys=True)):
        if name.startswith("mtp.") and not mtp:
            continue
        routed = re.search(r"\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if routed:
            r, c = shape[1:]
            mats = [(r // 2, c)] * 2 if routed.group(1) == "gate_up_proj" else [(r, c)]
            per = sum(_fp8_bytes(a, b) if fp8 else a * b * dtype_bytes for a, b in mats)
            out["experts"] += slots * per
        elif fp8 and name.endswith(".weight") and len(shape) == 2 and is_fp8_linear(name[:-len(".weight")]):
            out["rest"] += _fp8_bytes(*shape)
        else:
            el = 4 if (fp8 and name.endswith("e_score_correction_bias")) else dtype_bytes
            out["rest"] += math.prod(shape) * el
    out["total"] = out["experts"] + out["rest"]
    return out


def serving_terms(p: Params, gpu: GPU, n_gpus: int, seq: int, fp8: bool) -> list[Term]:
    """The MLA cache (normalised latent + rotated rope key per layer, BF16) and how many tokens of it
    fit beside the weights on n_gpus (an upper bound: no activation workspace)."""
    cfg = p.cfg
    kv_el = cfg.kv_cache_elements_per_token
    kv = 2 * kv_el
    weights = 0.0
    for b in p.blocks:
        if b.kind == "mtp":
            continue
        for cat, n in b.params.items():
            weights += n * (FP8_WEIGHT_BYTES if (fp8 and cat in FP8_LINEARS) else 2)
    capacity = n_gpus * gpu.memory_gib * GIB
    free = capacity - weights
    tokens = max(0, int(free // kv))
    wname = "FP8 linears, BF16 rest" if fp8 else "BF16"
    return [
        Term("KV cache per token", kv, f"2 B x {cfg.num_hidden_layers} layers x ({cfg.kv_lora_rank} latent + "
             f"{cfg.qk_rope_head_dim} rope key) = 2 x {kv_el}", "B"),
        Term("serving weights", weights, f"main model, {wname} (MTP not loaded)", "B"),
        Term("memory", capacity, f"{n_gpus} x {gpu.memory_gib:g} GiB ({gpu.name})", "B"),
        Term("KV tokens that fit", tokens, "(memory - weights) / KV bytes per token" if free > 0 else
             "the weights alone do not fit", "tokens"),
        Term("batch at context", tokens // seq, f"KV tokens / {seq} context", "sequences"),
    ]


def time_terms(tokens: float, flops: Flops, gpu: GPU, gpus: int, mfu: float, fp8: bool,
               price: float | None) -> list[Term]:
    peak = gpu.peak_tflops(fp8)
    prec = "FP8" if fp8 and gpu.fp8_tflops else "BF16"
    total = tokens * flops.training
    seconds = total / (gpus * peak * 1e12 * mfu)
    gpu_hours = seconds * gpus / 3600
    terms = [
        Term("training FLOPs", total, f"{human(tokens)} tokens x {flops.training / 1e9:.1f} GFLOP/token"),
        Term("wall time", seconds, f"FLOPs / ({gpus} GPUs x {peak:g} TFLOPS {prec} dense peak x MFU {mfu:g})", "s"),
        Term("GPU-hours", gpu_hours, f"{gpus} x wall time in hours", "GPU-h"),
    ]
    if price is not None:
        terms.append(Term("cost", gpu_hours * price, f"GPU-hours x ${price:g}", "USD"))
    return terms


def implied_mfu_terms(tokens: float, gpu_hours: float, flops: Flops, gpu: GPU) -> list[Term]:
    """What a run of `gpu_hours` on `tokens` achieved, as a fraction of the BF16 and FP8 dense peaks."""
    achieved = tokens * flops.training / (gpu_hours * 3600)
    achieved_main = tokens * flops.training_main / (gpu_hours * 3600)
    terms = [Term("achieved per GPU", achieved / 1e12,
                  f"{human(tokens)} tokens x {flops.training / 1e9:.1f} GFLOP/token / "
                  f"({human(gpu_hours)} GPU-h x 3600)",
                  "TFLOPS")]
    for prec, peak in (("BF16", gpu.bf16_tflops), ("FP8", gpu.fp8_tflops)):
        if peak:
            terms.append(Term(f"MFU vs {prec} peak", achieved / (peak * 1e12),
                              f"{achieved / 1e12:.1f} / {peak:g} TFLOPS ({gpu.name} {prec} dense); "
                              f"{achieved_main / (peak * 1e12):.1%} counting the main model only (no MTP)"))
    return terms


# ---------------------------------------------------------------------------------------------

def human(n: float) -> str:
    """1234567 -> '1.23M' (K/M/B/T)."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.2f}{unit}"
    return f"{n:g}"
