"""The lite-train shard format: schema, writer, random-access reader and verification.

Depends on pyarrow and numpy only, so any project can read converted sources through it.
"""

from manifests.lazy import lazy_exports

# Exported names -> defining module, imported on first use (PEP 562): `lite-convert md` then loads only
# the modules it runs, not every converter's (start-up is part of every conversion's time, BENCHMARKS.md).
_EXPORTS = {
    "ClassRecord": "manifests.writer",
    "FORMAT_VERSION": "manifests.schema",
    "FilePool": "manifests.reader",
    "ManifestError": "manifests.reader",
    "OrderedSourceWriter": "manifests.ordered_writer",
    "SampleOrigin": "manifests.ordered_writer",
    "ShardInfo": "manifests.schema",
    "SourceInfo": "manifests.schema",
    "SourceReader": "manifests.reader",
    "SourceWriter": "manifests.writer",
    "TfdsOrigin": "manifests.schema",
    "VerifyReport": "manifests.verify",
    "find_sources": "manifests.reader",
    "is_complete": "manifests.staging",
    "open_source": "manifests.reader",
    "read_provenance": "manifests.provenance",
    "role_rows": "manifests.provenance",
    "sample_key": "manifests.schema",
    "shard_name": "manifests.schema",
    "verify_source": "manifests.verify",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
