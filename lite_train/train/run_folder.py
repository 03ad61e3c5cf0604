"""An `--out` folder in, a run folder held by this process out: locked against a second lite-train, its
config written once, and what a resume continues from.

    fresh run:  the folder must be missing or empty; config.json is written before anything else.
    --resume:   config.json must be there and agree with the settings given (the fields that decide the
                result); checkpoint.pt, if any, is what the run continues from; without one (a run killed
                before its first checkpoint) the run starts again from the beginning in the same folder.

Either way temporaries left by a killed write (`.<name>.<pid>.tmp`) are removed first.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from lite_train.files import atomic_write, remove_temporaries

CONFIG_FILE = "config.json"
LOCK_FILE = ".lite-train.lock"


class RunFolder:
    """Context manager over a run folder: `__enter__` takes the lock (only the process that writes, rank 0,
    should), `prepare` checks and sets the folder up. The lock is released when the process exits or on
    `__exit__`.

    Args:
        out: the run folder.
        what: the command, for messages ("lite-train train").
    """

    def __init__(self, out: str | os.PathLike, what: str = "lite-train"):
        self.out, self.what = Path(out), what
        self._fd: int | None = None

    def __enter__(self) -> "RunFolder":
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"another lite-train (pid {holder}) is using {self.out}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race a waiting process)
            self._fd = None

    def prepare(self, config: dict[str, Any], resume: bool, compared: Sequence[str],
                checkpoint: str = "checkpoint.pt") -> Path | None:
        """Set the folder up for a fresh run or a resume; returns the checkpoint to continue from, or None.

        compared: the config keys a resumed run must agree on (the others, like the device or the number of
            workers, may change between runs).

        Raises:
            ValueError: a fresh run on a used folder, a resume without config.json or with other settings.
        """
        remove_temporaries(self.out)
        config_path = self.out / CONFIG_FILE
        if not resume:
            used = sorted(p.name for p in self.out.iterdir() if p.name != LOCK_FILE)
            if used:
                raise ValueError(f"{self.out}: run folder exists and is not empty ({', '.join(used[:3])}"
                                 f"{', ...' if len(used) > 3 else ''}); continue it with --resume, or pick "
                                 "another --out")
            atomic_write(config_path, json.dumps(config, indent=1, sort_keys=True) + "\n")
            return None
        if not config_path.is_file():
            raise ValueError(f"{self.out}: no run to resume (no {CONFIG_FILE}); start it without --resume")
        try:
            saved = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{config_path}: unreadable: {e}") from None
        config = json.loads(json.dumps(config))  # tuples as lists, as config.json holds them
        differs = [k for k in compared if saved.get(k) != config.get(k)]
        if differs:
            raise ValueError(f"{config_path}: the run was started with other settings: "
                             + ", ".join(f"{k} {saved.get(k)!r} (now {config.get(k)!r})" for k in differs))
        if (self.out / checkpoint).is_file():
            return self.out / checkpoint
        # Killed before its first checkpoint: nothing to continue, start over (keeping config.json).
        for p in self.out.iterdir():
            if p.name not in (CONFIG_FILE, LOCK_FILE) and p.is_file():
                p.unlink()
        return None


def run_in_folder(folder: RunFolder | None, body: Callable[[], Any]) -> Any:
    """`body()` with the folder locked (None: a process that does not write, e.g. rank > 0)."""
    if folder is None:
        return body()
    with folder:
        return body()
