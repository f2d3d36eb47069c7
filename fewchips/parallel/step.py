"""One distributed training step, for the trainer to call or copy: parallelize a model, the loss
(next token + MTP + sequence-wise balance), expert gradients reduced over dp, a global gradient
norm clip, the optimizer step, and the aux-loss-free bias update from the loads of the whole step.

The loss of a step is the mean over ranks of each rank's mean over its own tokens, which equals the
single-process loss on the concatenated global batch (every rank holds the same number of tokens).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from ..model import Router
from .expert_parallel import apply_expert_parallel, expert_params, reduce_expert_grads
from .fsdp import apply_fsdp
from .mesh import Parallel


def parallelize(model, par: Parallel, param_dtype: torch.dtype | None = None):
    """Experts split over ep, everything else FSDP over all ranks. `model` holds the full weights
    (the same on every rank: same seed or the same checkpoint)."""
    apply_expert_parallel(model, par)
    return apply_fsdp(model, par, param_dtype=param_dtype)


def lm_loss(model, ids_BT, stats: list, mtp_weight: float = 0.3, balance_alpha: float = 1e-4):
    """Next-token cross-entropy + mtp_weight * mean MTP cross-entropy + alpha * sum of the layers'
    sequence-wise balance terms. Appends one MoEStats per MoE layer (main layers, then MTP) to stats."""
    T = ids_BT.shape[1]
    h_BTD = model.hidden_states(ids_BT, stats=stats)
    logits = model.lm_head(h_BTD)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids_BT[:, 1:].flatten())
    mtp = []
    for d, lg in enumerate(model.mtp_forward(ids_BT, h_BTD, stats=stats)):
        k = d + 1                                      # position i of depth k predicts token i+k+1
        if T - k - 1 > 0:   # summed over the targets that exist, divided by the sequence length (eq. 24)
            mtp.append(F.cross_entropy(lg[:, :T - k - 1].flatten(0, 1).float(), ids_BT[:, k + 1:].flatten(),
                                       reduction="sum") / (ids_BT.shape[0] * (T - 1)))
    if mtp:
        loss = loss + mtp_weight * torch.stack(mtp).mean()
    if stats:
        loss = loss + balance_alpha * torch.stack([s.seq_balance for s in stats]).sum()
    return loss


def global_expert_loads(stats: list, par: Parallel | None = None) -> torch.Tensor:
    """[layers, E] token copies per expert over the whole step (all ranks): the same on every rank."""
    loads_LE = torch.stack([s.load_E.float() for s in stats])
    if par is not None and par.world_size > 1:
        dist.all_reduce(loads_LE)
    return loads_LE


@torch.no_grad()
def update_biases(model, loads_LE: torch.Tensor, gamma: float):
    """b_i += gamma * sign(mean load - load_i) per MoE layer (§2.1.2), outside autograd."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if len(routers) != loads_LE.shape[0]:
        raise ValueError(f"{loads_LE.shape[0]} load rows for {len(routers)} routers")
    for r, load_E in zip(routers, loads_LE):
        b = r.e_score_correction_bias
        b += gamma * torch.sign(load_E.mean() - load_E).to(b.device, b.dtype)


@torch.no_grad()
def clip_grad_norm_(model, max_norm: float, par: Parallel) -> torch.Tensor:
    """Global L2 norm over FSDP shards (each element on one rank) and expert shards (each element
    on dp ranks); scales every gradient by min(1, max_norm / norm). torch's clip_grad_norm_ cannot
    mix the two meshes."""
    experts = expert_params(model)
    sq = torch.zeros((), dtype=torch.float32, device=par.device)
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        part = g.float().pow(2).sum()
        if p in experts:
            part = part / par.dp
        elif not isinstance(p.grad, DTensor):
            part = part / par.world_size                # a replicated plain tensor
        sq += part
    if par.world_size > 1:
        dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(coef)
    return norm


def train_step(model, optimizer, ids_BT, par: Parallel, gamma: float = 1e-3, max_norm: float = 1.0,
               mtp_weight: float = 0.3, balance_alpha: float = 1e-4) -> dict:
    """One optimizer step on this rank's micro-batch ids_BT (its slice of the global batch).
    Returns the global loss, the gradient norm and the global expert loads [layers, E]."""
    optimizer.zero_grad(set_to_none=True)
    stats: list = []
    loss = lm_loss(model, ids_BT, stats, mtp_weight, balance_alpha)
    loss.backward()
    reduce_expert_grads(model, par)
    norm = clip_grad_norm_(model, max_norm, par)
    optimizer.step()
    loads_LE = global_expert_loads(stats, par)
    update_biases(model, loads_LE, gamma)
    loss_all = loss.detach().clone()
    if par.world_size > 1:
        dist.all_reduce(loss_all)
    return {"loss": (loss_all / par.world_size).item(), "grad_norm": norm.item(), "loads": loads_LE}
