"""`lite-convert vtab` has `lite-convert md`'s crash safety: no fsync by default and every published file and
folder fsynced with `--fsync` (same bytes either way), a publish that can be killed between any two steps,
and damaged staged shards written again on resume, not published.

Mirrors tests/convert/test_fsync.py and tests/convert/test_crash_safety.py (md); the expected output is the
same command's uninterrupted conversion, whose content tests/convert/vtab/test_convert.py checks against the
mocked TFDS examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import convert.vtab.convert as vtab_convert
import manifests.staging as staging_module
from convert.cli import app
from convert.vtab.convert import VtabConfig, convert_vtab
from manifests import open_source, schema
from manifests.ordered_writer import OrderedSourceWriter
from manifests.staging import Staging
from manifests.verify import verify_source

from tests.convert.conftest import inode as _inode
from tests.convert.vtab.conftest import mocked_tfds

N = 3  # examples per slice: clevr_count_all reads 3 slices (train800, val200, test) -> 9 samples
TASK = "clevr_count_all"
SHARD = 2  # samples per shard: 5 shards


def _cli(tfds_dir: Path, out: Path, *flags: str) -> None:
    result = CliRunner().invoke(app, ["vtab", "--tfds-data-dir", str(tfds_dir), "--out", str(out), "--tasks", TASK,
                                      "--limit", str(N), "--max-shard-samples", str(SHARD), *flags])
    assert result.exit_code == 0, result.output


def _convert(tfds_dir: Path, out: Path, progress=None):
    config = VtabConfig(tfds_data_dir=str(tfds_dir), out=str(out), tasks=(TASK,), limit=N, max_shard_samples=SHARD)
    return convert_vtab(config, progress)


def _same_source(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != schema.SOURCE_FILE:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _saved(src: Path) -> dict:
    """source.json without the output root (the one setting two conversions into different folders differ in)."""
    info = json.loads((src / schema.SOURCE_FILE).read_text())
    del info["extra"]["convert_config"]["out"]
    return info


def test_default_vtab_conversion_calls_no_fsync(tfds_dir, tmp_path, fsynced):
    with mocked_tfds(tfds_dir, N):
        _cli(tfds_dir, tmp_path / "out")
    assert (tmp_path / "out" / "vtab" / TASK / schema.SOURCE_FILE).is_file()
    assert fsynced == []


def test_fsync_flag_fsyncs_every_shard_manifest_and_folder_and_changes_no_byte(tfds_dir, tmp_path,
                                                                              fsynced):  # noqa: F811
    with mocked_tfds(tfds_dir, N):
        _cli(tfds_dir, tmp_path / "plain")
        fsynced.clear()
        _cli(tfds_dir, tmp_path / "out", "--fsync")
    src, plain = tmp_path / "out" / "vtab" / TASK, tmp_path / "plain" / "vtab" / TASK
    files = sorted(src.iterdir())
    shards = [p for p in files if p.suffix == ".tar"]
    assert len(shards) == 5
    synced = {(dev, ino) for dev, ino, _ in fsynced}
    # shards, samples.parquet, index.npy, classes.parquet, provenance.parquet, source.json
    assert [p.name for p in files if _inode(p) not in synced] == []
    folders = {(dev, ino) for dev, ino, is_dir in fsynced if is_dir}
    assert _inode(src) in folders and _inode(src.parent) in folders  # the staging folder (now src) and vtab/
    regular = sum(1 for *_, is_dir in fsynced if not is_dir)
    assert regular >= len(files) + 2 * len(shards) + 1  # + each shard's two parts + plan.json, since removed
    _same_source(plain, src)  # durability never changes the bytes...
    saved = _saved(src)
    assert saved == _saved(plain)  # ...nor source.json: fingerprint, staging plan and config leave fsync out
    assert "fsync" not in saved["extra"]["convert_config"]


class _Killed(Exception):
    """Stands for a kill at one step of publishing."""


def _kill(*_args, **_kwargs):
    raise _Killed


@pytest.mark.parametrize("step", ["before publish", "parts dropped", "old source moved away",
                                  "before the old copy is removed"])
def test_publishing_over_an_existing_task_can_be_killed_between_any_two_steps(tfds_dir, tmp_path, monkeypatch,
                                                                              step):
    out = tmp_path / "out"
    with mocked_tfds(tfds_dir, N):
        _convert(tfds_dir, tmp_path / "reference")
        _convert(tfds_dir, out)
        old_info = (out / "vtab" / TASK / schema.SOURCE_FILE).read_text()
        # A new fingerprint with the same content: the task is converted again and published over the old one.
        monkeypatch.setattr(vtab_convert, "converter_version", lambda: "next")
        with monkeypatch.context() as patch:
            if step == "before publish":
                patch.setattr(OrderedSourceWriter, "publish", _kill)
            elif step == "parts dropped":  # staging holds only the manifests and source.json; old source in place
                replace = staging_module.os.replace
                patch.setattr(staging_module.os, "replace",
                              lambda a, b: _kill() if Path(a).name == TASK else replace(a, b))
            elif step == "old source moved away":
                patch.setattr(Staging, "_swap_in", _kill)
            else:
                rmtree = staging_module.shutil.rmtree
                patch.setattr(staging_module.shutil, "rmtree",
                              lambda path, **kw: _kill() if Path(path).name == f".{TASK}.old" else rmtree(path, **kw))
            with pytest.raises(_Killed):
                _convert(tfds_dir, out)
        src = out / "vtab" / TASK
        if step in ("before publish", "parts dropped"):  # the old source is untouched and still verifies
            assert (src / schema.SOURCE_FILE).read_text() == old_info
            verify_source(src)
        elif step == "old source moved away":  # no source is visible, none is half-deleted
            assert not src.exists() and (out / "vtab" / f".{TASK}.old" / schema.SOURCE_FILE).is_file()
            with pytest.raises(Exception, match="not a converted source"):
                open_source(out, TASK, group="vtab")
        with monkeypatch.context() as patch:  # the finished staging folder is kept: nothing is converted
            patch.setattr(vtab_convert, "_convert_slice", _kill)
            [result] = _convert(tfds_dir, out)
        assert result.status == ("up to date" if step == "before the old copy is removed" else "resumed")
        assert (src / schema.SOURCE_FILE).read_text() != old_info
        assert json.loads((src / schema.SOURCE_FILE).read_text())["converter_version"] == "next"
        verify_source(src)
        _same_source(tmp_path / "reference" / "vtab" / TASK, src)
        assert sorted(p.name for p in (out / "vtab").iterdir()) == [TASK]
        assert [r.status for r in _convert(tfds_dir, out)] == ["up to date"]


@pytest.mark.parametrize("damage", ["flip image byte", "flip header byte", "truncate", "delete"])
def test_a_damaged_staged_shard_is_written_again_not_published(tfds_dir, tmp_path, damage):
    out = tmp_path / "out"
    seen = []

    def interrupt(task_id, n):
        seen.append(n)
        if sum(seen) >= 5:
            raise KeyboardInterrupt

    with mocked_tfds(tfds_dir, N):
        _convert(tfds_dir, tmp_path / "reference")
        with pytest.raises(KeyboardInterrupt):
            _convert(tfds_dir, out, interrupt)
        shard = out / "vtab" / f".{TASK}.partial" / "runs" / "000000" / "000001.tar"  # the second of three committed
        data = bytearray(shard.read_bytes())
        if damage == "delete":
            shard.unlink()
        else:
            if damage == "truncate":
                data = data[:-512]
            else:
                data[1536 + 3 if damage == "flip image byte" else 3] ^= 0x20  # image of sample 0 / its .cls header
            shard.write_bytes(bytes(data))
        [result] = _convert(tfds_dir, out)
        assert result.status == "resumed"
    verify_source(out / "vtab" / TASK)
    _same_source(tmp_path / "reference" / "vtab" / TASK, out / "vtab" / TASK)
