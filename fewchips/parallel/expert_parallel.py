"""Expert parallelism: each ep rank owns E/ep whole routed experts; token copies travel to their
expert's owner and back with two uneven all-to-alls.

Shape legend (as in model.py): M local tokens, K experts per token, D hidden, F expert width,
E experts in the layer, L local experts (E / ep), P ep ranks, R rows received from all peers.

One MoE layer on one rank:

    route (replicated router)      experts_MK, weights_MK
    sort copies by expert          x_sorted [M*K, D]     grouped by owner rank, then by expert
    exchange counts                counts_PL  received: how many rows each peer sends each local expert
    dispatch all-to-all            x_recv [R, D]         peer-major; regrouped expert-major for the FFN
    grouped SwiGLU                 y_local [R, D]
    combine all-to-all             y_sorted [M*K, D]     back in the sender's sorted order
    weight and scatter-add         y_MD                  exactly as the single-process RoutedExperts

Experts are placed contiguously (rank r holds experts [r*L, (r+1)*L)), and the router's groups are
contiguous too, so when ep divides n_group each rank holds whole groups and `topk_group` bounds the
number of ranks a token is sent to (the paper's node-limited routing with group = node).
Gradients flow through both all-to-alls (a small autograd.Function: the backward of an all-to-all is
the all-to-all with the splits swapped). The expert weights are DTensors placed
(Replicate on dp, Shard(0) on ep), so optimizers and torch.distributed.checkpoint see the full
[E, ...] tensor; the forward uses the local shard.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..model import MoE, RoutedExperts
from ..ops import expert_swiglu
from .mesh import Parallel


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits, differentiable; `timer` (a module) accumulates seconds."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, timer):
        ctx.splits, ctx.group, ctx.timer = (out_splits, in_splits), group, timer
        return _a2a(x, out_splits, in_splits, group, timer)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _a2a(grad, in_splits, out_splits, ctx.group, ctx.timer), None, None, None, None


def _a2a(x, out_splits, in_splits, group, timer):
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    if timer is not None:
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        timer.comm_seconds += time.perf_counter() - t0
    return out


def all_to_all(x, out_splits: list[int], in_splits: list[int], group, timer=None):
    return _AllToAll.apply(x, out_splits, in_splits, group, timer)


class ExpertParallelExperts(nn.Module):
    """Drop-in for `RoutedExperts` (same call, same parameter names and global shapes) whose experts
    live on their owner ranks."""

    def __init__(self, n_experts: int, gate_up_LFD: torch.Tensor, down_LDF: torch.Tensor, par: Parallel):
        super().__init__()
        self.n_experts, self.ep, self.n_local = n_experts, par.ep, n_experts // par.ep
        self.group = par.ep_group
        self.first = par.ep_rank * self.n_local             # global id of local expert 0
        place = [Replicate(), Shard(0)]
        self.gate_up_proj = nn.Parameter(DTensor.from_local(gate_up_LFD, par.mesh, place, run_check=False))
        self.down_proj = nn.Parameter(DTensor.from_local(down_LDF, par.mesh, place, run_check=False))
        self.comm_seconds = 0.0                             # all-to-all wall time, forward and backward
        self.swiglu = expert_swiglu                         # the grouped FFN: the replaced module's (FP8 too)

    @classmethod
    def from_dense(cls, experts: RoutedExperts, par: Parallel) -> "ExpertParallelExperts":
        E = experts.n_experts
        if E % par.ep:
            raise ValueError(f"--ep {par.ep} must divide n_routed_experts ({E}): experts are placed whole")
        L = E // par.ep
        sl = slice(par.ep_rank * L, (par.ep_rank + 1) * L)
        with torch.no_grad():
            gate_up = experts.gate_up_proj[sl].detach().clone().to(par.device)
            down = experts.down_proj[sl].detach().clone().to(par.device)
        new = cls(E, gate_up, down, par)
        new.swiglu = experts.swiglu
        return new

    def forward(self, x_MD, experts_MK, weights_MK):
        M, K = experts_MK.shape
        flat = experts_MK.reshape(-1)
        order = flat.argsort(stable=True)
        token_of = order // K                                               # source token of each copy
        y_sorted = self.exchange(x_MD[token_of], torch.bincount(flat, minlength=self.n_experts), self.expert_ffn)
        y_sorted = y_sorted * weights_MK.reshape(-1)[order, None].to(y_sorted.dtype)
        return torch.zeros_like(x_MD).index_add_(0, token_of, y_sorted.to(x_MD.dtype))  # bf16 under autocast

    def exchange(self, x_sorted, counts_E, fn):
        """Send rows sorted by global expert to their owners, apply fn(x_local, counts_L) there (rows
        sorted by local expert), and bring the results back in the original order."""
        P, L = self.ep, self.n_local
        counts_PL = counts_E.view(P, L)
        recv_PL = torch.empty_like(counts_PL)
        dist.all_to_all_single(recv_PL, counts_PL.contiguous(), group=self.group)  # counts first
        send = counts_PL.sum(1).tolist()
        recv = recv_PL.sum(1).tolist()
        x_recv = all_to_all(x_sorted, recv, send, self.group, self)
        # Received rows are peer-major; the grouped FFN wants them expert-major.
        local_id = torch.arange(L, device=x_recv.device).repeat(P).repeat_interleave(recv_PL.flatten())
        perm = local_id.argsort(stable=True)
        y_local = fn(x_recv[perm], recv_PL.sum(0))
        y_recv = torch.empty_like(y_local).index_copy_(0, perm, y_local)
        return all_to_all(y_recv, send, recv, self.group, self)

    def expert_ffn(self, x_sorted, counts_L):
        """The grouped SwiGLU of the replaced experts (plain or FP8) on the local experts' master weights."""
        return self.swiglu(x_sorted, counts_L, self.gate_up_proj.to_local(), self.down_proj.to_local())


