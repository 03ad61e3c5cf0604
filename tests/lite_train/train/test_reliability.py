"""The training commands never lie, never hang and never strand a run folder: divergence stops the run in one
line with nothing non-finite saved; a failing step, disk or shard ends the run at once with its workers and
temporaries gone; a signal during start-up, a run killed before its first checkpoint and a second lite-train
on the same --out all leave a folder that --resume finishes; every bad setting is one line before anything is
written; progress shows without a terminal."""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lite_train.train.loop as loop
import lite_train.train.run_state as run_state
from lite_train.cli import app
from lite_train.train import load_checkpoint
from manifests import open_source
from tests.lite_train.cli_output import one_error_line
from tests.lite_train.tiny_runs import tiny_config, tiny_pretrain_config, train_args

REPO = Path(__file__).resolve().parents[3]
runner = CliRunner()


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def _non_finite(value, where: str = "") -> list[str]:
    """Where a nested checkpoint value (dicts, lists, tensors, floats) holds NaN or infinity."""
    if isinstance(value, dict):
        return [w for k, v in value.items() for w in _non_finite(v, f"{where}/{k}")]
    if isinstance(value, (list, tuple)):
        return [w for i, v in enumerate(value) for w in _non_finite(v, f"{where}/{i}")]
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return [] if torch.isfinite(value).all() else [where]
    if isinstance(value, float):
        return [] if math.isfinite(value) else [where]
    return []


def _same_file(a: Path, b: Path) -> bool:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# --- divergence -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("poison, bad_task, checkpoint_every", [
    ("loss", 4, 2),  # the step reports a NaN loss: the run stops at that task
    ("gradient", 4, 2),  # a finite loss with a NaN gradient: the run stops before the Adam step (after task 5)
    ("loss", 1, 1000),  # before any checkpoint: the message must not point at one
])
def test_divergence_stops_train_in_one_line_and_saves_nothing_non_finite(tiny_data, tmp_path, monkeypatch, poison,
                                                                         bad_task, checkpoint_every):
    real, done = loop.STEPS["lite"], []

    def diverging(model, task, cfg):
        stats = real(model, task, cfg)
        done.append(task)
        if len(done) - 1 == bad_task:  # one process: the n-th call is task n
            if poison == "loss":
                return {**stats, "loss": float("nan")}
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return stats

    monkeypatch.setitem(loop.STEPS, "lite", diverging)
    run = tmp_path / "run"
    result = runner.invoke(app, train_args(tiny_config(tiny_data, run, iterations=8, tasks_per_step=2,
                                                       checkpoint_every=checkpoint_every)))
    assert result.exit_code == 1, result.output
    line = one_error_line(result.output)
    if poison == "loss":
        assert re.search(rf"training diverged: task {bad_task} \((toya|toyb)\) has loss nan", line), line
    else:
        assert re.search(r"training diverged: the gradient of \S+ is not finite after tasks 4-5 \((toya|toyb)"
                         r"(, (toya|toyb))?\)", line), line
    assert "--learning-rate" in line
    # metrics.csv: every task done with a finite loss (for a NaN gradient, up to the last task of its Adam step,
    # which the check stopped), written out although the run failed
    logged = _rows(run / "metrics.csv")
    assert [int(r[0]) for r in logged] == list(range(bad_task if poison == "loss" else bad_task + 2))
    assert all(math.isfinite(float(r[5])) and math.isfinite(float(r[6])) for r in logged)
    if checkpoint_every == 2:
        state = load_checkpoint(run / "checkpoint.pt")  # the last one written before the divergence
        assert state["iteration"] == 4 and _non_finite(state) == []
        assert f"{run / 'checkpoint.pt'} holds the last good state (task 4)" in line
    else:
        assert not (run / "checkpoint.pt").exists()
        assert "no checkpoint was written" in line and "holds the last good state" not in line
    assert not (run / "fully_trained.pt").exists() and _temporaries(run) == []


