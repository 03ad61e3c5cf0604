"""SIGTERM / SIGINT in, a flag out: a run stops at the next safe point (after the task or batch at hand, or
before the first one when the signal comes during start-up), checkpoints and exits."""

from __future__ import annotations

import signal


class StopRequest:
    """Context manager: while active, SIGTERM and SIGINT only set `requested` (a second signal too: the
    run is already stopping). Enter it first thing, so a signal during start-up (opening sources, building
    the model, calibration) is not fatal either: the run stops before its first task."""

    def __init__(self):
        self.requested = False
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
