"""FSDP2 (`fully_shard`) for every parameter that is not a routed expert, over all ranks.

Groups (one all-gather each): the embedding, every decoder layer, every MTP layer (its final norm
separately, since `mtp_logits` and `mtp_forward` call it outside the layer), the final norm and the
output head, all over the stage's dp x ep ranks. Each MoE layer's routed experts are a group of their
own over dp only: their weights are already split over ep (whole experts per rank), and FSDP shards
each rank's experts again over its dp replicas. That is ZeRO for the experts: weights, gradients and
optimizer state 1/dp per rank. FSDP averages their gradients over dp; the experts' own 1/ep (their
local gradient sums the ep peers' tokens, `ExpertParallelExperts.expert_ffn`) completes the mean
loss's gradient, as for every other parameter. The model's entry points besides `forward`
(`hidden_states`, the MTP methods) are registered as forward methods of the root, so its per-step
setup runs for them too.

Mixed precision: parameters are all-gathered and computed in `param_dtype` (bf16, say) and
gradients reduced in fp32; the sharded master weights and the optimizer state stay fp32. The
embedding's output is already in `param_dtype`, so no inputs are cast.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from .expert_parallel import expert_modules
from .mesh import Parallel

ROOT_METHODS = ("hidden_states", "mtp_forward", "mtp_hidden", "mtp_logits")


def apply_fsdp(model: nn.Module, par: Parallel, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    kw = dict(mesh=par.fsdp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if model.config.tie_word_embeddings:
        fully_shard([model.model.embed_tokens, model.lm_head], **kw)
        head = []
    else:
        fully_shard(model.model.embed_tokens, **kw)
        head = [model.lm_head]
    shard_blocks(model, model.model.layers, model.mtp, [model.model.norm, *head], par, kw)
    fully_shard(model, **{**kw, "reshard_after_forward": False})     # the root: owns no parameters itself
    for name in ROOT_METHODS:
        register_fsdp_forward_method(model, name)
    return model


def shard_blocks(root: nn.Module, layers, mtp_layers, others, par: Parallel, kw: dict):
    """The FSDP groups below a root, the same with or without a pipeline: the routed experts under
    `root` over dp (children first), each decoder layer, each MTP layer (its final norm separately:
    `mtp_logits` and `mtp_forward` call it outside the layer), and each module of `others` (final
    norm, head) over `kw`'s mesh."""
    for experts in expert_modules(root):
        fully_shard(experts, **{**kw, "mesh": par.mesh["dp"]})
    for layer in layers:
        fully_shard(layer, **kw)
    for layer in mtp_layers:
        fully_shard(layer.shared_head.norm, **kw)
        fully_shard(layer, **kw)
    for module in others:
        fully_shard(module, **kw)


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def gather_once(model: nn.Module):
    """All-gather and release every FSDP group once. torch 2.13's post-backward without gradient sync
    (accumulation) reads each group's gathered parameter, also of a group that has never run: the MTP
    layers when no MTP loss is taken (GRPO, SFT with --mtp-lambda 0), an AttributeError otherwise."""
    for m in fsdp_modules(model):
        m.unshard()
        m.reshard()


def set_gradient_sync(model: nn.Module, enabled: bool):
    """Gradient accumulation: skip the reduce-scatters on all but the last micro-batch."""
    for m in fsdp_modules(model):
        m.set_requires_gradient_sync(enabled, recurse=False)
