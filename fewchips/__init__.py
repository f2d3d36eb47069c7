"""fewchips: DeepSeek-V3 - the model, its frugal training recipe, and fast inference - on few chips."""

from .config import PRESETS, ConfigError, ModelConfig
from .lazy import lazy_attributes

__version__ = "0.1.0"

# Everything that needs torch is imported on first use (PEP 562), so `fewchips --help` and the
# planner start without loading torch.
_LAZY = {"DeepseekV3": "model", "LatentCache": "model", "CheckpointError": "checkpoint",
         "from_pretrained": "checkpoint", "save_pretrained": "checkpoint", "SamplingParams": "inference.sampling",
         "generate": "inference.generate"}

__all__ = ["ModelConfig", "PRESETS", "ConfigError", *_LAZY, "__version__"]

__getattr__ = lazy_attributes(__name__, _LAZY)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
