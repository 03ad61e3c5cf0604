"""The lite-train shard format: schema, writer, random-access reader and verification.

Depends on pyarrow and numpy only, so any project can read converted sources through it.
"""

from manifests.ordered_writer import OrderedSourceWriter, SampleOrigin
from manifests.provenance import read_provenance, role_rows
from manifests.reader import FilePool, ManifestError, SourceReader, find_sources, open_source
from manifests.schema import FORMAT_VERSION, SourceInfo, ShardInfo, TfdsOrigin, sample_key, shard_name
from manifests.verify import VerifyReport, verify_source
from manifests.staging import SourceWriter
from manifests.writer import ClassRecord, is_complete

__all__ = [
    "FORMAT_VERSION",
    "ClassRecord",
    "FilePool",
    "ManifestError",
    "OrderedSourceWriter",
    "SampleOrigin",
    "ShardInfo",
    "SourceInfo",
    "SourceReader",
    "SourceWriter",
    "TfdsOrigin",
    "VerifyReport",
    "find_sources",
    "is_complete",
    "open_source",
    "read_provenance",
    "role_rows",
    "sample_key",
    "shard_name",
    "verify_source",
]
