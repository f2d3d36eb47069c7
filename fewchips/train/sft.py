"""`fewchips sft`: supervised fine-tuning as DeepSeek-V3's post-training starts (arXiv 2412.19437
§5.1): the trainer of pre-training, started from a model directory, on chat data packed with sample
masking, the loss on the assistant's tokens, the MTP module trained alongside (or frozen), and the
report's SFT learning-rate shape (cosine from the peak to a fifth of it: 5e-6 -> 1e-6 for V3).

Under torchrun it runs on every layout pre-training does (--dp, --ep, --pp): each micro-batch's packed
rows are split over the processes and its summed CE divided by the whole micro-batch's target count,
so every layout logs one process's losses.

The result is an ordinary model directory (weights, tokenizer, chat template) that `fewchips chat`,
`fewchips serve`, `fewchips eval` and transformers read.
"""

from __future__ import annotations

import dataclasses
import math

from .bundled import bundled_chats
from .chat import ChatData, read_chats
from .config import SFT_DEFAULTS, TrainConfig, TrainError, sft_config  # noqa: F401  (re-exported)
from ..checkpoint.run_dir import model_tokenizer
from .trainer import Trainer

# Defaults where fine-tuning differs from pre-training (the rest are TrainConfig's).
class SFTTrainer(Trainer):
    """The trainer on chats. `chats` (a list of conversations) overrides `tc.data` (a .jsonl file);
    with neither, the bundled set (`fewchips.train.bundled`)."""

    positions_span_the_row = False       # packed chats: each sample's positions restart at 0

    def __init__(self, tc: TrainConfig, log=print, device="cpu", chats=None):
        if not tc.init:
            raise TrainError("fewchips sft needs a model to start from: --model DIR")
        self._chats = chats
        super().__init__(None, tc, log, device)

    data_first_on_main = True            # rank 0 reads the chats first; the others then do the same

    def make_data(self, cfg, resume_from):
        tok, sp = model_tokenizer(resume_from or self.tc.init)
        chats = self._chats
        if chats is None and self.tc.data:
            chats = read_chats(self.tc.data)
        if chats is None:
            chats = bundled_chats(self.tc.seed)
            self.log(f"data: the bundled chats ({len(chats):,} conversations: "
                     "standard-library functions and arithmetic)")
        data = ChatData(self.tc, tok, sp, self.log, chats)
        tc = self.tc
        if tc.epochs is not None:
            rows, per_step = len(data.train.ids), tc.batch_size * tc.grad_accum
            steps = max(1, math.ceil(tc.epochs * rows / per_step))
            self.log(f"--epochs {tc.epochs:g}: {steps} steps of {per_step} packed rows ({rows} rows per epoch)")
            self.tc = dataclasses.replace(tc, steps=steps)
        return data


def sft(tc: TrainConfig, log=print, chats=None) -> dict:
    return SFTTrainer(dataclasses.replace(tc), log, chats=chats).train()
