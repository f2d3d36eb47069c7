"""Inference: sampling (`sampling.py`), `generate` (`generate.py`: the plain reference decoder, and MTP
speculation through the engine), the continuous-batching engine (`request.py`, `scheduler.py`,
`runner.py`, `engine.py` over `paged.py`) and the OpenAI-compatible server. Imports run server ->
engine -> scheduler / runner -> model, never back. Nothing is imported here, so the command line's
--help does not load torch: import from the submodules (or use `fewchips.generate` and
`fewchips.SamplingParams`)."""
