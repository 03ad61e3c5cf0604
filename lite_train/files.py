"""Bytes (or a writer function) in, a file out, atomically: every file lite-train writes goes through
`atomic_write`, so a reader sees the old file or the new one, never a part, and a failure leaves no
temporary file behind and says in one line which file could not be written."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import BinaryIO, Callable


def write_error(path: Path, error: OSError) -> ValueError:
    """The one-line error for a failed write of `path`."""
    if error.errno == errno.ENOSPC:
        return ValueError(f"no space left on device: {path}")
    if error.errno == errno.EDQUOT:
        return ValueError(f"disk quota exceeded: {path}")
    return ValueError(f"{path}: cannot write: {error.strerror or error}")


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], None], *,
                 fsync: bool = False) -> None:
    """Write `content` (bytes, text, or a function that writes into a binary file) to `path` through a
    temporary file in the same folder and a rename; with `fsync`, also the data and the folder entry.
    A writer function writes into memory first, so that a full disk surfaces here as ENOSPC, not inside a
    serialiser (torch.save reports a short write as "unexpected pos").

    Raises:
        ValueError: the file cannot be written (one line naming it: "no space left on device: <path>").
    """
    path = Path(path)
    if callable(content):
        buffer = io.BytesIO()
        content(buffer)
        data = buffer.getvalue()
    else:
        data = content.encode() if isinstance(content, str) else content
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
        if fsync:
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:  # Ctrl-C in the middle of a write: no temporary file left behind either
        tmp.unlink(missing_ok=True)
        raise


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the `.<name>.<pid>.tmp` files an interrupted `atomic_write` (kill -9) left in `folder`."""
    removed = []
    for p in folder.glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
