"""TFRecord files in, checked payloads out; `tf.train.Example` payloads in, `{feature: values}` out. No TF.

Framing (per record, little-endian): uint64 length N, uint32 masked CRC32C of those 8 bytes, N payload
bytes, uint32 masked CRC32C of the payload. Both CRCs are always checked. The Example parser is a small
protobuf wire-format walker: map entries in any order, int64 lists packed or not, unknown fields skipped;
`read_md_example` first tries the one layout TF writes for MD records and falls back to the walker for any
other. Every error is a `RecordError` whose one-line message names the file and the record index.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable, Iterator

import crc32c

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # payload length, masked CRC of the length bytes
_CRC = struct.Struct("<I")


class RecordError(ValueError):
    """A TFRecord file or an Example in it is malformed. The message is one line naming the file."""


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C: rotate right by 15 bits, add 0xA282EAD8 (mod 2**32)."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(payload: bytes) -> bytes:
    """One framed record holding `payload`."""
    length = struct.pack("<Q", len(payload))
    return length + _CRC.pack(masked_crc(length)) + payload + _CRC.pack(masked_crc(payload))


def encode_varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int (negative int64 values: pass n & (2**64 - 1))."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def length_delimited(field: int, body: bytes) -> bytes:
    """Protobuf field `field` of wire type 2 (bytes / sub-message)."""
    return encode_varint(field << 3 | 2) + encode_varint(len(body)) + body


def encode_md_example(image: bytes, label: int) -> bytes:
    """A serialized `tf.train.Example` {image: bytes, label: int64 >= 0}.

    Byte-equal to TF's *deterministic* serialization (map entries sorted by key). Plain
    `SerializeToString()` may emit the two entries in either order (protobuf leaves map order
    unspecified), so readers must not assume one; `read_md_example` does not.
    """
    ld = length_delimited
    image_entry = ld(1, ld(1, b"image") + ld(2, ld(1, ld(1, image))))
    label_entry = ld(1, ld(1, b"label") + ld(2, ld(3, ld(1, encode_varint(label)))))
    return ld(1, image_entry + label_entry)


def write_records(path: str | os.PathLike, payloads: Iterable[bytes]) -> None:
    """Write `payloads` as a TFRecord file (plain framing writer; TF's own writer gives the same bytes)."""
    with open(path, "wb") as f:
        for p in payloads:
            f.write(frame(p))


class ReadBuffer:
    """One growable buffer that whole record files are read into, reused from file to file (a fresh buffer
    per file would fault in new memory pages for every byte read)."""

    def __init__(self):
        self._data = bytearray()

    def read(self, path: str | os.PathLike) -> memoryview:
        """The bytes of `path`, a view valid until the next `read`."""
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if len(self._data) < size:  # a new one (views of the old one stay valid), with room to spare: files
                # of one dataset differ in size, and each new buffer zero-fills and faults in all its pages
                self._data = bytearray(size + size // 4)
            view = memoryview(self._data)[:size]
            done = 0
            while done < size:
                n = f.readinto(view[done:])
                if not n:
                    return view[:done]  # the file shrank meanwhile: its framing check will say so
                done += n
            return view


def iter_records(path: str | os.PathLike, buffer: ReadBuffer | None = None) -> Iterator[memoryview]:
    """Yield the payload of every record of `path`, in file order, after checking both CRCs.

    The file is read whole (MD writes one file per class, so this is one class's records) into `buffer` (a
    new one if None), and payloads are zero-copy views into it, valid until the buffer reads the next file:
    a consumer that keeps one must copy it (`bytes(view)`).

    Raises:
        RecordError: truncated header or payload, or a CRC mismatch; the message names the file and
            the record index.
    """
    name = os.fspath(path)
    try:
        data = (buffer or ReadBuffer()).read(path)
    except OSError as e:
        raise RecordError(f"{name}: cannot be read: {e.strerror or e}") from None
    yield from _iter_buffer(data, name)


def _iter_buffer(buf: memoryview, name: str) -> Iterator[memoryview]:
    index, pos, end = 0, 0, len(buf)
    header_size, crc_size = _HEADER.size, _CRC.size
    while pos < end:
        if end - pos < header_size:
            raise RecordError(f"{name}: record {index} (byte {pos}): truncated length header "
                              f"({end - pos} of {header_size} bytes)")
        length, length_crc = _HEADER.unpack_from(buf, pos)
        if masked_crc(buf[pos:pos + 8]) != length_crc:
            raise RecordError(f"{name}: record {index} (byte {pos}): length CRC mismatch (corrupt header)")
        start = pos + header_size
        if start + length + crc_size > end:
            raise RecordError(f"{name}: record {index} (byte {pos}): truncated, header announces {length} payload "
                              f"bytes but the file ends {end - start} bytes later")
        payload = buf[start:start + length]
        if masked_crc(payload) != _CRC.unpack_from(buf, start + length)[0]:
            raise RecordError(f"{name}: record {index} (byte {pos}): payload CRC mismatch")
        yield payload
        pos = start + length + crc_size
        index += 1


# -- protobuf wire format -----------------------------------------------------------------------------------

def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, object]]:
    """Yield (field number, wire type, value) for one message; LEN values are (start, end) spans."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + n), pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("field runs past the end of its message")
        yield number, wire, value


def _signed64(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >> 63 else v


def _parse_feature(buf: bytes, start: int, end: int) -> list:
    """Feature{bytes_list=1 | float_list=2 | int64_list=3} -> list of bytes, floats or ints."""
    values: list = []
    for number, wire, span in _fields(buf, start, end):
        if wire != 2 or number not in (1, 2, 3):
            continue
        for inner, iwire, v in _fields(buf, *span):
            if inner != 1:
                continue
            if number == 1 and iwire == 2:  # BytesList.value (a view when `buf` is a memoryview)
                values.append(buf[v[0]:v[1]])
            elif number == 3 and iwire == 0:  # Int64List.value, unpacked
                values.append(_signed64(v))
            elif number == 3 and iwire == 2:  # Int64List.value, packed
                pos, stop = v
                while pos < stop:
                    x, pos = _varint(buf, pos, stop)
                    values.append(_signed64(x))
            elif number == 2 and iwire == 5:  # FloatList.value, unpacked
                values.append(struct.unpack("<f", v)[0])
            elif number == 2 and iwire == 2:  # FloatList.value, packed
                values.extend(struct.unpack(f"<{(v[1] - v[0]) // 4}f", buf[v[0]:v[1]]))
            else:
                raise ValueError(f"feature list of kind {number} has a value of wire type {iwire}")
    return values


def parse_example(payload: bytes | memoryview) -> dict[str, list]:
    """Parse a serialized `tf.train.Example` into {feature name: list of values}.

    Bytes values are slices of `payload`: views when it is a memoryview (no copy of the image bytes).

    Raises:
        ValueError: the payload is not a well-formed Example.
    """
    features: dict[str, list] = {}
    for number, wire, span in _fields(payload, 0, len(payload)):
        if number != 1 or wire != 2:  # Example.features
            continue
        for fnum, fwire, entry in _fields(payload, *span):
            if fnum != 1 or fwire != 2:  # Features.feature (map entry)
                continue
            key, value = None, []
            for enum, ewire, v in _fields(payload, *entry):
                if enum == 1 and ewire == 2:
                    key = bytes(payload[v[0]:v[1]]).decode("utf-8")
                elif enum == 2 and ewire == 2:
                    value = _parse_feature(payload, *v)
            if key is None:
                raise ValueError("feature map entry without a key")
            features[key] = value
    return features


# The two map entries of an MD record as TF writes them: tag + length of the key "image" / "label", then the
# tag of the entry's Feature value (field 2, LEN).
_IMAGE_KEY, _LABEL_KEY = b"\x0a\x05image\x12", b"\x0a\x05label\x12"


def _md_example_fast(buf: bytes | memoryview) -> tuple[bytes | memoryview, int] | None:
    """(image bytes, label) of an Example laid out exactly as TF writes an MD record, else None.

    Accepted: Example{features (1)} spanning the payload, holding exactly two map entries (1), in either order:
    {key "image", Feature{bytes_list (1){value (1): one bytes}}} and {key "label", Feature{int64_list (3){value
    (1): one packed or unpacked varint}}}, each field spanning its parent to the byte. This is the result
    `parse_example` gives for such a payload; anything else (other fields, more values, other encodings,
    malformed data) returns None so that `parse_example` decides, and words any error.
    """
    try:
        return _md_example_layout(buf)
    except (ValueError, IndexError):  # malformed
        return None


def _md_example_layout(buf: bytes | memoryview) -> tuple[bytes | memoryview, int] | None:
    end = len(buf)
    if end < 2 or buf[0] != 0x0A:
        return None
    n, pos = _varint(buf, 1, end)
    if pos + n != end:
        return None
    image = label = None
    while pos < end:  # one map entry per iteration
        if buf[pos] != 0x0A:
            return None
        n, pos = _varint(buf, pos + 1, end)
        stop = pos + n
        if stop > end or stop - pos < 8:
            return None
        key = buf[pos:pos + 8]
        n, pos = _varint(buf, pos + 8, stop)  # the Feature
        if pos + n != stop or pos >= stop:
            return None
        kind = buf[pos]  # 0x0A: bytes_list, 0x1A: int64_list
        n, pos = _varint(buf, pos + 1, stop)
        if pos + n != stop or pos >= stop:
            return None
        if key == _IMAGE_KEY and kind == 0x0A and image is None and buf[pos] == 0x0A:
            n, pos = _varint(buf, pos + 1, stop)
            if pos + n != stop:
                return None
            image = buf[pos:stop]
        elif key == _LABEL_KEY and kind == 0x1A and label is None and buf[pos] in (0x08, 0x0A):
            if buf[pos] == 0x0A:  # packed: a length, then the varint
                n, pos = _varint(buf, pos + 1, stop)
                if pos + n != stop:
                    return None
            else:
                pos += 1
            value, pos = _varint(buf, pos, stop)
            if pos != stop:
                return None
            label = _signed64(value)
        else:
            return None
        pos = stop
    if image is None or label is None:
        return None
    return image, label


def read_md_example(payload: bytes | memoryview, where: str) -> tuple[bytes | memoryview, int]:
    """An MD record's (image bytes, label): exactly one `image` bytes value and one `label` int64.

    Raises:
        RecordError: `f"{where}: <problem>"`.
    """
    fast = _md_example_fast(payload)
    if fast is not None:
        return fast
    try:
        features = parse_example(payload)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise RecordError(f"{where}: not a tf.train.Example ({e})") from None
    image, label = features.get("image"), features.get("label")
    if not image or len(image) != 1 or not isinstance(image[0], (bytes, memoryview)):
        raise RecordError(f"{where}: feature 'image' must hold exactly one bytes value, got {_describe(image)}")
    if not label or len(label) != 1 or not isinstance(label[0], int):
        raise RecordError(f"{where}: feature 'label' must hold exactly one int64 value, got {_describe(label)}")
    return image[0], label[0]


def _describe(values: list | None) -> str:
    if values is None:
        return "no such feature"
    return f"{len(values)} value(s) of type {sorted({type(v).__name__ for v in values}) or '-'}"
