"""The continuous-batching engine over a paged latent cache: requests join and leave a running batch
between steps; the cache is one pool of fixed-size blocks that requests take as they grow.

Each step the scheduler gives every running request its next tokens to compute (one for a decoding
request, a chunk of its prompt for one being prefilled) and admits waiting requests while the step's
prefill budget (`max_prefill_tokens`) and `max_batch` allow. A request computes its tokens in order;
once all of them (prompt and output so far) are in the cache, the logits at the last one give its next
token. So a long prompt is prefilled over several steps beside the running decodes (chunked prefill),
and a request that was preempted simply recomputes what it had (prompt + output) the same way.

- Prefix caching: a new request first takes the longest run of cached full blocks of its tokens
  (`paged.BlockPool`) and computes only the rest. A request whose next block is being computed by
  another request waits a step for it (n choices of one prompt, GRPO's G samples, prefill it once).
- Memory: the pool holds `max_cache_bytes` (default: max_batch requests of max_len tokens). When a
  running request needs a block and none is free, the newest running request is preempted (its blocks
  freed, back to the front of the queue). A request longer than max_len is refused at `add`.
- Two forwards per step: the prefill chunks (right-padded, expanded MLA from position 0 or over the
  cache after a prefix hit or an earlier chunk) and the decodes (absorbed MLA, compiled if asked).
- MTP speculation (`speculative="mtp"`, arXiv 2412.19437 §5.4.3): the MTP module runs after every main
  forward over the same positions (its latents are one more layer of the same blocks) and drafts each
  request's next-but-one token; a decode step verifies [last token, draft] per request in one T=2
  forward with the speculative-sampling rule (`speculative.verify`): one or two tokens per request per
  step, the output distribution unchanged (greedy: token for token). A shared prefix block's MTP entry
  at its last position was computed with the token after the block of whoever computed it; that can
  only change a draft, never the output.

`start()` runs steps on a background thread; `run(requests)` steps in the caller's thread.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .metrics import EngineMetrics
from .paged import NULL_BLOCK, BlockPool, PagedLatentCache, block_hashes
from .sampling import SamplingParams, adjust_logits, draw, probabilities, sample
from .speculative import verify
from .steps import compiled_decode_step, pad_rows, stop_reason

log = logging.getLogger("fewchips")
_ids = itertools.count()


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]          # the top-N (token, logprob), best first


@dataclass(eq=False)   # identity, not field, equality: two identical prompts are two requests
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    on_event: Callable | None = None      # on_event(request, kind, payload) from the engine thread:
    #                                       ("tokens", [TokenLogprob | int]), ("done", reason), ("error", msg)
    prompt_logprobs: int | None = None    # top-N logprobs of the prompt tokens too (echo scoring)
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprob_list: list[TokenLogprob | None] = field(default_factory=list)
    finish_reason: str | None = None      # "stop", "length", "abort" or "error"
    error: str | None = None
    aborted: bool = False
    done_event: threading.Event = field(default_factory=threading.Event)
    # cache state (the engine's)
    blocks: list[int] = field(default_factory=list)        # block table: block of positions [i*bs, (i+1)*bs)
    n_computed: int = 0                   # tokens of prompt + output whose latents are in the cache
    n_registered: int = 0                 # leading blocks offered to the prefix cache
    hashes: list[bytes] = field(default_factory=list)      # chained hashes of the full blocks of its tokens
    cached_tokens: int = 0                # prompt tokens the prefix cache supplied (first admission)
    drafted: int = 0                      # MTP drafts verified / accepted
    accepted: int = 0
    preemptions: int = 0
    arrival: float = 0.0
    last_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def _notify(self, kind, payload):
        if self.on_event is not None:
            self.on_event(self, kind, payload)


def speculation_for(model, choice: str = "auto", max_batch: int = 1) -> str | None:
    """The engine's `speculative` for a CLI choice: 'mtp', 'none', or 'auto': MTP when the model has its
    MTP module and either runs on a GPU (the report: 1.8x tokens/s at 85-90% acceptance) or decodes one
    request at a time. On CPU a two-token step reads about twice the routed experts: measured 1.14x at
    batch 1 and 1.0x at batch 8 on the demo model (benchmarks/RESULTS.md), so a CPU server stays plain."""
    if choice not in ("auto", "mtp", "none"):
        raise ValueError(f"--speculative must be auto, mtp or none, got {choice!r}")
    if choice != "auto":
        return None if choice == "none" else "mtp"
    on_gpu = next(model.parameters()).device.type == "cuda"
    return "mtp" if len(getattr(model, "mtp", [])) > 0 and (on_gpu or max_batch == 1) else None


class Engine:
    def __init__(self, model, tokenizer=None, max_batch: int = 16, max_len: int | None = None,
                 max_cache_bytes: int | None = None, max_prefill_tokens: int = 512, block_size: int = 16,
                 prefix_caching: bool = True, compile: bool = False, inference_mode: bool = True,
                 metrics: EngineMetrics | None = None, speculative: str | None = None):
        cfg = model.config
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
        if speculative and len(getattr(model, "mtp", [])) < 1:
            raise ValueError("speculative='mtp' needs a model with its MTP module loaded (num_nextn_predict_layers >= 1)")
        if speculative and compile:
            raise ValueError("speculative='mtp' and compile=True cannot be combined (the compiled step decodes one token)")
        self.speculative = speculative
        self.model, self.tokenizer = model, tokenizer
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if block_size < 1 or max_prefill_tokens < 1 or max_batch < 1:
            raise ValueError("block_size, max_prefill_tokens and max_batch must be >= 1")
        self.block_size, self.max_batch, self.max_prefill_tokens = block_size, max_batch, max_prefill_tokens
        per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * p.element_size()
        block_bytes = per_layer * (cfg.num_hidden_layers + (1 if speculative else 0)) * block_size   # + the MTP layer
        per_request = math.ceil((self.max_len + (1 if speculative else 0)) / block_size)   # + a draft's slot
        if max_cache_bytes is None:
            n_blocks = max_batch * per_request + 1               # today's memory: max_batch requests of max_len
        else:
            n_blocks = max_cache_bytes // block_bytes
            if n_blocks - 1 < per_request:
                raise ValueError(f"max_cache_bytes={max_cache_bytes} cannot hold one request of max_len="
                                 f"{self.max_len} tokens ({per_request * block_bytes + block_bytes} bytes in blocks "
                                 f"of {block_size}); lower max_len or raise the cap")
        self.pool = BlockPool(n_blocks, prefix_caching)
        self.cache = PagedLatentCache(cfg, n_blocks, block_size, cfg.num_hidden_layers + (1 if speculative else 0),
                                      dtype=self.dtype, device=self.device)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []        # in admission order: the last is preempted first
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.peak_batch = 0           # most requests decoded together so far
        self.peak_running = 0         # most requests holding cache at once
        self.preemptions = 0
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.metrics.watch(self)
        # compile: decode steps as one compiled graph (steps.compiled_decode_step); pays off for
        # batches of one or two, e.g. `fewchips chat --compile`. Prefill stays eager.
        self._step = compiled_decode_step() if compile else None
        # False for a model that trains between runs with FSDP: its gathered weights, made once, must not be
        # inference tensors (plain no_grad then)
        self.inference_mode = inference_mode

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

    @property
    def n_slots(self) -> int:
        """Requests that can hold cache at once (max_batch)."""
        return self.max_batch

    def reset_prefix_cache(self):
        """Forget cached prefixes: call after the weights change (GRPO between steps)."""
        self.pool.reset()
        for r in self.running + list(self.waiting):
            r.n_registered = len(r.blocks)      # held blocks are not offered again under stale content

    # ---- requests ----------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], max_tokens: int):
        """Raise ValueError if the request can never run (empty, unknown ids, longer than the context)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        V = self.model.config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= V for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {V})")
        if len(prompt_ids) + max_tokens > self.max_len:
            raise ValueError(f"this model's maximum context length is {self.max_len} tokens; the request "
                             f"needs {len(prompt_ids)} prompt + {max_tokens} completion tokens")

    def add(self, request: Request) -> Request:
        self.check(request.prompt_ids, request.params.max_tokens)
        request._rng = request.params.generator(self.device)
        request.arrival = time.monotonic()
        with self._cv:
            self.waiting.append(request)
            self._cv.notify()
        return request

    def abort(self, request: Request):
        request.aborted = True
        with self._cv:
            self._cv.notify()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step ----------------------------------------------------------------------------
    def step(self):
        with torch.inference_mode() if self.inference_mode else torch.no_grad():
            self._step_once()

    def _step_once(self):
        with self._cv:
            for r in [r for r in self.waiting if r.aborted]:
                self.waiting.remove(r)
                self._finish(r, "abort")
            for r in [r for r in self.running if r.aborted]:
                self._finish(r, "abort")
            work = self._schedule()
        self.peak_running = max(self.peak_running, len(self.running))
        decodes = [r for r, n in work if n == 1 and r.n_computed == len(r.tokens) - 1 and r.prompt_logprobs is None]
        chunks = [(r, n) for r, n in work if r not in decodes]
        batch = [r for r, _ in work]
        try:
            if chunks:
                self._prefill(chunks)
            if decodes:
                self.peak_batch = max(self.peak_batch, len(decodes))
                (self._decode_speculative if self.speculative else self._decode)(decodes)
        except Exception as e:          # a failed forward fails its requests, not the engine
            log.exception("engine step failed")
            for r in batch:
                if r.finish_reason is None:
                    r.error = f"{type(e).__name__}: {e}"
                    self._finish(r, "error")
        self.steps += 1

    # ---- scheduling --------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Request, int]]:
        """This step's (request, tokens to compute): running requests first (oldest first), then
        waiting ones while the prefill budget, max_batch and the pool allow."""
        work, budget = [], self.max_prefill_tokens
        for r in list(self.running):
            if r not in self.running:              # preempted for an older request in this loop
                continue
            pending = len(r.tokens) - r.n_computed
            n = 1 if pending == 1 else min(pending, budget)
            if n == 0:
                continue
            if self._reserve(r, n + (pending == 1 and getattr(r, "_draft", None) is not None), preempt=True):
                work.append((r, n))
                budget -= n if pending > 1 else 0
        inflight = {h for r in self.running for h in r.hashes[r.n_computed // self.block_size:]}
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            r = self.waiting[0]
            if not r.blocks:
                self._match_prefix(r)
                nxt = len(r.blocks)
                if (self.pool.prefix_caching and r.prompt_logprobs is None and nxt < len(r.hashes)
                        and r.hashes[nxt] in inflight):
                    self.pool.release(r.blocks)      # its next block is being computed: take it next step
                    r.blocks, r.n_computed = [], 0
                    break
            pending = len(r.tokens) - r.n_computed
            n = min(pending, budget)
            if not self._reserve(r, n, preempt=False):
                self.pool.release(r.blocks)
                r.blocks, r.n_computed = [], 0
                break
            self.waiting.popleft()
            self.running.append(r)
            if r.preemptions == 0 and not r.output_ids:   # counted once, at its first admission
                self.metrics.prefix_cache(len(r.prompt_ids), r.cached_tokens)
            inflight.update(r.hashes[r.n_computed // self.block_size:])
            work.append((r, n))
            budget -= n if pending > 1 else 0
        return work

    def _match_prefix(self, r: Request):
        """Take the cached blocks of r's longest cached prefix, leaving at least its last token to compute
        (its logits give the next token). Echo scoring computes every prompt position: no reuse."""
        bs, toks = self.block_size, r.tokens
        if len(r.hashes) < len(toks) // bs:
            r.hashes += block_hashes(toks, bs, r.hashes[-1] if r.hashes else b"", len(r.hashes))
        if r.prompt_logprobs is not None:
            return
        usable = (len(toks) - 1) // bs
        r.blocks = self.pool.match(r.hashes[:usable])
        r.n_computed, r.n_registered = len(r.blocks) * bs, len(r.blocks)
        if r.preemptions == 0 and not r.output_ids:   # its prompt, not a recompute after preemption
            r.cached_tokens = r.n_computed

    def _reserve(self, r: Request, n: int, preempt: bool) -> bool:
        """Blocks for r's next n tokens; if the pool is short, preempt the newest running request (maybe r)."""
        need = math.ceil((r.n_computed + n) / self.block_size) - len(r.blocks)
        while need > 0:
            got = self.pool.allocate(need)
            if got is not None:
                r.blocks += got
                return True
            if not preempt:
                return False
            victim = self.running[-1]
            self._preempt(victim)
            if victim is r:
                return False
        return True

    def _preempt(self, r: Request):
        """Free r's blocks and queue it first again; it recomputes prompt + output so far when readmitted
        (its full blocks stay in the prefix cache until evicted, so that is often cheap)."""
        self.running.remove(r)
        self.pool.release(r.blocks)
        r.blocks, r.n_computed, r.n_registered = [], 0, 0
        r._draft = None
        r.preemptions += 1
        self.preemptions += 1
        self.metrics.preempted()
        self.waiting.appendleft(r)
        log.debug("preempted request %d (%d tokens) for cache blocks", r.id, len(r.tokens))

    def _computed(self, r: Request, n: int):
        """n more of r's tokens are in the cache: offer its newly full blocks to the prefix cache."""
        r.n_computed += n
        bs = self.block_size
        full = min(r.n_computed, len(r.tokens)) // bs      # a kept draft's token is appended just after
        if len(r.hashes) < full:
            r.hashes += block_hashes(r.tokens, bs, r.hashes[-1] if r.hashes else b"", len(r.hashes))
        for i in range(r.n_registered, full):
            self.pool.register(r.blocks[i], r.hashes[i])
        r.n_registered = max(r.n_registered, full)

    def _tables(self, reqs: list[Request], width_tokens: int) -> torch.Tensor:
        """Block tables [B, K] padded with the null block, K blocks covering `width_tokens` positions."""
        K = math.ceil(width_tokens / self.block_size)
        return torch.tensor([r.blocks[:K] + [NULL_BLOCK] * (K - len(r.blocks[:K])) for r in reqs],
                            dtype=torch.long, device=self.device)

    # ---- the forwards ------------------------------------------------------------------------
    def _prefill(self, work: list[tuple[Request, int]]):
        """Compute each request's next chunk of tokens (right-padded; pad positions past a row's blocks
        write into the null block). Rows whose chunk completes their tokens sample their next token."""
        reqs = [r for r, _ in work]
        starts = [r.n_computed for r in reqs]
        rows = [r.tokens[s: s + n] for (r, n), s in zip(work, starts)]
        T = max(len(x) for x in rows)
        ids_BT = pad_rows(rows, 0, self.device)
        pos_BT = torch.tensor(starts, device=self.device)[:, None] + torch.arange(T, device=self.device)
        tables = self._tables(reqs, max(starts) + T)
        h_BTD = self.model.hidden_states(ids_BT, positions=pos_BT, cache=self.cache, slots=tables,
                                         attend_len=max(s + len(x) for s, x in zip(starts, rows)))
        self.metrics.prompt_tokens(sum(len(x) for r, x in zip(reqs, rows) if r.n_computed < len(r.prompt_ids)))
        done = []
        for i, (r, n) in enumerate(work):
            if r.prompt_logprobs is not None:
                self._prompt_logprobs(r, h_BTD[i, :n], starts[i])
            self._computed(r, n)
            if r.n_computed == len(r.tokens):
                if r.params.max_tokens == 0:      # scoring only (echo with max_tokens 0)
                    self._finish(r, "length")
                else:
                    done.append(i)
        if done:
            idx = torch.tensor(done, device=self.device)
            last = torch.tensor([len(rows[i]) - 1 for i in done], device=self.device)
            self._emit([reqs[i] for i in done], self.model.lm_head(h_BTD[idx, last]))
        if self.speculative:
            self._mtp_after(reqs, h_BTD, starts, [len(x) for x in rows], pos_BT, tables)

    def _mtp_after(self, reqs, h_BTD, starts, lens, pos_BT, tables, draft_at=None):
        """The MTP module over the positions the main forward just computed: position t reads the main
        state h_t and token t+1 (the next prompt token or the one just sampled). Rows that finished are
        left out (their blocks are freed). A row with all its tokens computed drafts from its last
        position, or from `draft_at[i]` (the speculative step's accepted/rejected choice)."""
        keep = [i for i, r in enumerate(reqs) if r.finish_reason is None]
        if not keep:
            return
        T = h_BTD.shape[1]
        nxt = [reqs[i].tokens[starts[i] + 1: starts[i] + lens[i] + 1] for i in keep]
        idx = torch.tensor(keep, device=self.device)
        ids_BT = pad_rows([x + [0] * (T - len(x)) for x in nxt], 0, self.device)
        hm_BTD = self.model.mtp_hidden(0, ids_BT, h_BTD[idx], positions=pos_BT[idx], cache=self.cache,
                                       slots=tables[idx])
        rows = [j for j, i in enumerate(keep) if reqs[i].n_computed == len(reqs[i].tokens) - 1]
        if not rows:
            return
        at = [draft_at[keep[j]] if draft_at is not None else lens[keep[j]] - 1 for j in rows]
        logits_BV = self.model.mtp_logits(0, hm_BTD[torch.tensor(rows, device=self.device),
                                                     torch.tensor(at, device=self.device)])
        rs = [reqs[keep[j]] for j in rows]
        params = [r.params for r in rs]
        if all(p.greedy for p in params):
            q_BV, d_B = [None] * len(rs), logits_BV.argmax(-1)
        else:
            q_BV = probabilities(logits_BV, params)
            d_B = draw(q_BV, [r._rng for r in rs])
        for r, q_V, d in zip(rs, q_BV, d_B.tolist()):
            r._draft, r._q = (d, q_V) if not (r.params.adjusts_logits or r.params.logprobs is not None) else (None, None)

    def _prompt_logprobs(self, r: Request, h_TD, start: int):
        """Logprobs of prompt tokens start+1 .. from this chunk's hidden states (position t predicts t+1)."""
        P = len(r.prompt_ids)
        if start == 0:
            r.prompt_logprob_list = [None]
        upto = min(start + h_TD.shape[0], P - 1)            # positions whose next token is a prompt token
        if upto > start:
            r.prompt_logprob_list += self._logprobs(self.model.lm_head(h_TD[: upto - start]),
                                                    r.prompt_ids[start + 1: upto + 1], r.prompt_logprobs)

    def _decode(self, reqs: list[Request]):
        pos = [r.n_computed for r in reqs]                      # the one token each row computes
        self.metrics.prompt_tokens(sum(p < len(r.prompt_ids) for r, p in zip(reqs, pos)))
        ids_B = torch.tensor([r.tokens[p] for r, p in zip(reqs, pos)], device=self.device)
        pos_B = torch.tensor(pos, device=self.device)
        tables = self._tables(reqs, max(pos) + 1)
        if self._step is not None:     # the attend length from the host-side positions: no sync in the graph
            logits_BV = self._step(self.model, ids_B, pos_B, self.cache, tables, max(pos) + 1)
        else:
            logits_BV = self.model(ids_B[:, None], positions=pos_B[:, None], cache=self.cache, slots=tables,
                                   attend_len=max(pos) + 1)[:, 0]
        for r in reqs:
            self._computed(r, 1)
        self._emit(reqs, logits_BV)

    def _decode_speculative(self, reqs: list[Request]):
        """One T=2 forward over [last token, MTP draft] per request: the logits at the last token verify the
        draft (kept with probability min(1, p/q), else a token from normalise(max(0, p - q))); if it is
        kept, the logits at the draft give a bonus token. Rows without a draft (penalties, logit bias or
        logprobs asked for) ride along and take one token as plain decoding would."""
        pos = [r.n_computed for r in reqs]
        drafts = [getattr(r, "_draft", None) for r in reqs]
        ids_B2 = torch.tensor([[r.tokens[p], 0 if d is None else d] for r, p, d in zip(reqs, pos, drafts)],
                              device=self.device)
        pos_B2 = torch.tensor(pos, device=self.device)[:, None] + torch.arange(2, device=self.device)
        tables = self._tables(reqs, max(pos) + 2)
        h_B2D = self.model.hidden_states(ids_B2, positions=pos_B2, cache=self.cache, slots=tables,
                                         attend_len=max(pos) + 2)
        logits_B2V = self.model.lm_head(h_B2D)
        self.metrics.prompt_tokens(sum(p < len(r.prompt_ids) for r, p in zip(reqs, pos)))
        spec = [i for i, d in enumerate(drafts) if d is not None]
        plain = [i for i, d in enumerate(drafts) if d is None]
        emitted: dict[int, list[tuple[int, torch.Tensor]]] = {}
        if plain:
            ps = [reqs[i] for i in plain]
            lg = logits_B2V[torch.tensor(plain, device=self.device), 0]
            toks = sample(adjust_logits(lg, [r.params for r in ps], [r.output_ids for r in ps]),
                          [r.params for r in ps], [r._rng for r in ps]).tolist()
            for j, i in enumerate(plain):
                emitted[i] = [(toks[j], lg[j])]
        if spec:
            sr = [reqs[i] for i in spec]
            params, rngs = [r.params for r in sr], [r._rng for r in sr]
            sel = torch.tensor(spec, device=self.device)
            d_S = torch.tensor([drafts[i] for i in spec], device=self.device)
            if all(p.greedy for p in params):   # exact match: the same rule with one-hot p and q, minus the softmaxes
                best_S2 = logits_B2V[sel].argmax(-1)
                ok_S, fix_S, bonus_S = best_S2[:, 0] == d_S, best_S2[:, 0], best_S2[:, 1]
            else:
                ok_S, fix_S = verify(probabilities(logits_B2V[sel, 0], params), torch.stack([r._q for r in sr]), d_S,
                                     params, rngs)
                bonus_S = draw(probabilities(logits_B2V[sel, 1], params), rngs)
            n_ok = int(ok_S.sum())
            self.metrics.speculation(len(spec), n_ok)
            for j, i in enumerate(spec):
                r = reqs[i]
                r.drafted += 1
                if bool(ok_S[j]):
                    r.accepted += 1
                    emitted[i] = [(drafts[i], logits_B2V[i, 0]), (int(bonus_S[j]), logits_B2V[i, 1])]
                else:
                    emitted[i] = [(int(fix_S[j]), logits_B2V[i, 0])]
        draft_at = []
        for i, r in enumerate(reqs):
            out = emitted[i]
            self._computed(r, len(out))          # position p, and p+1 if its draft was kept
            draft_at.append(len(out) - 1)
            for t, logits_V in out:
                self._append(r, t, logits_V)
                if r.finish_reason is not None:
                    break
        # MTP over [p, p+1] with tokens [p+1, p+2]; an entry at p+1 after a rejection is rewritten next step
        lens = [2] * len(reqs)
        for r in reqs:
            r._draft = None
        self._mtp_after(reqs, h_B2D, pos, lens, pos_B2, tables, draft_at=draft_at)

    def _emit(self, reqs: list[Request], logits_BV):
        """Sample each row's next token (after its penalties and logit bias; logprobs stay the model's own)."""
        params = [r.params for r in reqs]
        adjusted_BV = adjust_logits(logits_BV, params, [r.output_ids for r in reqs])
        tokens = sample(adjusted_BV, params, [r._rng for r in reqs]).tolist()
        for i, (r, t) in enumerate(zip(reqs, tokens)):
            self._append(r, t, logits_BV[i])

    def _append(self, r: Request, t: int, logits_V):
        """r's next token is t (sampled from logits_V): record, stream, and finish r if it stops."""
        now = time.monotonic()
        r.output_ids.append(t)
        self.metrics.token(r, now)
        r.last_token_time = now
        item = t
        if r.params.logprobs is not None:
            item = self._logprobs(logits_V[None], [t], r.params.logprobs)[0]
            r.logprobs.append(item)
        r._notify("tokens", [item])
        reason = stop_reason(r.output_ids, r.params, self.tokenizer)
        if reason is not None:
            self._finish(r, reason)

    @staticmethod
    def _logprobs(logits_TV, tokens: list[int], top_n: int) -> list[TokenLogprob]:
        """Log-softmax of the raw logits; the token's value and the top-N come from the same tensor."""
        lp_TV = torch.log_softmax(logits_TV.float(), -1)
        tok_T = torch.tensor(tokens, device=lp_TV.device)
        chosen = lp_TV.gather(1, tok_T[:, None])[:, 0].tolist()
        out = []
        if top_n > 0:
            vals, idx = lp_TV.topk(min(top_n, lp_TV.shape[-1]), dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        else:
            tops = [[] for _ in tokens]
        for t, c, top in zip(tokens, chosen, tops):
            out.append(TokenLogprob(t, c, top))
        return out

    def _finish(self, r: Request, reason: str):
        r.finish_reason = reason
        if r in self.running:
            self.running.remove(r)
        self.pool.release(r.blocks)
        r.blocks = []
        self.metrics.finished(r, reason, time.monotonic())
        if reason == "error":
            r._notify("error", r.error)
        else:
            r._notify("done", reason)
        r.done_event.set()

    # ---- driving it ----------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> list[Request]:
        """Add the requests and step in this thread until they are all done (no background thread)."""
        if self._thread is not None:
            raise RuntimeError("the engine runs on its own thread; add() requests and wait on done_event")
        for r in requests:
            self.add(r)
        while any(r.finish_reason is None for r in requests):
            self.step()
        return requests

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="fewchips-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self):
        while True:
            with self._cv:
                while not self.has_work() and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
            self.step()
