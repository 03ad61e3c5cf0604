"""`lite-train pretrain`: only training-split images reach the model, batches independent of the number of
workers, bit-exact resume and reruns, the backbone file that `train` and `test` take, one-line errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lite_train.cli import app
from lite_train.data.batches import BatchLoader, BatchLoaderConfig
from lite_train.train import PretrainConfig, pretrain
from manifests import open_source
from tests.lite_train.cli_output import one_error_line
from tests.lite_train.tiny_runs import tiny_config
from tests.lite_train.tiny_runs import tiny_pretrain_config as _config


def _metrics(run: Path) -> list[list[str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.reader(f))


def _backbone(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "backbone.pt", weights_only=True)["state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def poisoned_data(tiny_data, tmp_path_factory) -> Path:
    """tiny_data with the bytes of every validation- and test-class image flipped in the shards: reading any of
    them fails its crc32 check, so a run that finishes has read none."""
    root = tmp_path_factory.mktemp("poisoned")
    shutil.copytree(tiny_data, root, dirs_exist_ok=True)
    for name in ("toya", "toyb"):
        reader = open_source(root, name)
        for class_id in list(reader.class_ids("valid")) + list(reader.class_ids("test")):
            first, count = reader.class_range(int(class_id))
            for i in range(first, first + count):
                entry = reader.index[i]
                shard = reader.path / reader.info.shards[int(entry["shard"])].name
                with open(shard, "r+b") as f:
                    f.seek(int(entry["offset"]) + int(entry["size"]) // 2)
                    byte = f.read(1)
                    f.seek(-1, os.SEEK_CUR)
                    f.write(bytes([byte[0] ^ 0xFF]))
        reader.close()
    return root


def test_only_training_split_images_reach_the_model(poisoned_data, tiny_data, tmp_path):
    # The valid/test images are unreadable (crc32), so the run below can only finish if it never reads one.
    with pytest.raises(ValueError, match="crc32"):
        with BatchLoader(BatchLoaderConfig(data=str(poisoned_data), sources=("toya",), split="valid",
                                           image_size=32, batch_size=4, num_workers=0)) as loader:
            next(iter(loader.epoch(0)))
    run = tmp_path / "run"
    result = pretrain(_config(poisoned_data, run, num_workers=2), progress=False)
    assert result.finished and result.backbone == run / "backbone.pt"
    provenance = json.loads((run / "backbone.pt.json").read_text())
    assert provenance["classes"] == 11 and provenance["split"] == "train"  # 6 + 5 training classes
    assert all(name.split("/")[1] in {f"toya_class{i}" for i in range(6)} | {f"toyb_class{i}" for i in range(5)}
               for name in provenance["class_names"])
    assert _backbone(run)["_fc.weight"].shape == (11, 1280)  # one output per training class
    # and the poisoned copy trains exactly as the clean data does
    clean = tmp_path / "clean"
    pretrain(_config(tiny_data, clean, num_workers=0), progress=False)
    assert _same(_backbone(run), _backbone(clean)) and _metrics(run) == _metrics(clean)


def test_batches_are_the_same_for_any_number_of_workers_and_cover_the_training_pool_once(tiny_data):
    def epoch(workers):
        cfg = BatchLoaderConfig(data=str(tiny_data), sources=("toya", "toyb"), image_size=16, batch_size=8,
                                holdout=0.25, num_workers=workers, images_per_task=3)
        with BatchLoader(cfg) as loader:
            return [(b["index"], b["labels"].clone(), torch.stack([b["sources"], b["samples"]], 1),
                     b["images"].clone()) for b in loader.epoch(1)], loader.planner

    zero, planner = epoch(0)
    two, _ = epoch(2)
    assert len(zero) == planner.batches_per_epoch == 4  # 33 training images: 4 batches of 8, one dropped
    for (i, labels, samples, images), (j, labels2, samples2, images2) in zip(zero, two, strict=True):
        assert i == j and torch.equal(labels, labels2) and torch.equal(samples, samples2)
        assert torch.equal(images, images2)
    drawn = [tuple(pair) for _, _, s, _ in zero for pair in s.tolist()]  # (source, sample)
    assert len(set(drawn)) == len(drawn) == 32  # without replacement within an epoch
    held = set(zip(planner.held_out.source.tolist(), planner.held_out.sample.tolist()))
    assert len(held) == 11  # one per class
    assert not held & set(zip(planner.train.source.tolist(), planner.train.sample.tolist()))


def test_a_sigterm_then_resume_gives_the_uninterrupted_run_bit_for_bit(tiny_data, tmp_path):
    straight = tmp_path / "straight"
    assert pretrain(_config(tiny_data, straight), progress=False).finished
    again = tmp_path / "again"
    pretrain(_config(tiny_data, again), progress=False)
    assert _same(_backbone(straight), _backbone(again)) and _metrics(straight) == _metrics(again)  # reruns

    killed = tmp_path / "killed"

    def kill_after_batch_5(batch, loss):  # epoch 2, in the middle of it: the SGD momentum must be restored
        if batch == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    first = pretrain(_config(tiny_data, killed), progress=False, on_batch=kill_after_batch_5)
    assert (first.finished, first.batches) == (False, 6)
    assert not (killed / "backbone.pt").exists()
    second = pretrain(_config(tiny_data, killed), resume=True, progress=False)
    assert second.finished
    assert _same(_backbone(straight), _backbone(killed))
    assert _metrics(straight) == _metrics(killed)  # every logged loss, no duplicated row
    with open(killed / "validation.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == ["4", "8", "8"]  # each epoch, then once more with the final BN statistics
    assert rows[-1][5].startswith("recomputed")


def test_the_backbone_file_trains_and_tests_with_identity_film(tiny_data, tmp_path):
    run = tmp_path / "pre"
    pretrain(_config(tiny_data, run, epochs=1), progress=False)
    from lite_train.train import train

    lite = tmp_path / "lite"
    assert train(tiny_config(tiny_data, lite, iterations=2, tasks_per_step=2, calibration_images=0,
                             backbone_weights=str(run / "backbone.pt")), progress=False).finished
    meta = torch.load(lite / "fully_trained.pt", weights_only=True)._metadata[""]["lite_train"]
    assert meta["backbone"]["sources"] == ["toya", "toyb"] and meta["image_size"] == 32
    result = CliRunner().invoke(app, ["test", "--checkpoint", str(run / "backbone.pt"), "--checkpoint",
                                      str(lite / "fully_trained.pt"), "--data", str(tiny_data), "--sources", "toya",
                                      "--episodes", "2", "--num-workers", "0", "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    models = json.loads((tmp_path / "t" / "test_results.json").read_text())["models"]
    assert list(models) == ["pre (identity FiLM)", "lite"]
    # both at the recorded 32 px, on the same episodes
    assert json.loads((tmp_path / "t" / "test_results.json").read_text())["image_size"] == 32


@pytest.mark.parametrize("args, message", [
    (["--sources", "nosuch"], "nosuch"),
    (["--sources", "toya", "--augment", "crop,spin"], "--augment crop,spin"),
    (["--sources", "toya", "--learning-rate", "nan"], "--learning-rate nan: not a finite number"),
    (["--sources", "toya", "--image-size", "16"], "--image-size 16: must be at least 32"),
    (["--sources", "toya", "--batch-size", "64"], "fewer than one batch of 64"),
])
def test_bad_settings_are_one_line_before_the_run_folder_is_touched(tiny_data, tmp_path, args, message):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", "--data", str(tiny_data), "--out", str(out), "--image-size", "32",
                                      "--num-workers", "0", *args])
    assert result.exit_code == 1
    assert message in one_error_line(result.output)
    assert not out.exists()


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero():
    from lite_train.train.pretraining import learning_rate

    cfg = PretrainConfig(data="d", out="o", sources=("s",), learning_rate=0.1, warmup_epochs=1.0)
    lrs = np.array([learning_rate(cfg, step, total=40, per_epoch=10) for step in range(40)])
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)  # linear over the first epoch
    assert lrs[10] == pytest.approx(0.1) and np.all(np.diff(lrs[10:]) < 0)  # then strictly down
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 29 / 30)))
