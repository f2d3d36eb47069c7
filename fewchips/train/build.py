"""The pieces a trainer is built from: the model as it will be trained (on the meta device: the layout
places it and each process then materialises only what it holds), the precision, AdamW and the
gradient clip. FP8, activation checkpointing and compilation plug in here."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..fp8 import apply_fp8
from ..fp8.optim import AdamWBF16Moments
from ..model import DeepseekV3
from .config import TrainConfig
from .schedule import RunSchedule


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX). torch has no public query: its
    oneDNN one is used where it exists; without it, fp32 (the safe choice)."""
    query = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    return bool(query()) if query is not None else False


def autocast_dtype(name: str, device: torch.device):
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    try:   # CPUs with AVX512-BF16/AMX run bf16 matmuls natively; elsewhere bf16 is emulated and slow
        return torch.bfloat16 if cpu_has_native_bf16() else None
    except (AttributeError, RuntimeError):
        return None


def build_model(cfg: ModelConfig, tc: TrainConfig) -> DeepseekV3:
    """The model as it will be trained, on the meta device (no memory): FP8 linears, a frozen MTP module,
    activation checkpointing and compiled layers as `tc` asks. The layout places it on its ranks, then
    each process allocates and fills only the tensors it holds (`Layout.materialise`)."""
    with torch.device("meta"):
        model = DeepseekV3(cfg)
    if tc.freeze_mtp:                 # the MTP module stays as it is: no gradient, no optimizer state, no MTP loss
        for p in model.mtp.parameters():
            p.requires_grad_(False)
    if tc.fp8:
        apply_fp8(model, backend=tc.fp8_backend, cache_activations=tc.fp8_activations == "cached")
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
    for layer in [*model.model.layers, *model.mtp]:
        def forward(*args, _orig=layer.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _orig(*args, **kwargs)
            return checkpoint(_orig, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


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
    kinds = {isinstance(p, DTensor) for p in decay + no_decay}
    fused = len(kinds) == 1
    if tc.bf16_moments:
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
    """torch's clip_grad_norm_: gradients scaled by max_norm / (norm + 1e-6) when that is below 1, and
    no pass over them when nothing is clipped. `norm_sq`: Σ g² over the whole model when this process
    holds only part of it (`parallel.grad_norm_sq`, `Pipeline.grad_norm_sq`); each process then scales
    its own shards. Returns the norm before clipping."""
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
    scale = max_norm / (float(norm) + 1e-6)
    for p in params:               # the local shards: DTensors of several meshes need no common op
        local(p.grad).mul_(scale)
    return norm


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


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
        p.grad = DTensor.from_local(fixed, g.device_mesh, g.placements, run_check=False)
