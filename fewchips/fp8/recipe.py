"""Which weights run (and are stored) in FP8: the report's recipe (arXiv 2412.19437 §3.3.1) and the
released FP8 checkpoint, one predicate for both.

FP8: every attention projection, the dense MLPs, the shared experts and the routed experts, in the
main layers and in the MTP layers. Higher precision: embedding, output head, router (`mlp.gate`), all
norms, the attention core (softmax(QK^T)V, not a linear layer), the MTP `eh_proj`.
"""

from __future__ import annotations

import re

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
