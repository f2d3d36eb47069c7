"""The training objective of DeepSeek-V3 (arXiv 2412.19437 §2.1.2, §2.2), one floor below training and
parallelism so that the trainer and the pipeline's last stage compute the same loss:

    loss = CE(main) + λ·mean_k CE(MTP depth k) + α·Σ_layers seq_balance
    b ← b + γ·sign(mean(load) − load)          per MoE layer, after the step (aux-loss-free balancing;
                                               a load counts real tokens, never padding: `Batch.load_mask`)

Shape legend: B rows, T positions (a row holds T + 1 tokens: inputs [:-1], targets [1:]), D hidden,
V vocabulary, L MoE layers, E routed experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import DeepseekV3, MoE, MoEStats

FIELDS = ("ids", "target", "segment", "position")


@dataclass
class Batch:
    """Rows of T + 1 tokens: the model reads [:, :-1] and is scored on [:, 1:]. Pretraining fills only
    `ids` (documents packed without cross-document masking, as the report's pre-training); packed chat
    samples also say which tokens are targets, which sample each token is in, and its position there."""
    ids: torch.Tensor                        # [B, T+1] int64
    target: torch.Tensor | None = None       # [B, T+1] bool: the token is scored when it is a target
    segment: torch.Tensor | None = None      # [B, T+1] sample number (attention stays inside a sample)
    position: torch.Tensor | None = None     # [B, T+1] position within the sample

    def _tensors(self):
        return tuple(getattr(self, f) for f in FIELDS)

    def to(self, device) -> Batch:
        return Batch(*(None if t is None else t.to(device) for t in self._tensors()))

    def rows(self, sl: slice) -> Batch:
        return Batch(*(None if t is None else t[sl] for t in self._tensors()))

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        return Batch(*(None if ts[0] is None else torch.cat(ts) for ts in zip(*(b._tensors() for b in batches))))

    def target_mask(self, k: int = 0):
        """[B, T-k] bool: whether input position i is scored on token i+k+1 (k = 0: the next token;
        k >= 1: MTP depth k). None when every position is. A target must be a trained token of the same
        sample as the position predicting it."""
        if self.target is None and self.segment is None:
            return None
        T = self.ids.shape[1] - 1
        mask = (self.target[:, k + 1:] if self.target is not None
                else torch.ones_like(self.ids[:, k + 1:], dtype=torch.bool))
        if self.segment is not None:
            mask = mask & (self.segment[:, k + 1:] == self.segment[:, : T - k])
        return mask

    def load_mask(self):
        """[B, T] bool: the input positions that hold a real token (not padding), whose expert loads the
        bias update counts; None when every position does (pre-training rows)."""
        return None if self.segment is None else self.segment[:, :-1] >= 0

    def target_count(self) -> int:
        """Scored next-token targets: what the main loss is averaged over."""
        mask = self.target_mask(0)
        return self.ids[:, 1:].numel() if mask is None else int(mask.sum())

    # One int64 tensor for what travels between pipeline stages: ids alone [B, T+1] (pre-training), or
    # every field [B, 4, T+1] (packed chats: ids, target, segment, position).
    def window(self) -> torch.Tensor:
        if self.target is None and self.segment is None and self.position is None:
            return self.ids
        return torch.stack([t.long() for t in self._tensors()], dim=1)

    @staticmethod
    def from_window(w: torch.Tensor) -> Batch:
        if w.dim() == 2:
            return Batch(w)
        return Batch(w[:, 0], w[:, 1].bool(), w[:, 2], w[:, 3])


def summed_ce(logits_BTV, targets_BT, mask_BT=None) -> torch.Tensor:
    """Cross-entropy summed over each row's scored targets [B] (only where `mask_BT` is set), in fp32."""
    B, T = targets_BT.shape
    ce = F.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1), reduction="none")
    ce_BT = ce.view(B, T) if mask_BT is None else ce.view(B, T) * mask_BT
    return ce_BT.sum(1)


