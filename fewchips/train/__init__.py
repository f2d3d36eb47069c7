"""Training: data (documents → tokenizer → memory-mapped shards → sampler), the V3 recipe (trainer),
and plots. `fewchips train` is the command-line front end. What needs torch loads on first use."""

from ..lazy import lazy_attributes
from .config import TrainConfig, TrainError

_LAZY = {"Trainer": "trainer", "train": "trainer"}

__all__ = ["TrainConfig", "Trainer", "TrainError", "train"]

__getattr__ = lazy_attributes(__name__, _LAZY)
