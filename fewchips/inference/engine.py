"""The continuous-batching engine: requests join and leave a running batch between decode steps.

Each request owns one row ("slot") of a pre-allocated `LatentCache` from admission to its end; the slot
goes back to the free list when it finishes and the next waiting request reuses it (stale entries are
never read: attention stops at a row's own position). The cache is sized once from `max_cache_bytes`,
so memory is capped: requests beyond the free slots wait in a FIFO queue, and a request that could
never fit (prompt + max_tokens > max_len) is refused at `add` with a clear error.

One `step()`: admit waiting requests into free slots and prefill them (right-padded, expanded MLA),
sampling each one's first token; then one decode forward over every running request (absorbed MLA,
each row at its own position), sampling with each request's own parameters and generator.
`start()` runs steps on a background thread; `run(requests)` steps in the caller's thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model import LatentCache
from .sampling import SamplingParams, adjust_logits, sample
from .steps import compiled_decode_step, prefill, stop_reason

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
    slot: int | None = None
    aborted: bool = False
    done_event: threading.Event = field(default_factory=threading.Event)

    def _notify(self, kind, payload):
        if self.on_event is not None:
            self.on_event(self, kind, payload)


class Engine:
    def __init__(self, model, tokenizer=None, max_batch: int = 16, max_len: int | None = None,
                 max_cache_bytes: int | None = None, max_prefill_tokens: int = 8192, compile: bool = False,
                 inference_mode: bool = True):
        cfg = model.config
        self.model, self.tokenizer = model, tokenizer
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        per_token = cfg.kv_cache_bytes_per_token(p.element_size())
        n_slots = max_batch
        if max_cache_bytes is not None:
            n_slots = min(max_batch, max_cache_bytes // (per_token * self.max_len))
            if n_slots < 1:
                raise ValueError(f"max_cache_bytes={max_cache_bytes} cannot hold one request of max_len="
                                 f"{self.max_len} tokens ({per_token * self.max_len} bytes); lower max_len or raise the cap")
        self.cache = LatentCache(cfg, n_slots, self.max_len, n_layers=cfg.num_hidden_layers,
                                 dtype=self.dtype, device=self.device)
        self.n_slots, self.max_prefill_tokens = n_slots, max_prefill_tokens
        self.free_slots = list(range(n_slots))[::-1]
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.peak_batch = 0           # most requests decoded together so far
        # compile: decode steps as one compiled graph (generate.compiled_decode_step); pays off for
        # batches of one or two, e.g. `fewchips chat --compile`. Prefill stays eager.
        self._step = compiled_decode_step() if compile else None
        # False for a model that trains between runs with FSDP: its gathered weights, made once, must not be
        # inference tensors (plain no_grad then)
        self.inference_mode = inference_mode

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

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
            new, budget = [], self.max_prefill_tokens
            while self.waiting and self.free_slots and (not new or len(self.waiting[0].prompt_ids) <= budget):
                r = self.waiting.popleft()
                r.slot = self.free_slots.pop()
                budget -= len(r.prompt_ids)
                new.append(r)
        batch = new
        try:
            if new:
                self.running.extend(new)
                self._prefill(new)
            batch = [r for r in self.running if r.finish_reason is None and r not in new]
            if batch:
                self.peak_batch = max(self.peak_batch, len(batch))
                self._decode(batch)
        except Exception as e:          # a failed forward fails its requests, not the engine
            log.exception("engine step failed")
            for r in batch + [r for r in new if r.finish_reason is None]:
                if r.finish_reason is None:
                    r.error = f"{type(e).__name__}: {e}"
                    self._finish(r, "error")
        self.steps += 1

    def _prefill(self, reqs: list[Request]):
        slots_B = torch.tensor([r.slot for r in reqs], device=self.device)
        h_BTD, last_BV = prefill(self.model, [r.prompt_ids for r in reqs], self.cache, slots_B)
        for i, r in enumerate(reqs):
            if r.prompt_logprobs is not None and len(r.prompt_ids) > 1:
                r.prompt_logprob_list = [None] + self._logprobs(self.model.lm_head(h_BTD[i, : len(r.prompt_ids) - 1]),
                                                                r.prompt_ids[1:], r.prompt_logprobs)
            elif r.prompt_logprobs is not None:
                r.prompt_logprob_list = [None]
        live = []
        for i, r in enumerate(reqs):
            if r.params.max_tokens == 0:       # scoring only (echo with max_tokens 0)
                self._finish(r, "length")
            else:
                live.append(i)
        if live:
            self._emit([reqs[i] for i in live], last_BV[torch.tensor(live, device=self.device)])

    def _decode(self, reqs: list[Request]):
        pos = [len(r.prompt_ids) + len(r.output_ids) - 1 for r in reqs]      # of each row's last token
        ids_B1 = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.device)
        pos_B1 = torch.tensor(pos, device=self.device)[:, None]
        slots_B = torch.tensor([r.slot for r in reqs], device=self.device)
        if self._step is not None:     # the attend length from the host-side positions: no sync in the graph
            logits_BV = self._step(self.model, ids_B1[:, 0], pos_B1[:, 0], self.cache, slots_B, max(pos) + 1)
        else:
            logits_BV = self.model(ids_B1, positions=pos_B1, cache=self.cache, slots=slots_B)[:, 0]
        self._emit(reqs, logits_BV)

    def _emit(self, reqs: list[Request], logits_BV):
        """Sample each row's next token (after its penalties and logit bias; logprobs stay the model's own)."""
        params = [r.params for r in reqs]
        adjusted_BV = adjust_logits(logits_BV, params, [r.output_ids for r in reqs])
        tokens = sample(adjusted_BV, params, [r._rng for r in reqs]).tolist()
        for i, (r, t) in enumerate(zip(reqs, tokens)):
            r.output_ids.append(t)
            item = t
            if r.params.logprobs is not None:
                item = self._logprobs(logits_BV[i: i + 1], [t], r.params.logprobs)[0]
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
        if r.slot is not None:
            self.free_slots.append(r.slot)
            r.slot = None
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
