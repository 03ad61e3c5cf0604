"""The conversion worker pool (`convert._workers.run_tasks`): what its workers inherit, what it leaves."""

from __future__ import annotations

import gc
import os

import pytest
from typer.testing import CliRunner

import convert.md as md_module
from convert._workers import run_tasks
from convert.cli import app
from convert.md import MAX_DEFAULT_WORKERS, ConvertConfig


def _freeze_count(task: int, report) -> int:
    return gc.get_freeze_count()


def test_workers_inherit_a_frozen_heap_and_the_caller_keeps_its_collector_state():
    """Workers start with the parent's objects frozen (their collections never walk those, nor copy their
    pages); a caller that froze nothing has nothing frozen afterwards, one that froze keeps its freeze."""
    assert gc.get_freeze_count() == 0
    seen: dict[int, int] = {}
    run_tasks(4, _freeze_count, seen.__setitem__, workers=2)
    assert sorted(seen) == [0, 1, 2, 3]
    assert min(seen.values()) > 1000  # at least the interpreter's and pytest's objects
    assert gc.get_freeze_count() == 0

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        run_tasks(2, _freeze_count, seen.__setitem__, workers=2)
        assert gc.get_freeze_count() > frozen // 2  # not unfrozen (frozen objects freed meanwhile leave it)
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("cores, expected", [(1, 1), (3, 3), (64, MAX_DEFAULT_WORKERS)])
def test_default_workers_follow_the_cores_this_process_may_use(monkeypatch, cores, expected):
    """`lite-convert md` without `--workers` (and a ConvertConfig without `workers`) converts on one process per
    core of the process's CPU affinity (what a batch scheduler grants), at most MAX_DEFAULT_WORKERS."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert ConvertConfig(records="r", out="o").workers == expected


def test_md_without_workers_uses_the_default(tiny, tmp_path, monkeypatch):
    used = []
    real = md_module.run_tasks
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)

    def counting(*args, workers, **kwargs):
        used.append(workers)
        return real(*args, workers=workers, **kwargs)

    monkeypatch.setattr(md_module, "run_tasks", counting)
    result = CliRunner().invoke(app, ["md", "--records", str(tiny), "--out", str(tmp_path / "out"),
                                      "--max-shard-samples", "2"])
    assert result.exit_code == 0, result.output
    assert used == [3]
