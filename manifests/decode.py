"""Encoded image bytes (JPEG or PNG) -> RGB uint8 (H, W, 3), exactly what TensorFlow decodes, or a ValueError.

The byte-level half of the runtime's decoder (`lite_train.data.decode` adds the resize), kept here so that
`lite-convert verify --decode` checks every image with the decoder training uses: "verify passes" means
"training can read every image". It accepts exactly what `tf.io.decode_image(bytes, channels=3)` accepts
(MD `data/decoder.py`, see docs/fidelity.md):

* JPEG: libjpeg-turbo through `simplejpeg` with the fast integer IDCT and fancy upsampling (TF's default
  `dct_method=''`), bit-identical to TF. A clean file (no libjpeg warning) is decoded with `strict=True`
  and nothing else. A file on which libjpeg warns or fails takes `_damaged_jpeg_rgb`: libjpeg *warnings*
  (a corrupt Huffman code, extra bytes before a marker, an unknown JFIF revision) do not stop TF, and
  decode to TF's pixels here; libjpeg *errors*, and data that ends before the end-of-image marker (TF's
  memory source suspends, where libjpeg-turbo's pads it with grey), make TF fail, and raise here.
  Checked against TF on crafted and randomly damaged files (tests/lite_train/test_decode.py).
* PNG: Pillow, channel rules as TF's libpng path (`_png_rgb`). libpng, not Pillow, decides what is
  accepted: `_png_chunks` requires every chunk up to IEND complete with a correct CRC, except that an
  ancillary chunk with a bad CRC is dropped (libpng's default) where Pillow would refuse the file.

`simplejpeg` and Pillow are imported inside the functions that need them, so importing `manifests` still
costs pyarrow and numpy only. `decode_rgb` refuses, like TF, an image of 2**29 or more output bytes. Nothing here keeps state: concurrent threads are safe.
"""

from __future__ import annotations

import dataclasses
import io
import re
import zlib

import numpy as np

from manifests.sources import IMAGE_MAGIC

__all__ = ["decode_rgb"]

_JPEG_MAGIC, _PNG_MAGIC = IMAGE_MAGIC["jpg"], IMAGE_MAGIC["png"]
_DCT_SCALES = (8, 4, 2)  # power-of-two libjpeg downscales; their reduced IDCTs are the fast ones

# A marker as libjpeg's `next_marker` finds one between segments: FF, any FF fill bytes, then a byte that is
# neither 00 (FF 00 is skipped as garbage) nor FF. (Spelt `\xff\xff*`, not `\xff+`, so that `re` can jump
# to each FF with its literal-prefix search instead of trying a match at every byte.)
_MARKER = re.compile(rb"\xff\xff*[^\x00\xff]")
# A marker inside entropy-coded data: FF 00 is a stuffed data byte and RST0-7 belong to the scan.
_MARKER_IN_SCAN = re.compile(rb"\xff\xff*[^\x00\xff\xd0-\xd7]")
_EOI, _SOS, _DRI, _APP14, _SOF0 = 0xD9, 0xDA, 0xDD, 0xEE, 0xC0
_NO_LENGTH = frozenset([0x01, 0xD8, *range(0xD0, 0xD8)])  # TEM, SOI, RST0-7: markers without a segment
_APP0_DATA_LEN = 14  # libjpeg's examine_app0 needs 14 payload bytes starting with "JFIF\0"
_APP14_DATA_LEN = 12  # libjpeg's examine_app14 needs 12 payload bytes starting with "Adobe"
_SOF = frozenset([*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)])


@dataclasses.dataclass(frozen=True)
class _JpegLayout:
    problem: str | None  # why libjpeg under TF fails before the end-of-image marker, or None
    adobe: bool  # an APP14 "Adobe" segment precedes the first scan (libjpeg's saw_Adobe_marker)
    header: bytes | None  # what to decode in place of data[:scan_data] (see _jpeg_layout), or None: as it is
    scan_data: int  # offset of the first scan's entropy-coded data
    frame: tuple[int, int, int]  # (height, width, components) from the frame header (SOFn); zeros if none


