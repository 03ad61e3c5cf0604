"""`lite-train eval-vtab` and the ordered front-end on tiny ordered sources (written with
`manifests.ordered_writer`, no TensorFlow) and a random LiteModel at 32 px.

Expected accuracies come from the construction, not from the code under test: every image of a class is the
same solid colour, so a query image's features equal its class's support mean exactly (Mahalanobis distance
0, every other class > 0) and a correctly aligned classifier scores 100 % on the classes the support set
shows; a class absent from the support set can never be predicted.
"""

from __future__ import annotations

import io
import json
import multiprocessing

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import lite_train.data.engine as engine
from lite_train.cli import app
from lite_train.data.decode import decode_resize_into
from lite_train.data.engine import lite_resize_into
from lite_train.data.ordered import (OrderedLoaderConfig, open_ordered_task, query_batches,
                                     read_support)
from lite_train.model import LiteModel, ModelConfig
from lite_train.evaluate.vtab import TaskResult, VtabEvalConfig, group_means, run_eval_vtab
from manifests import schema
from tests.lite_train.cli_output import one_error_line
from manifests.ordered_writer import OrderedSourceWriter, SampleOrigin

SIZE = 32
runner = CliRunner()


def _colour(label: int) -> tuple[int, int, int]:
    return ((40 + 70 * label) % 256, (200 - 45 * label) % 256, (90 + 110 * label) % 256)