@pytest.mark.parametrize("poison", ["learning rate", "gradient"])
def test_divergence_stops_pretrain_in_one_line_and_saves_nothing_non_finite(tiny_data, tmp_path, monkeypatch, recwarn,
                                                                            poison):
    args = ["--learning-rate", "1e4"] if poison == "learning rate" else []
    if poison == "gradient":
        import torch.nn.functional as F

        class NanBackward(torch.autograd.Function):
            """Identity forward, NaN gradient: a finite loss whose gradient is not."""

            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, grad):
                return torch.full_like(grad, float("nan"))

        real = F.cross_entropy
        monkeypatch.setattr(F, "cross_entropy", lambda logits, *a, **k: real(NanBackward.apply(logits), *a, **k))
    run = tmp_path / "pre"
    cfg = tiny_pretrain_config(tiny_data, run, checkpoint_every=2)
    result = runner.invoke(app, ["pretrain", "--data", cfg.data, "--out", str(run), "--sources", "toya,toyb",
                                 "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--holdout", "0.25",
                                 "--bn-batches", "2", "--num-workers", "0", "--threads", "1", "--checkpoint-every",
                                 "2", *args])
    assert result.exit_code == 1, result.output
    line = one_error_line(result.output)
    # the first check that sees it: a NaN loss (lr 1e4), a finite loss whose gradient is NaN (the injection)
    assert line.startswith("error: pretraining diverged: " + ("the loss of batch " if poison == "learning rate" else
                                                              "the gradient of ")), line
    assert "--learning-rate" in line
    assert [str(w.message) for w in recwarn if "lite_train" in w.filename] == []  # a CLI would print them too
    assert not (run / "backbone.pt").exists() and _temporaries(run) == []
    assert all(math.isfinite(float(r[2])) for r in _rows(run / "metrics.csv"))
    if (run / "checkpoint.pt").exists():
        state = load_checkpoint(run / "checkpoint.pt")
        assert _non_finite(state) == [] and f"holds the last good state (batch {state['batches']})" in line
    else:
        assert "no checkpoint was written" in line


def test_no_file_is_written_with_a_non_finite_tensor_and_the_last_one_stays(tmp_path):
    from lite_train.train.checkpoint import save_checkpoint, save_model_file

    good, bad = {"w": torch.ones(3)}, {"w": torch.tensor([1.0, float("inf"), 0.0])}
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": good})
    with pytest.raises(ValueError, match=r"training diverged: w holds NaN or infinite values; .*checkpoint.pt was "
                                         r"not written"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"model": bad})
    assert torch.equal(load_checkpoint(tmp_path / "checkpoint.pt")["model"]["w"], good["w"])
    with pytest.raises(ValueError, match="w holds NaN or infinite values"):
        save_model_file(tmp_path / "fully_trained.pt", bad, {})
    assert not (tmp_path / "fully_trained.pt").exists() and _temporaries(tmp_path) == []


# --- never hang -------------------------------------------------------------------------------------------

# `lite-train train` with a failure injected: "step" (the training step raises), "disk" (writing checkpoint.pt
# meets a full disk after the temporary file was created) or none (the data itself is damaged).
_FAILING_TRAIN = """
import builtins, errno, sys
import lite_train.files
import lite_train.train.loop as loop
from lite_train.cli import main

kind = sys.argv[1]
if kind == "step":
    def failing_step(model, task, cfg):
        raise RuntimeError("injected: the training step failed")
    loop.STEPS["lite"] = failing_step
elif kind == "disk":
    def full_disk(file, mode="r", *args, **kwargs):
        if "checkpoint.pt" in str(file) and "w" in mode:
            builtins.open(file, mode).close()
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return builtins.open(file, mode, *args, **kwargs)
    lite_train.files.open = full_disk
sys.argv = ["lite-train", *sys.argv[2:]]
main()
"""


