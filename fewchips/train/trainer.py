"""DeepSeek-V3's pre-training recipe (arXiv 2412.19437 §2.1.2, §2.2, §4), scaled to the length of the run.

One optimizer step:
    for each micro-batch:  loss = CE(main) + λ·mean_k CE(MTP depth k) + α·Σ_layers seq_balance
                           backward; add up each MoE layer's expert loads
    all loads of the step  (`step_loads`: the one place a data-parallel all-reduce goes)
    clip to 1.0, AdamW, schedule; then, outside autograd, per MoE layer:
                           b ← b + γ·sign(mean(load) − load)          (aux-loss-free balancing)

Schedules, keyed on tokens as in the report: fractions of the run's tokens (its token counts out of 14.8T):
    lr  linear warm-up (steps) → constant until 67.6% (10T) → cosine to 0.1·peak by 96.6% (14.3T)
        → 0.1·peak until 98.9% → 0.033·peak (the report's 2.2e-4 → 2.2e-5 → 7.3e-6)
    γ   `bias_update_speed` until 96.6%, then 0
    λ   0.3 until 67.6%, then 0.1
    batch  optionally ramped (the report: 3,072 → 15,360 sequences over the first 469B tokens) in whole
           micro-batches, so a step's share of the tokens is not its share of the steps (`RunSchedule`)

Checkpoints live in OUT/checkpoint/ (written to a temp folder, then renamed; a failed write leaves
the previous one as it was): the Hugging Face model (weights and balancing biases), the optimizer
and schedule, the sampler position, RNG states and both configs. The final model is also exported
to OUT itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointError, CheckpointReader, from_pretrained, save_pretrained
from ..config import ConfigError, ModelConfig
from .config import TrainConfig, TrainError
from ..files import FolderLock, FolderLockedError, atomic_path, atomic_write_text, swap_dir, temp_dir_beside
from ..model import DeepseekV3, MoE, MoEStats
from . import data as D
from .stopping import StopOnSignal, TrainInterrupted
from .tokenizer import (load_tokenizer, save_tokenizer, special_ids, token_byte_lengths, tokenizer_hash,
                        train_tokenizer)

# Fractions of the run at which the report's schedules change (token counts / 14.8T).
CONSTANT_END = 10.0 / 14.8
COSINE_END = 14.3 / 14.8
MIN_LR_END = (14.3 + 0.333) / 14.8
MIN_LR_RATIO, FINAL_LR_RATIO = 2.2e-5 / 2.2e-4, 7.3e-6 / 2.2e-4


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

def lr_factor(step: int, warmup: int, frac: float, kind: str = "v3", min_ratio: float = 0.2) -> float:
    """Multiplier on the peak lr at optimizer step `step` (0-based) that starts `frac` of the way
    through the run's tokens. The warm-up counts steps (the report's first 2K steps). kind "v3": the
    pre-training schedule; "cosine": the report's SFT schedule, cosine from the peak to min_ratio x the
    peak over the run (5e-6 -> 1e-6 for V3)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    if frac < CONSTANT_END:
        return 1.0
    if frac < COSINE_END:
        t = (frac - CONSTANT_END) / (COSINE_END - CONSTANT_END)
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * t))
    return MIN_LR_RATIO if frac < MIN_LR_END else FINAL_LR_RATIO


def bias_speed(frac: float, gamma: float) -> float:
    return gamma if frac < COSINE_END else 0.0


def mtp_weight(frac: float, early: float, late: float) -> float:
    return early if frac < CONSTANT_END else late


