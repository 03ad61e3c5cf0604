"""A real `lite-convert md` subprocess killed with SIGKILL after a committed shard, then rerun: same bytes."""

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

from convert.demo_data import write_md_records
from convert.md import ConvertConfig, convert_planned, plan_datasets

CLASSES, PER_CLASS, SHARD = 30, 100, 5


def _records(root: Path) -> Path:
    rng = np.random.RandomState(3)
    spec = {"name": "big", "classes_per_split": {"TRAIN": 20, "VALID": 5, "TEST": 5},
            "images_per_class": {str(c): PER_CLASS for c in range(CLASSES)},
            "class_names": {str(c): f"c{c}" for c in range(CLASSES)},
            "path": "big", "file_pattern": "{}.tfrecords", "__class__": "DatasetSpecification"}
    jpeg_like = [[b"\xff\xd8\xff\xe0" + rng.bytes(int(rng.randint(500, 1500))) for _ in range(PER_CLASS)]
                 for _ in range(CLASSES)]
    folder = root / "big"
    folder.mkdir(parents=True)
    for c, images in enumerate(jpeg_like):
        write_md_records(folder / f"{c}.tfrecords", images, c)
    (folder / "dataset_spec.json").write_text(json.dumps(spec))
    return root


def test_sigkill_then_rerun_gives_byte_identical_source(tmp_path):
    records = _records(tmp_path / "records")
    reference, out = tmp_path / "reference", tmp_path / "out"
    config = ConvertConfig(records=str(records), out=str(reference), max_shard_samples=SHARD)
    convert_planned(plan_datasets(config), config)

    parts = out / "md" / ".big.partial" / "parts"
    cmd = [sys.executable, "-m", "convert.cli", "md", "--records", str(records), "--out", str(out),
           "--max-shard-samples", str(SHARD)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 60
    while not (parts / "000002.parquet").exists():
        assert proc.poll() is None, "conversion ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    committed = len(list(parts.glob("*.parquet")))
    assert 3 <= committed < CLASSES * PER_CLASS // SHARD
    assert not (out / "md" / "big").exists()  # nothing visible

    resumed = ConvertConfig(records=str(records), out=str(out), max_shard_samples=SHARD)
    [result] = convert_planned(plan_datasets(resumed), resumed)
    assert result.status == "resumed" and result.samples == CLASSES * PER_CLASS
    ref, got = reference / "md" / "big", out / "md" / "big"
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in got.iterdir()) and len(names) == 4 + CLASSES * PER_CLASS // SHARD
    for name in names:
        if name != "source.json":
            assert (ref / name).read_bytes() == (got / name).read_bytes(), name
    assert pq.read_table(ref / "samples.parquet").equals(pq.read_table(got / "samples.parquet"))
    keys = pq.read_table(got / "samples.parquet")["key"].to_pylist()
    assert len(set(keys)) == len(keys) == CLASSES * PER_CLASS  # nothing lost or duplicated
    info_ref, info_got = (json.loads((d / "source.json").read_text()) for d in (ref, got))
    info_ref["extra"]["convert_config"]["out"] = info_got["extra"]["convert_config"]["out"]
    assert info_ref == info_got
