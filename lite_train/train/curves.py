"""Run folders in, `curves.png` out: training loss and accuracy against tasks (meta-training) or batches
(pretraining), smoothed, per source, with the validation points; several runs overlaid (`lite-train plot`).

The kind of a run is read from its metrics.csv header (`train`: task, source, ...; `pretrain`: batch,
epoch, ...). Smoothing is a trailing moving mean over max(1, n / 25) rows; the raw values are drawn faintly
behind it. Training accuracy is shown in % like the validation accuracy.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from lite_train.files import atomic_write
from lite_train.train.logs import METRICS_COLUMNS, METRICS_FILE, PRETRAIN_METRICS_COLUMNS, VALIDATION_FILE

CURVES_FILE = "curves.png"


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return (rows[0], rows[1:]) if rows else ([], [])


class RunCurves:
    """One run folder's logged values."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        header, rows = _read(self.folder / METRICS_FILE)
        if tuple(header) == METRICS_COLUMNS:
            self.kind, self.unit = "train", "tasks"
            self.x = np.array([int(r[0]) for r in rows], np.int64)
            self.source = np.array([r[1] for r in rows])
            self.loss = np.array([float(r[5]) for r in rows])
            self.accuracy = 100 * np.array([float(r[6]) for r in rows])
        elif tuple(header) == PRETRAIN_METRICS_COLUMNS:
            self.kind, self.unit = "pretrain", "batches"
            self.x = np.array([int(r[0]) for r in rows], np.int64)
            self.source = np.array(["training batches"] * len(rows))
            self.loss = np.array([float(r[2]) for r in rows])
            self.accuracy = 100 * np.array([float(r[3]) for r in rows])
        else:
            raise ValueError(f"{self.folder / METRICS_FILE}: not the metrics of a lite-train train or pretrain run")
        vheader, vrows = _read(self.folder / VALIDATION_FILE)
        # (x, label, accuracy %): per source for train; held out (running / recomputed BN) for pretrain
        if self.kind == "train":
            self.validation = [(int(r[0]), r[1], float(r[2])) for r in vrows]
        else:
            self.validation = [(int(r[0]), "held out" if r[5] == "running" else "held out, final BN", float(r[2]))
                               for r in vrows]

    @property
    def name(self) -> str:
        return self.folder.name


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving mean (the first window - 1 points average what there is)."""
    if len(values) == 0:
        return values
    sums = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    i = np.arange(1, len(values) + 1)
    start = np.maximum(0, i - window)
    return (sums[i] - sums[start]) / (i - start)


def _window(n: int) -> int:
    return max(1, n // 25)


def plot_runs(folders: Sequence[str | Path], out: str | Path) -> Path:
    """Draw one or several runs into `out` (PNG): a single run per source, several runs one colour each.

    Raises:
        ValueError: a folder is not a run, or runs of both kinds (tasks and batches do not share an axis).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [RunCurves(f) for f in folders]
    kinds = {r.kind for r in runs}
    if len(kinds) > 1:
        raise ValueError("cannot overlay pretrain and train runs (batches and tasks are different axes); "
                         "plot them separately")
    unit = runs[0].unit
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = []
    for r, run in enumerate(runs):
        groups = sorted(set(run.source.tolist())) if len(runs) == 1 else [None]
        for g, group in enumerate(groups):
            colour = colours[(g if len(runs) == 1 else r) % len(colours)]
            mask = np.ones(len(run.x), bool) if group is None else run.source == group
            label = group if len(runs) == 1 else run.name
            w = _window(int(mask.sum()))
            for ax, values in ((ax_loss, run.loss[mask]), (ax_acc, run.accuracy[mask])):
                ax.plot(run.x[mask], values, ".", color=colour, alpha=0.12, markersize=2)
                line, = ax.plot(run.x[mask], smooth(values, w), "-", color=colour, label=label)
            lines.append(line)
        extra = len(groups)  # validation labels that are not training groups get the next colours
        for label in sorted({lab for _, lab, _ in run.validation}):
            if len(runs) > 1:
                colour = colours[r % len(colours)]
            elif label in groups:
                colour = colours[groups.index(label) % len(colours)]
            else:
                colour, extra = colours[extra % len(colours)], extra + 1
            points = [(x, acc) for x, lab, acc in run.validation if lab == label]
            final = "final" in label
            ax_acc.plot(*zip(*points), "*" if final else "o", color=colour, markersize=10 if final else 6,
                        markeredgecolor="black", linestyle="none" if final else "--",
                        label=f"{label} (validation)" if len(runs) == 1 else f"{run.name}: {label}")
    positive = np.concatenate([run.loss for run in runs])
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if len(positive) and positive.max() > 20 * positive.min():
        ax_loss.set_yscale("log")
    ax_loss.set_xlabel(unit)
    ax_loss.set_ylabel("training loss" + (" (log scale)" if ax_loss.get_yscale() == "log" else ""))
    ax_acc.set_xlabel(unit)
    ax_acc.set_ylabel("accuracy %")
    ax_acc.set_ylim(0, 100)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=7, loc="lower right")
    if len(runs) > 1 and ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=7)
    what = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    fig.suptitle(f"{what}: training curves (lines: trailing mean over 1/25 of the {unit}; dots: each value)",
                 fontsize=9)
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out


def write_curves(folder: str | Path) -> Path:
    """`<folder>/curves.png` for one run folder."""
    return plot_runs([folder], Path(folder) / CURVES_FILE)
