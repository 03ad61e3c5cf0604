"""What a user watches while a command runs: items done of a total, rate, ETA and running metrics.

In a terminal: a live rich bar. Otherwise (CI, `nohup`, a log file): plain lines on stderr, one when the work
starts, then at most one every `every` seconds, and one at the end, so a log shows progress without a
terminal. Start-up phases (opening sources, calibration, loading a model) are `status` lines in both modes.

    progress = Progress("train", total=300, unit="tasks", done=0)
    progress.status("calibrating the backbone's BN statistics on 200 images")
    progress.advance(1, loss=0.41, acc=0.55)   # running means over the last `window` values
    progress.close()
"""

from __future__ import annotations

import collections
import math
import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Progress of one unit of work (module docstring).

    Args:
        what: the label, e.g. "train", "pretrain", "test demo_glyphs".
        total: items in all (tasks, batches, episodes); done: items already done (a resumed run).
        unit: the items' name ("tasks", "batches", "episodes").
        live: a rich bar (True) or plain lines (False); None = a bar exactly when `stream` is a terminal.
        every: seconds between plain lines.
        window: running metrics are means over the last `window` values.
        enabled: False shows nothing (e.g. a process other than rank 0).
    """

    def __init__(self, what: str, total: int, unit: str, done: int = 0, *, live: bool | None = None,
                 every: float = 10.0, window: int = 100, enabled: bool = True, stream: TextIO | None = None):
        self.what, self.total, self.unit, self.done = what, total, unit, done
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.every = enabled, every
        self.live = (self.stream.isatty() if live is None else live) and enabled
        self.values: dict[str, collections.deque] = {}
        self.window = window
        self.started, self.start_done = time.monotonic(), done
        self._last_line = -math.inf
        self._printed_done = -1  # `done` when the last plain line was printed
        self._bar = None
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[unit]} {task.fields[rate]} {task.fields[metrics]}"),
                                      TimeRemainingColumn(), console=Console(file=self.stream), transient=False)
            self._rich.start()
            self._bar = self._rich.add_task(what, total=total, completed=done, unit=unit, rate="", metrics="")
        elif enabled and total:
            self._line(force=True)

    def status(self, text: str) -> None:
        """A start-up phase or an event, on its own line."""
        if not self.enabled:
            return
        if self.live:
            self._rich.console.print(f"{self.what}: {text}")
        else:
            print(f"{self.what}: {text}", file=self.stream, flush=True)

    def advance(self, n: int = 1, **metrics: float) -> None:
        """`n` more items done; `metrics` (e.g. loss, acc) enter the running means."""
        self.done += n
        for key, value in metrics.items():
            self.values.setdefault(key, collections.deque(maxlen=self.window)).append(float(value))
        if not self.enabled:
            return
        if self.live:
            self._rich.update(self._bar, completed=self.done, rate=self._rate_text(), metrics=self._metrics_text())
        else:
            self._line()

    def means(self) -> dict[str, float]:
        return {k: float(sum(v) / len(v)) for k, v in self.values.items() if v}

    def _rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def _rate_text(self) -> str:
        rate = self._rate()
        return f"{rate:.2f}/s" if rate >= 0.1 else (f"{1 / rate:.1f} s each" if rate > 0 else "")

    def _metrics_text(self) -> str:
        return " ".join(f"{k} {v:.4g}" for k, v in self.means().items())

    def _line(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_line < self.every and self.done < self.total:
            return
        self._last_line, self._printed_done = now, self.done
        rate = self._rate()
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        percent = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.what}: {self.done}/{self.total} {self.unit} ({percent:.0f} %)"]
        if self.done > self.start_done:
            parts.append(f"{self._rate_text()}, ETA {_clock(eta)}")
        if self.values:
            parts.append(self._metrics_text())
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        """Stop the bar (or print the last line if it was not printed yet)."""
        if not self.enabled:
            return
        if self.live:
            self._rich.stop()
            self.live = False
        elif self.total and self._printed_done != self.done:
            self._line(force=True)
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
