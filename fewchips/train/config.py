"""The training run's settings (`TrainConfig`, what `fewchips train` flags set) and its error type.
No torch here: the command line reads the defaults from this dataclass without loading torch."""

from __future__ import annotations

import math
from dataclasses import dataclass


class TrainError(RuntimeError):
    """Training cannot go on; the message says why and where the last good checkpoint is.
    `every_rank`: raised the same on every process of a torchrun launch (a bad flag, a setup error
    rank 0 shared), so only rank 0 prints it."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


@dataclass
class TrainConfig:
    out: str = "runs/train"
    init: str | None = None              # start from this Hugging Face model directory (weights, tokenizer)
    init_set: dict | None = None         # config fields changed on --init's model (weights' shapes kept)
    extend_context: int | None = None    # YaRN to this many positions from --init's model (arXiv 2412.19437 §4.3)
    data: str | list | None = None       # [WEIGHT:]PATH items; None: the Python standard library's .py files
    text_field: str = "text"
    max_corpus_mb: float | None = None   # per source
    skip_bad_rows: bool = False          # skip and count malformed rows instead of stopping at the first
    data_workers: int | None = None      # tokenising processes per rank (None: the cores / ranks on the node)
    tokenizer_sample_mb: float | None = None   # the BPE's training sample (None: 100 MB)
    val_fraction: float = 0.03
    tokenizer: str | None = None         # an existing tokenizer.json; None: train one
    cache_dir: str | None = None         # None: OUT/cache
    fim_rate: float = 0.1
    # schedule and batch
    steps: int = 300
    epochs: float | None = None          # SFT: the run's length in passes over the packed rows (sets steps)
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-3
    warmup_steps: int | None = None      # None: 3% of the run
    lr_schedule: str = "v3"              # v3: warm-up, constant, cosine, steps (pre-training); cosine: SFT's
    min_lr_ratio: float = 0.2            # cosine: the lr ends at this fraction of the peak (SFT: 1e-6 / 5e-6)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    batch_ramp_tokens: int = 0           # grow the batch over the run's first N tokens (0: no ramp)
    batch_size_start: int | None = None  # sequences per step when the ramp starts (default: one micro-batch)
    # the V3 recipe
    bias_update_speed: float = 0.001     # γ
    balance_alpha: float = 1e-4          # α
    mtp_lambda: float = 0.3              # λ for the first 67.6% of the run
    mtp_lambda_late: float = 0.1         # λ after that
    freeze_mtp: bool = False             # leave the MTP module as it is (no gradient, no MTP loss)
    init_std: float = 0.006
    # systems
    dtype: str = "auto"                  # auto | bf16 | fp32 (autocast; weights and optimizer stay fp32)
    activation_checkpointing: bool = False
    compile: bool = False
    fp8: bool = False                    # DeepSeek-V3's FP8 recipe on the linears and experts (fewchips.fp8)
    fp8_backend: str = "auto"            # auto | scaled_mm (Hopper) | emulate
    fp8_activations: str = "cached"      # cached: the backward keeps FP8 copies (arXiv 2412.19437 §3.3.3) | full
    bf16_moments: bool = False           # AdamW moments stored in BF16, as in the report (fewchips.fp8.optim)
    ema: float | None = None             # decay of the parameter EMA kept on the host (arXiv 2412.19437 §3.2.3)
    export_ema: bool = False             # also export the EMA's weights as OUT/ema
    threads: int | None = None
    seed: int = 0
    # layout (torchrun): processes = pp x dp x ep; a checkpoint resumes at any other layout
    dp: int | None = None                # data-parallel ranks (None: processes / (pp x ep))
    ep: int = 1                          # expert-parallel ranks
    pp: int = 1                          # pipeline-parallel ranks
    pp_schedule: str = "dualpipev"       # dualpipev | 1f1b | interleaved1f1b | zbv
    microbatches: int | None = None      # pipeline micro-batches per step (None: --grad-accum, >= stages)
    pp_overlap: str = "auto"             # DualPipeV's paired chunks on two threads: auto (CUDA) | on | off
    timeout_s: float = 600.0             # a collective waiting longer ends the run (a dead or stuck peer)
    # watching and saving
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    plots: bool = True
    progress: bool = True
    resume: bool = False
    allow_schedule_change: bool = False  # --resume with another --steps/--warmup: continue on the new schedule
    overwrite: bool = False
    stop_at: int | None = None           # stop (with a checkpoint) after this step: split a run
    max_bad_steps: int = 5               # consecutive non-finite steps before stopping

    def __post_init__(self):
        self._check_ranges()
        full = self.batch_size * self.grad_accum
        if self.batch_size < 1 or self.grad_accum < 1:
            raise TrainError(f"--batch-size ({self.batch_size}) and --grad-accum ({self.grad_accum}) must be >= 1")
        if self.data_workers is not None and self.data_workers < 1:
            raise TrainError(f"--data-workers must be >= 1, got {self.data_workers}")
        if self.tokenizer_sample_mb is not None and not self.tokenizer_sample_mb > 0:
            raise TrainError(f"--tokenizer-sample-mb must be > 0, got {self.tokenizer_sample_mb}")
        if self.epochs is not None and not self.epochs > 0:
            raise TrainError(f"--epochs must be > 0, got {self.epochs}")
        if self.batch_ramp_tokens < 0:
            raise TrainError(f"--batch-ramp-tokens must be >= 0, got {self.batch_ramp_tokens}")
        if self.lr_schedule not in ("v3", "cosine"):
            raise TrainError(f"lr_schedule must be v3 or cosine, got {self.lr_schedule!r}")
        if self.fp8_activations not in ("cached", "full"):
            raise TrainError(f"--fp8-activations must be cached or full, got {self.fp8_activations!r}")
        if not self.fp8:
            given = [flag for flag, value, default in (("--fp8-backend", self.fp8_backend, "auto"),
                                                       ("--fp8-activations", self.fp8_activations, "cached"))
                     if value != default]
            if given:
                raise TrainError(f"{', '.join(given)} set(s) the FP8 recipe, which this run does not use: add --fp8")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise TrainError(f"--ema takes the decay, between 0 and 1 (e.g. 0.999), got {self.ema}")
        if self.export_ema and self.ema is None:
            raise TrainError("--export-ema writes the parameter EMA, which this run does not keep: add --ema DECAY")
        start = self.batch_size_start
        if start is not None and (start % self.batch_size or not self.batch_size <= start <= full):
            raise TrainError(f"--batch-size-start {start} must be a multiple of --batch-size {self.batch_size} "
                             f"(the batch grows in whole micro-batches) between {self.batch_size} and "
                             f"--batch-size x --grad-accum = {full}")

    def _check_ranges(self):
        """Every number a run is made of, checked before any work (a tokenizer trained, data tokenised)."""
        checks = [("--steps", self.steps, self.steps >= 1, ">= 1"),
                  ("--seq-len", self.seq_len, self.seq_len >= 1, ">= 1"),
                  ("--lr", self.lr, math.isfinite(self.lr) and self.lr > 0, "> 0"),
                  ("--min-lr-ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                  ("--weight-decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
                  ("--grad-clip", self.grad_clip, self.grad_clip > 0, "> 0"),
                  ("--val-fraction", self.val_fraction, 0 <= self.val_fraction < 1, "in [0, 1)"),
                  ("--fim-rate", self.fim_rate, 0 <= self.fim_rate <= 1, "in [0, 1]"),
                  ("--log-every", self.log_every, self.log_every >= 1, ">= 1"),
                  ("--eval-every", self.eval_every, self.eval_every >= 1, ">= 1"),
                  ("--save-every", self.save_every, self.save_every >= 1, ">= 1"),
                  ("--warmup", self.warmup_steps, self.warmup_steps is None or self.warmup_steps >= 0, ">= 0"),
                  ("--threads", self.threads, self.threads is None or self.threads >= 1, ">= 1"),
                  ("--stop-at", self.stop_at, self.stop_at is None or self.stop_at >= 1, ">= 1")]
        for flag, value, ok, allowed in checks:
            if not ok:
                raise TrainError(f"{flag} must be {allowed}, got {value}")

    @property
    def distributed(self) -> bool:
        """Whether the run uses torch.distributed (a layout flag, or a torchrun launch of several processes)."""
        import os
        return self.ep > 1 or self.dp is not None or self.pp > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1

    @property
    def tokens_per_step(self) -> int:
        """Tokens of a full step (after any batch ramp)."""
        return self.batch_size * self.grad_accum * self.seq_len

    # fields that must agree with a checkpoint for `--resume` to continue exactly
    RESUME_FIELDS = ("seq_len", "batch_size", "grad_accum", "seed", "fim_rate", "val_fraction", "max_corpus_mb",
                     "batch_ramp_tokens", "batch_size_start", "freeze_mtp", "init")
    # fields that lay out the schedule: changing them on --resume needs --allow-schedule-change
    SCHEDULE_FIELDS = ("steps", "warmup_steps")


# ---- post-training's settings (here, torch-free, so the commands' --help loads no torch) ----

SFT_DEFAULTS = dict(steps=200, batch_size=8, seq_len=512, lr=3e-4, lr_schedule="cosine", min_lr_ratio=0.2,
                    mtp_lambda=0.1, mtp_lambda_late=0.1, val_fraction=0.05, eval_every=50, save_every=100,
                    fim_rate=0.0)


def sft_config(**kw) -> TrainConfig:
    """SFT's settings. λ (`--mtp-lambda`) holds for every step: pre-training's late value follows it. The
    run's length is --steps or --epochs (passes over the packed rows, turned into steps once the data is
    packed), not both."""
    kw.setdefault("mtp_lambda_late", kw.get("mtp_lambda", SFT_DEFAULTS["mtp_lambda"]))
    if kw.get("epochs") is not None and kw.get("steps") is not None:
        raise TrainError(f"--steps {kw['steps']} and --epochs {kw['epochs']:g} both set the run's length; give one")
    if kw.get("steps") is None:
        kw["steps"] = 1 if kw.get("epochs") is not None else SFT_DEFAULTS["steps"]   # epochs: set from the data
    return TrainConfig(**{**SFT_DEFAULTS, **kw})


@dataclass
class GRPOConfig(TrainConfig):
    task: str = "arithmetic"             # arithmetic | format | math | code | code-fraction | module:function
    prompts: str | None = None           # .jsonl of prompts for a math, code or module:function task
    unsafe_code_reward: bool = False     # run the code tasks where no sandbox can be made (limits only)
    group_size: int = 16                 # G completions per prompt
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    clip_eps: float = 0.2                # ε
    kl_beta: float = 0.04                # β (DeepSeekMath's value)
    iterations: int = 1                  # μ: updates per batch of rollouts, the ratio taken against the rollout policy
    val_prompts: int | str = 50          # held-out prompts drawn apart from training's (never trained on), or a .jsonl
    no_signal_steps: int = 3             # say so when this many first steps had no group with a reward spread

    def __post_init__(self):
        super().__post_init__()
        if self.iterations < 1:
            raise TrainError(f"--iterations must be >= 1, got {self.iterations}")
        if (self.batch_size * self.group_size) % self.grad_accum:
            raise TrainError(f"--grad-accum {self.grad_accum} must divide the step's {self.batch_size} x "
                             f"{self.group_size} completions")


GRPO_DEFAULTS = dict(steps=100, batch_size=16, lr=1e-4, lr_schedule="cosine", min_lr_ratio=1.0, warmup_steps=0,
                     mtp_lambda=0.1, mtp_lambda_late=0.1, eval_every=20, save_every=50, log_every=1, seq_len=128,
                     fim_rate=0.0)


def grpo_config(**kw) -> GRPOConfig:
    """GRPO's settings. λ (`--mtp-lambda`) holds for every step: pre-training's late value follows it."""
    kw.setdefault("mtp_lambda_late", kw.get("mtp_lambda", GRPO_DEFAULTS["mtp_lambda"]))
    return GRPOConfig(**{**GRPO_DEFAULTS, **kw})
