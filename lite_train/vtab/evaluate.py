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

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from lite_train.data.ordered import OrderedLoaderConfig, OrderedTask, open_ordered_task, query_batches, read_support
from manifests import schema
from manifests.reader import ManifestError, find_sources

GROUPS = ("natural", "specialized", "structured")  # VTAB's task groups (source.json extra["group"])


@dataclasses.dataclass(frozen=True)
class VtabEvalConfig:
    """`lite-train eval-vtab` settings; one field per CLI flag."""

    data: str  # root of converted sources; tasks are the ordered sources under it
    checkpoint: str  # model file: lite-train checkpoint or plain state dict (LITE's releases)
    out: str = "vtab-results"  # folder for the results (and per-task results, for --resume)
    tasks: tuple[str, ...] = ()  # task ids (source names); empty = every ordered source under `data`
    protocol: str | None = None  # only sources converted with this protocol (source.json tfds.protocol)
    image_size: int = 224
    chunk_size: int = 40  # images per no-grad pass: set encoder, support features, query batch
    preprocess: str = "md"  # "md" (TF1 bilinear) | "lite" (LITE's PIL LANCZOS); lite_train.data.ordered
    num_workers: int = 2  # decode workers
    device: str = "cpu"
    resume: bool = False  # keep the tasks already scored in `out` (same settings) and score the rest
    label_misalignment_quirk: bool = False  # argmax column taken as the label (the reference; module doc)
    drop_last_query_quirk: bool = False  # skip the last query example when M mod chunk_size == 1 (the reference)

    def __post_init__(self):
        OrderedLoaderConfig(image_size=self.image_size, batch_size=self.chunk_size, preprocess=self.preprocess,
                            num_workers=self.num_workers)  # validates those fields
        if self.chunk_size < 2:
            raise ValueError(f"chunk_size must be at least 2, got {self.chunk_size}")


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """One task's score (a row of the output table)."""

    task: str  # task id (source name)
    group: str  # natural | specialized | structured
    accuracy: float  # % of scored query examples whose predicted label equals their label
    correct: int
    scored: int  # query examples scored
    query_size: int  # query examples in the source
    support_size: int
    missing_classes: tuple[int, ...]  # label ids with no support example (never predicted when aligned)
    seconds: float  # wall time of the task (read, embed, score)
    images_per_s: float  # (support + scored query images) / seconds


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
                  on_images: Callable[[int], None] = lambda n: None) -> TaskResult:
    """Score every query example of `task` (module docstring); `on_images(n)` after each n images read."""
    start = time.perf_counter()
    loader_cfg = OrderedLoaderConfig(image_size=cfg.image_size, batch_size=cfg.chunk_size,
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
            on_images(len(column))
    if scored != count:
        raise RuntimeError(f"{task.reader.path}: scored {scored} query examples, expected {count}")
    seconds = time.perf_counter() - start
    return TaskResult(task=task.name, group=group, accuracy=100.0 * correct / scored, correct=correct,
                      scored=scored, query_size=len(task.query_rows), support_size=len(support_labels),
                      missing_classes=missing, seconds=seconds,
                      images_per_s=(len(support_labels) + scored) / max(seconds, 1e-9))


def scoring_settings(cfg: VtabEvalConfig, task_path: Path) -> dict:
    """What a task's score depends on; a resumed run keeps a stored result only if these are equal."""
    return {"checkpoint_sha256": _sha256(Path(cfg.checkpoint)),
            "source_sha256": _sha256(task_path / schema.SOURCE_FILE),
            "image_size": cfg.image_size, "chunk_size": cfg.chunk_size, "preprocess": cfg.preprocess,
            "label_misalignment_quirk": cfg.label_misalignment_quirk,
            "drop_last_query_quirk": cfg.drop_last_query_quirk}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_eval_vtab(cfg: VtabEvalConfig, *, progress: bool = True, model: torch.nn.Module | None = None
                  ) -> list[TaskResult]:
    """Evaluate every task of `cfg` (skipping, with `resume`, those already scored in `cfg.out` under the same
    settings), then print the table and write JSON, CSV and PNG (`report.write_report`). `model`: an
    already loaded model instead of loading `cfg.checkpoint` (whose hash still keys the stored results)."""
    from lite_train.vtab.report import ProgressBars, print_table, read_task_result, task_result_path, \
        write_report, write_task_result

    out = Path(cfg.out)
    paths = find_tasks(cfg.data, cfg.tasks, cfg.protocol)
    settings = {p.name: scoring_settings(cfg, p) for p in paths}
    stored = {}
    for path in paths:
        result_path = task_result_path(out, path.name)
        if result_path.exists():
            if not cfg.resume:
                raise ValueError(f"{result_path}: a task result of an earlier run; pass --resume to keep it and "
                                 "score the rest, or choose another --out")
            stored[path.name] = read_task_result(result_path, settings[path.name])
    device = torch.device(cfg.device)
    if model is None and len(stored) < len(paths):
        from lite_train.train.testing import load_model  # torch.load(weights_only=True, map_location="cpu")

        model = load_model(cfg.checkpoint, device)
    results = []
    with ProgressBars(progress) as bars:
        for path in paths:
            if path.name in stored:
                results.append(stored[path.name])
                continue
            task = open_ordered_task(path)
            tick = bars.add(task.name, len(task.support_rows)
                            + scored_query_count(len(task.query_rows), cfg.chunk_size, cfg.drop_last_query_quirk))
            result = evaluate_task(model, task, cfg, device, on_images=tick)
            task.reader.close()
            write_task_result(task_result_path(out, path.name), result, settings[path.name])
            results.append(result)
    print_table(results, cfg)
    write_report(out, results, cfg)
    return results
