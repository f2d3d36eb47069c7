"""What one client may ask of the OpenAI-compatible server. Its own module, without FastAPI, so that
`fewchips serve --help` shows the defaults without importing the server."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerLimits:
    """What one client may ask of the server (`fewchips serve` flags; docs/inference.md)."""
    max_body_bytes: int = 8 * 2**20      # larger bodies get 413 before they are read
    max_prompts: int = 128               # prompts in one /v1/completions request
    max_n: int = 16                      # choices per prompt
    max_waiting: int = 256               # generations queued for a slot; beyond, 429 with Retry-After
    shutdown_timeout: float = 10.0       # on SIGTERM, seconds in-flight requests get before they are cancelled
    disconnect_poll_s: float = 0.25      # how often a non-streaming request checks that its client is still there
