"""lite_train.data.decode against TensorFlow's decode_image(channels=3) + TF1 resize_images."""

import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from lite_train.data.decode import decode_resize_into, decode_rgb, resize_into

tf = pytest.importorskip("tensorflow")  # after torch (tests/conftest.py): TF first segfaults


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