@pytest.fixture(scope="module")
def damaged_data(tiny_data, tmp_path_factory) -> Path:
    """tiny_data with one byte flipped in every training-class image of the shards: every training episode
    fails its crc32 check in the loader."""
    root = tmp_path_factory.mktemp("damaged")
    shutil.copytree(tiny_data, root, dirs_exist_ok=True)
    for name in ("toya", "toyb"):
        reader = open_source(root, name)
        for class_id in reader.class_ids("train"):
            first, count = reader.class_range(int(class_id))
            for i in range(first, first + count):
                entry = reader.index[i]
                with open(reader.path / reader.info.shards[int(entry["shard"])].name, "r+b") as f:
                    f.seek(int(entry["offset"]) + int(entry["size"]) // 2)
                    byte = f.read(1)
                    f.seek(-1, os.SEEK_CUR)
                    f.write(bytes([byte[0] ^ 0xFF]))
        reader.close()
    return root


# Each failure with workers running (a subprocess costs ~5 s, mostly imports): the shard with 1 and 2 workers,
# since there the failure happens inside one of them while the other may be decoding.
@pytest.mark.parametrize("failure, workers", [("step", 1), ("disk", 2), ("shard", 2)])
def test_a_failure_ends_train_within_seconds_leaving_no_worker_and_no_temporary(tiny_data, damaged_data, tmp_path,
                                                                                failure, workers):
    run = tmp_path / "run"
    data = damaged_data if failure == "shard" else tiny_data
    # No calibration: the first images read are a training episode's, in the loader's workers.
    cfg = tiny_config(data, run, iterations=50, tasks_per_step=2, checkpoint_every=2, num_workers=workers,
                      calibration_images=0, threads=1)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", _FAILING_TRAIN, failure, *train_args(cfg)], cwd=REPO,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, out + err
    assert elapsed < 45, f"took {elapsed:.0f} s"  # a tiny run: the time of the imports, not of a hang
    gone_by = time.monotonic() + 3
    while True:  # no decode worker outlives the trainer
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < gone_by, "a loader worker is still alive"
        time.sleep(0.05)
    assert _temporaries(run) == []
    if failure == "disk":
        assert one_error_line(err) == f"error: no space left on device: {run / 'checkpoint.pt'}"
        assert not (run / "checkpoint.pt").exists()
    elif failure == "shard":
        line = one_error_line(err)
        assert "crc32" in line and "toy" in line and "Original Traceback" not in err, err
    else:
        assert "injected: the training step failed" in err


def test_a_failing_step_stops_the_loader_workers_before_train_raises(tiny_data, tmp_path, monkeypatch):
    # In a library call, not only at process exit: the traceback the caller keeps references the loader.
    import multiprocessing

    def failing_step(model, task, cfg):
        raise RuntimeError("injected: the training step failed")

    monkeypatch.setitem(loop.STEPS, "lite", failing_step)
    before = set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="injected") as failure:
        loop.train(tiny_config(tiny_data, tmp_path / "run", num_workers=2, calibration_images=0), progress=False)
    assert failure.traceback and set(multiprocessing.active_children()) - before == set()


# --- never stranded or shared -----------------------------------------------------------------------------


@pytest.mark.parametrize("module, phase", [(loop, "make_episode_loader"), (run_state, "calibrate_random_backbone")],
                         ids=["opening", "calibrating"])
