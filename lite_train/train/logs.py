"""Training curves out: `metrics.csv` (one row per task or batch), `validation.csv`, and TensorBoard event
files; `RunLogs` keeps the three of one run together and knows how many rows a checkpoint covers.

The event files are written here, not through `torch.utils.tensorboard`, because that writer imports
TensorFlow when it is installed (and lite_train must never import TensorFlow). The format is small: a
TFRecord file (length, masked CRC32C of the length, data, masked CRC32C of the data) of `Event` protobufs,
which are hand-encoded below (field numbers from tensorboard's `event.proto` and `summary.proto`); the test
decodes them with tensorboard's own protobuf classes. Viewing them needs the `tensorboard` extra.
"""

from __future__ import annotations

import csv
import os
import socket
import struct
import time
from pathlib import Path
from typing import Sequence

import crc32c

METRICS_FILE = "metrics.csv"
VALIDATION_FILE = "validation.csv"
METRICS_COLUMNS = ("task", "source", "ways", "support", "query", "loss", "accuracy")
VALIDATION_COLUMNS = ("task", "source", "accuracy", "confidence", "episodes", "new_best")
PRETRAIN_METRICS_COLUMNS = ("batch", "epoch", "loss", "accuracy", "learning_rate")
PRETRAIN_VALIDATION_COLUMNS = ("batch", "epoch", "accuracy", "loss", "images", "bn_statistics")


class CsvLog:
    """Append-only CSV with a header; on resume, rows beyond the checkpoint are cut off first."""

    def __init__(self, path: Path, columns: Sequence[str], keep_rows: int | None = None):
        self.path, self.columns = path, tuple(columns)
        if keep_rows is None or not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
            self.rows = 0
        else:
            self._truncate(keep_rows)
            self.rows = keep_rows  # data rows in the file
        self._file = open(path, "a", newline="")
        self._writer = csv.writer(self._file)

    def _truncate(self, keep_rows: int) -> None:
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or tuple(rows[0]) != self.columns:
            raise ValueError(f"{self.path}: header is not {','.join(self.columns)}")
        if len(rows) - 1 < keep_rows:
            raise ValueError(f"{self.path}: {len(rows) - 1} rows, the checkpoint expects at least {keep_rows}")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows[:keep_rows + 1])
        tmp.replace(self.path)

    def write(self, row: Sequence) -> None:
        self._writer.writerow(row)
        self.rows += 1

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def rows_in(path: Path) -> int:
    """Data rows of a CSV log (0 if missing)."""
    if not path.exists():
        return 0
    with open(path, newline="") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int, *, tag: str | None = None, value: float | None = None,
                 file_version: str | None = None) -> bytes:
    """An `Event` protobuf: wall_time (1, double), step (2, int64), file_version (3, string) or
    summary (5) holding one `Summary.Value` (tag: 1, simple_value: 2 float); session_log is field 7."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if tag is not None:
        summary_value = _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value))
        out += _bytes_field(5, _bytes_field(1, summary_value))
    return out


def _masked_crc(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


class EventWriter:
    """Scalars to `events.out.tfevents.<time>.<host>.<pid>.<n>` in `folder` (a new file per process start;
    after a resume TensorBoard is told to drop events at or after `purge_step` from older files)."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.0"
        self._file = open(folder / name, "ab")
        self._file.write(tfrecord(encode_event(now, 0, file_version="brain.Event:2")))
        if purge_step is not None:
            # A SessionLog START event at purge_step makes TensorBoard discard later steps of earlier files.
            session_log_start = _bytes_field(7, _field(1, 0, _varint(1)))  # Event.session_log, status START
            self._file.write(tfrecord(_field(1, 1, struct.pack("<d", now)) + _field(2, 0, _varint(purge_step))
                                      + session_log_start))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._file.write(tfrecord(encode_event(time.time(), step, tag=tag, value=float(value))))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class RunLogs:
    """metrics.csv, validation.csv and TensorBoard scalars of one run (the process that writes, rank 0).

    resume_rows: {"metrics": n, "validation": m} from the checkpoint a run resumes from: rows written after
    it are cut off, and TensorBoard is told to drop the events from `purge_step` on.
    """

    FLUSH_SECONDS = 2.0  # rows reach the files at least this often (a user tailing metrics.csv sees progress)

    def __init__(self, out: Path, metrics_columns: Sequence[str], validation_columns: Sequence[str],
                 resume_rows: dict[str, int] | None = None, purge_step: int | None = None):
        self._flushed = time.monotonic()
        keep = resume_rows or {}
        self.metrics = CsvLog(out / METRICS_FILE, metrics_columns, keep_rows=keep.get("metrics"))
        self.validation = CsvLog(out / VALIDATION_FILE, validation_columns, keep_rows=keep.get("validation"))
        self.events = EventWriter(out, purge_step=purge_step if resume_rows is not None else None)

    def metric(self, row: Sequence, step: int, scalars: dict[str, float]) -> None:
        self.metrics.write(row)
        for tag, value in scalars.items():
            self.events.scalar(tag, value, step)
        if time.monotonic() - self._flushed > self.FLUSH_SECONDS:
            self.flush()

    def validate(self, row: Sequence, step: int, scalars: dict[str, float]) -> None:
        self.validation.write(row)
        for tag, value in scalars.items():
            self.events.scalar(tag, value, step)

    def rows(self) -> dict[str, int]:
        """Rows written so far (what a checkpoint taken now covers)."""
        return {"metrics": self.metrics.rows, "validation": self.validation.rows}

    def flush(self) -> None:
        self.metrics.flush()
        self.validation.flush()
        self.events.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        self.metrics.close()
        self.validation.close()
        self.events.close()
