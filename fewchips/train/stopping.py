"""Stopping a run cleanly. SIGINT (Ctrl-C) and SIGTERM (what schedulers and torchrun send) do not
interrupt the step in progress: they ask the trainer to stop once it is done, so the checkpoint it
then writes is a state between two steps and `--resume` continues exactly as if nothing happened,
wherever in the step the signal landed. A second Ctrl-C aborts at once, without saving (the last
checkpoint stays as it was)."""

from __future__ import annotations

import signal
import threading


class TrainInterrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(f"stopped by {signal_name} after step {step}")
        self.signal_name, self.step = signal_name, step

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


class StopOnSignal:
    """`with StopOnSignal(log) as stop:` ... `stop.requested` holds the first signal's name (or None).
    Handlers are installed only in the main thread (the only one Python delivers signals to)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, log=print):
        self.log = log
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def __exit__(self, *exc):
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            self.log(f"\n{name}: stopping after this step and saving a checkpoint (Ctrl-C again aborts without saving)")
        elif name == "SIGINT":
            raise KeyboardInterrupt
