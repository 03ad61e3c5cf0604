"""The decoders against TensorFlow: manifests.decode (bytes -> RGB: same pixels, same accepted and refused
bytes as decode_image(channels=3)) and lite_train.data.decode (+ TF1 resize_images)."""

import io
import struct
import zlib

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from lite_train.data.decode import decode_resize_into, resize_into
from manifests.decode import decode_rgb

import tensorflow as tf  # noqa: E402  after torch (tests/conftest.py): TF first segfaults; never skipped


def _smooth(h, w, seed=0):
    """Natural-ish RGB content: gradients, a disc, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([90 * x / max(w, 1) + 60 * y / max(h, 1) + 40 * c for c in range(3)], -1) + 30
    img[(y - h / 2) ** 2 + (x - w / 3) ** 2 < (min(h, w) / 3) ** 2] += 70
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _pil_bytes(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _jpegs():
    cases = {}
    for sub in ("444", "422", "420"):
        cases[f"jpeg_{sub}"] = simplejpeg.encode_jpeg(_smooth(375, 500), 90, "RGB", sub)
    cases["jpeg_gray"] = simplejpeg.encode_jpeg(np.ascontiguousarray(_smooth(61, 47)[..., :1]), 85, "GRAY")
    cases["jpeg_progressive"] = _pil_bytes(Image.fromarray(_smooth(120, 90)), "JPEG", quality=88, progressive=True)
    cases["jpeg_1x1"] = simplejpeg.encode_jpeg(_smooth(1, 1), 90, "RGB", "420")
    cases["jpeg_3x500"] = simplejpeg.encode_jpeg(_smooth(3, 500), 90, "RGB", "420")
    cases["jpeg_odd_37x53"] = simplejpeg.encode_jpeg(_smooth(37, 53), 90, "RGB", "422")
    cmyk = Image.fromarray(_smooth(40, 64)).convert("CMYK")
    cases["jpeg_cmyk_adobe"] = _pil_bytes(cmyk, "JPEG", quality=90)  # Pillow writes APP14 Adobe
    return cases


def _pngs():
    rgb = Image.fromarray(_smooth(33, 45))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(_smooth(33, 45)[..., 1]))
    pal = rgb.quantize(16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    g16 = Image.fromarray((_smooth(20, 30)[..., 0].astype(np.uint16) * 257 + 77).astype(np.uint16))
    return {
        "png_rgb": _pil_bytes(rgb, "PNG"),
        "png_gray": _pil_bytes(rgb.convert("L"), "PNG"),
        "png_la": _pil_bytes(rgba.convert("LA"), "PNG"),
        "png_p": _pil_bytes(pal, "PNG"),
        "png_p_trns": _pil_bytes(pal_t, "PNG", transparency=3),
        "png_rgba": _pil_bytes(rgba, "PNG"),
        "png_gray16": _pil_bytes(g16, "PNG"),
        "png_1bit": _pil_bytes(rgb.convert("1"), "PNG"),
    }


CASES = {**_jpegs(), **_pngs()}


def _tf_decode(data):
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


def _tf_resized(img, size):  # [0, 255] float32, TF1 corner-aligned bilinear
    r = tf.compat.v1.image.resize_images(img, [size, size], tf.image.ResizeMethod.BILINEAR, align_corners=True)
    return r.numpy().transpose(2, 0, 1)


def test_png_rgb16_and_tf_agree_on_high_byte():
    a16 = (_smooth(9, 11).astype(np.uint16) * 257 + 129).astype(np.uint16)
    data = tf.io.encode_png(a16).numpy()
    np.testing.assert_array_equal(decode_rgb(data), _tf_decode(data))


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_equals_tf_decode_image_bit_for_bit(name):
    data = CASES[name]
    ours, ref = decode_rgb(data), _tf_decode(data)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("size", [84, 224])
@pytest.mark.parametrize("name", ["jpeg_420", "jpeg_gray", "jpeg_3x500", "jpeg_1x1", "png_p", "jpeg_cmyk_adobe"])
def test_resize_matches_tf1_align_corners_within_1e3(name, size):
    img = decode_rgb(CASES[name])
    out = np.empty((3, size, size), np.float32)
    resize_into(img, out, size)
    np.testing.assert_allclose((out + 1) * 127.5, _tf_resized(img, size), rtol=0, atol=1e-3)


def test_upsampling_28_to_84_matches_tf():
    img = _smooth(28, 28, seed=3)
    out = np.empty((3, 84, 84), np.float32)
    resize_into(img, out, 84)
    np.testing.assert_allclose((out + 1) * 127.5, _tf_resized(img, 84), rtol=0, atol=1e-3)


def test_output_maps_0_to_minus1_and_255_to_plus1_into_torch_view():
    img = np.zeros((10, 12, 3), np.uint8)
    img[:, 6:] = 255
    episode = torch.full((2, 3, 84, 84), 7.0)  # preallocated batch; fill slot 1 in place
    decode_resize_into(simplejpeg.encode_jpeg(np.zeros((8, 8, 3), np.uint8), 95), episode[0], 84)
    resize_into(img, episode[1], 84)
    assert episode[1, :, :, 0].eq(-1).all() and episode[1, :, :, -1].eq(1).all()
    assert episode.min() >= -1 and episode.max() <= 1
    assert (episode[0] + 1).abs().max() < 0.02  # black JPEG decodes to ~0 -> about -1


@pytest.mark.parametrize("data", [b"", b"not an image", b"\xff\xd8\xff\xe0garbage", CASES["png_rgb"][:40]])
def test_bad_bytes_raise_value_error(data):
    with pytest.raises(ValueError):
        decode_rgb(data)


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _without_app14(jpeg: bytes) -> bytes:
    """The JPEG minus its APP14 segment (Pillow writes one right after SOI/APP0 for CMYK)."""
    pos = 2
    while jpeg[pos + 1] != 0xEE:
        pos += 2 + struct.unpack(">H", jpeg[pos + 2:pos + 4])[0]
    return jpeg[:pos] + jpeg[pos + 2 + struct.unpack(">H", jpeg[pos + 2:pos + 4])[0]:]


def _mid_scan(jpeg: bytes) -> int:
    """An offset in the middle of the first scan's entropy-coded data, not inside an FF xx pair."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", jpeg[sos + 2:sos + 4])[0]
    i = (start + len(jpeg)) // 2
    while jpeg[i - 1] == 0xFF or jpeg[i] == 0x00:
        i += 1
    return i


