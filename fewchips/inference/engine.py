"""The continuous-batching engine over a paged latent cache: requests join and leave a running batch
between steps; the cache is one pool of fixed-size blocks that requests take as they grow.

A step is schedule -> run -> record:
- `scheduler.Scheduler` gives every running request its next tokens to compute (one for a decoding
  request, a chunk of its prompt for one being prefilled) and admits waiting requests while the step's
  prefill budget (`max_prefill_tokens`), `max_batch` and the block pool allow; it reuses cached
  prefixes and preempts the newest request when blocks run out.
- `runner.ModelRunner` runs the forwards (prefill chunks, decodes or MTP verification) and returns each
  request's sampled tokens, their logits and logprobs, and its next draft.
- the engine records them: blocks offered to the prefix cache, tokens appended and streamed, stops
  (a stop token or string, max_tokens, or a structured-output grammar that is complete).

A request computes its tokens in order; once all of them (prompt and output so far) are in the cache,
the logits at the last one give its next token. So a long prompt is prefilled over several steps beside
the running decodes (chunked prefill), and a preempted request recomputes what it had the same way.
Memory: the pool holds `max_cache_bytes` (default: max_batch requests of max_len tokens); a request
longer than max_len is refused at `add`. MTP speculation: `speculative="mtp"` (arXiv 2412.19437 §5.4.3).

`start()` runs steps on a background thread; `run(requests)` steps in the caller's thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import torch

from .metrics import EngineMetrics
from .paged import BlockPool, PagedLatentCache
from .request import Request, TokenLogprob
from .runner import ModelRunner, Output
from .scheduler import Scheduler
from .steps import stop_reason

__all__ = ["Engine", "Request", "TokenLogprob", "speculation_for"]

log = logging.getLogger("fewchips")


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


def pool_blocks(cfg, element_size: int, max_batch: int, max_len: int, block_size: int,
                max_cache_bytes: int | None, speculative: bool) -> int:
    """Blocks in the pool (the null block included): max_batch requests of max_len tokens, or what
    max_cache_bytes holds. With MTP every block holds one more layer and a request one more slot."""
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * element_size
    block_bytes = per_layer * (cfg.num_hidden_layers + speculative) * block_size
    per_request = math.ceil((max_len + speculative) / block_size)
    if max_cache_bytes is None:
        return max_batch * per_request + 1
    n_blocks = max_cache_bytes // block_bytes
    if n_blocks - 1 < per_request:
        raise ValueError(f"max_cache_bytes={max_cache_bytes} cannot hold one request of max_len={max_len} "
                         f"tokens ({per_request * block_bytes + block_bytes} bytes in blocks of {block_size}); "
                         "lower max_len or raise the cap")
    return n_blocks


class Engine:
    def __init__(self, model, tokenizer=None, max_batch: int = 16, max_len: int | None = None,
                 max_cache_bytes: int | None = None, max_prefill_tokens: int = 512, block_size: int = 16,
                 prefix_caching: bool = True, compile: bool = False, inference_mode: bool = True,
                 metrics: EngineMetrics | None = None, speculative: str | None = None):
        cfg = model.config
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
        if speculative and len(getattr(model, "mtp", [])) < 1:
            raise ValueError("speculative='mtp' needs a model with its MTP module loaded "
                             "(num_nextn_predict_layers >= 1)")
        if speculative and compile:
            raise ValueError("speculative='mtp' and compile=True cannot be combined "
                             "(the compiled step decodes one token)")
        if block_size < 1 or max_prefill_tokens < 1 or max_batch < 1:
            raise ValueError("block_size, max_prefill_tokens and max_batch must be >= 1")
        self.speculative = speculative
        self.model, self.tokenizer = model, tokenizer
        p = next(model.parameters())
        self.device = p.device
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        spec = speculative is not None
        n_blocks = pool_blocks(cfg, p.element_size(), max_batch, self.max_len, block_size, max_cache_bytes, spec)
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.scheduler = Scheduler(BlockPool(n_blocks, prefix_caching), block_size, max_batch, max_prefill_tokens,
                                   self.metrics)
        cache = PagedLatentCache(cfg, n_blocks, block_size, cfg.num_hidden_layers + spec, dtype=p.dtype,
                                 device=self.device)
        self.runner = ModelRunner(model, cache, speculative=spec, compile=compile)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.forwards = 0             # main-model forwards: a step runs one for its chunks, one for its decodes
        self.peak_batch = 0           # most requests decoded together so far
        self.peak_running = 0         # most requests holding cache at once
        self.metrics.watch(self)
        # False for a model that trains between runs with FSDP: its gathered weights, made once, must not be
        # inference tensors (plain no_grad then)
        self.inference_mode = inference_mode

    # the parts' state, under the names callers and metrics read
    pool = property(lambda self: self.scheduler.pool)
    waiting = property(lambda self: self.scheduler.waiting)
    running = property(lambda self: self.scheduler.running)
    preemptions = property(lambda self: self.scheduler.preemptions)
    block_size = property(lambda self: self.scheduler.block_size)
    max_batch = property(lambda self: self.scheduler.max_batch)
    n_slots = max_batch           # requests that can hold cache at once
    cache = property(lambda self: self.runner.cache)

    @property
    def cache_bytes(self) -> int:
        return self.runner.cache.nbytes

    def reset_prefix_cache(self):
        """Forget cached prefixes: call after the weights change (GRPO between steps)."""
        self.scheduler.reset_prefix_cache()

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
        request.rng = request.params.generator(self.device)
        request.arrival = time.monotonic()
        with self._cv:
            self.scheduler.add(request)
            self._cv.notify()
        return request

    def abort(self, request: Request):
        request.aborted = True
        with self._cv:
            self._cv.notify()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step: schedule -> run -> record ----------------------------------------------------
    def step(self):
        with torch.inference_mode() if self.inference_mode else torch.no_grad():
            self._step_once()

    def _step_once(self):
        with self._cv:
            for r in self.scheduler.aborted():
                self._finish(r, "abort")
            batch = self.scheduler.schedule()
        self.peak_running = max(self.peak_running, len(self.running))
        try:
            for r in batch.requests:
                r.forwards += 1
            if batch.prefill:
                self._record(self.runner.prefill(batch.prefill))
            if batch.decode:
                self.peak_batch = max(self.peak_batch, len(batch.decode))
                self._record(self.runner.decode(batch.decode))
            self.forwards += bool(batch.prefill) + bool(batch.decode)
        except Exception as e:          # a failed forward fails its requests, not the engine
            log.exception("engine step failed")
            for r in batch.requests:
                if r.finish_reason is None:
                    r.error = f"{type(e).__name__}: {e}"
                    self._finish(r, "error")
        self.steps += 1

    def _record(self, outs: list[Output]):
        """Take in one forward's outputs: computed tokens to the scheduler, sampled ones to the requests."""
        P = [len(o.request.prompt_ids) for o in outs]
        self.metrics.prompt_tokens(sum(max(0, min(o.request.n_computed + o.n_computed, p) - o.request.n_computed)
                                       for o, p in zip(outs, P)))
        drafted = [o for o in outs if o.drafted]
        if drafted:
            self.metrics.speculation(len(drafted), sum(o.accepted for o in drafted))
        for o in outs:
            r = o.request
            if o.prompt_logprobs:                    # from position 0 (again, after a preemption): afresh
                r.prompt_logprob_list = (r.prompt_logprob_list if r.n_computed else []) + o.prompt_logprobs
            self.scheduler.computed(r, o.n_computed)   # before the new tokens: a draft's block is not full yet
            r.drafted, r.accepted = r.drafted + o.drafted, r.accepted + o.accepted
            r.draft, r.draft_q = o.draft, o.draft_q
            for t, item in zip(o.tokens, o.logprobs):
                self._append(r, t, item)
                if r.finish_reason is not None:
                    break
            if r.finish_reason is None and r.pending == 0:   # scoring only (echo with max_tokens 0)
                self._finish(r, "length")

    def _append(self, r: Request, t: int, item: TokenLogprob | None):
        """r's next token is t: record, stream, and finish r if it stops."""
        now = time.monotonic()
        r.output_ids.append(t)
        self.metrics.token(r, now)
        r.last_token_time = now
        if item is not None:
            r.logprobs.append(item)
        r.notify("tokens", [t if item is None else item])
        reason = stop_reason(r.output_ids, r.params, self.tokenizer)
        if reason is None and r.grammar is not None:
            reason = self._follow_grammar(r, t)
        if reason is not None:
            self._finish(r, reason)

    @staticmethod
    def _follow_grammar(r: Request, t: int) -> str | None:
        """r's grammar takes token t: "stop" once its output is complete, "error" if it refuses t."""
        if not r.grammar.advance(t):
            r.error = f"structured output: token {t} refused by the grammar: {r.grammar.error}"
            return "error"
        return "stop" if r.grammar.finished else None

    def _finish(self, r: Request, reason: str):
        r.finish_reason = reason
        self.scheduler.finish(r)
        self.metrics.finished(r, reason, time.monotonic())
        if reason == "error":
            r.notify("error", r.error)
        else:
            r.notify("done", reason)
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

    @property
    def is_running(self) -> bool:
        """Whether the engine's thread is stepping (started, not stopped, not dead of an error)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

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
