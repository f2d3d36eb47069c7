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
the all-to-all with the splits swapped).

Overlap. The dispatch is asynchronous (`async_op=True`): the shared experts, which need no routed
row, run on this rank's tokens while the rows travel, and the dispatch is waited just before the
routed experts need it (`overlap`, on by default). `comm_seconds` counts the time a rank is blocked
on an all-to-all: the exposed communication, which the overlap shrinks. The combine and the
backward all-to-alls stay synchronous: within one micro-batch nothing independent is left to run
beside them; hiding those takes a second micro-batch (DualPipe's paired forward and backward).

The expert weights are DTensors sharded on the ep mesh (Shard(0): E/ep whole experts per rank), so
optimizers and torch.distributed.checkpoint see the full [E, ...] tensor; the forward uses the local
shard. The dp replicas of a shard are FSDP-sharded again over dp (`apply_fsdp`: ZeRO for the experts,
so each dp rank keeps 1/dp of their optimizer state); inside a pipeline stage they stay replicated.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..fp8.linear import FP8RoutedExperts
from ..fp8.quant import E4M3, TILE, dequantize, quantize
from ..model import MoE, RoutedExperts
from ..ops import expert_swiglu
from .mesh import Parallel


class InFlight:
    """All-to-alls started with async_op=True and what to do once they land (`then`). Their output
    buffers must not be read before `wait`."""

    def __init__(self):
        self.works, self.then = [], None

    def wait(self, timer=None):
        t0 = time.perf_counter()
        for w in self.works:
            w.wait()
        if timer is not None:
            timer.comm_seconds += time.perf_counter() - t0
        if self.then is not None:
            self.then()


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits, differentiable; `timer` (a module) accumulates seconds.
    With `inflight` the forward only starts the exchange (the caller waits); the backward blocks."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, timer, inflight=None, backward_group=None):
        ctx.splits, ctx.group, ctx.timer = (out_splits, in_splits), backward_group or group, timer
        return _a2a(x, out_splits, in_splits, group, timer, inflight)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _a2a(grad, in_splits, out_splits, ctx.group, ctx.timer), None, None, None, None, None, None


def _a2a(x, out_splits, in_splits, group, timer, inflight: InFlight | None = None):
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    if inflight is not None:
        inflight.works.append(dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group,
                                                     async_op=True))
        return out
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    if timer is not None:
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        timer.comm_seconds += time.perf_counter() - t0
    return out


def all_to_all(x, out_splits: list[int], in_splits: list[int], group, timer=None, inflight=None, backward_group=None):
    """Differentiable; its backward exchanges over `backward_group` (default: `group`)."""
    return _AllToAll.apply(x, out_splits, in_splits, group, timer, inflight, backward_group)


# FP8 communication (arXiv 2412.19437 §3.3.4): the activations before the experts' up-projection and the
# activation gradients before their down-projection travel as E4M3 in 1x128 tiles with power-of-two
# scales, ~half the bytes of BF16; the combine forward and the dispatch backward stay in full precision.
# Power-of-two scales make a re-quantisation on the expert side lossless.

def _send_fp8(x, out_splits, in_splits, group, timer, inflight=None):
    """x [N, D] quantised, sent as (uint8 codes, fp32 scales), received as (q E4M3, s)."""
    q, s = quantize(x, TILE, pow2=True)
    q_recv = _a2a(q.view(torch.uint8), out_splits, in_splits, group, timer, inflight).view(E4M3)
    s_recv = _a2a(s, out_splits, in_splits, group, timer, inflight)
    if timer is not None:
        timer.fp8_bytes_sent += q.numel() + s.numel() * s.element_size()
    return q_recv, s_recv


