"""The benchmark harness's own invariants: a deterministic photo fixture, memory split into episode buffers
and the rest, and no benchmark section that silently disappears. No timing is asserted."""

import io
import mmap
import os
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks import run
from benchmarks.loader_bench import process_memory
from benchmarks.photos import PhotoConfig, photo_jpegs


def _quantization(jpeg: bytes) -> dict:
    return Image.open(io.BytesIO(jpeg)).quantization


def test_photo_fixture_is_deterministic_cached_and_imagenet_like(tmp_path):
    images = photo_jpegs(PhotoConfig(count=6, seed=3), cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1  # written to the cache
    assert photo_jpegs(PhotoConfig(count=6, seed=3), cache_dir=tmp_path) == images  # read back from it
    assert photo_jpegs(PhotoConfig(count=2, seed=3), cache_dir=None) == images[:2]  # image i does not depend on count
    assert photo_jpegs(PhotoConfig(count=2, seed=4), cache_dir=None) != images[:2]  # the seed decides
    assert len(set(images)) == 6
    # Quality 90 as libjpeg writes it: the same quantization tables as any q90 encode.
    q90 = io.BytesIO()
    Image.new("RGB", (16, 16)).save(q90, "JPEG", quality=90)
    for jpeg in images:
        im = Image.open(io.BytesIO(jpeg))
        assert im.format == "JPEG" and im.mode == "RGB"
        assert 300 <= min(im.size) and max(im.size) == 500, im.size  # ILSVRC-like shapes
        assert _quantization(jpeg) == _quantization(q90.getvalue())
        pixels = np.asarray(im, np.float32)
        assert pixels.std() > 20  # a photograph, not a flat frame


def test_process_memory_counts_the_episode_buffers_apart():
    before = process_memory(os.getpid())
    nbytes = 32 * 2**20
    fd = os.memfd_create("lite-train-episode")  # the name the loader gives its shared episode buffers
    try:
        os.ftruncate(fd, nbytes)
        with mmap.mmap(fd, nbytes) as m:
            m.write(b"\x01" * nbytes)  # every page written by this process only
            after = process_memory(os.getpid())
    finally:
        os.close(fd)
    assert after.buffer_pss - before.buffer_pss == pytest.approx(32, abs=1)
    assert abs(after.own_private_dirty - before.own_private_dirty) < 8
    assert after.own_pss > 1


def test_missing_module_says_not_run_and_failing_module_fails_the_run(tmp_path, monkeypatch):
    (tmp_path / "tiny_ok_bench.py").write_text(
        "import sys\nopen(sys.argv[sys.argv.index('--out') + 1], 'w').write('| a |\\n|---|\\n| 1 |\\n')\n")
    (tmp_path / "tiny_silent_bench.py").write_text("pass\n")  # exits 0 and writes no table
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    out = tmp_path / "BENCH.md"
    benches = (run.Bench("Ok", "tiny_ok_bench", quick_args=()), run.Bench("Absent", "benchmarks.no_such_bench"))
    assert run.main(["--quick", "--out", str(out)], benches) == 0
    text = out.read_text()
    assert "## Ok" in text and "| 1 |" in text
    assert "## Absent" in text and "not run: `benchmarks/no_such_bench.py` is not in this tree." in text

    benches += (run.Bench("Silent", "tiny_silent_bench", quick_args=()),)
    assert run.main(["--quick", "--out", str(out)], benches) == 1
    text = out.read_text()
    assert "## Ok" in text and "## Absent" in text  # the other sections are kept
    assert "## Silent" in text and "FAILED: exited 0 but wrote no table." in text