def _jpeg_layout(data: bytes) -> _JpegLayout:
    """Walks the marker segments of a JPEG the way libjpeg reads them, without decoding anything.

    Segment lengths are followed between markers; inside a scan, only a marker (FF then neither 00, FF
    nor RST0-7) ends the entropy-coded data, except that libjpeg skips an invalid marker code (below
    SOF0) when the scan has restart intervals (`jpeg_resync_to_restart`); without them it is an error.
    Data that ends before an EOI marker, or inside a segment, is a `problem` (libjpeg under TF runs out
    of data). O(segments) Python steps plus one C regex search per scan.

    TurboJPEG's header call fails on any libjpeg warning, where TF only warns. The header warnings
    libjpeg can give are removed from a rewritten header, without changing what libjpeg decodes: bytes
    between segments (it skips them), a JFIF major version other than 1 (it keeps the number but never
    uses it), an unknown Adobe transform code (it assumes YCbCr for 3 components, YCCK for 4: the code is
    set to exactly that).
    """
    n = len(data)
    pos, in_scan, seen_scan, adobe, garbage = 2, False, False, False, False
    pieces = []  # (marker code, first byte after the marker code, end) of each segment before the first scan
    scan_data, frame, restart_interval = 0, (0, 0, 0), 0
    incomplete = _JpegLayout("data ends before the end-of-image marker", False, None, 0, frame)
    while True:
        m = (_MARKER_IN_SCAN if in_scan else _MARKER).search(data, pos)
        if m is None:
            return incomplete
        if not in_scan and m.start() > pos and not seen_scan:
            garbage = True  # libjpeg warns "extraneous bytes before marker" and skips them
        code = data[m.end() - 1]
        if code == _EOI:
            break
        start = m.end()
        if in_scan and code < _SOF0:
            if not restart_interval:
                return _JpegLayout(f"invalid marker 0x{code:02x} inside a scan", False, None, 0, frame)
            pos = start
            continue
        if code in _NO_LENGTH:
            end = start
        else:
            if start + 2 > n:
                return incomplete
            end = start + max(2, data[start] << 8 | data[start + 1])
            if end > n:
                return incomplete
            if code == _DRI and end - start >= 4:
                restart_interval = data[start + 2] << 8 | data[start + 3]
            if code in _SOF and not seen_scan and end - start >= 8:  # length, precision, Y, X, Nf
                frame = (data[start + 3] << 8 | data[start + 4], data[start + 5] << 8 | data[start + 6],
                         data[start + 7])
            if (code == _APP14 and not seen_scan and end - start - 2 >= _APP14_DATA_LEN
                    and data[start + 2:start + 7] == b"Adobe"):
                adobe = True
        if not seen_scan:
            pieces.append((code, start, end))
        if code == _SOS and not seen_scan:
            seen_scan, scan_data = True, end
        in_scan = code == _SOS
        pos = end
    fixes = _header_fixes(data, pieces) if seen_scan else {}
    if not (garbage or fixes) or not seen_scan:
        return _JpegLayout(None, adobe, None, scan_data, frame)
    header = bytearray(data[:2])  # SOI
    for code, start, end in pieces:
        header += bytes([0xFF, code])
        segment_at = len(header)
        header += data[start:end]
        for at, value in fixes.items():
            if start <= at < end:
                header[segment_at + at - start] = value
    return _JpegLayout(None, adobe, bytes(header), scan_data, frame)


def _header_fixes(data: bytes, pieces: list) -> dict[int, int]:
    """{offset in data: byte} that silence libjpeg's JFIF-version and Adobe-transform header warnings."""
    fixes, jfif, components, transform_at = {}, False, 0, None
    for code, start, end in pieces:
        payload = data[start + 2:end]  # after the 2-byte length
        if code == 0xE0 and len(payload) >= _APP0_DATA_LEN and payload.startswith(b"JFIF\0"):
            jfif = True
            if payload[5] != 1:  # major version
                fixes[start + 2 + 5] = 1
        elif code == _APP14 and len(payload) >= _APP14_DATA_LEN and payload.startswith(b"Adobe"):
            transform_at = start + 2 + 11  # libjpeg keeps the last APP14's transform code
        elif code in _SOF and len(payload) > 5:
            components = payload[5]
    if transform_at is not None and (components == 4 or components == 3 and not jfif):
        valid, assumed = {3: ((0, 1), 1), 4: ((0, 2), 2)}[components]
        if data[transform_at] not in valid:
            fixes[transform_at] = assumed
    return fixes


