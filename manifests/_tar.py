"""A sample (key, label, image format and size) in, the bytes of its tar members out, as the shards hold them.

Each sample is two USTAR members, `<key>.cls` (the label as ASCII digits) then `<key>.<jpg|png>`, with the
fixed header fields of `schema` (docs/format.md, "Shards"); an archive ends with two zero blocks and is
padded to whole 10,240-byte records, like GNU tar. The writer (`manifests._shards`) and `verify` both take
their bytes from here, so a shard is checked against exactly what was written.
"""

from __future__ import annotations

import tarfile

from manifests import schema

BLOCK = 512
RECORD = 20 * BLOCK  # tar files are padded to whole records, as GNU tar and Python's tarfile do
END = b"\0" * (2 * BLOCK)


def tarfile_header(name: str, size: int) -> bytes:
    """The USTAR header `tarfile` itself writes for a regular-file member `name` of `size` bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = schema.TAR_MTIME
    info.mode = schema.TAR_MODE
    info.uname = schema.TAR_UNAME
    info.gname = schema.TAR_GNAME
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


# A USTAR header is a fixed 512-byte template in which only the name, the size and the checksum vary, so it
# is built from a template made once by `tarfile` itself (byte-identical to `TarInfo.tobuf`, tested).
_TEMPLATE = bytearray(tarfile_header("", 0))
_TEMPLATE[148:156] = b" " * 8  # checksum field counts as spaces while the checksum is computed
_TEMPLATE_SUM = sum(_TEMPLATE) - sum(_TEMPLATE[124:136])  # without the size field
_MAX_SIZE = 8 ** 11  # 11 octal digits


def tar_header(name: str, size: int) -> bytes:
    """The USTAR header of a regular-file member `name` of `size` bytes, as `tarfile` writes it."""
    raw = name.encode()
    if not raw or len(raw) > schema.MAX_MEMBER_NAME_BYTES or not 0 <= size < _MAX_SIZE:
        return tarfile_header(name, size)  # tarfile raises its own error for what USTAR cannot hold
    size_field = b"%011o\0" % size
    header = _TEMPLATE.copy()
    header[:len(raw)] = raw
    header[124:136] = size_field
    header[148:155] = b"%06o\0" % (_TEMPLATE_SUM + sum(raw) + sum(size_field))
    return bytes(header)


def padding(size: int, unit: int = BLOCK) -> bytes:
    """The zero bytes that follow `size` bytes of data up to the next multiple of `unit`."""
    return b"\0" * (-size % unit)


def sample_head(key: str, class_id: int, fmt: str, size: int) -> bytes:
    """Everything a sample's members hold before its image data: the label member (header, digits, padding)
    and the image member's header. Members come in sorted extension order, as webdataset's TarWriter writes
    them: cls, then jpg|png."""
    label = str(class_id).encode()
    return b"".join((tar_header(f"{key}.{schema.LABEL_EXTENSION}", len(label)), label, padding(len(label)),
                     tar_header(f"{key}.{fmt}", size)))


def archive_end(size: int) -> bytes:
    """What ends an archive whose members fill `size` bytes: the two zero blocks, then zeros up to a record."""
    return END + padding(size + len(END), RECORD)


def shard_size(end_of_last_member: int) -> int:
    """Tar file size once the end-of-archive blocks and the record padding follow the last member."""
    end = end_of_last_member + len(END)
    return end + (-end % RECORD)
