"""The model runner: the model, the paged latent cache and the forwards of one step.

`prefill` computes prompt chunks (right-padded, expanded MLA from position 0 or over the cache after a
prefix hit or an earlier chunk); `decode` computes one token per request (absorbed MLA, compiled if
asked) or, with MTP speculation, verifies [last token, draft] per request in one T=2 forward. Each
returns one `Output` per request: the tokens sampled, the logits they came from, logprobs, and the
next MTP draft. The runner reads requests and never writes them: the engine records the outputs (and
moves a grammar's matcher on by the tokens it records). Sampling applies each grammar row's mask of allowed
tokens (structured outputs, `grammar.py`); those rows draft no MTP token.

MTP speculation (arXiv 2412.19437 §5.4.3): the MTP module runs after every main forward over the same
positions (its latents are one more layer of the same blocks) and drafts each request's next-but-one
token; the verify step keeps a draft with the speculative-sampling rule (`speculative.verify`): one
or two tokens per request per step, the output distribution unchanged (greedy: token for token). A
shared prefix block's MTP entry at its last position was computed with the token after the block of
whoever computed it; that can only change a draft, never the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .grammar import allowed_mask
from .paged import NULL_BLOCK, PagedLatentCache
from .request import Request, TokenLogprob
from .sampling import adjust_logits, draw, probabilities, sample
from .speculative import verify
from .steps import compiled_decode_step, pad_rows


@dataclass
class Output:
    """What one step computed for one request."""
    request: Request
    n_computed: int                               # more of its tokens now in the cache
    tokens: list[int] = field(default_factory=list)               # sampled, in order (none, one or two)
    logits: list[torch.Tensor] = field(default_factory=list)      # the raw logits [V] each came from
    logprobs: list[TokenLogprob | None] = field(default_factory=list)   # per token, when asked for
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    draft: int | None = None                      # the next MTP draft and its distribution (None: greedy)
    draft_q: torch.Tensor | None = None
    drafted: bool = False                         # a draft was verified this step / and kept
    accepted: bool = False


def token_logprobs(logits_TV, tokens: list[int], top_n: int) -> list[TokenLogprob]:
    """Log-softmax of the raw logits; the token's value and the top-N come from the same tensor."""
    lp_TV = torch.log_softmax(logits_TV.float(), -1)
    chosen = lp_TV.gather(1, torch.tensor(tokens, device=lp_TV.device)[:, None])[:, 0].tolist()
    if top_n > 0:
        vals, idx = lp_TV.topk(min(top_n, lp_TV.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


def drafts_for(r: Request) -> bool:
    """Penalties, logit bias and a grammar change p after the draft; logprobs report one token a step: no draft."""
    return not (r.params.adjusts_logits or r.params.logprobs is not None or r.grammar is not None)


class ModelRunner:
    def __init__(self, model, cache: PagedLatentCache, speculative: bool = False, compile: bool = False):
        self.model, self.cache, self.block_size = model, cache, cache.block_size
        self.device = next(model.parameters()).device
        self.speculative = speculative
        # compile: decode steps as one compiled graph (steps.compiled_decode_step); pays off for
        # batches of one or two, e.g. `fewchips chat --compile`. Prefill stays eager.
        self._step = compiled_decode_step() if compile else None

    def tables(self, reqs: list[Request], width_tokens: int) -> torch.Tensor:
        """Block tables [B, K] padded with the null block, K blocks covering `width_tokens` positions."""
        K = math.ceil(width_tokens / self.block_size)
        return torch.tensor([r.blocks[:K] + [NULL_BLOCK] * (K - len(r.blocks[:K])) for r in reqs],
                            dtype=torch.long, device=self.device)

    # ---- the forwards ------------------------------------------------------------------------
    def prefill(self, work: list[tuple[Request, int]]) -> list[Output]:
        """Each request's next chunk of tokens (right-padded; pad positions past a row's blocks write
        into the null block). Rows whose chunk completes their tokens sample their next token."""
        reqs = [r for r, _ in work]
        starts = [r.n_computed for r in reqs]
        rows = [r.tokens[s: s + n] for (r, n), s in zip(work, starts)]
        T = max(len(x) for x in rows)
        pos_BT = torch.tensor(starts, device=self.device)[:, None] + torch.arange(T, device=self.device)
        tables = self.tables(reqs, max(starts) + T)
        h_BTD = self.model.hidden_states(pad_rows(rows, 0, self.device), positions=pos_BT, cache=self.cache,
                                         slots=tables, attend_len=max(s + len(x) for s, x in zip(starts, rows)))
        outs = [Output(r, n) for r, n in work]
        for i, (r, n) in enumerate(work):
            if r.prompt_logprobs is not None:
                outs[i].prompt_logprobs = self._prompt_logprobs(r, h_BTD[i, :n], starts[i])
        done = [i for i, (r, n) in enumerate(work) if n == r.pending and r.params.max_tokens > 0]
        if done:                                  # max_tokens 0 is scoring only (echo): nothing to sample
            last = torch.tensor([len(rows[i]) - 1 for i in done], device=self.device)
            self._sample([outs[i] for i in done],
                         self.model.lm_head(h_BTD[torch.tensor(done, device=self.device), last]))
        if self.speculative:
            self._draft(outs, h_BTD, starts, [len(x) for x in rows], pos_BT, tables)
        return outs

    def decode(self, reqs: list[Request]) -> list[Output]:
        """One token per request, or with MTP speculation one or two (`_verify`)."""
        if self.speculative:
            return self._verify(reqs)
        pos = [r.n_computed for r in reqs]                      # the one token each row computes
        ids_B = torch.tensor([r.tokens[p] for r, p in zip(reqs, pos)], device=self.device)
        pos_B = torch.tensor(pos, device=self.device)
        tables = self.tables(reqs, max(pos) + 1)
        if self._step is not None:     # the attend length from the host-side positions: no sync in the graph
            logits_BV = self._step(self.model, ids_B, pos_B, self.cache, tables, max(pos) + 1)
        else:
            logits_BV = self.model(ids_B[:, None], positions=pos_B[:, None], cache=self.cache, slots=tables,
                                   attend_len=max(pos) + 1)[:, 0]
        outs = [Output(r, 1) for r in reqs]
        self._sample(outs, logits_BV)
        return outs

    def _verify(self, reqs: list[Request]) -> list[Output]:
        """One T=2 forward over [last token, MTP draft] per request: the logits at the last token verify the
        draft (kept with probability min(1, p/q), else a token from normalise(max(0, p - q))); if it is
        kept, the logits at the draft give a bonus token. Rows without a draft (penalties, logit bias or
        logprobs asked for) ride along and take one token as plain decoding would."""
        pos = [r.n_computed for r in reqs]
        ids_B2 = torch.tensor([[r.tokens[p], 0 if r.draft is None else r.draft] for r, p in zip(reqs, pos)],
                              device=self.device)
        pos_B2 = torch.tensor(pos, device=self.device)[:, None] + torch.arange(2, device=self.device)
        tables = self.tables(reqs, max(pos) + 2)
        h_B2D = self.model.hidden_states(ids_B2, positions=pos_B2, cache=self.cache, slots=tables,
                                         attend_len=max(pos) + 2)
        logits_B2V = self.model.lm_head(h_B2D)
        outs = [Output(r, 1) for r in reqs]
        plain = [i for i, r in enumerate(reqs) if r.draft is None]
        spec = [i for i, r in enumerate(reqs) if r.draft is not None]
        if plain:
            self._sample([outs[i] for i in plain], logits_B2V[torch.tensor(plain, device=self.device), 0])
        if spec:
            sr = [reqs[i] for i in spec]
            params, rngs = [r.params for r in sr], [r.rng for r in sr]
            sel = torch.tensor(spec, device=self.device)
            d_S = torch.tensor([r.draft for r in sr], device=self.device)
            if all(p.greedy for p in params):   # exact match: the same rule with one-hot p and q, minus the softmaxes
                best_S2 = logits_B2V[sel].argmax(-1)
                ok_S, fix_S, bonus_S = best_S2[:, 0] == d_S, best_S2[:, 0], best_S2[:, 1]
            else:                               # a draft made in an all-greedy batch has q one-hot at it
                q_SV = torch.zeros(len(sr), logits_B2V.shape[-1], device=self.device)   # fp32, as probabilities
                for j, r in enumerate(sr):
                    if r.draft_q is not None:
                        q_SV[j] = r.draft_q
                    else:
                        q_SV[j, r.draft] = 1.0
                ok_S, fix_S = verify(probabilities(logits_B2V[sel, 0], params), q_SV, d_S, params, rngs)
                bonus_S = draw(probabilities(logits_B2V[sel, 1], params), rngs)
            for i, ok, fix, bonus in zip(spec, ok_S.tolist(), fix_S.tolist(), bonus_S.tolist()):
                o = outs[i]                             # one host copy per tensor above, not one per row
                o.drafted = True
                if ok:                                  # position p+1 (the draft) is computed too
                    o.accepted, o.n_computed = True, 2
                    o.tokens, o.logits = [reqs[i].draft, bonus], [logits_B2V[i, 0], logits_B2V[i, 1]]
                else:
                    o.tokens, o.logits = [fix], [logits_B2V[i, 0]]
                o.logprobs = [None] * len(o.tokens)
        # MTP over [p, p+1] with tokens [p+1, p+2]; an entry at p+1 after a rejection is rewritten next step
        self._draft(outs, h_B2D, pos, [2] * len(outs), pos_B2, tables, at=[len(o.tokens) - 1 for o in outs])
        return outs

    # ---- sampling, drafts, logprobs ----------------------------------------------------------
    def _sample(self, outs: list[Output], logits_BV):
        """Each row's next token (after its penalties, logit bias and grammar; logprobs stay the model's own)."""
        reqs = [o.request for o in outs]
        params = [r.params for r in reqs]
        adjusted_BV = adjust_logits(logits_BV, params, [r.output_ids for r in reqs], [r.prompt_ids for r in reqs])
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and r.grammar.active]
        if rows:                                  # tokens a grammar does not allow next: -inf (a new tensor)
            allowed_BV = allowed_mask([reqs[i].grammar for i in rows], logits_BV.shape[-1], self.device)
            if len(rows) < len(reqs):             # rows without a grammar allow everything
                allowed_GV, allowed_BV = allowed_BV, torch.ones_like(logits_BV, dtype=torch.bool)
                allowed_BV[torch.tensor(rows, device=self.device)] = allowed_GV
            adjusted_BV = adjusted_BV.masked_fill(~allowed_BV, float("-inf"))
        for o, r, t, logits_V in zip(outs, reqs, sample(adjusted_BV, params, [r.rng for r in reqs]).tolist(),
                                     logits_BV):
            o.tokens, o.logits = [t], [logits_V]
            o.logprobs = [token_logprobs(logits_V[None], [t], r.params.logprobs)[0]
                          if r.params.logprobs is not None else None]

    def _draft(self, outs: list[Output], h_BTD, starts, lens, pos_BT, tables, at: list[int] | None = None):
        """The MTP module over the positions the main forward just computed: position t reads the main
        state h_t and token t+1 (the next prompt token or the one just sampled). Rows that sampled a token
        draft the next-but-one from position `at[i]` (default: the row's last, lens[i] - 1)."""
        T = h_BTD.shape[1]
        at = at if at is not None else [n - 1 for n in lens]
        nxt = [(o.request.tokens + o.tokens)[s + 1: s + n + 1] for o, s, n in zip(outs, starts, lens)]
        hm_BTD = self.model.mtp_hidden(0, pad_rows([x + [0] * (T - len(x)) for x in nxt], 0, self.device),
                                       h_BTD, positions=pos_BT, cache=self.cache, slots=tables)
        rows = [i for i, o in enumerate(outs) if o.tokens and drafts_for(o.request)]
        if not rows:
            return
        logits_BV = self.model.mtp_logits(0, hm_BTD[torch.tensor(rows, device=self.device),
                                                     torch.tensor([at[i] for i in rows], device=self.device)])
        params = [outs[i].request.params for i in rows]
        if all(p.greedy for p in params):
            q_BV, d_B = [None] * len(rows), logits_BV.argmax(-1)
        else:
            q_BV = probabilities(logits_BV, params)
            d_B = draw(q_BV, [outs[i].request.rng for i in rows])
        for i, q_V, d in zip(rows, q_BV, d_B.tolist()):
            outs[i].draft, outs[i].draft_q = d, q_V

    def _prompt_logprobs(self, r: Request, h_TD, start: int) -> list[TokenLogprob | None]:
        """Logprobs of prompt tokens start+1 .. from this chunk's hidden states (position t predicts t+1)."""
        P = len(r.prompt_ids)
        out = [None] if start == 0 else []              # the first token has no context to score it
        upto = min(start + h_TD.shape[0], P - 1)            # positions whose next token is a prompt token
        if upto > start:
            out += token_logprobs(self.model.lm_head(h_TD[: upto - start]), r.prompt_ids[start + 1: upto + 1],
                                  r.prompt_logprobs)
        return out
