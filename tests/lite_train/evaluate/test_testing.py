"""Test-time statistics, the validation rule, and `lite-train test` / `lite-train predict` end to end."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lite_train.cli import app
from lite_train.evaluate import SourceResult, better_on_half, summarise


def test_summary_is_the_reference_mean_and_196_std_over_sqrt_n():
    # LITE:src/run.py: accuracy = mean x 100, confidence = 196 * np.std(acc) / sqrt(n) (ddof 0)
    r = summarise([0.5, 1.0, 0.75, 0.25])
    assert r.accuracy == pytest.approx(62.5)
    assert r.confidence == pytest.approx(196 * math.sqrt(0.078125) / 2)
    assert r.n == 4


def test_new_validation_is_better_when_it_wins_on_at_least_half_of_the_sources():
    names = [f"s{i}" for i in range(7)]
    best = {s: SourceResult(50.0, 1.0, 200) for s in names}
    four = {s: SourceResult(51.0 if i < 4 else 10.0, 1.0, 200) for i, s in enumerate(names)}
    three = {s: SourceResult(99.0 if i < 3 else 49.0, 1.0, 200) for i, s in enumerate(names)}
    assert better_on_half(four, best)  # ceil(7 / 2) = 4 wins, however large the losses elsewhere
    assert not better_on_half(three, best)
    assert not better_on_half({s: SourceResult(50.0, 1.0, 200) for s in names}, best)  # ties do not win
    assert better_on_half({"a": SourceResult(0.1, 0, 1), "b": SourceResult(0.0, 0, 1)}, {})  # 1 of 2 vs 0 %


def test_test_command_same_seed_same_numbers_json_chart_and_identity_baseline(trained_run, tiny_data, tmp_path):
    runner = CliRunner()
    args = ["test", "--checkpoint", str(trained_run / "checkpoint.pt"), "--data", str(tiny_data),
            "--sources", "toya,toyb", "--episodes", "2", "--image-size", "32", "--num-workers", "0",
            "--identity-film-baseline"]
    first = runner.invoke(app, args + ["--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, args + ["--out", str(tmp_path / "b")])
    a = json.loads((tmp_path / "a" / "test_results.json").read_text())
    b = json.loads((tmp_path / "b" / "test_results.json").read_text())
    assert a["models"] == b["models"]
    assert set(a["models"]) == {"run", "run, identity FiLM"}  # labelled by the run folder
    assert set(a["models"]["run"]) == {"toya", "toyb"} and a["models"]["run"]["toya"]["n"] == 2
    with Image.open(tmp_path / "a" / "test_results.png") as png:
        assert png.format == "PNG"
    assert "toya" in first.output and "±" in first.output


def test_test_command_reports_missing_sources_in_one_line(trained_run, tiny_data, tmp_path):
    result = CliRunner().invoke(app, ["test", "--checkpoint", str(trained_run / "fully_trained.pt"), "--data",
                                      str(tiny_data), "--sources", "toya,nosuch", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "nosuch" in result.output and "Traceback" not in result.output


def _write_images(folder, colour, n, fmt="PNG"):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (20 + i, 24), colour).save(folder / f"img{i}.{fmt.lower()}", format=fmt)


def test_predict_writes_scores_per_class_for_every_query(trained_run, tmp_path):
    _write_images(tmp_path / "support" / "red", (250, 10, 10), 3)
    _write_images(tmp_path / "support" / "blue", (10, 10, 250), 2, fmt="JPEG")
    _write_images(tmp_path / "query", (240, 20, 20), 2, fmt="BMP")  # not JPEG/PNG: Pillow converts it
    (tmp_path / "query" / ".DS_Store").write_bytes(b"junk")
    out = tmp_path / "pred.csv"
    result = CliRunner().invoke(app, ["predict", "--checkpoint", str(trained_run / "checkpoint.pt"),
                                      "--support", str(tmp_path / "support"), "--query", str(tmp_path / "query"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "predicted", "blue", "red"]
    assert [r[0] for r in rows[1:]] == ["img0.bmp", "img1.bmp"]
    for r in rows[1:]:
        scores = np.array(r[2:], dtype=float)
        assert scores.sum() == pytest.approx(1.0, abs=1e-5) and r[1] == ["blue", "red"][int(scores.argmax())]
    assert "1 hidden files ignored" in result.output


def test_predict_rejects_a_loose_file_in_the_support_folder(trained_run, tmp_path):
    _write_images(tmp_path / "support" / "a", (0, 0, 0), 1)
    _write_images(tmp_path / "support" / "b", (9, 9, 9), 1)
    (tmp_path / "support" / "notes.txt").write_text("x")
    _write_images(tmp_path / "query", (0, 0, 0), 1)
    result = CliRunner().invoke(app, ["predict", "--checkpoint", str(trained_run / "checkpoint.pt"),
                                      "--support", str(tmp_path / "support"), "--query", str(tmp_path / "query"),
                                      "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 1
    assert "notes.txt" in result.output and "Traceback" not in result.output
