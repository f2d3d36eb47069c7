"""Training: data (documents → tokenizer → memory-mapped shards → sampler), the V3 recipe (trainer),
and plots. `fewchips train` is the command-line front end."""

from .trainer import TrainConfig, Trainer, TrainError, train

__all__ = ["TrainConfig", "Trainer", "TrainError", "train"]
