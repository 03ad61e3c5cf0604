"""The lite-train shard format: schema, writer, random-access reader and verification.

Depends on pyarrow and numpy only, so any project can read converted sources through it.
"""

from manifests.reader import FilePool, ManifestError, SourceReader, find_sources, open_source
from manifests.schema import FORMAT_VERSION, SourceInfo, ShardInfo, sample_key, shard_name
from manifests.verify import VerifyReport, verify_source
from manifests.writer import ClassRecord, SourceWriter, is_complete

__all__ = [
    "FORMAT_VERSION",
    "ClassRecord",
    "FilePool",
    "ManifestError",
    "ShardInfo",
    "SourceInfo",
    "SourceReader",
    "SourceWriter",
    "VerifyReport",
    "find_sources",
    "is_complete",
    "open_source",
    "sample_key",
    "shard_name",
    "verify_source",
]
