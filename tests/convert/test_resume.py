"""A real `lite-convert md` killed (SIGKILL, SIGTERM) at several moments with 1 or 2 workers, then rerun: same bytes,
no worker left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from convert.tfrecord import encode_md_example, write_records
from convert.md import ConvertConfig, convert_planned, plan_datasets

CLASSES, PER_CLASS, SHARD = 12, 40, 4  # every class is a run of its own: 12 runs of 10 shards
REPO = Path(__file__).parents[2]


def _records(root: Path) -> Path:
    rng = np.random.RandomState(3)
    spec = {"name": "big", "classes_per_split": {"TRAIN": 8, "VALID": 2, "TEST": 2},
            "images_per_class": {str(c): PER_CLASS for c in range(CLASSES)},
            "class_names": {str(c): f"c{c}" for c in range(CLASSES)},
            "path": "big", "file_pattern": "{}.tfrecords", "__class__": "DatasetSpecification"}
    jpeg_like = [[b"\xff\xd8\xff\xe0" + rng.bytes(int(rng.randint(500, 1500))) for _ in range(PER_CLASS)]
                 for _ in range(CLASSES)]
    folder = root / "big"
    folder.mkdir(parents=True)
    for c, images in enumerate(jpeg_like):
        write_records(folder / f"{c}.tfrecords", (encode_md_example(image, c) for image in images))
    (folder / "dataset_spec.json").write_text(json.dumps(spec))
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The records and an uninterrupted one-worker conversion of them."""
    root = tmp_path_factory.mktemp("resume")
    records = _records(root / "records")
    config = ConvertConfig(records=str(records), out=str(root / "reference"), max_shard_samples=SHARD,
                           workers=1)
    convert_planned(plan_datasets(config), config)
    return records, root / "reference" / "md" / "big"


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state.split()[1] not in ("Z", "X")  # a zombie is dead, only not yet reaped


def _stopped(pid: int) -> bool:
    """Every thread of `pid` is stopped by a signal (or the process is gone): none can run a system call."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return True
    for task in tasks:
        try:
            state = (task / "stat").read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            continue
        if state not in ("T", "Z", "X"):
            return False
    return True


def _committed(stage: Path) -> int:
    return len(list(stage.glob("runs/*/*.parquet"))) if stage.exists() else 0


def _files(stage: Path) -> list[str]:
    return sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))


def _kill_after(cmd: list[str], stage: Path, shards: int, sig: int, workers: int) -> None:
    """Start the converter, kill it with `sig` once `shards` shards are committed; its workers must die with it.

    The workers are stopped (SIGSTOP) just before the kill and continued after it: a worker that outlived
    its parent would go on writing, so the staging folder must not change any more. A signal takes effect
    only when a thread returns from the kernel, so a worker in the middle of a slow system call (an open on a
    busy disk) finishes it first: the folder is listed once every thread of every worker is seen stopped."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 120
    children: set[int] = set()
    while _committed(stage) < shards:
        assert proc.poll() is None, "conversion ended before it could be interrupted"
        assert time.monotonic() < deadline
        children.update(_children(proc.pid))
        time.sleep(0.002)
    children.update(_children(proc.pid))
    for child in children:
        os.kill(child, signal.SIGSTOP)
    while not all(_stopped(child) for child in children):
        assert time.monotonic() < deadline, "the workers did not stop"
        time.sleep(0.002)
    os.kill(proc.pid, sig)
    assert proc.wait() == -sig
    left = _files(stage)
    for child in children:
        if _alive(child):
            os.kill(child, signal.SIGCONT)
    assert len(children) >= (workers if workers > 1 else 0)
    gone_by = time.monotonic() + 10  # the kernel killed them as the parent died; a busy machine reaps late
    while [c for c in children if _alive(c)] and time.monotonic() < gone_by:
        time.sleep(0.01)
    assert not [c for c in children if _alive(c)], "workers outlived the converter"
    assert _files(stage) == left


@pytest.mark.parametrize("workers,sig,moments", [(1, signal.SIGKILL, (0.3,)), (2, signal.SIGKILL, (0.1, 0.4, 0.8)),
                                                 (2, signal.SIGTERM, (0.5,))])
def test_killed_at_several_moments_then_rerun_gives_byte_identical_source(reference, tmp_path, workers, sig, moments):
    records, ref = reference
    out = tmp_path / "out"
    stage = out / "md" / ".big.partial"
    cmd = [sys.executable, "-m", "convert.cli", "md", "--records", str(records), "--out", str(out),
           "--max-shard-samples", str(SHARD), "--workers", str(workers)]
    total = CLASSES * PER_CLASS // SHARD
    for moment in moments:  # fractions of the shards committed; each rerun resumes the last one
        _kill_after(cmd, stage, int(moment * total), sig, workers)
        assert not (out / "md" / "big").exists()  # nothing visible
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)  # started at once: the lock is free
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout
    got = out / "md" / "big"
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in got.iterdir()) and len(names) == 4 + total
    for name in names:
        if name != "source.json":
            assert (ref / name).read_bytes() == (got / name).read_bytes(), name
    keys = pq.read_table(got / "samples.parquet")["key"].to_pylist()
    assert len(set(keys)) == len(keys) == CLASSES * PER_CLASS  # nothing lost or duplicated
    info_ref, info_got = (json.loads((d / "source.json").read_text()) for d in (ref, got))
    info_ref["extra"]["convert_config"]["out"] = info_got["extra"]["convert_config"]["out"]
    assert info_ref == info_got
    assert not stage.exists() and not (out / "md" / ".big.old").exists()


def test_output_is_byte_identical_for_any_number_of_workers(reference, tmp_path):
    records, ref = reference
    config = ConvertConfig(records=str(records), out=str(tmp_path), max_shard_samples=SHARD, workers=3)
    [result] = convert_planned(plan_datasets(config), config)
    assert result.status == "converted" and result.shards == CLASSES * PER_CLASS // SHARD
    for path in ref.iterdir():
        if path.name != "source.json":
            assert path.read_bytes() == (tmp_path / "md" / "big" / path.name).read_bytes(), path.name
