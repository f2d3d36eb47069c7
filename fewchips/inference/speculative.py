"""MTP speculative decoding (arXiv 2412.19437 §2.2 and §5.4.3): the MTP module drafts token p+1 from the main model's
hidden state at p and the token at p; one main forward over [token p, draft] verifies the draft and
yields one more token, so each forward emits one or two tokens.

Acceptance is the standard speculative rule: keep draft d with probability min(1, p(d) / q(d)) (p the
main model's distribution, q the drafter's, both after temperature/top-k/top-p), otherwise sample from
normalise(max(0, p - q)); the output distribution is exactly p. Greedy rows have one-hot p and q, so
this is exact-match acceptance and the output is token for token plain greedy decoding's.

Per step, for a row whose last emitted token t sits at position p with draft d for p+1:
    main   [t, d] at [p, p+1]             -> h_p, h_{p+1}; logits for p+1 and p+2
    accepted: emit d and the bonus b from p+2; MTP on (h_p, d), (h_{p+1}, b) drafts p+3
    rejected: emit the corrected c for p+1;   MTP on (h_p, c) drafts p+2
Entries the rejected branch writes at p+1 (main and MTP cache) are overwritten by the next step,
which starts there; attention never looks past a row's own position. The engine's runner
(`runner.ModelRunner._verify`) runs these steps; this module holds the acceptance rule.
"""

from __future__ import annotations

import torch

from .sampling import SamplingParams, draw


def verify(p_BV, q_BV, draft_B, params: list[SamplingParams], generators) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept or reject one draft per row. Returns (accepted [B] bool, replacement token [B]) where
    the replacement is drawn from the residual distribution (used only where rejected)."""
    B = draft_B.shape[0]
    rows = torch.arange(B, device=draft_B.device)
    ratio_B = p_BV[rows, draft_B] / q_BV[rows, draft_B].clamp_min(1e-30)
    u_B = torch.zeros(B, device=p_BV.device)
    for i, g in enumerate(generators):
        if g is not None:
            u_B[i] = torch.rand((), generator=g, device=p_BV.device)
    accepted_B = u_B < ratio_B
    residual_BV = (p_BV - q_BV).clamp_min(0)
    mass_B = residual_BV.sum(-1, keepdim=True)
    residual_BV = torch.where(mass_B > 0, residual_BV / mass_B.clamp_min(1e-30), p_BV)
    return accepted_B, draw(residual_BV, generators)
