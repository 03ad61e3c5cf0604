"""The training loop: bit-exact resume after SIGTERM, run-folder contents, config round trip, TensorBoard."""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys

import pytest
import torch

from lite_train.train import TrainConfig, load_checkpoint, train
from tests.lite_train.tiny_runs import tiny_config


def _losses(run) -> list[list[str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.reader(f))


def _final_state(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "fully_trained.pt", weights_only=True)


def _differences(a, b, where: str = "") -> list[str]:
    """Paths at which two checkpoint values (nested dicts, lists, tensors, plain values) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}/{i}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [where]
    return [] if type(a) is type(b) and a == b else [where]


def test_four_tasks_equal_three_a_sigterm_and_one_resumed(tiny_data, tmp_path):
    # tasks_per_step 2: the kill after task 3 comes after one Adam step (its moments must be restored) and in
    # the middle of the next (the accumulated gradient of task 3 must be restored).
    straight = tmp_path / "straight"
    assert train(tiny_config(tiny_data, straight, tasks_per_step=2, iterations=4), progress=False).finished

    killed = tmp_path / "killed"
    cfg = tiny_config(tiny_data, killed, tasks_per_step=2, iterations=4)

    def kill_after_third(task, stats):
        if task == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal path: handler -> checkpoint -> return

    first = train(cfg, progress=False, on_task=kill_after_third)
    assert (first.finished, first.iteration) == (False, 3)
    assert load_checkpoint(killed / "checkpoint.pt")["iteration"] == 3
    assert not (killed / "fully_trained.pt").exists()
    second = train(cfg, resume=True, progress=False)
    assert (second.finished, second.iteration) == (True, 4)

    assert _losses(killed) == _losses(straight)  # every logged loss and accuracy, bit for bit (repr of floats)
    a, b = _final_state(straight), _final_state(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the final checkpoint.pt in every entry: model, Adam moments and steps, accumulated gradients, global RNG
    # states (the loaders draw from their own generators), loader position and fingerprints, log rows, metadata;
    # only the run folder's own name differs.
    assert _differences(load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(killed / "checkpoint.pt")) == [
        "/config/out", "/model_meta/train_config/out"]
    # and training did change the trainable parameters
    init = tiny_config(tiny_data, tmp_path / "unused")
    from lite_train.train.run_state import build_model
    start = build_model(init).state_dict()  # calibration changes only backbone BN buffers
    assert any(not torch.equal(start[k], a[k]) for k in a if "regularizers" in k)


def test_run_folder_holds_config_checkpoint_and_curves(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(tiny_data, run, iterations=4, val_sources=("toya", "toyb"), val_freq=2, val_episodes=2)
    result = train(cfg, progress=False)
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())) == cfg
    state = load_checkpoint(run / "checkpoint.pt")
    assert TrainConfig.from_dict(state["config"]) == cfg and state["iteration"] == 4
    assert state["loader"]["next_episode"] == 4 and set(state["loader"]["fingerprints"]) == {"toya", "toyb"}
    rows = _losses(run)
    assert rows[0] == ["task", "source", "ways", "support", "query", "loss", "accuracy"]
    assert [int(r[0]) for r in rows[1:]] == [0, 1, 2, 3]
    with open(run / "validation.csv", newline="") as f:
        val = list(csv.reader(f))[1:]
    assert [(r[0], r[1]) for r in val] == [("2", "toya"), ("2", "toyb")]  # never after the last task
    assert val[0][5] == "1" and (run / "best_validation.pt").exists()  # first validation beats 0 %
    assert set(result.best_validation) == {"toya", "toyb"}

    # TensorBoard: the hand-written events decode with tensorboard's own protobuf classes
    from tensorboard.compat.proto import event_pb2

    events_file = next(run.glob("events.out.tfevents.*"))
    data, events = events_file.read_bytes(), []
    while data:
        (n,) = struct.unpack("<Q", data[:8])
        events.append(event_pb2.Event.FromString(data[12:12 + n]))
        data = data[12 + n + 4:]
    assert events[0].file_version == "brain.Event:2"
    losses = [(e.step, e.summary.value[0].simple_value) for e in events
              if e.HasField("summary") and e.summary.value[0].tag == "train/loss"]
    assert losses == [(int(r[0]), pytest.approx(float(r[5]), rel=1e-6)) for r in rows[1:]]


def test_a_fresh_run_refuses_a_used_folder_and_resume_refuses_other_settings(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, iterations=1), progress=False)
    with pytest.raises(ValueError, match="not empty"):
        train(tiny_config(tiny_data, run, iterations=1), progress=False)
    with pytest.raises(ValueError, match="started with other settings: h 3 \\(now 2\\)"):
        train(tiny_config(tiny_data, run, iterations=1, h=2), resume=True, progress=False)


def test_config_from_dict_rejects_unknown_keys():
    raw = tiny_config("d", "o").to_dict()
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({**raw, "lr": 0.1})


def test_creating_the_event_writer_does_not_import_tensorflow(tmp_path):
    code = ("import sys, pathlib; import lite_train.train.loop; from lite_train.train.logs import EventWriter; "
            f"w = EventWriter(pathlib.Path({str(tmp_path)!r})); w.scalar('a', 1.0, 0); w.close(); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sigterm_to_the_whole_process_group_checkpoints(tiny_data, tmp_path):
    # `timeout`, Ctrl-C in a terminal and cluster schedulers signal every process of the job, the loader's
    # workers included: the trainer must still finish its task, checkpoint and leave no process behind.
    import time
    from pathlib import Path

    run = tmp_path / "run"
    repo = Path(__file__).resolve().parents[3]
    code = ("from pathlib import Path; from lite_train.train import train; "
            "from tests.lite_train.tiny_runs import tiny_config; "
            f"r = train(tiny_config(Path({str(tiny_data)!r}), Path({str(run)!r}), num_workers=2, "
            "iterations=10**6, checkpoint_every=10**6), progress=False); print('stopped', r.finished, r.iteration)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.csv").exists() or len(_losses(run)) < 3:  # header + 2 tasks logged
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no tasks logged"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    stopped = out.split()
    assert stopped[:2] == ["stopped", "False"], out + err
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == int(stopped[2]) >= 2
    gone_by = time.monotonic() + 10  # the workers end with the main process (the loader's shutdown)
    while time.monotonic() < gone_by:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_tf32_is_a_cuda_setting_and_set_tf32_sets_both_backends(tiny_data, tmp_path):
    from typer.testing import CliRunner

    from lite_train.cli import app
    from lite_train.runtime import set_tf32

    with pytest.raises(ValueError, match="--tf32: TF32 needs a CUDA device"):
        tiny_config(tiny_data, tmp_path / "run", tf32=True)
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"),
                                      "--sources", "toya", "--device", "cpu", "--tf32"])
    assert result.exit_code == 1 and "--tf32: TF32 is a CUDA setting" in result.output
    assert not (tmp_path / "run").exists()
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        set_tf32(False)  # PyTorch's own default leaves cuDNN's TF32 on: lite-train turns it off on CUDA
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
        set_tf32(True)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
