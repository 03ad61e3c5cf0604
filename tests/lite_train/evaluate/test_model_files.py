"""Model files and inputs of `test`, `predict` and `eval-vtab`: a run's model files carry what is needed to use
them as trained (size, head) and stay LITE's plain state dicts; a file that does not say is used at 224 px with
a note; a damaged, foreign, unsafe or non-finite file, an impossible image, a bad query folder and a bad
setting are each refused in one line naming it, before any work or output."""

from __future__ import annotations

import collections
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lite_train.cli import app
from lite_train.model import LiteModel
from tests.lite_train.cli_output import one_error_line

runner = CliRunner()


def _images(folder: Path, colour, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (20 + i, 24), colour).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(support folder with classes red and blue, query folder of two images)."""
    root = tmp_path_factory.mktemp("predict_input")
    _images(root / "support" / "red", (250, 10, 10), 2)
    _images(root / "support" / "blue", (10, 10, 250), 2)
    _images(root / "query", (240, 20, 20), 2)
    return root / "support", root / "query"


def _predict(model: Path, folders, out: Path, *extra: str):
    support, query = folders
    return runner.invoke(app, ["predict", "--checkpoint", str(model), "--support", str(support), "--query",
                               str(query), "--out", str(out), "--threads", "1", *extra])


def _test(model: Path, data: Path, out: Path, *extra: str):
    return runner.invoke(app, ["test", "--checkpoint", str(model), "--data", str(data), "--sources", "toya",
                               "--episodes", "2", "--num-workers", "0", "--threads", "1", "--out", str(out), *extra])


# --- a run's model files ----------------------------------------------------------------------------------


def test_fully_trained_tests_exactly_as_the_runs_checkpoint_at_the_recorded_size(trained_run, tiny_data, tmp_path):
    results = {}
    for name in ("checkpoint.pt", "fully_trained.pt"):
        result = _test(trained_run / name, tiny_data, tmp_path / name)
        assert result.exit_code == 0, result.output
        results[name] = json.loads((tmp_path / name / "test_results.json").read_text())
        assert results[name]["image_size"] == 32  # as trained, not LITE's 224
        assert "224" not in result.output
    assert results["fully_trained.pt"]["models"] == results["checkpoint.pt"]["models"]


def test_predict_uses_the_recorded_size_and_lite_loads_the_file_strictly(trained_run, folders, tmp_path):
    model = trained_run / "fully_trained.pt"
    result = _predict(model, folders, tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p.csv.json").read_text())["image_size"] == 32 and "32 px" in result.output
    # LITE's own loading (src/run.py): a plain state dict, every key, strictly
    LiteModel().load_state_dict(torch.load(model, weights_only=True), strict=True)
    assert torch.load(model, weights_only=True)._metadata[""]["lite_train"]["image_size"] == 32


def test_a_file_without_metadata_is_used_at_224_px_with_a_note_and_image_size_overrides(trained_run, folders,
                                                                                        tmp_path):
    from lite_train.model.model_file import read_model_file

    stripped = tmp_path / "stripped.pt"
    torch.save(dict(torch.load(trained_run / "fully_trained.pt", weights_only=True)), stripped)  # no _metadata
    note = (f"{stripped}: no image size recorded (a LITE release or a foreign file); using 224 px, LITE's; pass "
            "--image-size to choose")
    assert read_model_file(stripped).image_size(None) == (224, note)
    assert read_model_file(stripped).image_size(32) == (32, None)
    # End to end on a stand-in for a LITE release: a Simple CNAPs LiteModel's own state dict (its _metadata holds
    # PyTorch's module versions only). The stripped file above is a ProtoNets run's, which Simple CNAPs, LITE's
    # head and so the assumed one, cannot use at 224 px (its covariance is not positive-definite there).
    torch.manual_seed(0)
    plain = tmp_path / "lite_release.pt"
    torch.save(LiteModel().state_dict(), plain)
    result = _predict(plain, folders, tmp_path / "a.csv")
    assert result.exit_code == 0, result.output
    assert note.replace(str(stripped), str(plain)) in result.stderr
    assert json.loads((tmp_path / "a.csv.json").read_text())["image_size"] == 224
    chosen = _predict(plain, folders, tmp_path / "b.csv", "--image-size", "32")
    assert chosen.exit_code == 0, chosen.output
    assert "no image size recorded" not in chosen.output
    assert json.loads((tmp_path / "b.csv.json").read_text())["image_size"] == 32


# --- damaged, foreign, unsafe and non-finite files --------------------------------------------------------


class Payload:
    """Not a tensor: unpickling it would import and run this module's code."""


def _bad_file(kind: str, trained_run: Path, path: Path) -> Path:
    good = (trained_run / "fully_trained.pt").read_bytes()
    if kind == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif kind == "random bytes":
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "a Counter":
        torch.save(collections.Counter(), path)
    elif kind == "a custom class":
        torch.save({"model": Payload()}, path)
    elif kind == "non-finite":
        state = torch.load(trained_run / "fully_trained.pt", weights_only=True)
        key = next(k for k, v in state.items() if v.is_floating_point() and "regularizers" in k)
        state[key] = state[key].clone().fill_(float("nan"))
        torch.save(state, path)
    elif kind == "a missing key":
        state = torch.load(trained_run / "fully_trained.pt", weights_only=True)
        del state[next(iter(state))]
        torch.save(state, path)
    return path


BAD_FILES = {"truncated": "cannot be read as a model file (not a PyTorch file, or a damaged one: ",
             "random bytes": "cannot be read as a model file (not a PyTorch file, or a damaged one: ",
             "empty": "empty file, not a model", "a Counter": "neither a LITE model",
             "a custom class": "Payload, not only tensors and plain values; refused",
             "non-finite": "with NaN or infinite values", "a missing key": "does not fit the LITE model: 1 missing"}


