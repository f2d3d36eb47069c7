"""Placement of a built model on the dp x ep mesh (`parallelize`), and the one reduction that depends
on it: the global gradient norm over FSDP shards and expert shards. The training step itself is the
trainer's, for every layout (fewchips/train/trainer.py, layout.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .expert_parallel import apply_expert_parallel
from .fsdp import apply_fsdp
from .mesh import Parallel


def parallelize(model, par: Parallel, param_dtype: torch.dtype | None = None):
    """Experts split over ep, everything else FSDP over all ranks. `model` is on the meta device (the
    trainer then materialises each rank's shards) or holds the same full weights on every rank."""
    apply_expert_parallel(model, par)
    return apply_fsdp(model, par, param_dtype=param_dtype)


@torch.no_grad()
def grad_norm_sq(model, par: Parallel) -> torch.Tensor:
    """Σ g² over the whole model, each element counted once, the same on every rank: a sharded
    gradient's elements live on one rank each (FSDP over dp x ep; experts over ep, then FSDP over
    dp), a plain tensor's on every rank. (torch's clip_grad_norm_ cannot mix the two meshes.)"""
    sq = torch.zeros((), dtype=torch.float32, device=par.device)
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        part = g.float().pow(2).sum()
        if not isinstance(p.grad, DTensor):
            part = part / par.world_size
        sq += part
    if par.world_size > 1:
        dist.all_reduce(sq)
    return sq
