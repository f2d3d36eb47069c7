"""fewchips: DeepSeek-V3 - the model, its frugal training recipe, and fast inference - on few chips."""

import importlib

from .config import PRESETS, ConfigError, ModelConfig

__version__ = "0.1.0"

# Everything that needs torch is imported on first use (PEP 562), so `fewchips --help` and the
# planner start without loading torch.
_LAZY = {"DeepseekV3": "model", "LatentCache": "model", "CheckpointError": "checkpoint",
         "from_pretrained": "checkpoint", "save_pretrained": "checkpoint", "SamplingParams": "inference.sampling",
         "generate": "inference.generate"}

__all__ = ["ModelConfig", "PRESETS", "ConfigError", *_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        importlib.import_module(".checkpoint", __name__)    # attaches DeepseekV3.save_pretrained
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fewchips' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
