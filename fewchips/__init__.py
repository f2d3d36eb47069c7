"""fewchips: DeepSeek-V3 - the model, its frugal training recipe, and fast inference - on few chips."""

from .config import PRESETS, ConfigError, ModelConfig
from .model import DeepseekV3, LatentCache
from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .inference import SamplingParams, generate

__version__ = "0.1.0"

__all__ = ["ModelConfig", "PRESETS", "ConfigError", "DeepseekV3", "LatentCache", "from_pretrained",
           "save_pretrained", "CheckpointError", "generate", "SamplingParams", "__version__"]
