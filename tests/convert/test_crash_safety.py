"""Conversion does not trust the disk: the output lock, re-checked staged and published shards, a publish that
can be killed between any two steps, and a full disk, each ending in a source that verifies or in none."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import convert.md as md
import manifests._assemble as assemble_module
import manifests._files as files_module
import manifests._shards as shards_module
import manifests.staging as staging_module
from convert.cli import app
from convert.md import ConvertConfig, convert_planned, convert_run, plan_datasets
from manifests import open_source, verify_source
from manifests.staging import Staging, output_lock
from manifests.writer import SourceStaging

runner = CliRunner()
SHARD = 2  # 9 samples of `tiny` (3 classes x 3): runs of one class, two shards each


def _convert(records: Path, out: Path, **kwargs):
    config = ConvertConfig(records=str(records), out=str(out), max_shard_samples=SHARD, **kwargs)
    return convert_planned(plan_datasets(config), config)


def _same_source(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "source.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture
def reference(tiny, tmp_path) -> Path:
    _convert(tiny, tmp_path / "reference", workers=1)
    return tmp_path / "reference" / "md" / "tiny"


def _error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_second_converter_on_the_same_output_fails_at_once(tiny, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        result = runner.invoke(app, ["md", "--records", str(tiny), "--out", str(out)])
    assert _error(result) == f"error: another lite-convert (pid {os.getpid()}) is writing {out}"
    assert not (out / "md").exists()
    assert runner.invoke(app, ["md", "--records", str(tiny), "--out", str(out)]).exit_code == 0  # released


def test_a_dataset_named_twice_is_an_error(tiny, tmp_path):
    result = runner.invoke(app, ["md", "--records", str(tiny), "--out", str(tmp_path / "out"), "--datasets",
                                 "tiny,tiny", "--workers", "2"])
    assert "--datasets names tiny more than once" in _error(result)


def _stage_first_runs(records: Path, out: Path, runs: int) -> tuple[Path, SourceStaging]:
    """What a killed conversion leaves: the first `runs` runs written and committed, nothing finished."""
    config = ConvertConfig(records=str(records), out=str(out), max_shard_samples=SHARD)
    [plan] = plan_datasets(config)
    staging = SourceStaging(out, "md", "tiny", fingerprint=plan.fingerprint, runs=len(plan.runs),
                            max_shard_samples=SHARD, max_shard_bytes=config.max_shard_bytes)
    for run in range(runs):
        convert_run(plan, run, staging.run_writer(run))
    return staging.stage, staging


@pytest.mark.parametrize("damage", ["flip image byte", "flip header byte", "truncate"])
def test_a_damaged_staged_shard_is_written_again_not_published(tiny, tmp_path, reference, damage):
    out = tmp_path / "out"
    stage, _ = _stage_first_runs(tiny, out, 2)
    shard = stage / "runs" / "000001" / "000000.tar"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[:-512]
    else:
        data[1536 + 3 if damage == "flip image byte" else 3] ^= 0x20  # image data of sample 0 / its .cls header
    shard.write_bytes(bytes(data))
    [result] = _convert(tiny, out)
    assert result.status == "resumed"
    verify_source(out / "md" / "tiny")
    _same_source(reference, out / "md" / "tiny")


class _Killed(Exception):
    """Stands for a kill at one step of publishing."""


def _kill(*_args, **_kwargs):
    raise _Killed


@pytest.mark.parametrize("step", ["before publish", "old source moved away", "before the old copy is removed"])
def test_publishing_over_an_existing_source_can_be_killed_between_any_two_steps(tiny, tmp_path, reference,
                                                                                monkeypatch, step):
    out = tmp_path / "out"
    _convert(tiny, out)
    old_info = (out / "md" / "tiny" / "source.json").read_text()
    for path in (tiny / "tiny").glob("*.tfrecords"):  # new input fingerprint, same content
        os.utime(path, ns=(1, 1))
    with monkeypatch.context() as patch:
        if step == "before publish":
            patch.setattr(SourceStaging, "publish", _kill)
        elif step == "old source moved away":
            patch.setattr(Staging, "_swap_in", _kill)
        else:
            rmtree = staging_module.shutil.rmtree
            patch.setattr(staging_module.shutil, "rmtree",
                          lambda path, **kw: _kill() if Path(path).name == ".tiny.old" else rmtree(path, **kw))
        with pytest.raises(_Killed):
            _convert(tiny, out)
    src = out / "md" / "tiny"
    if step == "before publish":  # the old source is untouched and still verifies
        assert (src / "source.json").read_text() == old_info
        verify_source(src)
    elif step == "old source moved away":  # no source is visible, none is half-deleted
        with pytest.raises(Exception, match="no converted source"):
            open_source(out, "tiny")
    monkeypatch.setattr(md, "convert_run", _kill)  # the finished staging folder is kept: nothing is converted
    [result] = _convert(tiny, out)
    assert result.status == ("up to date" if step == "before the old copy is removed" else "resumed")
    assert (src / "source.json").read_text() != old_info
    verify_source(src)
    _same_source(reference, src)
    assert sorted(p.name for p in (out / "md").iterdir()) == ["tiny"]


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes have been written through all such files."""

    room = 0

    def __init__(self, file):
        self._file = file

    def write(self, data) -> int:
        if len(data) > _FullDisk.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


@pytest.mark.parametrize("full,room,what", [
    (".tar.tmp", 3000, "runs/000000/000000.tar.tmp: cannot write shard data (sample c00000_0000001)"),
    ("index.npy.tmp", 0, ".tiny.partial: cannot write the sample manifests (samples.parquet, index.npy)"),
    ("source.json.tmp", 0, ".tiny.partial/source.json: cannot write source.json"),
])
def test_a_full_disk_names_the_file_and_leaves_nothing_that_verifies(tiny, tmp_path, monkeypatch, full, room, what):
    out = tmp_path / "out"
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return _FullDisk(file) if "w" in mode and str(path).endswith(full) else file

    _FullDisk.room = room
    for module in (files_module, shards_module, assemble_module):  # every file the converter writes is opened here
        monkeypatch.setattr(module, "open", full_open, raising=False)
    error = _error(runner.invoke(app, ["md", "--records", str(tiny), "--out", str(out), "--max-shard-samples",
                                       str(SHARD)]))
    assert what in error and error.endswith(": No space left on device") and str(out / "md" / ".tiny.partial") in error
    verified = runner.invoke(app, ["verify", str(out)])
    assert verified.exit_code == 1 and "no converted source" in verified.stderr
    monkeypatch.undo()
    assert runner.invoke(app, ["md", "--records", str(tiny), "--out", str(out), "--max-shard-samples",
                               str(SHARD)]).exit_code == 0  # room again: the same command finishes
    verify_source(out / "md" / "tiny")
