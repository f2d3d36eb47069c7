"""Sampling parameters and the per-row logits -> token step (greedy, temperature, top-k, top-p, min-p;
penalties, logit bias and min_tokens before them).

Every row of a batch carries its own parameters and its own `torch.Generator`, so a seeded request
draws the same tokens whatever else shares the batch. Draws use the exponential race (argmax of
p / Exp(1) noise), which is categorical sampling without a cumulative sum (as the official
inference demo's generate.py samples).
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

import torch


MAX_TOKENS = 16    # the one default length of a generation: OpenAI's for /v1/completions


@dataclass
class SamplingParams:
    max_tokens: int = MAX_TOKENS
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0                # 1: off
    top_k: int = 0                    # 0: off
    min_p: float = 0.0                # keep tokens with p >= min_p * the top token's p; 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)            # stop strings (need a tokenizer)
    stop_token_ids: list[int] = field(default_factory=list)  # e.g. the eos token
    logprobs: int | None = None       # also return the top-N logprobs of every generated token
    # OpenAI's penalties on the tokens generated so far: logit -= count·frequency + (count > 0)·presence
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    # CTRL's (and transformers', vLLM's) penalty on every token of the prompt and the output so far:
    # a positive logit divided by it, a negative one multiplied; 1: off
    repetition_penalty: float = 1.0
    min_tokens: int = 0               # no stop token (eos, stop_token_ids) nor stop string before this many
    max_new_tokens: InitVar[int | None] = None                    # another name for max_tokens (generate's)

    def __post_init__(self, max_new_tokens):
        if max_new_tokens is not None:
            self.max_tokens = max_new_tokens
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0 or self.min_tokens)

    def generator(self, device="cpu") -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed % 2**64)       # any integer: torch takes [-2^63, 2^64)
        return g


def adjust_logits(logits_BV: torch.Tensor, params: list[SamplingParams], generated: list[list[int]],
                  prompts: list[list[int]] | None = None) -> torch.Tensor:
    """Penalties, logit bias and min_tokens, row by row. The repetition penalty (on the prompt's and the
    output's tokens, as transformers and vLLM apply it) first; then OpenAI's: for each token j already
    generated c_j times in the row, logit_j -= c_j·frequency_penalty + [c_j > 0]·presence_penalty, and
    each `logit_bias` entry added; then the stop tokens masked while the row has fewer than min_tokens.
    Rows that ask for none are left as they are (no copy if none does)."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits_BV
    logits_BV = logits_BV.clone()
    V = logits_BV.shape[-1]
    for i in rows:
        p = params[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set((prompts[i] if prompts else []) + generated[i])), dtype=torch.long,
                                device=logits_BV.device)
            if len(seen):
                x = logits_BV[i, seen]
                logits_BV[i, seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and generated[i]:
            count_V = torch.bincount(torch.tensor(generated[i], device=logits_BV.device), minlength=V)[:V]
            logits_BV[i] -= (count_V * p.frequency_penalty + (count_V > 0) * p.presence_penalty).to(logits_BV.dtype)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits_BV.device)
            logits_BV[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits_BV.device,
                                              dtype=logits_BV.dtype)
        if len(generated[i]) < p.min_tokens and p.stop_token_ids:
            logits_BV[i, torch.tensor(p.stop_token_ids, device=logits_BV.device)] = float("-inf")
    return logits_BV


def probabilities(logits_BV: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k and top-p applied row by row: the distribution sampling draws from [B, V] (fp32).
    Greedy rows get a one-hot on their argmax."""
    logits_BV = logits_BV.float()
    B, V = logits_BV.shape
    temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits_BV.device)
    probs_BV = (logits_BV / temp[:, None]).softmax(-1)
    min_p = [p.min_p for p in params]
    if any(min_p):                                             # vLLM's order: min-p, then top-k and top-p
        floor_B = torch.tensor(min_p, device=logits_BV.device) * probs_BV.amax(-1)
        probs_BV = torch.where(probs_BV >= floor_B[:, None], probs_BV, 0.0)
        probs_BV = probs_BV / probs_BV.sum(-1, keepdim=True)
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(0 < k < V for k in top_k) or any(p < 1 for p in top_p):
        sorted_BV, idx_BV = probs_BV.sort(-1, descending=True)
        rank_V = torch.arange(V, device=logits_BV.device)
        k_B = torch.tensor([k if 0 < k < V else V for k in top_k], device=logits_BV.device)
        p_B = torch.tensor(top_p, device=logits_BV.device)
        before_BV = sorted_BV.cumsum(-1) - sorted_BV          # mass strictly before each token
        keep_BV = (rank_V[None] < k_B[:, None]) & (before_BV < p_B[:, None])
        keep_BV[:, 0] = True                                   # the most likely token always survives
        sorted_BV = sorted_BV * keep_BV
        probs_BV = torch.zeros_like(probs_BV).scatter_(1, idx_BV, sorted_BV)
        probs_BV = probs_BV / probs_BV.sum(-1, keepdim=True)
    greedy = torch.tensor([p.greedy for p in params], device=logits_BV.device)
    if greedy.any():
        onehot = torch.zeros_like(probs_BV).scatter_(1, logits_BV.argmax(-1, keepdim=True), 1.0)
        probs_BV = torch.where(greedy[:, None], onehot, probs_BV)
    return probs_BV


def draw(probs_BV: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row from `probs_BV`; rows without a generator (greedy) take the argmax."""
    noise_BV = torch.ones_like(probs_BV)
    for i, g in enumerate(generators):
        if g is not None:
            noise_BV[i].exponential_(generator=g)
    return (probs_BV / noise_BV).argmax(-1)


def sample(logits_BV, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    if all(p.greedy for p in params):
        return logits_BV.argmax(-1)
    return draw(probabilities(logits_BV, params), generators)
