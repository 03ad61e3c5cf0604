"""Converted VTAB tasks (ordered sources) + a LITE model in, one `TaskResult` per task out: the reference's
test path (reference lite.md §5) with the support set read once and the query set streamed.

Per task: the support block is read (`lite_train.data.ordered.read_support`), embedded by the set encoder in
chunks, mean-pooled into the task embedding, turned into FiLM parameters; the support features (in chunks)
configure the classifier once (`LiteModel.fit_classifier`); then the query set streams in source order in
batches of `chunk_size` and each batch is featurised and scored (`LiteModel.features`, `.classify`), so
memory is bounded by the chunk size. These are `LiteModel`'s own pieces, the ones `predict_details` chains.

Two reference quirks, off by default here (the issue asks for the corrected behaviour; docs/fidelity.md E1, E2):
- `label_misalignment_quirk`: the reference takes the argmax column as the label, but column k is the k-th
  smallest label present in the support set, so a class missing from it shifts every higher label. Here the
  column is mapped back to its label id (`ClassStats.classes`).
- `drop_last_query_quirk`: the reference's query batch count is one short when the query size mod the chunk
  size is 1, so its last query example is never scored. Here every query example is scored exactly once.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from lite_train.data.ordered import OrderedLoaderConfig, OrderedTask, open_ordered_task, query_batches, read_support
from lite_train.model.model_file import read_model_file
from lite_train.progress import Progress
from lite_train.runtime import torch_threads
from lite_train.evaluate.vtab.config import GROUPS, TaskResult, VtabEvalConfig
from lite_train.evaluate.vtab.report import print_table, read_task_result, task_result_path, write_report, write_task_result
from manifests import schema
from manifests.reader import ManifestError, find_sources

def scored_query_count(query_size: int, chunk_size: int, drop_last_query_quirk: bool) -> int:
    """How many query examples are scored: all, or with the quirk one fewer when query_size mod chunk_size is
    1 (the reference's batch count ceil(M / B) - 1 with full batches of B; M = 1 is kept, as no batch could
    then be dropped without scoring nothing)."""
    if drop_last_query_quirk and query_size > 1 and query_size % chunk_size == 1:
        return query_size - 1
    return query_size


def task_group(task: OrderedTask) -> str:
    """The task's VTAB group from source.json (`extra.group`); ManifestError naming the file otherwise."""
    group = task.reader.info.extra.get("group")
    if group not in GROUPS:
        raise ManifestError(f"{task.reader.path / schema.SOURCE_FILE}: extra.group is {group!r}, not one of {GROUPS}")
    return group


def find_tasks(data: str | Path, tasks: Sequence[str] = (), protocol: str | None = None) -> list[Path]:
    """Folders of the ordered sources under `data` named in `tasks` (all if empty), in VTAB group order then
    the order given (or by name). ValueError if a task is missing or converted under several protocols;
    ManifestError if an ordered source has no VTAB group in source.json."""
    found: dict[str, list[Path]] = {}
    groups: dict[Path, str] = {}
    for path in find_sources(data):
        info = schema.SourceInfo.from_json((path / schema.SOURCE_FILE).read_text(), origin=str(path))
        if info.layout != "ordered" or (protocol is not None and (info.tfds is None or info.tfds.protocol != protocol)):
            continue
        found.setdefault(path.name, []).append(path)
        groups[path] = info.extra.get("group")
    names = list(tasks) or sorted(found)
    missing = [t for t in names if t not in found]
    if missing:
        raise ValueError(f"{data}: no converted VTAB task {', '.join(missing)}"
                         + (f" (protocol {protocol})" if protocol else "")
                         + f"; found: {', '.join(sorted(found)) or 'none'}")
    several = [t for t in names if len(found[t]) > 1]
    if several:
        where = ", ".join(f"{p.parent.name}/{p.name}" for t in several for p in found[t])
        raise ValueError(f"{data}: {', '.join(several)} converted more than once ({where}); pass --protocol")
    paths = [found[t][0] for t in names]
    for path in paths:  # checked here, before any task is scored
        if groups[path] not in GROUPS:
            raise ManifestError(f"{path / schema.SOURCE_FILE}: extra.group is {groups[path]!r}, not one of {GROUPS}")
    rank = {g: i for i, g in enumerate(GROUPS)}
    return sorted(paths, key=lambda p: (rank[groups[p]], names.index(p.name)))


