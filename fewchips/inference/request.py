"""One generation request as the engine's parts share it: what the caller asked for (prompt, sampling,
callbacks, a grammar), what it produced (tokens, logprobs, finish reason) and its per-request state, every
field declared here: the scheduler's (block table, computed and registered counts, block hashes,
preemptions) and the runner's (random generator, MTP draft and its distribution).

The scheduler and the runner read a request; only the engine and the scheduler write it."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from .grammar import GrammarMatcher
from .sampling import SamplingParams

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
    grammar: GrammarMatcher | None = None  # structured outputs: the tokens allowed at each step; the engine
    #                                        moves it on by each token recorded and stops the request when complete
    id: int = field(default_factory=lambda: next(_ids))
    # what it produced
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprob_list: list[TokenLogprob | None] = field(default_factory=list)
    finish_reason: str | None = None      # "stop", "length", "abort" or "error"
    error: str | None = None
    aborted: bool = False
    done_event: threading.Event = field(default_factory=threading.Event)
    arrival: float = 0.0
    last_token_time: float | None = None
    # the scheduler's: its place in the paged cache
    blocks: list[int] = field(default_factory=list)        # block table: block of positions [i*bs, (i+1)*bs)
    n_computed: int = 0                   # tokens of prompt + output whose latents are in the cache
    n_registered: int = 0                 # leading blocks offered to the prefix cache
    hashes: list[bytes] = field(default_factory=list)      # chained hashes of the full blocks of its tokens
    cached_tokens: int = 0                # prompt tokens the prefix cache supplied (first admission)
    preemptions: int = 0
    # the runner's: sampling state
    rng: torch.Generator | None = None    # its own generator (seeded requests draw the same in any batch)
    draft: int | None = None              # the MTP module's guess at its next-but-one token
    draft_q: torch.Tensor | None = None   # the distribution the draft was drawn from (None: greedy)
    drafted: int = 0                      # MTP drafts verified / accepted
    accepted: int = 0
    forwards: int = 0                     # main-model forwards it took part in (prefill chunks, decodes)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def pending(self) -> int:
        """Tokens whose latents are not in the cache yet."""
        return len(self.prompt_ids) + len(self.output_ids) - self.n_computed

    @property
    def is_decode(self) -> bool:
        """Everything but its newest token is computed, and a token is wanted (no prompt scoring, not
        max_tokens 0): one token this step."""
        return self.pending == 1 and self.prompt_logprobs is None and self.params.max_tokens > 0

    def notify(self, kind, payload):
        if self.on_event is not None:
            self.on_event(self, kind, payload)