def _damaged():
    """Damaged files and what TF does with them (checked too, so a TF change is noticed)."""
    jpeg = simplejpeg.encode_jpeg(_smooth(60, 80, seed=4), 90, "RGB", "420")
    prog = _pil_bytes(Image.fromarray(_smooth(60, 80, seed=5)), "JPEG", quality=88, progressive=True)
    rst = _pil_bytes(Image.fromarray(_smooth(60, 80, seed=6)), "JPEG", quality=88, restart_marker_blocks=4)
    second_scan = prog.index(b"\xff\xda", prog.index(b"\xff\xda") + 2)
    png = CASES["png_rgb"]
    text = _chunk(b"tEXt", b"k\0some text")
    flipped = bytearray(jpeg)
    flipped[len(jpeg) * 2 // 3] ^= 0x5A  # inside the scan: bad Huffman data, libjpeg warns and goes on
    cut = jpeg[:len(jpeg) // 2] + jpeg[len(jpeg) // 2 + 20:]  # 20 scan bytes lost, end marker kept
    idat = png.index(b"IDAT") - 4
    n = struct.unpack(">I", png[idat:idat + 4])[0]
    broken_zlib = png[:idat] + _chunk(b"IDAT", png[idat + 8:idat + 8 + n][:-9] + bytes(9)) + png[idat + 12 + n:]
    version = jpeg.index(b"JFIF\0") + 5
    app0_end = 4 + struct.unpack(">H", jpeg[4:6])[0]  # simplejpeg writes SOI then the JFIF APP0
    adobe_7 = jpeg[:2] + _segment(0xEE, b"Adobe\0\x64\0\0\0\0\x07") + jpeg[app0_end:]  # no JFIF, code 7
    cmyk = CASES["jpeg_cmyk_adobe"]
    transform = cmyk.index(b"\xff\xee") + 4 + 11
    mid_rst, mid_jpeg = _mid_scan(rst), _mid_scan(jpeg)
    dht = prog.index(b"\xff\xc4", second_scan)  # a Huffman table defined between two progressive scans
    bogus_table = prog[:second_scan] + b"junk" + prog[second_scan:dht + 5] + b"\xff" * 16 + prog[dht + 21:]
    return {
        # TurboJPEG with strict=False returns an image for all three: a warning ("junk") hides the later error
        "jpeg_progressive_warning_then_bogus_huffman_table": (bogus_table, "fails"),
        "jpeg_invalid_marker_in_scan_with_restarts": (rst[:mid_rst] + b"\xff\x2d" + rst[mid_rst:], "decodes"),
        "jpeg_invalid_marker_in_scan_without_restarts": (jpeg[:mid_jpeg] + b"\xff\x2d" + jpeg[mid_jpeg:], "fails"),
        # libjpeg warnings: TF decodes (TurboJPEG's header call refused the first three, strict simplejpeg also
        # extra bytes and garbage)
        "jpeg_jfif_revision_2": (jpeg[:version] + b"\x02" + jpeg[version + 1:], "decodes"),
        "jpeg_adobe_unknown_transform": (adobe_7, "decodes"),
        "jpeg_cmyk_adobe_unknown_transform": (cmyk[:transform] + b"\x05" + cmyk[transform + 1:], "decodes"),
        "jpeg_extra_bytes_before_eoi": (jpeg[:-2] + b"\x12\x34" + b"garbage" * 4 + jpeg[-2:], "decodes"),
        "jpeg_garbage_between_header_segments": (jpeg[:20] + b"junk" + jpeg[20:], "decodes"),
        "jpeg_garbage_between_progressive_scans": (prog[:second_scan] + b"junk" + prog[second_scan:], "decodes"),
        "jpeg_scan_bytes_lost_eoi_kept": (cut, "decodes"),
        "jpeg_bit_flips_in_scan": (bytes(flipped), "decodes"),
        "jpeg_trailing_bytes_after_eoi": (jpeg + b"trailing\xff\xd8", "decodes"),
        "jpeg_comment_after_scan": (jpeg[:-2] + _segment(0xFE, b"note" * 9) + jpeg[-2:], "decodes"),
        "jpeg_restart_markers": (rst, "decodes"),
        # data that ends before the end marker: TF fails (libjpeg-turbo alone would pad it with grey)
        "jpeg_cut_in_half": (jpeg[:len(jpeg) // 2], "fails"),
        "jpeg_last_byte_missing": (jpeg[:-1], "fails"),
        "jpeg_no_eoi": (jpeg[:-2], "fails"),
        "jpeg_cut_in_header": (jpeg[:30], "fails"),
        "jpeg_progressive_cut": (prog[:len(prog) * 2 // 3], "fails"),
        "jpeg_progressive_no_eoi": (prog[:-2], "fails"),
        "jpeg_restart_markers_cut": (rst[:len(rst) * 3 // 4], "fails"),
        "jpeg_comment_after_scan_cut": (jpeg[:-2] + _segment(0xFE, b"note" * 9)[:20], "fails"),
        "jpeg_magic_then_garbage": (b"\xff\xd8\xff" + bytes(np.random.default_rng(1).integers(0, 256, 400,
                                                                                      dtype=np.uint8)), "fails"),
        "jpeg_soi_eoi_only": (b"\xff\xd8\xff\xd9", "fails"),
        # PNG: libpng's rules, not Pillow's
        "png_trailing_bytes_after_iend": (png + b"garbage", "decodes"),
        "png_ancillary_chunk_bad_crc": (png[:33] + text[:-1] + bytes([text[-1] ^ 1]) + png[33:], "decodes"),
        "png_cut_in_half": (png[:len(png) // 2], "fails"),
        "png_no_iend": (png[:-12], "fails"),
        "png_idat_bad_crc": (png[:-13] + bytes([png[-13] ^ 1]) + png[-12:], "fails"),
        "png_idat_broken_zlib_good_crc": (broken_zlib, "fails"),
    }


DAMAGED = _damaged()


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_files_decode_or_fail_exactly_as_in_tf(name):
    data, expected = DAMAGED[name]
    try:
        ref = _tf_decode(data)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        ref = None
    assert ("fails" if ref is None else "decodes") == expected, "TensorFlow itself changed its mind"
    if ref is None:
        with pytest.raises(ValueError, match="^bad (JPEG|PNG): "):
            decode_rgb(data)
    else:
        np.testing.assert_array_equal(decode_rgb(data), ref)


def _tf_outcome(data):
    try:
        return _tf_decode(data)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        return None


@pytest.mark.parametrize("kind", ["baseline", "progressive", "restart", "cmyk"])
def test_randomly_damaged_jpegs_decode_or_fail_exactly_as_in_tf(kind):
    """Seeded damage (cut, overwritten, inserted, deleted bytes): same outcome as TF, same pixels."""
    rng = np.random.default_rng(["baseline", "progressive", "restart", "cmyk"].index(kind))
    img = Image.fromarray(_smooth(40, 56, seed=9))
    base = {"baseline": lambda: simplejpeg.encode_jpeg(_smooth(40, 56, seed=9), 90, "RGB", "420"),
            "progressive": lambda: _pil_bytes(img, "JPEG", quality=85, progressive=True),
            "restart": lambda: _pil_bytes(img, "JPEG", quality=85, restart_marker_blocks=2),
            "cmyk": lambda: _pil_bytes(img.convert("CMYK"), "JPEG", quality=85)}[kind]()
    outcomes = set()
    for k in range(60):
        d = bytearray(base)
        at = int(rng.integers(3, len(d) - 1))
        if k % 4 == 0:
            d = d[:at]
        elif k % 4 == 1:
            d[at] = int(rng.integers(0, 256))
        elif k % 4 == 2:
            d[at:at] = rng.integers(0, 256, int(rng.integers(1, 30)), dtype=np.uint8).tobytes()
        else:
            del d[at:at + int(rng.integers(1, 40))]
        ref = _tf_outcome(bytes(d))
        outcomes.add(ref is None)
        if ref is None:
            with pytest.raises(ValueError):
                decode_rgb(bytes(d))
        elif kind == "progressive":  # docs/fidelity.md: damaged progressive scans may differ by one level
            np.testing.assert_allclose(decode_rgb(bytes(d)), ref, rtol=0, atol=1, err_msg=f"damage {k}")
        else:
            np.testing.assert_array_equal(decode_rgb(bytes(d)), ref, err_msg=f"damage {k}")
    assert outcomes == {True, False}  # both outcomes occur


def test_adobe_text_inside_exif_does_not_make_a_cmyk_jpeg_inverted():
    """Only a real APP14 segment before the scan marks inverted CMYK (libjpeg's saw_Adobe_marker)."""
    plain = _without_app14(CASES["jpeg_cmyk_adobe"])  # CMYK, no Adobe marker: TF uses the non-inverted rule
    fake = _segment(0xE1, b"Exif\0\0" + _segment(0xEE, b"Adobe\0\x64\0\0\0\0\0") + b"ICC Adobe RGB")
    data = plain[:2] + fake + plain[2:]
    ref = _tf_decode(data)
    np.testing.assert_array_equal(decode_rgb(data), ref)
    np.testing.assert_array_equal(decode_rgb(plain), _tf_decode(plain))
    assert not np.array_equal(ref, _tf_decode(CASES["jpeg_cmyk_adobe"]))  # the marker does change pixels


@pytest.mark.parametrize("size", [84, 224])
def test_fast_mode_deviation_is_bounded(size):
    data = CASES["jpeg_420"]
    exact, fast = np.empty((2, 3, size, size), np.float32)
    decode_resize_into(data, exact, size)
    decode_resize_into(data, fast, size, dct_scale=True)
    d = np.abs(exact - fast) * 127.5  # [0, 255] units; this image carries sigma-6 pixel noise
    assert d.mean() < 4.0 and d.max() < 64.0
    if size == 224:  # 375 rows: no power-of-two DCT downscale keeps >= 224, so identical
        assert d.max() == 0


def test_resize_rejects_outputs_it_cannot_fill():
    img = _smooth(30, 40)
    for out in (np.empty((3, 84, 168), np.float32)[:, :, ::2],  # not contiguous
                np.empty((3, 84, 84), np.float64), np.empty((3, 84, 83), np.float32)):
        with pytest.raises(ValueError, match="resize_into"):
            resize_into(img, out, 84)


def test_an_image_tf_finds_too_large_is_refused_before_decoding():
    jpeg = simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8), 90)
    sof = jpeg.index(b"\xff\xc0")
    huge = jpeg[:sof + 5] + struct.pack(">HH", 10000, 20000) + jpeg[sof + 9:]  # 20000x10000: 600 MB as RGB
    assert _tf_outcome(huge) is None  # TF: "Image too large: 600000000"
    with pytest.raises(ValueError, match="image too large"):
        decode_rgb(huge)