def compute_losses(model: DeepseekV3, batch, mtp_lambda: float, amp_dtype, count=None):
    """Losses of one micro-batch (a `Batch`, or ids [B, T+1]). Returns (main CE, MTP CE averaged over
    depths, Σ_layers seq_balance, MoEStats stacked over main then MTP layers). The main loss sums the
    scored targets' CE and divides by `count` (default: their number, so a mean; a process holding a
    slice of a batch passes its share of the whole batch's count, a scalar or one per row [B]). MTP
    depth k at position i predicts token i+k+1 and, as the report's eq. 24, is divided by the same
    count (T per sequence in pre-training)."""
    if isinstance(batch, torch.Tensor):
        batch = Batch(batch)
    ids = batch.ids
    inp_BT = ids[:, :-1]
    pos_BT = None if batch.position is None else batch.position[:, :-1]
    seg_BT = None if batch.segment is None else batch.segment[:, :-1]
    with torch.autocast(ids.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        h_BTD, stats = model.hidden_states(inp_BT, positions=pos_BT, segments=seg_BT, with_stats=True,
                                           load_mask=batch.load_mask())
        main, mtp, mtp_stats = head_losses(model, h_BTD, batch, mtp_lambda, count)
    stats = stats.cat(mtp_stats)
    return main, mtp, stats.seq_balance.float().sum(), stats


def head_losses(model: DeepseekV3, h_BTD, batch: Batch, mtp_lambda: float, count=None):
    """What follows the decoder layers, from their final-normed output h [B, T, D]: the main CE and the
    MTP depths' CE (see `compute_losses`), and the MTP layers' MoEStats."""
    main_B, mtp_B, stats = head_row_losses(model, h_BTD, batch, mtp_lambda)
    if count is None:
        count = max(batch.target_count(), 1)
    return (main_B / count).sum(), (mtp_B / count).sum(), stats


def head_row_losses(model: DeepseekV3, h_BTD, batch: Batch, mtp_lambda: float):
    """Per row [B]: the main CE summed over its scored targets, and the MTP depths' summed CE averaged
    over depths (none when mtp_lambda is 0); and the MTP layers' MoEStats. The pipeline's last stage
    calls it too (dividing by counts it gets from the schedule): one loss for every layout."""
    ids = batch.ids
    inp_BT, tgt_BT = ids[:, :-1], ids[:, 1:]
    pos_BT = None if batch.position is None else batch.position[:, :-1]
    seg_BT = None if batch.segment is None else batch.segment[:, :-1]
    main_B = summed_ce(model.lm_head(h_BTD), tgt_BT, batch.target_mask(0))
    mtp_terms, stats = [], MoEStats.stack([], model.config.n_routed_experts, ids.device)
    if mtp_lambda > 0 and len(model.mtp):
        logits_k, stats = model.mtp_forward(inp_BT, h_BTD, pos_BT, seg_BT, with_stats=True, load_mask=batch.load_mask())
        for k, logits in enumerate(logits_k, start=1):                              # targets t_{i+k+1}
            mtp_terms.append(summed_ce(logits, ids[:, k + 1:], batch.target_mask(k)))
    mtp_B = torch.stack(mtp_terms).mean(0) if mtp_terms else torch.zeros_like(main_B)
    return main_B, mtp_B, stats


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    return loss_nats / (math.log(2) * bytes_per_token) if bytes_per_token > 0 else float("nan")


@torch.no_grad()
def evaluate(model: DeepseekV3, batches, target_bytes: int, amp=None, device="cpu", reduce=None) -> dict:
    """Loss (mean over the scored targets: every token of text, the assistant's tokens of chats) and bits
    per byte of those targets' text. What the trainers log as validation and `fewchips eval` prints.
    `reduce(t)`: sums a tensor over the processes that each scored a slice of the batches."""
    if not batches:
        return {}
    was_training = model.training
    model.eval()
    device = torch.device(device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)           # summed CE, scored targets
    for b in batches:
        b = b.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            h = model.hidden_states(b.ids[:, :-1], None if b.position is None else b.position[:, :-1],
                                    segments=None if b.segment is None else b.segment[:, :-1])
            sums[0] += summed_ce(model.lm_head(h), b.ids[:, 1:], b.target_mask(0)).sum().double()
        sums[1] += b.target_count()
    model.train(was_training)
    if reduce is not None:
        sums = reduce(sums)
    n = int(sums[1].item())
    loss = sums[0].item() / max(n, 1)
    return {"val_loss": loss, "val_bpb": bits_per_byte(loss, target_bytes / max(n, 1)), "val_tokens": n}


def moe_routers(model: DeepseekV3):
    """Routers in the order of the rows of MoEStats: main layers, then MTP layers."""
    layers = [*model.model.layers, *model.mtp]
    return [layer.mlp.gate for layer in layers if isinstance(layer.mlp, MoE)]


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
