"""FSDP2 (`fully_shard`) for every parameter that is not a routed expert, over all ranks.

Groups (one all-gather each): the embedding, every decoder layer, every MTP layer (its final norm
separately, since `mtp_logits` calls it outside the layer), the final norm and the output head. A
layer's group is the list of its submodules that take tensors only (attention, norms, router,
shared expert): FSDP's hooks rebuild list arguments, and the layer's forward takes the `stats` list. Routed experts are left out (`ignored_params`): expert parallelism owns them, and
`reduce_expert_grads` reduces their gradients over dp.

Mixed precision: parameters are all-gathered and computed in `param_dtype` (bf16, say) and
gradients reduced in fp32; the sharded master weights and the optimizer state stay fp32. The
embedding's output is already in `param_dtype`, so no inputs are cast (casting would copy the
`stats` list the model appends to).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..model import MoE, MTPLayer
from .expert_parallel import expert_params
from .mesh import Parallel

ROOT_METHODS = ("hidden_states", "mtp_forward", "mtp_hidden", "mtp_logits")


def apply_fsdp(model: nn.Module, par: Parallel, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    kw = dict(mesh=par.fsdp_mesh, mp_policy=mp, ignored_params=expert_params(model))
    if model.config.tie_word_embeddings:
        fully_shard([model.model.embed_tokens, model.lm_head], **kw, reshard_after_forward=reshard_after_forward)
    else:
        fully_shard(model.model.embed_tokens, **kw, reshard_after_forward=reshard_after_forward)
        fully_shard(model.lm_head, **kw, reshard_after_forward=reshard_after_forward)
    for layer in list(model.model.layers) + list(model.mtp):
        if hasattr(layer, "shared_head"):
            fully_shard(layer.shared_head.norm, **kw, reshard_after_forward=reshard_after_forward)
        fully_shard(_tensor_only_parts(layer), **kw, reshard_after_forward=reshard_after_forward)
    fully_shard(model.model.norm, **kw, reshard_after_forward=reshard_after_forward)
    fully_shard(model, **kw, reshard_after_forward=False)     # the root: owns no parameters itself
    _claim_root_without_args(model)
    return model


def _tensor_only_parts(layer: nn.Module) -> list[nn.Module]:
    """A decoder (or MTP) layer's submodules whose calls take tensors only, as one FSDP group.
    The layer and MoE forwards also take the `stats` list, which FSDP's hooks would copy."""
    mlp = layer.mlp
    parts = [layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm]
    if isinstance(mlp, MoE):
        parts += [mlp.gate] + ([mlp.shared_experts] if mlp.shared_experts is not None else [])
    else:
        parts.append(mlp)
    if isinstance(layer, MTPLayer):
        parts += [layer.enorm, layer.hnorm, layer.eh_proj]
    return parts


def _claim_root_without_args(model: nn.Module):
    """Run the root's per-iteration setup (lazy init, stream waits, the backward final callback) for
    `model(...)` and the model's other entry points, with no arguments: on CUDA the root copies its
    arguments to the device, and a copied `stats` list would never be seen by the caller."""
    state = model._get_fsdp_state()
    model.register_forward_pre_hook(lambda m, a, k: (state._pre_forward(m, (), {}), None)[1],
                                    prepend=True, with_kwargs=True)
    for name in ROOT_METHODS:
        orig = getattr(model, name)

        @functools.wraps(orig)
        def wrapped(*args, _orig=orig, **kwargs):
            state._pre_forward(model, (), {})
            return state._post_forward(model, (), _orig(*args, **kwargs))

        setattr(model, name, wrapped)


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def set_gradient_sync(model: nn.Module, enabled: bool):
    """Gradient accumulation: skip the reduce-scatters on all but the last micro-batch."""
    for m in fsdp_modules(model):
        m.set_requires_gradient_sync(enabled, recurse=False)
