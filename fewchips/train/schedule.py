"""The run's schedules, keyed on tokens as in the report (its token counts out of 14.8T, arXiv
2412.19437 §4.2):
    lr  linear warm-up (steps) → constant until 67.6% (10T) → cosine to 0.1·peak by 96.6% (14.3T)
        → 0.1·peak until 98.9% → 0.033·peak (the report's 2.2e-4 → 2.2e-5 → 7.3e-6)
    γ   `bias_update_speed` until 96.6%, then 0
    λ   0.3 until 67.6%, then 0.1
    batch  optionally ramped (the report: 3,072 → 15,360 sequences over the first 469B tokens) in whole
           micro-batches, so a step's share of the tokens is not its share of the steps (`RunSchedule`)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import TrainConfig

# Fractions of the run at which the report's schedules change (token counts / 14.8T).
CONSTANT_END = 10.0 / 14.8
COSINE_END = 14.3 / 14.8
MIN_LR_END = (14.3 + 0.333) / 14.8
MIN_LR_RATIO, FINAL_LR_RATIO = 2.2e-5 / 2.2e-4, 7.3e-6 / 2.2e-4


def lr_factor(step: int, warmup: int, frac: float, kind: str = "v3", min_ratio: float = 0.2) -> float:
    """Multiplier on the peak lr at optimizer step `step` (0-based) that starts `frac` of the way
    through the run's tokens. The warm-up counts steps (the report's first 2K steps). kind "v3": the
    pre-training schedule; "cosine": the report's SFT schedule, cosine from the peak to min_ratio x the
    peak over the run (5e-6 -> 1e-6 for V3)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    if frac < CONSTANT_END:
        return 1.0
    if frac < COSINE_END:
        t = (frac - CONSTANT_END) / (COSINE_END - CONSTANT_END)
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * t))
    return MIN_LR_RATIO if frac < MIN_LR_END else FINAL_LR_RATIO


def bias_speed(frac: float, gamma: float) -> float:
    return gamma if frac < COSINE_END else 0.0


def mtp_weight(frac: float, early: float, late: float) -> float:
    return early if frac < CONSTANT_END else late


@dataclass(frozen=True)
class RunSchedule:
    """Each optimizer step's micro-batches and the tokens seen before it. With a ramp, the global batch grows
    linearly in tokens (as Megatron's batch-size ramp-up) from `batch_size_start` sequences to
    `batch_size x grad_accum`, one micro-batch at a time, reaching the full batch after `batch_ramp_tokens`.
    A trainer step is one optimizer step, except GRPO's: μ = `iterations` of them, one per update on its
    batch of rollouts, so the lr's warm-up and decay count μ·steps. Deterministic from the config, so a
    resumed run recomputes exactly the same schedule."""
    micro_batches: tuple[int, ...]      # per optimizer step
    tokens_before: tuple[int, ...]      # per optimizer step, and the run's total at the end
    kind: str = "v3"                    # the lr shape: v3 (pre-training) or cosine (SFT)
    min_ratio: float = 0.2
    updates_per_step: int = 1           # optimizer steps per trainer step (GRPO's μ)

    @classmethod
    def of(cls, tc: TrainConfig) -> "RunSchedule":
        full, ramp = tc.grad_accum, tc.batch_ramp_tokens
        first = (tc.batch_size_start or tc.batch_size) // tc.batch_size if ramp else full
        per_micro = tc.batch_size * tc.seq_len
        updates = getattr(tc, "iterations", 1)          # GRPOConfig's μ; every other run steps once per batch
        micro, before, seen = [], [], 0
        for _ in range(tc.steps * updates):
            n = full if seen >= ramp else min(full, first + (full - first) * seen // ramp)
            micro.append(n)
            before.append(seen)
            seen += n * per_micro
        return cls(tuple(micro), tuple(before) + (seen,), tc.lr_schedule, tc.min_lr_ratio, updates)

    @property
    def total_tokens(self) -> int:
        return self.tokens_before[-1]

    def fraction(self, step: int) -> float:
        """Share of the run's tokens seen before optimizer step `step`."""
        return self.tokens_before[min(step, len(self.tokens_before) - 1)] / max(self.total_tokens, 1)

    def lr_factor(self, step: int, warmup: int) -> float:
        return lr_factor(step, warmup, self.fraction(step), self.kind, self.min_ratio)


def switch_step(tc: TrainConfig, schedule: RunSchedule) -> int:
    """The first step past 67.6% of the run's tokens (where the cosine starts and λ drops)."""
    return next((i // schedule.updates_per_step for i in range(len(schedule.micro_batches))
                 if schedule.fraction(i) >= CONSTANT_END), tc.steps)
