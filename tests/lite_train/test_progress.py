"""What a user watches: plain progress lines without a terminal (start, at most one per period, the end),
start-up status lines, running means; and the default number of torch threads."""

from __future__ import annotations

import io
import os

import pytest

from lite_train.progress import Progress
from lite_train.runtime import default_threads, torch_threads


def test_plain_lines_at_start_every_period_and_at_the_end():
    out = io.StringIO()
    view = Progress("train", 10, "tasks", live=False, every=3600, stream=out)
    view.status("calibrating the backbone")
    for i in range(10):
        view.advance(1, loss=float(i), acc=0.5)
    view.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "train: 0/10 tasks (0 %)"
    assert lines[1] == "train: calibrating the backbone"
    assert len(lines) == 3 and lines[2].startswith("train: 10/10 tasks (100 %), ")  # nothing in between
    assert "ETA 0:00" in lines[2] and "loss 4.5 acc 0.5" in lines[2]  # running means over the window


def test_a_line_every_period_and_a_closing_line_only_for_unprinted_progress():
    out = io.StringIO()
    view = Progress("test", 4, "episodes", live=False, every=0, stream=out, window=2)
    for acc in (0.0, 1.0, 1.0, 1.0):
        view.advance(1, acc=acc)
    view.close()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"test: {i}/4 episodes ({25 * i} %)" for i in range(5)]
    assert lines[2].endswith("acc 0.5") and lines[4].endswith("acc 1")  # mean of the last two values


def test_a_disabled_view_prints_nothing():
    out = io.StringIO()
    view = Progress("train", 3, "tasks", live=False, enabled=False, stream=out)
    view.status("x")
    view.advance(3, loss=1.0)
    view.close()
    assert out.getvalue() == ""


@pytest.mark.parametrize("cores, workers, local, expected", [(2, 1, 1, 1), (2, 0, 1, 2), (2, 2, 1, 1),
                                                              (16, 2, 1, 14), (16, 2, 4, 2)])
def test_default_threads_are_the_usable_cores_minus_the_decode_workers(monkeypatch, cores, workers, local,
                                                                      expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))  # torchrun: the cores are shared by its processes
    assert default_threads(workers) == expected


def test_torch_threads_sets_and_restores():
    import torch

    before = torch.get_num_threads()
    with torch_threads(1, 0) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