def decode_rgb(data: bytes, *, min_size: int = 0) -> np.ndarray:
    """Decodes JPEG or PNG bytes to an RGB array exactly as `tf.io.decode_image(channels=3)`.

    The format is sniffed from the magic bytes, never from a file name.

    * JPEG (baseline, progressive, gray, any chroma subsampling): libjpeg-turbo with the fast
      integer IDCT and fancy upsampling, i.e. TF's default `dct_method=''`. Gray becomes three
      equal channels. CMYK/YCCK JPEGs are decoded to raw CMYK by libjpeg and converted with TF's
      integer rule (`tensorflow/core/lib/jpeg/jpeg_mem.cc`): with an Adobe APP14 segment before the scan
      (inverted CMYK, what Photoshop and Pillow write) `r = c * k // 255`, otherwise
      `r = (255 - c) * (255 - k) // 255`, likewise g from m and b from y. Recoverable corruption
      (libjpeg warnings) decodes as in TF; libjpeg errors and data cut before the end marker raise,
      as in TF.
    * PNG: see `_png_rgb`.

    Args:
      data: the encoded image.
      min_size: if > 0 and the image is a JPEG, let libjpeg downscale in the DCT domain by the
        largest power of two (1/2, 1/4, 1/8) that keeps both sides >= `min_size`. This is the
        FAST mode of `lite_train.data.decode.decode_resize_into`: pixels then differ from TF's.
        Ignored for PNG.

    Returns:
      uint8 array of shape (H, W, 3).

    Raises:
      ValueError: unknown format, or bytes TensorFlow would not decode either (message says why).
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    if data.startswith(_JPEG_MAGIC):
        return _jpeg_rgb(data, min_size)
    if data.startswith(_PNG_MAGIC):
        return _png_rgb(data)
    raise ValueError(f"not a JPEG or PNG (first bytes {data[:8]!r}, {len(data)} bytes)")


def _jpeg_rgb(data: bytes, min_size: int) -> np.ndarray:
    import simplejpeg  # the JPEG codec: only the decoding processes need it

    # strict=True: a libjpeg warning or error raises, and such files take the careful path.
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, KeyError):  # KeyError: sampling factors TurboJPEG has no name for
        return _damaged_jpeg_rgb(data, min_size)
    components = 4 if colorspace in ("CMYK", "YCCK") else 3
    _check_size(h, w)
    adobe = components == 4 and _jpeg_layout(data).adobe
    try:
        return _jpeg_decode(data, (h, w, components), adobe, min_size, strict=True)
    except ValueError:
        return _damaged_jpeg_rgb(data, min_size)


def _check_size(height: int, width: int) -> None:
    if height * width * 3 >= 1 << 29:  # TF's limit on its output buffer (jpeg_mem.cc "Image too large")
        raise ValueError(f"bad JPEG: image too large ({width}x{height}), TensorFlow refuses it")


def _damaged_jpeg_rgb(data: bytes, min_size: int) -> np.ndarray:
    """A JPEG on which libjpeg warns or fails: accepted or refused as TF does, decoded to TF's pixels.

    TF decodes through libjpeg warnings but fails on libjpeg errors and on data that ends early (its memory
    source suspends), up to the end marker. TurboJPEG cannot tell: with `strict=False` it hides an error
    that follows a warning and pads data that ends early with grey. So the marker walk decides whether
    libjpeg reaches the end marker and Pillow's libjpeg reader whether it meets an error (warnings pass);
    the pixels then come from TurboJPEG with TF's settings, `strict=False`, on a header rewritten without
    the warnings TurboJPEG's header call fails on.
    """
    from PIL import Image

    layout = _jpeg_layout(data)
    _check_size(*layout.frame[:2])
    # Pillow does not read on after the last scan line (TF does, to the end marker) and may be told,
    # process-wide, to pad data that ends early: the marker walk covers both.
    if layout.problem is not None:
        raise ValueError(f"bad JPEG: {layout.problem} ({len(data)} bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"bad JPEG: {e}") from None
    if layout.header is not None:
        data = layout.header + data[layout.scan_data:]
    return _jpeg_decode(data, layout.frame, layout.adobe, min_size, strict=False)


def _jpeg_decode(data: bytes, frame: tuple[int, int, int], adobe: bool, min_size: int, *,
                 strict: bool) -> np.ndarray:
    """TurboJPEG with TF's settings; frame = (height, width, components) from the frame header."""
    import simplejpeg

    h, w, components = frame
    kwargs = {}
    if min_size > 0:
        for f in _DCT_SCALES:  # libjpeg's scaled size is ceil(side / f)
            if -(-min(h, w) // f) >= min_size:
                kwargs = {"min_height": -(-h // f), "min_width": -(-w // f)}
                break
    try:
        if components == 4:  # CMYK or YCCK
            # libjpeg-turbo cannot emit RGB from CMYK; TF reads CMYK and converts it itself.
            cmyk = simplejpeg.decode_jpeg(data, colorspace="CMYK", fastdct=True, fastupsample=False,
                                          strict=strict, **kwargs)
            return _cmyk_to_rgb(cmyk, inverted=adobe)
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False, strict=strict,
                                      **kwargs)
    except ValueError as e:  # simplejpeg reports libjpeg errors as ValueError
        if strict:
            raise
        raise ValueError(f"bad JPEG: {e}") from None


def _cmyk_to_rgb(cmyk: np.ndarray, *, inverted: bool) -> np.ndarray:
    c = cmyk.astype(np.uint16)  # (H, W, 4); products fit in uint16 (255 * 255)
    cmy, k = c[..., :3], c[..., 3:]
    rgb = cmy * k if inverted else (255 - cmy) * (255 - k)
    return (rgb // 255).astype(np.uint8)


def _png_rgb(data: bytes) -> np.ndarray:
    """PNG -> RGB the way TF's libpng path does with channels=3.

    Alpha (RGBA, gray+alpha, palette tRNS) is stripped, not composited; palette entries are
    expanded; gray (1/2/4/8/16-bit) is replicated. 16-bit samples keep their high byte
    (libpng `png_set_strip_16`, which TF uses): v8 = v16 >> 8.
    """
    from PIL import Image  # Pillow is only needed for the rare PNG records

    data = _png_chunks(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray: Pillow's RGB convert clips
                g = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
                return np.repeat(g[..., None], 3, axis=2)
            # Pillow already keeps the high byte of 16-bit RGB(A)/LA samples.
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"bad PNG: {e}") from None


def _png_chunks(data: bytes) -> bytes:
    """Checks the chunk structure as libpng reads it for TF; returns the bytes to hand to Pillow.

    Every chunk (4-byte length, type, data, CRC-32 of type + data) up to IEND must be complete, a
    critical chunk (type starting upper case) must have the right CRC and the IDAT data must be one whole
    zlib stream: otherwise TF fails, and so does this. An ancillary chunk with a bad CRC is discarded, as libpng does by default; bytes after IEND are
    ignored.

    Raises:
      ValueError: truncated data, no IEND, a critical chunk with a bad CRC or a broken zlib stream.
    """
    view, n, pos, dropped = memoryview(data), len(data), len(_PNG_MAGIC), []
    inflate = zlib.decompressobj()  # libpng inflates to the end of the stream and checks its Adler-32; Pillow
    # stops once it has its rows, so the stream is checked here (output discarded)
    while True:
        if pos + 12 > n:
            raise ValueError(f"bad PNG: data ends before the IEND chunk ({n} bytes)")
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, end = data[pos + 4:pos + 8], pos + 12 + length
        if end > n:
            raise ValueError(f"bad PNG: chunk {kind!r} at byte {pos} runs past the end of the data ({n} bytes)")
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            if not kind[0] & 0x20:  # bit 5 of the first letter clear: critical chunk
                raise ValueError(f"bad PNG: CRC error in critical chunk {kind!r} at byte {pos}")
            dropped.append((pos, end))
        if kind == b"IDAT":
            try:
                inflate.decompress(view[pos + 8:end - 4])
            except zlib.error as e:
                raise ValueError(f"bad PNG: image data does not inflate: {e}") from None
        if kind == b"IEND":
            break
        pos = end
    if not inflate.eof:
        raise ValueError("bad PNG: the compressed image data ends early")
    if not dropped:
        return data
    keep, last = [], 0
    for start, stop in dropped:
        keep.append(view[last:start])
        last = stop
    keep.append(view[last:])
    return b"".join(keep)
