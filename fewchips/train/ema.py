"""The parameter EMA of DeepSeek-V3's pre-training (arXiv 2412.19437 §3.2.3): an exponential moving
average of the parameters, kept in host memory and updated after each step without holding it up, to
estimate the model after learning-rate decay early.

    ema_0 = θ_0,    ema_t = β·ema_{t-1} + (1 − β)·θ_t        (t: each optimizer step taken)

Each process averages the shards it holds (FSDP's, its experts, its pipeline stages), in FP32 on the
host. The update reads the parameters from a background thread while the next step's forward runs
(on an accelerator it first copies them to pinned host buffers, non-blocking); the optimizer waits
for it before it changes them again. `swap(model)` exchanges the average with the live weights in
place (and back, called twice), so evaluation and export use the model's own code paths.
Buffers (the routers' selection biases) are not averaged: the EMA model uses the live ones.
"""

from __future__ import annotations

import threading

import torch
from torch.distributed.tensor import DTensor

from ..parallel.fsdp import fsdp_modules


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


class ParameterEMA:
    def __init__(self, model: torch.nn.Module, decay: float, owned: set[str] | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema takes the decay β, 0 < β < 1 (e.g. 0.999), got {decay}")
        self.decay = decay
        self.updates = 0
        # what this process trains: not meta (a pipeline's released stages), not frozen, its own stages
        self.named = [(n, p) for n, p in model.named_parameters()
                      if p.requires_grad and not p.is_meta and (owned is None or n in owned)]
        self.shadow = [_local(p).detach().to("cpu", torch.float32, copy=True) for _, p in self.named]
        pin = any(_local(p).device.type == "cuda" for _, p in self.named)
        self.staging = [torch.empty_like(s, pin_memory=True) for s in self.shadow] if pin else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.named]

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shadow)

    # ---- the update ------------------------------------------------------------------------
    def update(self):
        """After an optimizer step: start averaging the new parameters in; returns at once."""
        self.wait()
        if self.staging is not None:          # copies queued behind the step on its stream
            for buf, (_, p) in zip(self.staging, self.named):
                buf.copy_(_local(p).detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            sources = self.staging
        else:
            done, sources = None, [_local(p).detach() for _, p in self.named]
        self.updates += 1
        self._thread = threading.Thread(target=self._average, args=(sources, done), daemon=True,
                                        name="fewchips-ema")
        self._thread.start()

    def _average(self, sources, done):
        try:
            if done is not None:
                done.synchronize()
            with torch.no_grad():
                for s, x in zip(self.shadow, sources):
                    s.lerp_(x.float(), 1.0 - self.decay)
        except BaseException as e:   # noqa: BLE001 - raised in the training thread by wait()
            self._error = e

    def wait(self):
        """Block until the last update is in (before the parameters change, or the average is read)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"the parameter EMA's update failed: {err}") from err

    # ---- reading it ------------------------------------------------------------------------
    @torch.no_grad()
    def swap(self, model: torch.nn.Module):
        """Exchange the average and the live parameters in place (bitwise; call again to swap back)."""
        self.wait()
        for m in fsdp_modules(model):      # drop gathered weights, so the next forward reads the shards
            m.reshard()
        for s, (_, p) in zip(self.shadow, self.named):
            live = _local(p)
            held = live.detach().to("cpu", torch.float32, copy=True)
            live.copy_(s)
            s.copy_(held)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Name → this process's shard of the average (the live parameter's name and shape)."""
        self.wait()
        return dict(zip(self.names, self.shadow))

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """Name → the average as a DTensor laid out like its parameter (for torch.distributed.checkpoint,
        which stores it as the global tensor, so it loads at any other layout)."""
        self.wait()
        out = {}
        for s, (n, p) in zip(self.shadow, self.named):
            out[n] = (DTensor.from_local(s, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                         stride=p.stride()) if isinstance(p, DTensor) else s)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int):
        self.wait()
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {len(missing)} parameter(s), e.g. {missing[0]}")
        for s, n in zip(self.shadow, self.names):
            s.copy_(_local(state[n]))
        self.updates = updates