@dataclass(frozen=True)
class RunSchedule:
    """Each step's micro-batches and the tokens seen before it. With a ramp, the global batch grows
    linearly in tokens (as Megatron's batch-size ramp-up) from `batch_size_start` sequences to
    `batch_size x grad_accum`, one micro-batch at a time, reaching the full batch after `batch_ramp_tokens`.
    Deterministic from the config, so a resumed run recomputes exactly the same schedule."""
    micro_batches: tuple[int, ...]      # per step
    tokens_before: tuple[int, ...]      # per step, and the run's total at the end

    @classmethod
    def of(cls, tc: TrainConfig) -> "RunSchedule":
        full, ramp = tc.grad_accum, tc.batch_ramp_tokens
        first = (tc.batch_size_start or tc.batch_size) // tc.batch_size if ramp else full
        per_micro = tc.batch_size * tc.seq_len
        micro, before, seen = [], [], 0
        for _ in range(tc.steps):
            n = full if seen >= ramp else min(full, first + (full - first) * seen // ramp)
            micro.append(n)
            before.append(seen)
            seen += n * per_micro
        return cls(tuple(micro), tuple(before) + (seen,), tc.lr_schedule, tc.min_lr_ratio)

    @property
    def total_tokens(self) -> int:
        return self.tokens_before[-1]

    def fraction(self, step: int) -> float:
        """Share of the run's tokens seen before optimizer step `step`."""
        return self.tokens_before[min(step, len(self.tokens_before) - 1)] / max(self.total_tokens, 1)

    kind: str = "v3"
    min_ratio: float = 0.2

    def lr_factor(self, step: int, warmup: int) -> float:
        return lr_factor(step, warmup, self.fraction(step), self.kind, self.min_ratio)


# ---------------------------------------------------------------------------------------------
# Building blocks (small functions: FP8 and parallelism plug in here)
# ---------------------------------------------------------------------------------------------

def autocast_dtype(name: str, device: torch.device):
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    try:   # CPUs with AVX512-BF16/AMX run bf16 matmuls natively; elsewhere bf16 is emulated and slow
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


def build_model(cfg: ModelConfig, tc: TrainConfig, device="cpu") -> DeepseekV3:
    """The model as it will be trained: initialised, and (optionally) with activation checkpointing
    and compiled layers. FP8 linears and parallel wrapping are applied here."""
    torch.manual_seed(tc.seed)
    if tc.init:       # continue from a model directory: its weights (any dtype, FP8 dequantised) as fp32 masters
        model = from_pretrained(tc.init, dtype=torch.float32, device=device, mtp=cfg.num_nextn_predict_layers > 0)
        model.config = cfg
    else:
        model = DeepseekV3(cfg).to(device).init_weights(tc.init_std)
    if tc.freeze_mtp:                 # the MTP module stays as it is: no gradient, no optimizer state, no MTP loss
        for p in model.mtp.parameters():
            p.requires_grad_(False)
    if tc.fp8:
        from ..fp8 import apply_fp8
        apply_fp8(model, backend=tc.fp8_backend)
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if tc.compile:
        compile_layers(model)
    return model


def compile_layers(model: DeepseekV3):
    """torch.compile each decoder and MTP layer whole. The routed experts' grouped GEMMs depend on the
    routing (data-dependent sizes), so dynamo breaks the graph around them; the rest of the layer is
    fused. Layers take and return tensors only (MoE statistics are outputs), so one compiled code
    serves every layer of the same shape."""
    for layer in [*model.model.layers, *model.mtp]:
        layer.compile(dynamic=True)


def apply_activation_checkpointing(model: DeepseekV3):
    """Recompute each decoder layer (and MTP layer) in backward instead of keeping its activations.
    The layer's forward is replaced on the instance, so parameter names (and checkpoints) do not
    change. The MoE statistics are outputs of the checkpointed region like the hidden state, so the
    recomputation cannot count them twice. Without grad (evaluation, decoding with a cache) nothing
    is recomputed and the layer runs as it is."""
    from torch.utils.checkpoint import checkpoint

    for layer in [*model.model.layers, *model.mtp]:
        def forward(*args, _orig=layer.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _orig(*args, **kwargs)
            return checkpoint(_orig, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def moe_routers(model: DeepseekV3):
    """Routers in the order of the rows of MoEStats: main layers, then MTP layers."""
    layers = [*model.model.layers, *model.mtp]
    return [layer.mlp.gate for layer in layers if isinstance(layer.mlp, MoE)]


def build_optimizer(model: DeepseekV3, tc: TrainConfig, schedule: RunSchedule | None = None):
    """AdamW with weight decay on matrices only (not on norms, biases or any 1-D parameter), and the
    lr schedule on the run's tokens. Fused, unless the parameters mix plain tensors and DTensors
    (experts split over ep beside replicated pipeline-stage weights), which fused and foreach kernels
    refuse: then torch's per-parameter loop."""
    schedule = schedule or RunSchedule.of(tc)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.endswith("bias") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8)
    kinds = {hasattr(p, "_local_tensor") for p in decay + no_decay}       # DTensor or not
    fused = len(kinds) == 1
    if tc.bf16_moments:
        from ..fp8.optim import AdamWBF16Moments
        opt = AdamWBF16Moments(groups, **kw)
    else:
        try:
            opt = torch.optim.AdamW(groups, **(dict(fused=True) if fused else dict(foreach=False)), **kw)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(groups, **kw)
    warmup = tc.warmup_steps if tc.warmup_steps is not None else max(1, round(0.03 * tc.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule.lr_factor(s, warmup))
    return opt, sched


@torch.no_grad()
def clip_grad_norm(model, opt, max_norm: float, norm_sq: torch.Tensor | None = None) -> torch.Tensor:
    """torch's clip_grad_norm_ (scale by max_norm / (norm + 1e-6) when that is below 1), without its
    extra pass over every gradient: no pass when nothing is clipped, and with fused AdamW the scale
    goes to the optimizer's own `grad_scale` (its kernel divides the gradients as it reads them; the
    caller pops it after the step). `norm_sq`: Σ g² over the whole model when this process holds only
    part of it (`parallel.grad_norm_sq`, `Pipeline.grad_norm_sq`); each process then scales its own
    part. Returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    for p in params:
        lay_out_grad_like_param(p)
    if norm_sq is None:
        # sum of g.g by BLAS dot: 2.5x the bandwidth of torch's per-tensor vector_norm on CPU (measured)
        sq = [g.reshape(-1).dot(g.reshape(-1)) for g in (p.grad.float() for p in params)]
        norm_sq = torch.stack(sq).sum() if sq else torch.zeros(())
    norm = norm_sq.sqrt()
    if not bool(norm + 1e-6 > max_norm):           # also False for NaN: the step is skipped anyway
        return norm
    grads = [local(p.grad) for p in params]
    if isinstance(opt, torch.optim.AdamW) and opt.defaults.get("fused") and all(g is p.grad for g, p in zip(grads, params)):
        opt.grad_scale = (norm + 1e-6) / max_norm
    else:                          # each process scales its local shards, whatever mesh a DTensor lives on
        torch._foreach_mul_(grads, max_norm / (float(norm) + 1e-6))
    return norm


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself otherwise)."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def lay_out_grad_like_param(p: torch.nn.Parameter):
    """torch 2.13's fused CPU AdamW reads a gradient as if laid out like its parameter; a transposed one
    (the pipeline schedules' split weight backward leaves some) would be applied scrambled. Copy such a
    gradient into its parameter's layout (the local shard's, for a DTensor)."""
    g = p.grad
    local_g, local_p = local(g), local(p)
    if local_g.stride() == local_p.stride():
        return
    fixed = torch.empty_strided(local_p.shape, local_p.stride(), dtype=local_g.dtype, device=local_g.device)
    fixed.copy_(local_g)
    if local_g is g:
        p.grad = fixed
    else:
        from torch.distributed.tensor import DTensor
        p.grad = DTensor.from_local(fixed, g.device_mesh, g.placements, run_check=False)


def compute_losses(model: DeepseekV3, batch, mtp_lambda: float, amp_dtype):
    """Losses of one micro-batch (a `Batch`, or ids [B, T+1]). Returns (main CE, MTP CE averaged over
    depths, Σ_layers seq_balance, MoEStats stacked over main then MTP layers). The main loss is the
    mean over the scored targets; MTP depth k at position i predicts token i+k+1 and, as the report's
    eq. 24, sums its log-likelihoods and divides by the main loss's count (T per sequence in
    pre-training)."""
    if isinstance(batch, torch.Tensor):
        batch = D.Batch(batch)
    ids = batch.ids
    inp_BT = ids[:, :-1]
    pos_BT = None if batch.position is None else batch.position[:, :-1]
    seg_BT = None if batch.segment is None else batch.segment[:, :-1]
    with torch.autocast(ids.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        h_BTD, stats = model.hidden_states(inp_BT, positions=pos_BT, segments=seg_BT, with_stats=True)
        main, mtp, mtp_stats = head_losses(model, h_BTD, batch, mtp_lambda)
    stats = stats.cat(mtp_stats)
    return main, mtp, stats.seq_balance.float().sum(), stats


def head_losses(model: DeepseekV3, h_BTD, batch, mtp_lambda: float):
    """What follows the decoder layers, from their final-normed output h [B, T, D]: the main CE and the
    MTP depths' CE (see `compute_losses`), and the MTP layers' MoEStats. The pipeline's last stage
    calls it too: one loss for every layout."""
    ids = batch.ids
    inp_BT, tgt_BT = ids[:, :-1], ids[:, 1:]
    pos_BT = None if batch.position is None else batch.position[:, :-1]
    seg_BT = None if batch.segment is None else batch.segment[:, :-1]
    mask_BT = batch.target_mask(0)
    count = inp_BT.numel() if mask_BT is None else mask_BT.sum().clamp_min(1)
    main = _ce(model.lm_head(h_BTD), tgt_BT, mask_BT) / count
    mtp_terms, stats = [], MoEStats.stack([], model.config.n_routed_experts, ids.device)
    if mtp_lambda > 0 and len(model.mtp):
        logits_k, stats = model.mtp_forward(inp_BT, h_BTD, pos_BT, seg_BT, with_stats=True)
        for k, logits in enumerate(logits_k, start=1):
            mtp_terms.append(_ce(logits, ids[:, k + 1:], batch.target_mask(k)) / count)   # targets t_{i+k+1}
    mtp = torch.stack(mtp_terms).mean() if mtp_terms else torch.zeros((), device=ids.device)
    return main, mtp, stats


def _ce(logits_BTV, targets_BT, mask_BT=None):
    """Summed cross-entropy over the targets (only where `mask_BT` is set)."""
    ce = F.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1), reduction="none")
    return ce.sum() if mask_BT is None else (ce * mask_BT.reshape(-1)).sum()


@torch.no_grad()
def evaluate(model: DeepseekV3, batches, target_bytes: int, amp=None, device="cpu") -> dict:
    """Loss (mean over the scored targets: every token of text, the assistant's tokens of chats) and bits
    per byte of those targets' text. What the trainers log as validation and `fewchips eval` prints."""
    if not batches:
        return {}
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    device = torch.device(device)
    for b in batches:
        b = b.to(device)
        mask = b.target_mask(0)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            h = model.hidden_states(b.ids[:, :-1], None if b.position is None else b.position[:, :-1],
                                    segments=None if b.segment is None else b.segment[:, :-1])
            total += _ce(model.lm_head(h), b.ids[:, 1:], mask).item()
        n += b.ids[:, 1:].numel() if mask is None else int(mask.sum())
    model.train(was_training)
    loss = total / max(n, 1)
    return {"val_loss": loss, "val_bpb": D.bits_per_byte(loss, target_bytes / max(n, 1)), "val_tokens": n}


def step_loads(loads_LE: torch.Tensor) -> torch.Tensor:
    """Expert loads of the whole optimizer step [layers, experts]. With data parallelism, this is
    where they are summed over ranks (all-reduce) so every rank applies the same bias update."""
    return loads_LE


@torch.no_grad()
def update_biases(routers, loads_LE: torch.Tensor, gamma: float):
    """b ← b + γ·sign(mean(load) − load), per layer: overloaded experts become less attractive."""
    if gamma == 0:
        return
    for router, load_E in zip(routers, loads_LE):
        router.e_score_correction_bias += gamma * torch.sign(load_E.mean() - load_E).to(torch.float32)


def max_violation(loads_LE: torch.Tensor) -> list[float]:
    """MaxVio per layer: (max load − mean load) / mean load (0 = perfectly balanced)."""
    mean = loads_LE.float().mean(-1).clamp_min(1e-9)
    return ((loads_LE.float().amax(-1) - mean) / mean).tolist()


# ---------------------------------------------------------------------------------------------
# Data, tokenizer
# ---------------------------------------------------------------------------------------------

def prepare_data(cfg: ModelConfig, tc: TrainConfig, log=print, tokenizer_path: str | None = None):
    """Documents → tokenizer (trained once per corpus, cached) → memory-mapped shards (cached)."""
    max_bytes = int(tc.max_corpus_mb * 2**20) if tc.max_corpus_mb else None
    docs = D.read_documents(tc.data, max_bytes, tc.text_field)
    train_docs, val_docs = D.split_documents(docs, tc.val_fraction)
    if not train_docs:
        raise D.DataError(f"all {len(docs)} documents went to validation; lower --val-fraction or add data")
    fp = D.corpus_fingerprint(docs)
    cache = tc.cache_dir or os.path.join(tc.out, "cache")
    tokenizer_path = tokenizer_path or tc.tokenizer
    if tokenizer_path:
        tok = load_tokenizer(tokenizer_path)
    else:
        cached = os.path.join(cache, f"tokenizer-{fp}-{cfg.vocab_size}.json")
        if os.path.exists(cached):
            tok = load_tokenizer(cached)
        else:
            t0 = time.time()
            tok = train_tokenizer((t for _, t in train_docs), cfg.vocab_size, len(train_docs))
            os.makedirs(cache, exist_ok=True)
            with atomic_path(cached, ".json") as tmp:
                tok.save(tmp)
            log(f"trained a {tok.get_vocab_size()}-token byte-level BPE in {time.time() - t0:.1f}s")
    if tok.get_vocab_size() > cfg.vocab_size:
        raise D.DataError(f"the tokenizer has {tok.get_vocab_size()} tokens but the model's vocab_size is "
                          f"{cfg.vocab_size}; pass --vocab-size {tok.get_vocab_size()} (or more)")
    sp = special_ids(tok)
    key = f"tokens-{fp}-{tokenizer_hash(tok)}-fim{tc.fim_rate}-val{tc.val_fraction}-seed{tc.seed}"
    corpus = D.prepare_corpus(train_docs, val_docs, tok, sp, cache, key, tc.fim_rate, tc.seed, log)
    val = corpus.index["splits"]["val"]
    if tc.val_fraction > 0 and val["tokens"] < MIN_VAL_TOKENS:
        log(f"warning: the validation split is {val['tokens']:,} tokens in {val['documents']} document(s) "
            f"(--val-fraction {tc.val_fraction} of {len(docs)} documents, split by name): validation loss will "
            f"be noisy. Raise --val-fraction or add documents")
    return tok, sp, corpus


MIN_VAL_TOKENS = 4096      # below this a validation loss is mostly noise: say so


class TextData:
    """Pre-training data: the tokenised corpus, windows drawn by the seeded `Sampler`, and fixed
    validation windows. The trainer's view of any data set: `next_batch`, `val_batches`, `val_bytes`,
    its position (`state_dict`), what must match on resume (`fingerprint`) and one line about it."""

    def __init__(self, cfg: ModelConfig, tc: TrainConfig, log=print, tokenizer_path: str | None = None):
        self.tok, self.sp, self.corpus = prepare_data(cfg, tc, log, tokenizer_path)
        self.sampler = D.Sampler(self.corpus.train.tokens, tc.seq_len, tc.seed)
        self.val = D.eval_windows(self.corpus.val.tokens, tc.seq_len, tc.eval_batches * tc.batch_size)
        # exact bytes behind the evaluated targets: bits per byte compares across tokenizers
        self.val_bytes = int(token_byte_lengths(self.tok)[self.val[:, 1:]].sum()) if len(self.val) else 0
        self.unigram_entropy = self.corpus.index["unigram_entropy_nats"]

    def next_batch(self, n: int) -> D.Batch:
        ids, _ = self.sampler.next_batch(n)
        return D.Batch(torch.from_numpy(ids))

    def val_batches(self, n: int) -> list[D.Batch]:
        return [D.Batch(torch.from_numpy(self.val[i:i + n])) for i in range(0, len(self.val), n)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict):
        self.sampler.load_state_dict(state)

    def fingerprint(self) -> dict:
        return self.corpus.index            # its "splits" must match on resume; `fewchips.demo` reads the rest

    def describe(self) -> str:
        return (f"train {len(self.corpus.train.tokens):,} tokens, val {len(self.corpus.val.tokens):,}; "
                f"unigram entropy {self.unigram_entropy:.3f} nats")


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float
    mtp_loss: float
    balance_loss: float
    grad_norm: float
    loads_LE: torch.Tensor
    skipped: bool
    batch: int                           # sequences in this step (grows during a batch ramp)
    extra: dict = field(default_factory=dict)   # more per-step metrics (GRPO's rewards, KL, ...)
    tokens: int | None = None            # tokens processed, when not batch x seq_len (GRPO's rollouts)


class Trainer:
    def __init__(self, cfg: ModelConfig | None, tc: TrainConfig, log=print, device="cpu"):
        self.cfg, self.tc, self.log, self.device = cfg, tc, log, torch.device(device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.ckpt_dir = os.path.join(tc.out, "checkpoint")
        self.metrics_path = os.path.join(tc.out, "metrics.jsonl")
        self.lock = FolderLock(tc.out)
        self._check_out_dir()
        resume_from = self._resume_dir() if tc.resume else None
        if tc.init:
            cfg = init_config(tc.init, log)
        self.data = self.make_data(cfg, resume_from)
        self.tok, self.sp = self.data.tok, self.data.sp
        self.sampler = getattr(self.data, "sampler", None)
        self.cfg = cfg = cfg.replace(bos_token_id=self.sp.bos, eos_token_id=self.sp.eos)
        self.amp = autocast_dtype(tc.dtype, self.device)
        self.model = self.place(build_model(cfg, tc, self.device))
        self.routers = moe_routers(self.model)
        self.schedule = RunSchedule.of(tc)
        self.opt, self.sched = build_optimizer(self.model, tc, self.schedule)      # once, on the placed model
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps_total = 0
        self.bad_streak = 0
        self.load_accum_LE = torch.zeros(len(self.routers), cfg.n_routed_experts)
        if resume_from:
            self._load(resume_from)
        else:
            self._reset_metrics()
        self.unigram_entropy = self.data.unigram_entropy

    def make_data(self, cfg: ModelConfig, resume_from: str | None):
        """The data this run trains on (pre-training text here; chats for `fewchips sft`)."""
        tokenizer = os.path.join(resume_from, "tokenizer.json") if resume_from else (
            os.path.join(self.tc.init, "tokenizer.json") if self.tc.init else None)
        return TextData(cfg, self.tc, self.log, tokenizer)

    # ---- setup -------------------------------------------------------------------------------
    def _check_out_dir(self):
        tc = self.tc
        has_ckpt = any(os.path.exists(self.ckpt_dir + s) for s in ("", ".old"))
        if has_ckpt and not tc.resume and not tc.overwrite:
            raise TrainError(f"{tc.out} already holds a training run; pass --resume to continue it or "
                             f"--overwrite to start over (the tokenised data cache is kept)")
        os.makedirs(tc.out, exist_ok=True)
        try:
            self.lock.acquire()                      # one writer per output folder
        except FolderLockedError as e:
            raise TrainError(str(e)) from None

    def _resume_dir(self):
        """The newest checkpoint that can be read: OUT/checkpoint, else OUT/checkpoint.old (the one before
        it, kept as a fallback; also what a crash between the two renames of a save leaves)."""
        problems = []
        for d in (self.ckpt_dir, self.ckpt_dir + ".old"):
            if not os.path.exists(os.path.join(d, "train_state.pt")):
                continue
            try:
                read_train_state(d)
                load_tokenizer(os.path.join(d, "tokenizer.json"))
            except (TrainError, ValueError, FileNotFoundError) as e:
                problems.append(str(e))
                self.log(f"warning: {e}")
                continue
            if problems:
                self.log(f"resuming from the previous checkpoint, {d}")
            return d
        if problems:
            raise TrainError(f"--resume: {problems[-1]}; no earlier checkpoint to fall back to. Start over with "
                             f"--overwrite (the tokenised data cache is kept)")
        raise TrainError(f"--resume: no checkpoint in {self.ckpt_dir}")

    def _reset_metrics(self):
        """A fresh run: with --overwrite the previous run's checkpoints go, only now that the data and the
        model are ready (a bad data file or config has stopped the run before anything was deleted)."""
        if self.tc.overwrite:
            for d in (self.ckpt_dir, self.ckpt_dir + ".old"):
                shutil.rmtree(d, ignore_errors=True)
        open(self.metrics_path, "w").close()

    # ---- one step ----------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        tc = self.tc
        frac = self.schedule.fraction(self.step)
        n_micro = self.schedule.micro_batches[self.step]
        lam = 0.0 if tc.freeze_mtp else mtp_weight(frac, tc.mtp_lambda, tc.mtp_lambda_late)
        loads_LE = torch.zeros(len(self.routers), self.cfg.n_routed_experts, device=self.device)
        main, mtp, bal, finite = self.forward_backward(n_micro, lam, loads_LE)
        grad_norm = float("nan")
        if finite:
            grad_norm = float(self.clip_grad_norm())
            finite = math.isfinite(grad_norm)
        if finite:
            self.opt.step()
            loads_LE = self.step_loads(loads_LE)
            update_biases(self.routers, loads_LE, bias_speed(frac, tc.bias_update_speed))
        self.opt.__dict__.pop("grad_scale", None)       # a clip folded into this step only
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step += 1
        self.tokens_seen += n_micro * tc.batch_size * tc.seq_len
        return StepResult(main if finite else float("nan"), mtp, bal, grad_norm, loads_LE.cpu(),
                          not finite, n_micro * tc.batch_size)

    def forward_backward(self, n_micro: int, lam: float, loads_LE: torch.Tensor):
        """Forward and backward of one optimizer step's `n_micro` micro-batches, gradients accumulated;
        adds the MoE loads to `loads_LE`. Returns the step's (main, MTP, balance) losses, each the mean
        over micro-batches, and whether the loss was finite (a non-finite micro-batch ends the step)."""
        tc = self.tc
        tot_main = tot_mtp = tot_bal = 0.0
        for i in range(n_micro):
            self.sync_gradients(i == n_micro - 1)
            batch = self.data.next_batch(tc.batch_size)
            main, mtp, bal, stats = self.compute_losses(batch.to(self.device), lam)
            loss = main + lam * mtp + tc.balance_alpha * bal
            if not torch.isfinite(loss):
                return tot_main, tot_mtp, tot_bal, False
            (loss / n_micro).backward()
            loads_LE[:len(stats.load)] += stats.load
            tot_main += main.item() / n_micro
            tot_mtp += mtp.item() / n_micro
            tot_bal += bal.item() / n_micro
        return tot_main, tot_mtp, tot_bal, True

    def compute_losses(self, batch, lam):
        return compute_losses(self.model, batch, lam, self.amp)

    # Hooks that the distributed trainer (fewchips/train/distributed.py) overrides.
    is_main = True                   # the process that writes logs, metrics and plots

    def place(self, model: DeepseekV3) -> DeepseekV3:
        """The model on this process's devices and ranks, before the optimizer is built."""
        return model

    def sync_gradients(self, last_micro_batch: bool):
        """Before each micro-batch's backward: whether its gradients are reduced over ranks now."""

    def clip_grad_norm(self):
        return clip_grad_norm(self.model, self.opt, self.tc.grad_clip)

    def step_loads(self, loads_LE):
        return step_loads(loads_LE)

    def evaluate(self) -> dict:
        return evaluate(self.model, self.data.val_batches(self.tc.batch_size), self.data.val_bytes, self.amp,
                        self.device)

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> dict:
        tc = self.tc
        last_step = min(tc.steps, tc.stop_at) if tc.stop_at else tc.steps
        ramp = (f" (batch ramps from {self.schedule.micro_batches[0] * tc.batch_size} sequences over the first "
                f"{tc.batch_ramp_tokens:,} tokens{'; the run ends first' if tc.batch_ramp_tokens > self.schedule.total_tokens else ''})"
                if tc.batch_ramp_tokens else "")
        self.log(f"training {self.cfg.num_hidden_layers}-layer model for {tc.steps} steps, {self.schedule.total_tokens:,} "
                 f"tokens, {tc.tokens_per_step} per step{ramp}; {self.data.describe()}; "
                 f"autocast {self.amp or 'off'}")
        bar = None
        if tc.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=tc.steps, initial=self.step, unit="step", dynamic_ncols=True)
        tok_s, last = None, {}
        self.model.train()
        try:
            with StopOnSignal(self.log) as stop:
                while self.step < last_step:
                    t0 = time.perf_counter()
                    r = self.train_step()
                    dt = time.perf_counter() - t0
                    rate = (r.tokens if r.tokens is not None else r.batch * tc.seq_len) / dt
                    tok_s = rate if tok_s is None else 0.9 * tok_s + 0.1 * rate
                    if r.skipped:
                        self._on_bad_step()
                    else:
                        self.bad_streak = 0
                        self.load_accum_LE += r.loads_LE
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{r.loss:.3f}", tok_s=f"{tok_s:,.0f}")
                    if self.step % tc.log_every == 0 or self.step == last_step:
                        self._write({"step": self.step, "tokens": self.tokens_seen, "batch": r.batch, "loss": r.loss,
                                     "mtp_loss": r.mtp_loss, "balance_loss": tc.balance_alpha * r.balance_loss,
                                     "lr": self.sched.get_last_lr()[0], "grad_norm": r.grad_norm, "tok_per_s": tok_s,
                                     "maxvio": max_violation(r.loads_LE), "skipped_steps": self.bad_steps_total,
                                     **r.extra})
                    if self.step % tc.eval_every == 0 or self.step == tc.steps:
                        last = self._eval_and_plot(bar)
                    if self.stop_requested(stop.requested) and self.step < last_step:
                        raise TrainInterrupted(stop.requested or "SIGTERM", self.step)
                    if self.step % tc.save_every == 0 and self.step < last_step:
                        self.save_checkpoint()
        except TrainInterrupted:
            if bar is not None:
                bar.close()
            self.save_checkpoint()
            self.export()
            self.log(f"stopped after step {self.step}; checkpoint in {self.ckpt_dir}; continue with --resume")
            raise
        except KeyboardInterrupt:
            where = f"the checkpoint in {self.ckpt_dir} is as it was" if os.path.exists(self.ckpt_dir) else "no checkpoint was written"
            self.log(f"\naborted during step {self.step + 1}; {where}")
            raise
        finally:
            if bar is not None:
                bar.close()
            if self.step < last_step:
                self.lock.release()
        self.save_checkpoint()
        self.export()
        if self.tc.plots:
            self.plot()
        self.lock.release()
        return {"step": self.step, **last, "unigram_entropy": self.unigram_entropy,
                "skipped_steps": self.bad_steps_total}

    def stop_requested(self, signal_name: str | None) -> bool:
        """Whether to stop after this step. With several processes, all must agree (the distributed trainer)."""
        return signal_name is not None

    def _on_bad_step(self):
        self.bad_steps_total += 1
        self.bad_streak += 1
        self.log(f"step {self.step}: non-finite loss or gradient; step skipped "
                 f"({self.bad_streak} in a row, {self.bad_steps_total} in all)")
        if self.bad_streak >= self.tc.max_bad_steps:
            where = self.ckpt_dir if os.path.exists(self.ckpt_dir) else "none written yet"
            raise TrainError(f"stopping at step {self.step}: {self.bad_streak} steps in a row had a non-finite "
                             f"loss or gradient ({self.bad_steps_total} skipped in all). Last checkpoint: {where}. "
                             f"Try a lower --lr, a longer --warmup, or --dtype fp32.")

    def _eval_and_plot(self, bar):
        ev = self.evaluate()
        if ev:
            self._write({"step": self.step, "tokens": self.tokens_seen, **ev})
            msg = f"step {self.step}: val loss {ev['val_loss']:.3f} nats ({ev['val_bpb']:.3f} bits/byte)"
            if self.unigram_entropy is not None:
                msg += f", unigram entropy {self.unigram_entropy:.3f}"
            (bar.write if bar is not None else self.log)(msg)
        if self.tc.plots:
            self.plot()
        return ev

    def _write(self, rec: dict):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def plot(self):
        from .plots import write_plots
        layers = [f"layer {i}" for i in range(self.cfg.num_hidden_layers) if self.cfg.is_moe_layer(i)]
        layers += [f"MTP {k + 1}" for k in range(self.cfg.num_nextn_predict_layers)]
        write_plots(self.metrics_path, self.load_accum_LE, self.tc.out, self.unigram_entropy, layers)

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "bad_steps_total": self.bad_steps_total,
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "sampler": self.data.state_dict(), "load_accum": self.load_accum_LE,
            "biases": [r.e_score_correction_bias.clone() for r in self.routers],
            "rng": rng_state(),
            "train_config": dataclasses.asdict(self.tc), "model_config": self.cfg.to_dict(),
            "corpus": self.data.fingerprint(), "tokenizer_hash": tokenizer_hash(self.tok),
        }

    def save_checkpoint(self):
        """Write everything to a temp folder beside the checkpoint, then swap it in by renames, keeping
        the one before as checkpoint.old (a fallback if this one is later found damaged). Any failure
        (a full disk) removes the temp folder and leaves the old checkpoints alone."""
        tmp = temp_dir_beside(self.ckpt_dir)
        try:
            save_pretrained(self.model, tmp)
            self.write_tokenizer(tmp)
            torch.save(self.state(), os.path.join(tmp, "train_state.pt"))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"the previous checkpoint in {self.ckpt_dir} is intact" if os.path.exists(self.ckpt_dir) \
                else "no earlier checkpoint exists"
            raise TrainError(f"could not write a checkpoint at step {self.step} ({e.strerror or e}); {kept}. "
                             f"Free some disk space and rerun with --resume.") from e
        swap_dir(tmp, self.ckpt_dir, keep_previous=True)

    def write_tokenizer(self, folder: str):
        """tokenizer.json and tokenizer_config.json; a run started from a model directory keeps that
        directory's tokenizer_config.json (its own chat template, e.g. a released checkpoint's)."""
        save_tokenizer(self.tok, folder, self.tc.seq_len)
        source = os.path.join(self.tc.init, "tokenizer_config.json") if self.tc.init else None
        if source and os.path.exists(source):
            with open(source, encoding="utf-8") as f:
                atomic_write_text(os.path.join(folder, "tokenizer_config.json"), f.read())

    def export(self):
        """The final model in OUT itself: config.json, model.safetensors, tokenizer files."""
        try:
            save_pretrained(self.model, self.tc.out)
            self.write_tokenizer(self.tc.out)
        except OSError as e:
            raise TrainError(f"could not export the model to {self.tc.out} ({e.strerror or e}); "
                             f"the checkpoint in {self.ckpt_dir} is intact") from e

    def _load(self, path):
        """Continue the run saved in `path`: the same model and data settings are required; weights and
        optimizer state (`load_weights`), schedule, sampler position, counters, loads and RNG come back."""
        st = read_train_state(path)
        saved_cfg = ModelConfig.from_dict(st["model_config"])
        if saved_cfg.to_dict() != self.cfg.to_dict():
            a, b = saved_cfg.to_dict(), self.cfg.to_dict()
            diff = [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            raise TrainError(f"--resume: the model config does not match the checkpoint in {path} ({'; '.join(diff)})")
        check_resume_fields(st["train_config"], self.tc, self.log)
        check_same_data(st, self.data)
        self.load_weights(path, st)
        self.sched.load_state_dict(st["scheduler"])
        for group, lr in zip(self.opt.param_groups, self.sched.get_last_lr()):
            group["lr"] = lr                                   # the schedule's lr at the saved step
        self.data.load_state_dict(st["sampler"])
        self.step, self.tokens_seen, self.bad_steps_total = st["step"], st["tokens_seen"], st["bad_steps_total"]
        self.load_accum_LE = st["load_accum"]
        set_rng_state(st["rng"])
        if self.is_main:
            truncate_metrics(self.metrics_path, self.step, self.log)
        was = st.get("parallel")
        layout = f" (saved at pp {was.get('pp', 1)} x dp {was['dp']} x ep {was['ep']})" if was else ""
        self.log(f"resumed from {path} at step {self.step}{layout}")

    def load_weights(self, path: str, st: dict):
        """Model weights and optimizer state of a one-process checkpoint (a Hugging Face directory)."""
        if os.path.exists(os.path.join(path, ".metadata")):
            raise TrainError(f"--resume: {path} holds a sharded checkpoint from a torchrun run; resume it with "
                             f"torchrun (any number of processes), or in one process with --dp 1")
        try:
            loaded = from_pretrained(path, dtype=torch.float32)
        except CheckpointError as e:
            raise TrainError(f"--resume: {e}. If {self.ckpt_dir}.old exists, move it to {self.ckpt_dir} to resume "
                             f"from the checkpoint before; otherwise start over with --overwrite") from None
        self.model.load_state_dict(loaded.state_dict())
        self.opt.load_state_dict(st["optimizer"])


def check_resume_fields(saved: dict, tc: TrainConfig, log=print):
    """Refuse to resume with a setting that would change the data of the saved run, or (unless
    --allow-schedule-change) its schedule. A field the checkpoint predates had its default then."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for k in TrainConfig.RESUME_FIELDS:
        was = saved.get(k, fields[k].default)
        if was != getattr(tc, k):
            raise TrainError(f"--resume: {k} is {getattr(tc, k)!r} but the checkpoint was trained with "
                             f"{was!r}; pass the same value to continue exactly")
    changed = {k: saved.get(k, fields[k].default) for k in TrainConfig.SCHEDULE_FIELDS
               if saved.get(k, fields[k].default) != getattr(tc, k)}
    if not changed:
        return
    was = dataclasses.replace(tc, **changed)
    old, new = RunSchedule.of(was), RunSchedule.of(tc)
    what = ", ".join(f"--{k.replace('_', '-')} {v} -> {getattr(tc, k)}" for k, v in changed.items())
    plan = (f"the lr, γ and λ schedules are laid out over the run's tokens ({old.total_tokens:,} -> {new.total_tokens:,}): "
            f"the cosine would start after step {switch_step(was, old)} instead of step {switch_step(tc, new)}")
    if not tc.allow_schedule_change:
        raise TrainError(f"--resume with {what} changes the run's schedule: {plan}. Pass the checkpoint's values "
                         f"to continue it exactly, or --allow-schedule-change to continue on the new schedule")
    log(f"warning: {what} changes the schedule: {plan} (--allow-schedule-change)")


def model_tokenizer(folder: str):
    """A model directory's tokenizer.json and its special ids, or one error naming the file."""
    path = os.path.join(folder, "tokenizer.json")
    try:
        tok = load_tokenizer(path)
        return tok, special_ids(tok, path)
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(f"--model: {e}") from None


def init_config(path: str, log=print) -> ModelConfig:
    """The config of a model directory to start from, its MTP layers counted only if their weights are there."""
    try:
        cfg = CheckpointReader(path).cfg
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        raise TrainError(f"--init: {e}") from None
    if not cfg.num_nextn_predict_layers:
        log(f"--init: {path} has no MTP weights; training without the MTP module")
    return cfg


def check_same_data(state: dict, data):
    """--resume needs the data the checkpoint was trained on (its fingerprint: token counts per split)."""
    saved, now = state["corpus"].get("splits"), data.fingerprint().get("splits")
    if saved != now:
        raise TrainError(f"--resume: the data differs from the checkpoint's (train/val token counts {saved} vs "
                         f"{now}); pass the same --data")


def switch_step(tc: TrainConfig, schedule: RunSchedule) -> int:
    """The first step past 67.6% of the run's tokens (where the cosine starts and λ drops)."""
    return next((i for i in range(tc.steps) if schedule.fraction(i) >= CONSTANT_END), tc.steps)


def read_train_state(path) -> dict:
    """A checkpoint's train_state.pt (weights_only: tensors and plain values, no pickled code)."""
    file = os.path.join(path, "train_state.pt")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"{file} is missing") from None
    except Exception as e:            # truncated or corrupt: torch raises RuntimeError, pickle errors, ...
        raise TrainError(f"{file} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         f"the file is damaged or truncated") from None


def truncate_metrics(path, step: int, log=print):
    """On resume, keep the metrics up to the checkpoint's step (drop an interrupted tail) and any line
    that does not parse (a crash mid-write), saying how many."""
    if not os.path.exists(path):
        return
    keep, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    if bad:
        log(f"warning: {path}: dropped {bad} line(s) that are not JSON (a write cut short?); the other records are kept")
    atomic_write_text(path, "".join(keep))


def train(cfg: ModelConfig, tc: TrainConfig, log=print) -> dict:
    """Build everything, train, export. Returns the final metrics."""
    return Trainer(cfg, tc, log).train()


def rng_state() -> dict:
    """torch, numpy and Python RNG states as tensors and plain values, so the training state loads
    with torch.load(weights_only=True) - no arbitrary pickles."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
