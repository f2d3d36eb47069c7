"""Inference: sampling, `generate` (plain and MTP-speculative), the continuous-batching engine and
the OpenAI-compatible server. Imports run server -> engine -> model, never back."""

from .generate import generate
from .sampling import SamplingParams

__all__ = ["generate", "SamplingParams"]
