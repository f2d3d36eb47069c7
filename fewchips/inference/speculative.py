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
which starts there; attention never looks past a row's own position.
"""

from __future__ import annotations

import torch

from ..model import LatentCache
from .sampling import SamplingParams, draw, probabilities
from .steps import pad_rows, prefill, stop_reason


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


def mtp_generate(model, rows: list[list[int]], params: list[SamplingParams], tokenizer=None,
                 stats: dict | None = None) -> list[list[int]]:
    cfg = model.config
    if cfg.num_nextn_predict_layers < 1 or len(model.mtp) < 1:
        raise ValueError("use_mtp needs a model with an MTP module (num_nextn_predict_layers >= 1 and its weights)")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B = len(rows)
    lens_B = torch.tensor([len(r) for r in rows], device=device)
    T = int(lens_B.max())
    cache = LatentCache(cfg, B, T + params[0].max_tokens + 2, dtype=dtype, device=device)
    gen_rngs = [p.generator(device) for p in params]
    arangeB = torch.arange(B, device=device)

    # Prefill: main model over the prompts, first token, then the MTP module over the same positions.
    h_BTD, last_BV = prefill(model, rows, cache)
    first_B = draw(probabilities(last_BV, params), gen_rngs)
    mtp_in = pad_rows([r[1:] + [t] for r, t in zip(rows, first_B.tolist())], 0, device)
    hm_BTD = model.mtp_hidden(0, mtp_in, h_BTD, cache=cache)
    q_BV = probabilities(model.mtp_logits(0, hm_BTD[arangeB, lens_B - 1]), params)
    draft_B = draw(q_BV, gen_rngs)

    greedy = all(p.greedy for p in params)
    gens: list[list[int]] = [[t] for t in first_B.tolist()]
    active = [i for i in range(B) if stop_reason(gens[i], params[i], tokenizer) is None]
    last_B, pos_B = first_B, lens_B.clone()            # last emitted token and its position, per row
    n_forwards, n_row_forwards, n_drafted, n_accepted = 1, B, 0, 0
    while active:
        sel = torch.tensor(active, device=device)
        slots = None if len(active) == B else sel
        a_params, a_rngs = [params[i] for i in active], [gen_rngs[i] for i in active]
        A = len(active)
        arangeA = torch.arange(A, device=device)
        pos_A2 = pos_B[sel][:, None] + torch.arange(2, device=device)
        last_A, d_A = last_B[sel], draft_B[sel]
        h_A2D = model.hidden_states(torch.stack((last_A, d_A), 1), positions=pos_A2, cache=cache, slots=slots)
        logits_A2V = model.lm_head(h_A2D)
        if greedy:                  # exact match; the same rule as below with one-hot p and q, minus the softmaxes
            best_A2 = logits_A2V.argmax(-1)
            ok_A, fix_A, bonus_A = best_A2[:, 0] == d_A, best_A2[:, 0], best_A2[:, 1]
        else:
            ok_A, fix_A = verify(probabilities(logits_A2V[:, 0], a_params), q_BV[sel], d_A, a_params, a_rngs)
            bonus_A = draw(probabilities(logits_A2V[:, 1], a_params), a_rngs)
        n_forwards += 1
        n_row_forwards += A
        n_drafted += A
        n_accepted += int(ok_A.sum())

        # The next draft: MTP over (h_p, token p+1) and, where accepted, (h_{p+1}, token p+2).
        tok1_A = torch.where(ok_A, d_A, fix_A)
        tok2_A = torch.where(ok_A, bonus_A, fix_A)
        hm_A2D = model.mtp_hidden(0, torch.stack((tok1_A, tok2_A), 1), h_A2D, positions=pos_A2, cache=cache, slots=slots)
        idx_A = ok_A.long()
        mtp_logits_AV = model.mtp_logits(0, hm_A2D[arangeA, idx_A])
        if greedy:
            draft_B[sel] = mtp_logits_AV.argmax(-1)
        else:
            q_BV[sel] = probabilities(mtp_logits_AV, a_params)
            draft_B[sel] = draw(q_BV[sel], a_rngs)
        last_B[sel] = tok2_A
        pos_B[sel] += 1 + idx_A
        still = []
        for j, i in enumerate(active):
            emitted = [int(tok1_A[j])] + ([int(tok2_A[j])] if bool(ok_A[j]) else [])
            done = False
            for t in emitted:
                gens[i].append(t)
                if stop_reason(gens[i], params[i], tokenizer) is not None:
                    done = True
                    break
            if not done:
                still.append(i)
        active = still
    if stats is not None:
        n_tokens = sum(len(g) for g in gens)
        stats.update(drafted=n_drafted, accepted=n_accepted, forwards=n_forwards, tokens=n_tokens,
                     acceptance_rate=n_accepted / max(n_drafted, 1),
                     tokens_per_forward=n_tokens / n_row_forwards)   # per row; plain decoding: 1.0
    return gens