class _FP8Dispatch(torch.autograd.Function):
    """Forward: rows sent in FP8; returns them dequantised (exactly the values the experts compute on)
    and the FP8 codes and scales themselves, for the up-projection to use as they are. Backward: the
    gradient returns in full precision. With `inflight` the rows are dequantised into the returned
    buffer when the exchange is waited."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, timer, inflight=None, backward_group=None):
        ctx.splits, ctx.group, ctx.timer = (out_splits, in_splits), backward_group or group, timer
        q, s = _send_fp8(x, out_splits, in_splits, group, timer, inflight)
        ctx.mark_non_differentiable(q, s)
        if inflight is None:
            return dequantize(q, s, TILE, x.dtype), q, s
        rows = x.new_empty(q.shape)

        @torch.no_grad()              # filling the output in place keeps it this function's output
        def land():
            rows.copy_(dequantize(q, s, TILE, x.dtype))

        inflight.then = land
        return rows, q, s

    @staticmethod
    def backward(ctx, grad, _gq, _gs):
        out_splits, in_splits = ctx.splits
        return _a2a(grad, in_splits, out_splits, ctx.group, ctx.timer), None, None, None, None, None, None


class _FP8GradCombine(torch.autograd.Function):
    """Forward: the expert outputs return in full precision. Backward: their gradients (the input of the
    down-projection's backward) are sent in FP8."""

    @staticmethod
    def forward(ctx, y, out_splits, in_splits, group, timer, backward_group=None):
        ctx.splits, ctx.group, ctx.timer, ctx.dtype = (out_splits, in_splits), backward_group or group, timer, y.dtype
        return _a2a(y, out_splits, in_splits, group, timer)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        q, s = _send_fp8(grad, in_splits, out_splits, ctx.group, ctx.timer)
        return dequantize(q, s, TILE, ctx.dtype), None, None, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale`."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ExpertExchange(nn.Module):
    """The dispatch/combine of expert parallelism over `n_slots` expert slots, `n_local` per ep rank (rank
    r holds slots [r*n_local, (r+1)*n_local)). Training's slots are the experts themselves; serving adds
    replicas of hot experts as extra slots (fewchips.inference.experts)."""

    overlap = True                          # the shared experts run while the dispatch travels

    def __init__(self, n_slots: int, par: Parallel):
        super().__init__()
        self.ep, self.n_local = par.ep, n_slots // par.ep
        self.group = par.ep_group
        self.comm_seconds = 0.0                             # all-to-all wall time, forward and backward
        self.dispatch_bytes = 0                             # bytes of the token rows the forward dispatch sent
        self.dispatch_rows = 0                              # and how many rows
        self.fp8_bytes_sent = 0                             # FP8 codes and scales sent (both directions)
        self.backward_group = None                          # the backward's all-to-alls (None: self.group);
        #                                                     DualPipe's overlapped chunks set their own
        self.fp8_dispatch = False                           # FP8 experts: dispatch in FP8 (set by from_dense)

    def exchange(self, x_sorted, counts_E, fn, meanwhile=None):
        """Send rows sorted by global expert to their owners, apply fn(x_local, counts_L) there (rows
        sorted by local expert), and bring the results back in the original order. `meanwhile()` runs
        while the rows travel (with `overlap`; after they land otherwise)."""
        P, L = self.ep, self.n_local
        counts_PL = counts_E.view(P, L)
        recv_PL = torch.empty_like(counts_PL)
        dist.all_to_all_single(recv_PL, counts_PL.contiguous(), group=self.group)  # counts first
        send = counts_PL.sum(1).tolist()
        recv = recv_PL.sum(1).tolist()
        self.dispatch_rows += x_sorted.shape[0]
        inflight = InFlight() if self.overlap else None
        if self.fp8_dispatch:
            before = self.fp8_bytes_sent
            x_recv, q_recv, s_recv = _FP8Dispatch.apply(x_sorted, recv, send, self.group, self, inflight,
                                                        self.backward_group)
            self.dispatch_bytes += self.fp8_bytes_sent - before
        else:
            self.dispatch_bytes += x_sorted.numel() * x_sorted.element_size()
            x_recv = all_to_all(x_sorted, recv, send, self.group, self, inflight, self.backward_group)
        if meanwhile is not None:
            meanwhile()
        if inflight is not None:
            inflight.wait(self)
        # Received rows are peer-major; the grouped FFN wants them expert-major.
        local_id = torch.arange(L, device=x_recv.device).repeat(P).repeat_interleave(recv_PL.flatten())
        perm = local_id.argsort(stable=True)
        if self.fp8_dispatch:                     # the up-projection takes the received FP8 rows as they are
            y_local = fn(x_recv[perm], recv_PL.sum(0), x_fp8=(q_recv[perm], s_recv[perm]))
        else:
            y_local = fn(x_recv[perm], recv_PL.sum(0))
        y_recv = torch.empty_like(y_local).index_copy_(0, perm, y_local)
        if self.fp8_dispatch:
            return _FP8GradCombine.apply(y_recv, send, recv, self.group, self, self.backward_group)
        return all_to_all(y_recv, send, recv, self.group, self, backward_group=self.backward_group)


class ExpertParallelExperts(ExpertExchange):
    """Drop-in for `RoutedExperts` (same call, same parameter names and global shapes) whose experts
    live on their owner ranks."""

    def __init__(self, n_experts: int, gate_up_LFD: torch.Tensor, down_LDF: torch.Tensor, par: Parallel):
        super().__init__(n_experts, par)
        self.n_experts = n_experts
        self.first = par.ep_rank * self.n_local             # global id of local expert 0
        ep_mesh = par.mesh["ep"]                            # replicas over dp: FSDP shards them there (apply_fsdp)
        self.gate_up_proj = nn.Parameter(DTensor.from_local(gate_up_LFD, ep_mesh, [Shard(0)], run_check=False))
        self.down_proj = nn.Parameter(DTensor.from_local(down_LDF, ep_mesh, [Shard(0)], run_check=False))
        self.swiglu = expert_swiglu                         # the grouped FFN: the replaced module's (FP8 too)

    @classmethod
    def from_dense(cls, experts: RoutedExperts, par: Parallel,
                   fp8_dispatch: bool | None = None) -> "ExpertParallelExperts":
        """The experts of `experts` this rank owns. fp8_dispatch (default: when the experts are FP8 and
        ep > 1): send token rows and the down-projection's gradients in FP8, as the report does."""
        E = experts.n_experts
        if E % par.ep:
            raise ValueError(f"--ep {par.ep} must divide n_routed_experts ({E}): experts are placed whole")
        L = E // par.ep
        sl = slice(par.ep_rank * L, (par.ep_rank + 1) * L)
        with torch.no_grad():                   # a meta model stays meta: each rank materialises its experts later
            device = "meta" if experts.gate_up_proj.is_meta else par.device
            gate_up = experts.gate_up_proj[sl].detach().clone().to(device)
            down = experts.down_proj[sl].detach().clone().to(device)
        new = cls(E, gate_up, down, par)
        new.swiglu = experts.swiglu
        if fp8_dispatch is None:                 # at ep 1 nothing travels: no reason to round the rows
            fp8_dispatch = isinstance(experts, FP8RoutedExperts) and par.ep > 1
        new.fp8_dispatch = fp8_dispatch
        return new

    def forward(self, x_MD, experts_MK, weights_MK, shared: nn.Module | None = None):
        M, K = experts_MK.shape
        flat = experts_MK.reshape(-1)
        order = flat.argsort(stable=True)
        token_of = order // K                                               # source token of each copy
        side = {}

        def meanwhile():                                  # the shared experts need no routed row
            side["y"] = shared(x_MD)

        y_sorted = self.exchange(x_MD[token_of], torch.bincount(flat, minlength=self.n_experts), self.expert_ffn,
                                 meanwhile if shared is not None else None)
        y_sorted = y_sorted * weights_MK.reshape(-1)[order, None].to(y_sorted.dtype)
        y_MD = torch.zeros_like(x_MD).index_add_(0, token_of, y_sorted.to(x_MD.dtype))  # bf16 under autocast
        return y_MD if shared is None else y_MD + side["y"]

    def expert_ffn(self, x_sorted, counts_L, **kw):
        """The grouped SwiGLU of the replaced experts (plain or FP8) on the local experts' weights. Their
        gradient is scaled by 1/ep: the rows of all ep peers meet here, and each peer's loss is the mean
        over its own tokens, so the weights' share of the mean loss over the ep peers is the sum / ep
        (the mean over dp is FSDP's, or the pipeline's)."""
        w1, w2 = self.gate_up_proj.to_local(), self.down_proj.to_local()
        if self.ep > 1:
            w1, w2 = _ScaleGrad.apply(w1, 1.0 / self.ep), _ScaleGrad.apply(w2, 1.0 / self.ep)
        return self.swiglu(x_sorted, counts_L, w1, w2, **kw)


def apply_expert_parallel(model: nn.Module, par: Parallel, fp8_dispatch: bool | None = None) -> nn.Module:
    """Replace every MoE layer's RoutedExperts (FP8 ones included: their `swiglu` comes along) by its
    ExpertParallelExperts (in place), at every ep including 1. fp8_dispatch: see `from_dense`."""
    for m in model.modules():
        if isinstance(m, MoE) and not isinstance(m.experts, (RoutedExperts, ExpertParallelExperts)):
            raise ValueError(f"{type(m.experts).__name__} holds no trainable expert weights (FP8 kept for inference?): "
                             f"load the model with fewchips.from_pretrained to train or split it over ranks")
        if isinstance(m, MoE) and isinstance(m.experts, RoutedExperts):
            m.experts = ExpertParallelExperts.from_dense(m.experts, par, fp8_dispatch)
    return model


def expert_modules(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def expert_params(model: nn.Module) -> set[nn.Parameter]:
    return {p for m in expert_modules(model) for p in (m.gate_up_proj, m.down_proj)}


def comm_seconds(model: nn.Module, reset: bool = False) -> float:
    total = 0.0
    for m in expert_modules(model):
        total += m.comm_seconds
        if reset:
            m.comm_seconds = 0.0
    return total