def evaluate_task(model: torch.nn.Module, task: OrderedTask, cfg: VtabEvalConfig, device: torch.device,
                  image_size: int, on_images: Callable[..., None] = lambda n, **metrics: None) -> TaskResult:
    """Score every query example of `task` (module docstring) at `image_size`; `on_images(n, acc=...)` after
    each n images read (acc: the running query accuracy)."""
    start = time.perf_counter()
    loader_cfg = OrderedLoaderConfig(image_size=image_size, batch_size=cfg.chunk_size,
                                     preprocess=cfg.preprocess, num_workers=cfg.num_workers)
    group = task_group(task)
    support_images, support_labels = read_support(task, loader_cfg)  # (N, 3, S, S), (N,)
    on_images(len(support_labels))
    num_classes = task.reader.info.num_classes
    missing = tuple(sorted(set(range(num_classes)) - set(support_labels.tolist())))
    count = scored_query_count(len(task.query_rows), cfg.chunk_size, cfg.drop_last_query_quirk)
    correct = scored = 0
    model.eval()
    with torch.no_grad():
        support_images = support_images.to(device, non_blocking=True)
        embeddings = model.set_encoder_embeddings(support_images, cfg.chunk_size)  # (N[+1], 64)
        film = model.film_params(embeddings.mean(dim=0, keepdim=True))  # from the (1, 64) task embedding
        features = model.features_by_chunks(support_images, film, cfg.chunk_size)  # (N, 1280)
        stats = model.fit_classifier(features, support_labels.to(device))  # columns = stats.classes (K,)
        del support_images, features
        column_label = stats.classes.cpu()  # (K,) label id of each logit column
        for batch in query_batches(task, loader_cfg, count):
            logits = model.classify(stats, model.features(batch["images"].to(device, non_blocking=True), film))
            column = logits.argmax(dim=1).cpu()  # (b,)
            predicted = column if cfg.label_misalignment_quirk else column_label[column]  # (b,) label ids
            correct += int((predicted == batch["labels"]).sum())
            scored += len(column)
            on_images(len(column), acc=correct / scored)
    if scored != count:
        raise RuntimeError(f"{task.reader.path}: scored {scored} query examples, expected {count}")
    seconds = time.perf_counter() - start
    return TaskResult(task=task.name, group=group, accuracy=100.0 * correct / scored, correct=correct,
                      scored=scored, query_size=len(task.query_rows), support_size=len(support_labels),
                      missing_classes=missing, seconds=seconds,
                      images_per_s=(len(support_labels) + scored) / max(seconds, 1e-9))


def scoring_settings(cfg: VtabEvalConfig, task_path: Path, image_size: int) -> dict:
    """What a task's score depends on; a resumed run keeps a stored result only if these are equal."""
    return {"checkpoint_sha256": _sha256(Path(cfg.checkpoint)),
            "source_sha256": _sha256(task_path / schema.SOURCE_FILE),
            "image_size": image_size, "chunk_size": cfg.chunk_size, "preprocess": cfg.preprocess,
            "label_misalignment_quirk": cfg.label_misalignment_quirk,
            "drop_last_query_quirk": cfg.drop_last_query_quirk}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_eval_vtab(cfg: VtabEvalConfig, *, progress: bool | None = None, model: torch.nn.Module | None = None
                  ) -> list[TaskResult]:
    """Evaluate every task of `cfg` (skipping, with `resume`, those already scored in `cfg.out` under the same
    settings), then print the table and write JSON, CSV and PNG (`report.write_report`). `model`: an
    already loaded model instead of building `cfg.checkpoint`'s (which is read all the same: its hash keys the
    stored results, its image size is the default).

    Raises:
        ValueError: no VTAB task under `cfg.data`, an unreadable model file, a stored result of other settings.
    """
    with torch_threads(cfg.threads, cfg.num_workers):
        out = Path(cfg.out)
        paths = find_tasks(cfg.data, cfg.tasks, cfg.protocol)
        if not paths:
            raise ValueError(f"{cfg.data}: no converted VTAB task (ordered source"
                             + (f" of protocol {cfg.protocol}" if cfg.protocol else "")
                             + ") under it; convert some with lite-convert vtab --out")
        model_file = read_model_file(cfg.checkpoint)
        image_size, note = model_file.image_size(cfg.image_size)
        status = Progress("eval-vtab", 0, "images", live=False)
        if note:
            status.status(note)
        settings = {p.name: scoring_settings(cfg, p, image_size) for p in paths}
        stored = {}
        for path in paths:
            result_path = task_result_path(out, path.name)
            if result_path.exists():
                if not cfg.resume:
                    raise ValueError(f"{result_path}: a task result of an earlier run; pass --resume to keep it "
                                     "and score the rest, or choose another --out")
                stored[path.name] = read_task_result(result_path, settings[path.name])
        device = torch.device(cfg.device)
        if model is None and len(stored) < len(paths):
            model = model_file.build(device)
        results = []
        for path in paths:
            if path.name in stored:
                status.status(f"{path.name}: kept from {task_result_path(out, path.name)}")
                results.append(stored[path.name])
                continue
            task = open_ordered_task(path)
            total = len(task.support_rows) + scored_query_count(len(task.query_rows), cfg.chunk_size,
                                                                cfg.drop_last_query_quirk)
            with Progress(f"eval-vtab {task.name}", total, "images", live=progress, window=1) as view:
                result = evaluate_task(model, task, cfg, device, image_size, on_images=view.advance)
            task.reader.close()
            write_task_result(task_result_path(out, path.name), result, settings[path.name])
            results.append(result)
    print_table(results, cfg, image_size)
    write_report(out, results, cfg, image_size)
    return results
