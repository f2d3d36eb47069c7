"""Inference: sampling (`sampling.py`), `generate` (`generate.py`, plain and MTP-speculative), the
continuous-batching engine and the OpenAI-compatible server. Imports run server -> engine -> model,
never back. Nothing is imported here, so the command line's --help does not load torch: import from
the submodules (or use `fewchips.generate` and `fewchips.SamplingParams`)."""