def _png(label: int, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), _colour(label), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_task(root, name: str, group: str, support: list[int], query: list[int], num_classes: int = 4,
               protocol: str = "vtab1k"):
    """An ordered source `<root>/vtab/<name>` with these support and query labels, in this order."""
    writer = OrderedSourceWriter(root, "vtab", name, fingerprint={"test": name}, max_shard_samples=16)
    for role, labels in (("support", support), ("query", query)):
        split = "train" if role == "support" else "test"
        for i, label in enumerate(labels):
            writer.add(label, _png(label), "png", SampleOrigin(role, split, split, i, float(label)))
    tfds = schema.TfdsOrigin(name, None, "1.0.0", "4.9.6", protocol, "label")
    writer.finish([f"class_{c}" for c in range(num_classes)], "test", {
        "origin": "test", "converter_version": "0", "benchmark": protocol, "dataset_spec": None,
        "sampling_spec": None, "tfds": tfds, "extra": {"group": group}})
    return root / "vtab" / name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "random.pt"
    torch.save(LiteModel().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    """The checkpoint's model with the ProtoNets head: the same scoring path (columns = sorted support labels)
    without Simple CNAPs' 1280 x 1280 inverses, the slow part of these tiny runs. The CLI tests load the
    checkpoint as eval-vtab does (Simple CNAPs)."""
    model = LiteModel(ModelConfig(classifier="protonets"))
    model.load_state_dict(torch.load(checkpoint, weights_only=True, map_location="cpu"))
    return model.eval()


def _run(data, checkpoint, model, out, **options):
    """eval-vtab in this process with an already loaded model (loading it is the slow part of a tiny run)."""
    cfg = VtabEvalConfig(data=str(data), checkpoint=str(checkpoint), out=str(out), image_size=SIZE, num_workers=0,
                         **options)
    return {r.task: r for r in run_eval_vtab(cfg, progress=False, model=model)}


def _eval(data, checkpoint, out, *extra):
    return runner.invoke(app, ["eval-vtab", "--data", str(data), "--checkpoint", str(checkpoint), "--out", str(out),
                               "--image-size", str(SIZE), "--device", "cpu", "--num-workers", "0", *extra])


def _tasks(out) -> dict:
    return json.loads((out / "vtab_results.json").read_text())["tasks"]


SUPPORT = [0, 1, 2, 3] * 2


def test_eval_vtab_end_to_end_writes_table_json_csv_and_chart(tmp_path, checkpoint):
    # toy_natural: class 1 has no support example, so its two query examples are wrong: 4 of 6 right.
    write_task(tmp_path / "data", "toy_natural", "natural", [0, 2, 3, 0, 2, 3, 0, 2], [3, 0, 2, 1, 1, 0])
    write_task(tmp_path / "data", "toy_structured", "structured", SUPPORT, [2, 2, 0])
    out = tmp_path / "out"
    result = _eval(tmp_path / "data", checkpoint, out, "--num-workers", "2")
    assert result.exit_code == 0, result.output
    assert "toy_natural" in result.output and "overall" in result.output  # the rich table
    payload = json.loads((out / "vtab_results.json").read_text())
    tasks = payload["tasks"]
    assert list(tasks) == ["toy_natural", "toy_structured"]
    assert [(t["correct"], t["scored"], t["support_size"]) for t in tasks.values()] == [(4, 6, 8), (3, 3, 8)]
    assert payload["means"] == pytest.approx({"natural": 400 / 6, "specialized": None, "structured": 100.0,
                                              "overall": (400 / 6 + 100) / 2})
    rows = (out / "vtab_results.csv").read_text().splitlines()
    assert rows[0].startswith("task,group,accuracy,correct,scored")
    assert [r.split(",")[:3] for r in rows[1:]] == [
        ["toy_natural", "natural", "66.6667"], ["toy_structured", "structured", "100.0000"],
        ["mean:natural", "natural", "66.6667"], ["mean:specialized", "specialized", ""],
        ["mean:structured", "structured", "100.0000"], ["mean:overall", "", "83.3333"]]
    assert (out / "vtab_results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _result(task, group, accuracy):
    return TaskResult(task, group, accuracy, 0, 1, 1, 1, (), 1.0, 1.0)


def test_means_are_over_tasks_per_group_and_overall():
    results = [_result("a", "natural", 50.0), _result("b", "natural", 100.0), _result("c", "structured", 30.0)]
    # overall = mean over the 3 tasks (60), not over the 2 group means (52.5); no specialized task: None
    assert group_means(results) == {"natural": 75.0, "specialized": None, "structured": 30.0, "overall": 60.0}


def test_a_class_missing_from_the_support_set_does_not_shift_the_other_labels(tmp_path, checkpoint, model):
    # class 1 has no support example: columns are (0, 2, 3); query classes 0, 2, 3 must still score 100 %.
    query = [0, 2, 3, 3, 2, 0, 3, 2]
    write_task(tmp_path / "data", "gap", "specialized", [0, 2, 3, 0, 2, 3, 0, 2], query)
    aligned = _run(tmp_path / "data", checkpoint, model, tmp_path / "aligned")["gap"]
    assert (aligned.accuracy, aligned.missing_classes) == (100.0, (1,))
    # The reference's misalignment: column k read as label k, right only for class 0 (column 0).
    quirk = _run(tmp_path / "data", checkpoint, model, tmp_path / "quirk", label_misalignment_quirk=True)["gap"]
    assert quirk.correct == query.count(0)


def test_every_query_example_is_scored_once_also_when_query_size_mod_chunk_is_1(tmp_path, checkpoint, model):
    query = [0, 1, 2, 3] * 10 + [2]  # 41 = 1 mod 40
    path = write_task(tmp_path / "data", "odd", "natural", SUPPORT, query)
    task = open_ordered_task(path)
    rows = torch.cat([b["rows"] for b in query_batches(task, OrderedLoaderConfig(image_size=8, num_workers=2))])
    assert rows.tolist() == task.query_rows.tolist() == list(range(8, 49))  # each once, in source order
    scored = _run(tmp_path / "data", checkpoint, model, tmp_path / "all")["odd"]
    assert (scored.scored, scored.correct, scored.query_size) == (41, 41, 41)
    # The reference's batch count drops the 41st example.
    quirk = _run(tmp_path / "data", checkpoint, model, tmp_path / "quirk", drop_last_query_quirk=True)["odd"]
    assert (quirk.scored, quirk.correct) == (40, 40)


def test_query_stream_decodes_at_most_one_batch_ahead(tmp_path, monkeypatch):
    path = write_task(tmp_path, "long", "natural", [0, 1], [c % 4 for c in range(23)])
    decoded = []
    real = engine.decode_resize_into
    monkeypatch.setattr(engine, "decode_resize_into", lambda *a, **k: (decoded.append(1), real(*a, **k)))
    task = open_ordered_task(path)
    cfg = OrderedLoaderConfig(image_size=8, batch_size=5, num_workers=0)
    sizes = []
    for k, batch in enumerate(query_batches(task, cfg)):
        assert len(decoded) == 5 * k + len(batch["images"])  # nothing decoded beyond the batch in hand
        sizes.append(len(batch["images"]))
    assert sizes == [5, 5, 5, 5, 3]


def _centre_colours(images: torch.Tensor, labels: torch.Tensor) -> bool:
    expected = torch.tensor([[c / 127.5 - 1 for c in _colour(int(label))] for label in labels])
    return torch.allclose(images[:, :, 4, 4], expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_held_batches_are_never_overwritten_and_released_ones_are_recycled(tmp_path, workers):
    path = write_task(tmp_path, "ring", "natural", [0, 1], [(c * 3) % 4 for c in range(23)])
    cfg = OrderedLoaderConfig(image_size=8, batch_size=2, num_workers=workers)  # 12 batches > buffers
    held = []
    for batch in query_batches(open_ordered_task(path), cfg):
        assert _centre_colours(batch["images"], batch["labels"])
        held.append(batch)
    assert all(_centre_colours(b["images"], b["labels"]) for b in held)  # every held batch still intact
    storages = {b["images"].untyped_storage().data_ptr() for b in held}
    assert len(storages) == len(held)  # none shared a buffer with another held batch
    recycled = {b["images"].untyped_storage().data_ptr() for b in query_batches(open_ordered_task(path), cfg)}
    assert len(recycled) < 12  # released batches give their buffers back


_REBUILT: list[str] = []  # shared-memory storages this process received from a worker (test below)
_REAL_REBUILD: dict = {}


def _counted_rebuild_fd(*args):  # module level: the forked workers pickle it by name
    _REBUILT.append("fd")
    return _REAL_REBUILD["rebuild_storage_fd"](*args)


def _counted_rebuild_filename(*args):
    _REBUILT.append("filename")
    return _REAL_REBUILD["rebuild_storage_filename"](*args)


def test_only_the_batch_index_crosses_the_worker_queue(tmp_path, monkeypatch):
    """Images are written in place into the shared slots; labels and rows are known in this process. A tensor
    (or array, which the DataLoader turns into one) in a worker's result would arrive through a new
    shared-memory segment and a descriptor handshake each, on every batch."""
    import torch.multiprocessing.reductions as reductions

    for name, counted in (("rebuild_storage_fd", _counted_rebuild_fd),
                          ("rebuild_storage_filename", _counted_rebuild_filename)):
        _REAL_REBUILD[name] = getattr(reductions, name)
        monkeypatch.setattr(reductions, name, counted)
    _REBUILT.clear()
    path = write_task(tmp_path, "ipc", "natural", [0, 1], [(c * 3) % 4 for c in range(23)])
    cfg = OrderedLoaderConfig(image_size=8, batch_size=2, num_workers=2)
    labels = []
    for batch in query_batches(open_ordered_task(path), cfg):
        assert _centre_colours(batch["images"], batch["labels"])
        labels += batch["labels"].tolist()
    assert labels == [(c * 3) % 4 for c in range(23)]
    assert _REBUILT == []


def test_support_block_is_read_once_in_order_with_labels(tmp_path):
    path = write_task(tmp_path, "sup", "natural", [3, 1, 0, 2, 2], [0])
    images, labels = read_support(open_ordered_task(path), OrderedLoaderConfig(image_size=8, batch_size=2,
                                                                               num_workers=2))
    assert labels.tolist() == [3, 1, 0, 2, 2] and images.shape == (5, 3, 8, 8)
    expected = torch.tensor([[c / 127.5 - 1 for c in _colour(label)] for label in [3, 1, 0, 2, 2]])
    assert torch.allclose(images[:, :, 4, 4], expected)


def test_lite_preprocess_is_pil_lanczos_then_totensor_normalize():
    from torchvision import transforms

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (13, 21, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    out = np.empty((3, 16, 16), np.float32)
    lite_resize_into(buf.getvalue(), out, 16)
    # LITE:src/tf_dataset_reader.py: PIL resize LANCZOS, ToTensor, Normalize(0.5, 0.5)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])(
        Image.fromarray(pixels).resize((16, 16), Image.LANCZOS))
    assert torch.equal(torch.from_numpy(out), reference)
    md = np.empty((3, 16, 16), np.float32)
    decode_resize_into(buf.getvalue(), md, 16)
    assert not np.allclose(md, out, atol=1e-2)  # the two preprocessings really differ


def test_resume_keeps_scored_tasks_and_scores_the_rest(tmp_path, checkpoint, model):
    data, out = tmp_path / "data", tmp_path / "out"
    write_task(data, "first", "natural", SUPPORT, [0, 1, 2])
    write_task(data, "second", "structured", SUPPORT, [3, 3])
    _run(data, checkpoint, model, out)
    # Mark the stored result of "first" (so a rescore would show) and forget "second".
    stored = out / "tasks" / "first.json"
    raw = json.loads(stored.read_text())
    raw["result"]["accuracy"] = 12.5
    stored.write_text(json.dumps(raw))
    (out / "tasks" / "second.json").unlink()
    result = _eval(data, checkpoint, out)
    assert result.exit_code == 1 and "--resume" in one_error_line(result.output)
    results = _run(data, checkpoint, model, out, resume=True)
    assert (results["first"].accuracy, results["second"].accuracy) == (12.5, 100.0)
    assert _tasks(out)["first"]["accuracy"] == 12.5 and (out / "tasks" / "second.json").is_file()
    # Other settings: the stored results do not count for them.
    result = _eval(data, checkpoint, out, "--resume", "--chunk-size", "8")
    assert result.exit_code == 1 and "chunk_size" in result.output


def test_bad_inputs_fail_with_one_line(tmp_path, checkpoint):
    path = write_task(tmp_path / "data", "broken", "natural", SUPPORT, [0, 1])
    result = _eval(tmp_path / "data", checkpoint, tmp_path / "o1", "--tasks", "nope")
    assert result.exit_code == 1 and "no converted VTAB task nope" in result.output
    shard = path / schema.shard_name("broken", 0)
    blob = bytearray(shard.read_bytes())
    blob[blob.rindex(b"IEND") - 20] ^= 0xFF  # inside the last image written to this shard
    shard.write_bytes(bytes(blob))
    result = _eval(tmp_path / "data", checkpoint, tmp_path / "o2", "--num-workers", "2")
    assert result.exit_code == 1
    error = one_error_line(result.output)  # progress lines may come before it; the error itself is one line
    assert "broken-000000.tar" in error and "crc32" in error
    assert result.exc_info is not None and not multiprocessing.active_children()  # workers stopped with the error