def apply_expert_parallel(model: nn.Module, par: Parallel) -> nn.Module:
    """Replace every MoE layer's RoutedExperts (FP8 ones included: their `swiglu` comes along) by its
    ExpertParallelExperts (in place), at every ep including 1."""
    for m in model.modules():
        if isinstance(m, MoE) and not isinstance(m.experts, (RoutedExperts, ExpertParallelExperts)):
            raise ValueError(f"{type(m.experts).__name__} holds no trainable expert weights (FP8 kept for inference?): "
                             f"load the model with fewchips.from_pretrained to train or split it over ranks")
        if isinstance(m, MoE) and isinstance(m.experts, RoutedExperts):
            m.experts = ExpertParallelExperts.from_dense(m.experts, par)
    return model


def expert_modules(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def expert_params(model: nn.Module) -> set[nn.Parameter]:
    return {p for m in expert_modules(model) for p in (m.gate_up_proj, m.down_proj)}


def reduce_expert_grads(model: nn.Module, par: Parallel):
    """Make expert gradients those of the mean loss over all ranks. Each rank's local gradient
    already sums the contributions of its ep peers' tokens (through the all-to-all backward); sum
    over dp replicas and divide by dp x ep (FSDP averages the other parameters likewise)."""
    for p in _ordered_expert_params(model):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad.to_local()
        if par.dp > 1:
            dist.all_reduce(g, group=par.dp_group)
        g.div_(par.data_size)


def _ordered_expert_params(model):
    # The same order on every rank (module order), so the dp all-reduces pair up.
    return [p for m in expert_modules(model) for p in (m.gate_up_proj, m.down_proj)]


def comm_seconds(model: nn.Module, reset: bool = False) -> float:
    total = 0.0
    for m in expert_modules(model):
        total += m.comm_seconds
        if reset:
            m.comm_seconds = 0.0
    return total
