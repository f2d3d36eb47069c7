"""Which weights run (and are stored) in FP8: the report's recipe (arXiv 2412.19437 §3.3.1) and the
released FP8 checkpoint, one predicate for both; `apply_fp8` puts a model under it.

FP8: every attention projection, the dense MLPs, the shared experts and the routed experts, in the
main layers and in the MTP layers. Higher precision: embedding, output head, router (`mlp.gate`), all
norms, the attention core (softmax(QK^T)V, not a linear layer), the MTP `eh_proj`.
"""

from __future__ import annotations

import re

from torch import nn
from torch.distributed.tensor import DTensor

from ..model import MLP, RoutedExperts
from .cached import FP8CachedMLP
from .linear import FP8Linear, FP8RoutedExperts

_ATTN = r"self_attn\.(?:q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
_MLP = r"mlp\.(?:shared_experts\.)?(?:gate_proj|up_proj|down_proj)"

FP8_LINEAR_RE = re.compile(rf"(?:^|\.)(?:{_ATTN}|{_MLP})$")                        # in-memory module names
FP8_EXPERTS_RE = re.compile(r"(?:^|\.)mlp\.experts$")                             # stacked routed experts
FP8_WEIGHT_RE = re.compile(rf"(?:^|\.)(?:{_ATTN}|{_MLP}|mlp\.experts\.\d+\.(?:gate_proj|up_proj|down_proj))\.weight$")


def is_fp8_linear(module_name: str) -> bool:
    return bool(FP8_LINEAR_RE.search(module_name))


def is_fp8_weight(disk_name: str) -> bool:
    """A tensor name in the release layout (`model.layers.3.mlp.experts.7.up_proj.weight`)."""
    return bool(FP8_WEIGHT_RE.search(disk_name))


def apply_fp8(model: nn.Module, backend: str = "auto", pow2_scales: bool = False,
              cache_activations: bool = False) -> list[str]:
    """Swap the recipe's layers (recipe.py) for FP8 ones in place; returns the converted module names.
    Parameters are kept (same objects), so this may run before or after the optimiser is built.
    `cache_activations`: what the backward keeps is FP8 too (the report's §3.3.3, `fp8.cached`): SwiGLU
    MLPs become one function caching x in E4M3 and h in E5M6, o_proj caches its input in E5M6."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("apply_fp8 must run before parallelize: the layers it swaps are then held by FSDP "
                         "(FP8 experts carry over into expert parallelism)")
    converted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, FP8Linear) and is_fp8_linear(name):
            new = FP8Linear.from_linear(module, backend, pow2_scales,
                                        cache_e5m6=cache_activations and name.endswith("self_attn.o_proj"))
        elif type(module) is RoutedExperts and FP8_EXPERTS_RE.search(name):
            new = FP8RoutedExperts.from_experts(module, backend, pow2_scales, cache_activations)
        elif cache_activations and type(module) is MLP and is_fp8_linear(name + ".gate_proj"):
            new = FP8CachedMLP.from_mlp(module, backend, pow2_scales)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        converted.append(name)
    return converted
