"""What every converter (md, mnist, vtab) shares: the converter version, image-format sniffing, the summary row
of a source, and the check that settles a source before converting it (a killed publish, an up-to-date copy)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from manifests import schema
from manifests._version import __version__
from manifests.sources import IMAGE_MAGIC
from manifests.staging import recover_publish, up_to_date

from convert.tfrecord import RecordError

_MAGIC = tuple(IMAGE_MAGIC.items())  # ((extension, leading bytes), ...): a tuple on the per-record path


@dataclasses.dataclass(frozen=True)
class SourceResult:
    """What one source conversion did (one row of the summary table)."""

    source: str  # "<group>/<source>"
    status: str  # "converted" | "resumed" | "up to date"
    classes: int
    samples: int
    shards: int
    bytes: int  # total shard bytes
    seconds: float


def converter_version() -> str:
    """The lite-train version (written into every source.json); the package metadata gets it from the same
    constant, which is read here without importing importlib.metadata (part of every command's start-up)."""
    return __version__


def sniff_format(data: bytes | memoryview, where: str) -> str:
    """"jpg" or "png" from the magic bytes (`manifests.sources.IMAGE_MAGIC`); RecordError otherwise."""
    head = bytes(data[:8])
    for fmt, magic in _MAGIC:
        if head.startswith(magic):
            return fmt
    raise RecordError(f"{where}: image bytes are neither JPEG nor PNG (start {head.hex() or 'empty'})")


def source_result(info: schema.SourceInfo, status: str, start_time: float) -> SourceResult:
    """The summary row of a source described by `info`, timed from `start_time` (perf_counter)."""
    return SourceResult(f"{info.group}/{info.source}", status, info.num_classes, info.num_samples,
                        len(info.shards), sum(s.num_bytes for s in info.shards),
                        time.perf_counter() - start_time)


def published_result(out: str | Path, group: str, source: str, fingerprint: dict[str, Any], *, fsync: bool,
                     start_time: float) -> SourceResult | None:
    """Complete or undo a publish of `<out>/<group>/<source>` that was killed half-way, then, if the source is
    up to date (`manifests.staging.up_to_date`: same fingerprint, every published file at its recorded size),
    its summary row ("resumed" when the publish was completed here, else "up to date"); None when it must be
    converted. The caller holds the output root's lock."""
    recovered = recover_publish(Path(out), group, source, fsync=fsync)
    done = up_to_date(Path(out), group, source, fingerprint)
    if done is None:
        return None
    return source_result(done, "resumed" if recovered else "up to date", start_time)
