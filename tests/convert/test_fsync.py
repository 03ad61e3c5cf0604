"""Durability policy of `lite-convert md` and `mnist`: no fsync by default (a kill loses nothing without it),
and with `--fsync` every published data file, every manifest and the folders holding them are fsynced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from convert.cli import app
from tests.convert.conftest import inode as _inode

runner = CliRunner()


def _convert(records: Path, out: Path, *flags: str) -> None:
    # One worker: the conversion runs in this process, where os.fsync is counted.
    result = runner.invoke(app, ["md", "--records", str(records), "--out", str(out), "--max-shard-samples", "2",
                                 "--workers", "1", *flags])
    assert result.exit_code == 0, result.output


def test_default_conversion_calls_no_fsync(tiny, tmp_path, fsynced):
    _convert(tiny, tmp_path / "out")
    assert (tmp_path / "out" / "md" / "tiny" / "source.json").is_file()
    assert fsynced == []


def test_fsync_flag_fsyncs_every_shard_manifest_and_folder(tiny, tmp_path, fsynced):
    _convert(tiny, tmp_path / "plain")
    fsynced.clear()
    _convert(tiny, tmp_path / "out", "--fsync")
    src = tmp_path / "out" / "md" / "tiny"
    files = sorted(p for p in src.iterdir())
    shards = [p for p in files if p.suffix == ".tar"]
    assert len(shards) == 6  # 3 classes of 3 samples, one run each, 2 samples per shard
    synced = {(dev, ino) for dev, ino, _ in fsynced}
    missing = [p.name for p in files if _inode(p) not in synced]
    assert missing == []  # shards, samples.parquet, index.npy, classes.parquet, source.json
    folders = {(dev, ino) for dev, ino, is_dir in fsynced if is_dir}
    assert _inode(src) in folders and _inode(src.parent) in folders  # the staging folder (now src) and md/
    regular = sum(1 for *_, is_dir in fsynced if not is_dir)
    assert regular >= len(files) + len(shards) + 1  # + each shard's manifest part + plan.json, since removed
    for path in files:  # durability never changes the bytes
        if path.name != "source.json":
            assert path.read_bytes() == (tmp_path / "plain" / "md" / "tiny" / path.name).read_bytes(), path.name


@pytest.mark.parametrize("flags", [(), ("--fsync",)])
def test_mnist_follows_the_same_policy(tmp_path, fsynced, flags):
    from convert.demo_data import write_idx

    rng = np.random.RandomState(5)
    write_idx(tmp_path / "idx", rng.randint(0, 256, size=(30, 28, 28)).astype(np.uint8),
              np.arange(30, dtype=np.uint8) % 10)
    result = runner.invoke(app, ["mnist", "--idx-dir", str(tmp_path / "idx"), "--out", str(tmp_path / "out"), *flags])
    assert result.exit_code == 0, result.output
    src = tmp_path / "out" / "md" / "mnist"
    synced = {(dev, ino) for dev, ino, _ in fsynced}
    if flags:
        assert [p.name for p in src.iterdir() if _inode(p) not in synced] == [] and _inode(src) in synced
    else:
        assert fsynced == []
