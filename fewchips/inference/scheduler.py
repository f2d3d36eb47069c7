"""The scheduler: which requests compute which tokens this step, and where in the paged cache.

It owns the waiting queue, the running list and the block pool (no tensors, no model), and returns one
step's work as a `Batch`: running requests first (oldest first: a decoding request one token, one
being prefilled a chunk), then waiting ones admitted while the step's prefill budget
(`max_prefill_tokens`), `max_batch` and the pool allow.

- Prefix reuse: an admitted request first takes the longest run of cached full blocks of its tokens
  (`paged.BlockPool`) and computes only the rest. A request whose next block another running request
  is computing waits a step for it (n choices of one prompt, GRPO's G samples: prefill it once).
- Preemption: when a running request needs a block and none is free, the newest running request gives
  its blocks back and goes to the front of the queue; it recomputes prompt + output when readmitted
  (its full blocks stay in the prefix cache until evicted, so that is often cheap).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

from .metrics import EngineMetrics
from .paged import BlockPool, block_hashes
from .request import Request

log = logging.getLogger("fewchips")


@dataclass
class Batch:
    """One step's work: prompt chunks (request, tokens to compute) and single-token decodes."""
    prefill: list[tuple[Request, int]] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)

    @property
    def requests(self) -> list[Request]:
        return [r for r, _ in self.prefill] + self.decode

    def __bool__(self):
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_batch: int, max_prefill_tokens: int,
                 metrics: EngineMetrics | None = None):
        if block_size < 1 or max_prefill_tokens < 1 or max_batch < 1:
            raise ValueError("block_size, max_prefill_tokens and max_batch must be >= 1")
        self.pool, self.block_size = pool, block_size
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.metrics = metrics
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []        # in admission order: the last is preempted first
        self.preemptions = 0

    def add(self, r: Request):
        self.waiting.append(r)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def aborted(self) -> list[Request]:
        """Aborted requests still queued or running (the caller finishes them)."""
        return [r for r in self.waiting if r.aborted] + [r for r in self.running if r.aborted]

    def finish(self, r: Request):
        """r leaves the queues and gives its blocks back (cached ones stay findable until evicted)."""
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        self.pool.release(r.blocks)
        r.blocks = []

    def reset_prefix_cache(self):
        """Forget cached prefixes: call after the weights change (GRPO between steps)."""
        self.pool.reset()
        for r in self.running + list(self.waiting):
            r.n_registered = len(r.blocks)      # held blocks are not offered again under stale content

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> Batch:
        """This step's work: running requests first (oldest first), then waiting ones while the prefill
        budget, max_batch and the pool allow."""
        work, budget = [], self.max_prefill_tokens
        for r in list(self.running):
            if r not in self.running:              # preempted for an older request in this loop
                continue
            n = 1 if r.pending == 1 else min(r.pending, budget)
            if n == 0:
                continue
            if self._reserve(r, n + (r.pending == 1 and r.draft is not None), preempt=True):   # + its draft
                work.append((r, n))
                budget -= n if r.pending > 1 else 0
        inflight = {h for r in self.running for h in r.hashes[r.n_computed // self.block_size:]}
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            r = self.waiting[0]
            if not r.blocks:
                self._match_prefix(r)
                nxt = len(r.blocks)
                if (self.pool.prefix_caching and r.prompt_logprobs is None and nxt < len(r.hashes)
                        and r.hashes[nxt] in inflight):
                    self._unreserve(r)                 # its next block is being computed: take it next step
                    break
            n = min(r.pending, budget)
            if not self._reserve(r, n, preempt=False):
                self._unreserve(r)
                break
            self.waiting.popleft()
            self.running.append(r)
            if r.preemptions == 0 and not r.output_ids and self.metrics is not None:   # once, at first admission
                self.metrics.prefix_cache(len(r.prompt_ids), r.cached_tokens)
            inflight.update(r.hashes[r.n_computed // self.block_size:])
            work.append((r, n))
            budget -= n if r.pending > 1 else 0
        return Batch(prefill=[(r, n) for r, n in work if not r.is_decode],
                     decode=[r for r, _ in work if r.is_decode])

    def computed(self, r: Request, n: int):
        """n more of r's tokens are in the cache: offer its newly full blocks to the prefix cache."""
        r.n_computed += n
        bs = self.block_size
        full = min(r.n_computed, len(r.tokens)) // bs      # a kept draft's token is appended just after
        if len(r.hashes) < full:
            r.hashes += block_hashes(r.tokens, bs, r.hashes[-1] if r.hashes else b"", len(r.hashes))
        for i in range(r.n_registered, full):
            self.pool.register(r.blocks[i], r.hashes[i])
        r.n_registered = max(r.n_registered, full)

    # ---- blocks ------------------------------------------------------------------------------
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

    def _unreserve(self, r: Request):
        """A waiting request gives back the blocks it was about to take (matched or reserved)."""
        self.pool.release(r.blocks)
        r.blocks, r.n_computed = [], 0

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
        """Free r's blocks and queue it first again; it recomputes prompt + output so far when readmitted."""
        self.running.remove(r)
        self.pool.release(r.blocks)
        r.blocks, r.n_computed, r.n_registered = [], 0, 0
        r.draft = r.draft_q = None
        r.preemptions += 1
        self.preemptions += 1
        if self.metrics is not None:
            self.metrics.preempted()
        self.waiting.appendleft(r)
        log.debug("preempted request %d (%d tokens) for cache blocks", r.id, len(r.tokens))
