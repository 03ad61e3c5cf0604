"""curves.png of a run and `lite-train plot` over several runs."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from lite_train.cli import app
from lite_train.train.curves import RunCurves, smooth
from tests.lite_train.cli_output import one_error_line
from tests.lite_train.tiny_runs import tiny_pretrain_config as _config


def test_trailing_moving_mean():
    assert smooth(np.array([1.0, 2.0, 3.0, 4.0]), 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert smooth(np.array([5.0]), 3).tolist() == [5.0]


def test_runs_write_their_curves_and_plot_overlays_runs_of_one_kind(trained_run, tiny_data, tmp_path):
    from lite_train.train import pretrain

    with Image.open(trained_run / "curves.png") as png:  # written by train() at the end
        assert png.format == "PNG" and png.size[0] > 500
    curves = RunCurves(trained_run)
    assert curves.kind == "train" and curves.x.tolist() == [0, 1, 2, 3]
    pre = tmp_path / "pre"
    pretrain(_config(tiny_data, pre, epochs=1), progress=False)
    assert RunCurves(pre).kind == "pretrain" and (pre / "curves.png").is_file()

    runner = CliRunner()
    out = tmp_path / "both.png"
    result = runner.invoke(app, ["plot", str(trained_run), str(trained_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as png:
        assert png.format == "PNG"
    mixed = runner.invoke(app, ["plot", str(trained_run), str(pre), "--out", str(tmp_path / "x.png")])
    assert mixed.exit_code == 1 and "cannot overlay pretrain and train runs" in one_error_line(mixed.output)
    empty = runner.invoke(app, ["plot", str(tmp_path), "--out", str(tmp_path / "y.png")])
    assert empty.exit_code == 1 and "metrics.csv" in one_error_line(empty.output)
