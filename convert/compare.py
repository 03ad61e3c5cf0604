"""A converted Meta-Dataset source and the records folder it came from in, a record-by-record comparison out.

This is the byte-identity check for real Meta-Dataset records, `lite-convert verify OUT --records ROOT`: every
record is read and checked as the converter reads it (`convert.md.checked_records`: both CRCs, label = the
file's class id, the count) and its image bytes compared with the converted sample's.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from manifests.reader import SourceReader

from convert.md import FILE_PATTERN, checked_records
from convert.tfrecord import ReadBuffer, RecordError


@dataclasses.dataclass(frozen=True)
class RecordsComparison:
    """What `compare_with_records` checked: every record of every class file, in order."""

    source: str
    classes: int
    images: int
    bytes: int


def compare_with_records(source_path: str | os.PathLike, records: str | os.PathLike) -> RecordsComparison:
    """Re-read the TFRecords a converted MD source came from and check, record by record, that the image
    bytes and label equal the converted sample's (same class, same index), with equal counts.

    Raises:
        RecordError / ValueError: the first difference, naming the record file, the record index and the
            shard member it was compared with.
    """
    reader = SourceReader(source_path)
    folder = Path(records) / reader.info.source
    images = nbytes = 0
    buffer = ReadBuffer()
    with reader:
        for class_id in range(reader.info.num_classes):
            first, count = reader.class_range(class_id)
            path = folder / FILE_PATTERN.format(class_id)
            if not path.is_file():
                raise ValueError(f"{path}: missing record file for class {class_id} of {source_path}")
            for index, image, _ in checked_records(path, class_id, count, f"converted samples of class {class_id}",
                                                   buffer):
                if reader.read(first + index) != image:
                    raise RecordError(f"{path}: record {index}: image bytes differ from {reader.locate(first + index)}")
                nbytes += len(image)
            images += count
    return RecordsComparison(reader.info.source, reader.info.num_classes, images, nbytes)
