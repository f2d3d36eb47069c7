"""A model's sampling defaults from its `generation_config.json` (what transformers' GenerationConfig
holds), as vLLM's `--generation-config auto` reads them: a request's own value wins, then the model's,
then OpenAI's. DeepSeek-R1, for one, ships temperature 0.6 and top_p 0.95."""

from __future__ import annotations

import json
import os

from .sampling import SamplingParams

# generation_config.json's name -> the request field it is the default of
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(model_dir: str, setting: str = "auto") -> dict:
    """`setting`: "auto" (the model directory's file, if any), "vllm" or "none" (OpenAI's defaults only),
    or a folder holding a generation_config.json."""
    if setting in ("vllm", "none"):
        return {}
    folder = model_dir if setting == "auto" else setting
    file = os.path.join(folder, "generation_config.json")
    if not os.path.exists(file):
        if setting != "auto":
            raise FileNotFoundError(f"--generation-config {setting}: no generation_config.json there")
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not readable JSON ({e})") from None
    out = {field: config[key] for key, field in FIELDS.items() if isinstance(config.get(key), (int, float))
           and not isinstance(config.get(key), bool)}
    try:                                           # a bad value is said at start, not as a 500 on every request
        SamplingParams(**{k: v for k, v in out.items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from None
    return out