def test_a_signal_during_start_up_checkpoints_task_0_and_resume_finishes_the_run(tiny_data, trained_run, tmp_path,
                                                                                 monkeypatch, module, phase):
    # SIGTERM while the sources are being opened, or while the random backbone's BN statistics are set.
    real = getattr(module, phase)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    def fatal(signum, frame):  # what SIGTERM does when the trainer does not handle it (here without killing pytest)
        raise SystemExit(f"signal {signum} was not handled by the trainer")

    monkeypatch.setattr(module, phase, signalled)
    run = tmp_path / "run"
    cfg = tiny_config(tiny_data, run, iterations=4, tasks_per_step=2)  # trained_run's settings
    previous = signal.signal(signal.SIGTERM, fatal)
    try:
        stopped = runner.invoke(app, train_args(cfg))
    finally:
        signal.signal(signal.SIGTERM, previous)
        monkeypatch.undo()
    assert stopped.exit_code == 130, stopped.output
    assert (f"stopped at task 0; checkpoint written to {run}/checkpoint.pt (continue with the same command plus "
            "--resume)") in stopped.stdout
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 0
    (run / ".checkpoint.pt.999.tmp").write_bytes(b"a checkpoint write killed half way")
    resumed = runner.invoke(app, train_args(cfg, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert _temporaries(run) == []
    assert _rows(run / "metrics.csv") == _rows(trained_run / "metrics.csv")
    assert _same_file(run / "fully_trained.pt", trained_run / "fully_trained.pt")


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tiny_data, trained_run, tmp_path):
    # What kill -9 during the first tasks leaves: config.json, a partial metrics.csv, a half-written checkpoint.
    run = tmp_path / "run"
    cfg = tiny_config(tiny_data, run, iterations=4, tasks_per_step=2)
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    (run / "metrics.csv").write_text("task,source,ways,support,query,loss,accuracy\n0,toya,5,5,10,1.5,0.5\n")
    (run / ".checkpoint.pt.123.tmp").write_bytes(b"the first half of a checkpoint")
    again = runner.invoke(app, train_args(cfg))
    assert again.exit_code == 1
    line = one_error_line(again.output)
    assert str(run) in line and "--resume" in line and "another --out" in line
    resumed = runner.invoke(app, train_args(cfg, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert _temporaries(run) == []
    assert _rows(run / "metrics.csv") == _rows(trained_run / "metrics.csv")  # from task 0, no stale row
    assert _same_file(run / "fully_trained.pt", trained_run / "fully_trained.pt")


def test_resume_from_an_empty_checkpoint_is_one_line(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(tiny_data, run)
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    (run / "checkpoint.pt").write_bytes(b"")
    result = runner.invoke(app, train_args(cfg, "--resume"))
    assert result.exit_code == 1
    assert one_error_line(result.output).startswith(f"error: {run / 'checkpoint.pt'}: empty file")


def test_a_second_lite_train_on_a_running_folder_fails_at_once_and_changes_nothing(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(tiny_data, run, iterations=2, tasks_per_step=1, checkpoint_every=1)
    tries = []

    def second_run(task, stats):  # while the first run holds the folder
        if task != 1:
            return
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        for extra in (["--resume"], []):
            started = time.monotonic()
            result = runner.invoke(app, train_args(cfg, *extra))
            tries.append((result.exit_code, one_error_line(result.output), time.monotonic() - started))
        tries.append({p.name: p.read_bytes() for p in run.iterdir()} == before)

    assert loop.train(cfg, progress=False, on_task=second_run).finished
    *failed, unchanged = tries
    assert unchanged and len(failed) == 2
    for code, line, seconds in failed:
        assert (code, line) == (1, f"error: another lite-train (pid {os.getpid()}) is using {run}")
        assert seconds < 5
    assert [int(r[0]) for r in _rows(run / "metrics.csv")] == [0, 1]


# --- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("--learning-rate", "nan", "--learning-rate nan: not a finite number"),
    ("--learning-rate", "inf", "--learning-rate inf: not a finite number"),
    ("--max-way-train", "1", "--max-way-train 1: must be at least 5"),
    ("--image-size", "16", "--image-size 16: must be at least 32"),
    ("--image-size", "100000", "--image-size 100000: must be at most 1024"),
    ("--chunk-size", "1", "--chunk-size 1: must be at least 2"),
    ("--max-support-train", "3", "--max-support-train 3: must be at least 5"),
])
def test_a_bad_train_setting_is_one_line_naming_it_before_anything_is_written(tiny_data, tmp_path, option, value,
                                                                             message):
    out = tmp_path / "run"
    result = runner.invoke(app, train_args(tiny_config(tiny_data, out), option, value))
    assert result.exit_code == 1
    assert one_error_line(result.output) == f"error: {message}"
    assert not out.exists()


def test_h_0_is_accepted_as_the_reference_allows(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", h=0, iterations=2, tasks_per_step=2, calibration_images=0)
    result = runner.invoke(app, train_args(cfg))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "fully_trained.pt").exists()


# --- progress ---------------------------------------------------------------------------------------------


def test_train_without_a_terminal_prints_start_up_and_progress_lines(tiny_data, tmp_path, monkeypatch):
    from lite_train.progress import Progress

    # A line at most every 0 s instead of 10 s: the periodic lines of a long run, in a 4-task one.
    monkeypatch.setattr(Progress.__init__, "__kwdefaults__", {**Progress.__init__.__kwdefaults__, "every": 0.0})
    result = runner.invoke(app, train_args(tiny_config(tiny_data, tmp_path / "run", iterations=4, tasks_per_step=2)))
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == "train: opening toya, toyb (md-v2 training classes)"
    assert lines[1] == "train: setting the random backbone's BN statistics from 20 training images"
    assert lines[2] == "train: 0/4 tasks (0 %)"
    progress = lines[3:]
    assert [line.split()[1] for line in progress] == ["1/4", "2/4", "3/4", "4/4"]
    for line in progress:
        loss, acc = re.search(r", loss (\S+) acc (\S+)$", line).groups()
        assert math.isfinite(float(loss)) and 0 <= float(acc) <= 1, line
    assert "nan" not in result.output
