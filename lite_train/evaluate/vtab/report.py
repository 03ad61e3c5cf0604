"""`TaskResult`s in, eval-vtab's outputs out: per-task result files (what `--resume` keeps), the group and
overall means, a rich table, `vtab_results.json`, `vtab_results.csv`, `vtab_results.png`.

Means follow VTAB: a group's mean is the mean of its tasks' accuracies, the overall mean the mean over all
tasks evaluated (not the mean of the group means); a group without tasks has mean None (empty in the CSV).
Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Sequence

from lite_train.files import atomic_write
from lite_train.evaluate.vtab.config import GROUPS, TaskResult, VtabEvalConfig

TASKS_DIR = "tasks"  # <out>/tasks/<task>.json: one scored task, with the settings it was scored under
RESULTS_JSON, RESULTS_CSV, RESULTS_PNG = "vtab_results.json", "vtab_results.csv", "vtab_results.png"
CSV_COLUMNS = ("task", "group", "accuracy", "correct", "scored", "query_size", "support_size", "missing_classes",
               "seconds", "images_per_s")


def task_result_path(out: Path, task: str) -> Path:
    return Path(out) / TASKS_DIR / f"{task}.json"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, fsync=True)


def write_task_result(path: Path, result: TaskResult, settings: dict) -> None:
    _atomic_write(path, (json.dumps({"settings": settings, "result": dataclasses.asdict(result)}, indent=1)
                         + "\n").encode())


def read_task_result(path: Path, settings: dict) -> TaskResult:
    """The result stored in `path`; ValueError naming the file if unreadable or scored under other settings."""
    try:
        raw = json.loads(Path(path).read_text())
        result = raw["result"]
        result["missing_classes"] = tuple(result["missing_classes"])
        stored = TaskResult(**result)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a task result of eval-vtab ({e}); delete it to score the task again") \
            from None
    changed = sorted(k for k in settings if raw["settings"].get(k) != settings[k])
    if changed:
        raise ValueError(f"{path}: scored with other {', '.join(changed)}; use another --out, or delete it to "
                         "score the task again")
    return stored


def group_means(results: Sequence[TaskResult]) -> dict[str, float | None]:
    """{"natural", "specialized", "structured", "overall"} -> mean accuracy % (None without tasks)."""
    def mean(values):
        return sum(values) / len(values) if values else None

    means = {g: mean([r.accuracy for r in results if r.group == g]) for g in GROUPS}
    means["overall"] = mean([r.accuracy for r in results])
    return means


def write_report(out: Path, results: Sequence[TaskResult], cfg: VtabEvalConfig,
                 image_size: int) -> tuple[Path, Path, Path]:
    """Write `vtab_results.json` (settings, tasks, means), `vtab_results.csv` (a row per task, then one per
    mean with the task column `mean:<group>`) and the chart `vtab_results.png`."""
    out = Path(out)
    means = group_means(results)
    payload = {"settings": {**dataclasses.asdict(cfg), "image_size": image_size}, "tasks": {r.task: dataclasses.asdict(r) for r in results},
               "means": means}
    _atomic_write(out / RESULTS_JSON, (json.dumps(payload, indent=1) + "\n").encode())
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in results:
        row = dataclasses.asdict(r)
        row["missing_classes"] = " ".join(map(str, r.missing_classes))
        row["accuracy"] = f"{r.accuracy:.4f}"
        writer.writerow([row[c] for c in CSV_COLUMNS])
    for name, value in means.items():
        writer.writerow([f"mean:{name}", name if name in GROUPS else "", "" if value is None else f"{value:.4f}"]
                        + [""] * (len(CSV_COLUMNS) - 3))
    _atomic_write(out / RESULTS_CSV, text.getvalue().encode())
    _atomic_write(out / RESULTS_PNG, _chart(results, means, f"{Path(cfg.checkpoint).name}, {image_size} px, "
                                                            f"preprocess {cfg.preprocess}"))
    return out / RESULTS_JSON, out / RESULTS_CSV, out / RESULTS_PNG


def _chart(results: Sequence[TaskResult], means: dict[str, float | None], title: str) -> bytes:
    """PNG bytes: a bar per task coloured by group, then the group and overall means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"natural": "tab:green", "specialized": "tab:orange", "structured": "tab:blue", "overall": "tab:gray"}
    bars = [(r.task, r.accuracy, colours[r.group]) for r in results]
    bars += [(f"mean {g}", v, colours[g]) for g, v in means.items() if v is not None]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(bars) + 1.5), 4.2))
    ax.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def print_table(results: Sequence[TaskResult], cfg: VtabEvalConfig, image_size: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"VTAB accuracy %: {Path(cfg.checkpoint).name}, {image_size} px, {cfg.preprocess}")
    table.add_column("task", no_wrap=True, min_width=max([len(r.task) for r in results] + [4]))
    for column in ("group", "accuracy", "scored", "missing", "images/s"):
        table.add_column(column, justify="left" if column == "group" else "right", no_wrap=True)
    for i, r in enumerate(results):
        table.add_row(r.task, r.group, f"{r.accuracy:.1f}", str(r.scored), str(len(r.missing_classes)),
                      f"{r.images_per_s:.0f}", end_section=i == len(results) - 1)
    for name, value in group_means(results).items():  # "missing": classes without a support example
        table.add_row("mean", name, "-" if value is None else f"{value:.1f}", "", "", "")
    console = Console()
    # Not a terminal (a log, a pipe): rich would assume 80 columns and truncate the task ids.
    (console if console.is_terminal else Console(width=120)).print(table)