@pytest.mark.parametrize("command", ["test", "predict"])
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_model_file_is_one_line_naming_it(trained_run, tiny_data, folders, tmp_path, kind, command):
    path = _bad_file(kind, trained_run, tmp_path / "model.pt")
    out = tmp_path / "out"
    result = (_test(path, tiny_data, out) if command == "test" else _predict(path, folders, out / "p.csv"))
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert line.startswith(f"error: {path}: ") and BAD_FILES[kind] in line, line
    if kind == "a missing key":
        assert f"(e.g. {next(iter(torch.load(trained_run / 'fully_trained.pt', weights_only=True)))})" in line
    assert not out.exists()


def test_eval_vtab_refuses_a_model_file_with_non_finite_weights_in_one_line(trained_run, tmp_path):
    from tests.lite_train.evaluate.vtab.test_eval_vtab import write_task

    write_task(tmp_path / "data", "svhn", "natural", [0, 1], [0, 1])
    path = _bad_file("non-finite", trained_run, tmp_path / "model.pt")
    result = runner.invoke(app, ["eval-vtab", "--data", str(tmp_path / "data"), "--checkpoint", str(path),
                                 "--num-workers", "0", "--threads", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert one_error_line(result.output).startswith(f"error: {path}: 1 tensor with NaN or infinite values")
    assert not (tmp_path / "out").exists()


def test_eval_vtab_without_vtab_tasks_is_one_line_naming_what_it_looked_for(trained_run, tiny_data, tmp_path):
    result = runner.invoke(app, ["eval-vtab", "--data", str(tiny_data), "--checkpoint",
                                 str(trained_run / "fully_trained.pt"), "--threads", "1", "--out",
                                 str(tmp_path / "out")])
    assert result.exit_code == 1
    assert one_error_line(result.output) == (f"error: {tiny_data}: no converted VTAB task (ordered source) under it; "
                                             "convert some with lite-convert vtab --out")
    assert not (tmp_path / "out").exists() and "accuracy" not in result.output


# --- images and folders -----------------------------------------------------------------------------------


def _huge_png(side: int) -> bytes:
    """A 1-bit grey PNG of side x side pixels: a few kB on disk, side**2 * 3 bytes once decoded to RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compressobj(1)
    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed pixels
    idat = b"".join(rows.compress(row) for _ in range(side)) + rows.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _huge_jpeg(side: int) -> bytes:
    """A small JPEG whose frame header claims side x side pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 90, 90)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_predict_refuses_a_14000_px_image_in_one_line(trained_run, folders, tmp_path, kind):
    query = tmp_path / "query"
    query.mkdir()
    big = query / f"big.{kind}"
    big.write_bytes(_huge_png(14000) if kind == "png" else _huge_jpeg(14000))
    support, _ = folders
    result = _predict(trained_run / "fully_trained.pt", (support, query), tmp_path / "p.csv")
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert line.startswith(f"error: {big}: 14000 x 14000 pixels, too large to decode"), line
    assert not (tmp_path / "p.csv").exists()


def test_predict_onto_a_folder_fails_before_any_work_and_leaves_nothing(trained_run, folders, tmp_path, monkeypatch):
    import lite_train.evaluate.predict as predict

    monkeypatch.setattr(predict, "predict_folders", lambda *a, **k: pytest.fail("computed before checking --out"))
    out = tmp_path / "results"
    out.mkdir()
    result = _predict(trained_run / "fully_trained.pt", folders, out)
    assert result.exit_code == 1
    assert one_error_line(result.output).startswith(f"error: --out {out}: is a folder")
    assert list(out.iterdir()) == [] and list(tmp_path.glob(".*.tmp")) == []


def test_an_existing_predictions_file_is_replaced_only_with_overwrite(trained_run, folders, tmp_path):
    out = tmp_path / "predictions.csv"
    out.write_text("an earlier result\n")
    refused = _predict(trained_run / "fully_trained.pt", folders, out)
    assert refused.exit_code == 1
    assert one_error_line(refused.output) == (f"error: --out {out}: exists; pass --overwrite to replace it, or "
                                              "choose another name")
    assert out.read_text() == "an earlier result\n"
    replaced = _predict(trained_run / "fully_trained.pt", folders, out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert out.read_text().startswith("file,predicted,blue,red\n")
    assert list(tmp_path.glob(".*.tmp")) == []


@pytest.mark.parametrize("entry", ["a sub-folder", "a broken link"])
def test_a_query_folder_entry_that_is_not_an_image_is_one_line_naming_it(trained_run, folders, tmp_path, entry):
    query = _images(tmp_path / "query", (240, 20, 20), 1)
    if entry == "a sub-folder":
        (query / "more").mkdir()
        bad, message = query / "more", "not an image file (a folder)"
    else:
        (query / "gone.png").symlink_to(tmp_path / "nowhere.png")
        bad, message = query / "gone.png", "a broken link"
    support, _ = folders
    result = _predict(trained_run / "fully_trained.pt", (support, query), tmp_path / "p.csv")
    assert result.exit_code == 1
    assert one_error_line(result.output).startswith(f"error: {bad}: {message}")


# --- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["test", "predict"])
@pytest.mark.parametrize("size", ["16", "0"])
def test_a_bad_image_size_is_one_line_naming_the_option(trained_run, tiny_data, folders, tmp_path, command, size):
    model, out = trained_run / "fully_trained.pt", tmp_path / "out"
    result = (_test(model, tiny_data, out, "--image-size", size) if command == "test"
              else _predict(model, folders, out / "p.csv", "--image-size", size))
    assert result.exit_code == 1
    assert one_error_line(result.output) == f"error: --image-size {size}: must be at least 32"
    assert not out.exists()
