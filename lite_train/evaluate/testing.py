"""Model files + converted test sources in, `lite-train test`'s outputs out: a table, test_results.json and a
PNG chart of accuracy ± 95 % interval per source and model, every model on the same seeded episodes (each
episode decoded once), with the paired gain of each model over the one before it.

A model file is read once (`lite_train.model.model_file`): a checkpoint, a LITE state dict (ours carry their
image size and settings) or backbone weights alone (tested with identity FiLM: the plain backbone under the
Simple CNAPs head, e.g. a random or a pretrained backbone as baselines).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from lite_train.files import atomic_write
from lite_train.model.model_file import ModelFile, read_model_file
from lite_train.options import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_bounds, option
from lite_train.progress import Progress
from lite_train.runtime import THREADS_HELP, torch_threads
from lite_train.evaluate.episodes import SourceResult, episode_accuracies, paired_difference, summarise

RESULTS_JSON = "test_results.json"
RESULTS_PNG = "test_results.png"


@dataclasses.dataclass(frozen=True)
class TestConfig:
    """`lite-train test` settings (the CLI options are these fields); saved in test_results.json."""

    __test__ = False  # not a pytest test class

    checkpoint: tuple[str, ...] = option(..., "Model file, repeatable: checkpoint.pt, fully_trained.pt, "
                                              "best_validation.pt, a LITE .pt, or backbone weights "
                                              "(pretrain's backbone.pt: tested with identity FiLM).", repeat=True)
    data: str = option(..., "Root of converted sources.")
    labels: tuple[str, ...] = option((), "Column names, comma-separated, one per --checkpoint [default: from "
                                         "the file names].")
    sources: tuple[str, ...] = option((), "Test sources [default: the MD-v2 test sources present].")
    episodes: int = option(600, "Episodes per source.", min=1)
    seed: int = option(0, "Same seed, same episodes, same numbers.")
    image_size: int | None = option(None, "Image side [default: the size the models were trained at; 224 for "
                                          "files that do not say].", min=MIN_IMAGE_SIZE, max=MAX_IMAGE_SIZE)
    chunk_size: int = option(40, "Images per no-grad pass.", min=2)
    view: str = option("md-v2", "Class-split view: md-v2 (LITE's) | md-v1.")
    identity_film_baseline: bool = option(False, "Also test each meta-trained model with identity FiLM "
                                                 "(its backbone, not adapted), side by side.")
    out: str = option("test-results", "Folder for test_results.json and test_results.png.")
    device: str = option("cpu", "Resolved torch device.", cli=False)
    tf32: bool = option(False, "CUDA: TF32 float32 convolutions/matmuls (docs/fidelity.md M10).")
    threads: int = option(0, THREADS_HELP, min=0)
    num_workers: int = option(2, "Episode decode processes.", min=0)

    def __post_init__(self):
        check_bounds(self)
        if self.labels and len(self.labels) != len(self.checkpoint):
            raise ValueError(f"--labels: {len(self.labels)} names for {len(self.checkpoint)} --checkpoint files")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"--labels: names repeat ({', '.join(self.labels)})")


def _default_label(model: ModelFile, others: list[ModelFile]) -> str:
    name = model.path.parent.name or model.path.stem
    if sum(o.path.parent.name == model.path.parent.name for o in others) > 1:
        name = f"{name}/{model.path.name}"
    return f"{name} (identity FiLM)" if model.identity_film_only else name


def _image_size(cfg: TestConfig, files: list[ModelFile]) -> tuple[int, list[str]]:
    sizes = {f.image_size(cfg.image_size) for f in files}
    if len({size for size, _ in sizes}) > 1:
        raise ValueError("the models were trained at different image sizes ("
                         + ", ".join(f"{f.path}: {f.image_size(None)[0]} px" for f in files) + "); pass --image-size")
    (size, _), notes = next(iter(sizes)), [note for _, note in sizes if note]
    return size, notes


def run_test(cfg: TestConfig, progress: bool | None = None) -> dict[str, dict[str, SourceResult]]:
    """Evaluate every model of `cfg.checkpoint` on `cfg.episodes` test episodes per source (the same episodes
    for all); print the table, write the JSON and the chart. Returns {label: {source: SourceResult}}."""
    from lite_train.train.config import MD_V2_TEST, resolve_sources

    with torch_threads(cfg.threads, cfg.num_workers):
        status = Progress("test", 0, "episodes", live=False)
        sources, missing = resolve_sources(cfg.data, cfg.sources, MD_V2_TEST, "test")
        if missing:
            status.status(f"MD-v2 test sources not converted under {cfg.data} (not tested): {', '.join(missing)}")
        if not sources:
            raise ValueError(f"{cfg.data}: none of the MD-v2 test sources is converted there; pass --sources")
        files = [read_model_file(p) for p in cfg.checkpoint]
        size, notes = _image_size(cfg, files)
        for note in notes:
            status.status(note)
        labels = list(cfg.labels) or [_default_label(f, files) for f in files]
        device = torch.device(cfg.device)
        models = {}
        for label, f in zip(labels, files):
            if cfg.identity_film_baseline and not f.identity_film_only:
                models[f"{label}, identity FiLM"] = f.build(device, identity_film=True)
            models[label] = f.build(device)
        view = Progress("test", cfg.episodes * len(sources), "episodes", live=progress)
        last = list(models)[-1]
        accuracies = episode_accuracies(models, cfg.data, sources, "test", cfg.episodes, cfg.seed, size, device,
                                        chunk_size=cfg.chunk_size, num_workers=cfg.num_workers, view=cfg.view,
                                        on_episode=lambda source, scores: view.advance(1, acc=scores[last]))
        view.close()
    results = {label: {s: summarise(v) for s, v in per.items()} for label, per in accuracies.items()}
    names = list(results)
    paired = {f"{b} - {a}": {s: paired_difference(accuracies[a][s], accuracies[b][s]) for s in sources}
              for a, b in zip(names, names[1:])}
    meta = {"config": dataclasses.asdict(cfg), "image_size": size, "sources": list(sources),
            "files": {label: str(f.path) for label, f in zip(labels, files)}}
    print_table(results, paired, f"test accuracy % ± 95 % interval, {cfg.episodes} episodes per source, "
                                 f"{size} px, seed {cfg.seed}")
    write_results(Path(cfg.out), results, paired, meta)
    return results


def write_results(out: Path, results: dict[str, dict[str, SourceResult]], paired: dict[str, dict[str, SourceResult]],
                  meta: dict[str, Any]) -> tuple[Path, Path]:
    """`test_results.json` ({meta..., "models": {label: {source: {accuracy, confidence, n}}}, "paired":
    {"b - a": {source: ...}}}) and the chart."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "models": {label: {s: dataclasses.asdict(r) for s, r in per.items()}
                                  for label, per in results.items()},
               "paired": {pair: {s: dataclasses.asdict(r) for s, r in per.items()} for pair, per in paired.items()}}
    json_path, png_path = out / RESULTS_JSON, out / RESULTS_PNG
    atomic_write(json_path, json.dumps(payload, indent=1) + "\n")
    n = next(iter(next(iter(results.values())).values())).n
    _chart(png_path, results, f"{n} episodes per source, seed {meta['config']['seed']}, {meta['image_size']} px")
    return json_path, png_path


def _chart(path: Path, results: dict[str, dict[str, SourceResult]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    sources = list(next(iter(results.values())))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(sources) * len(labels) + 1.5), 3.6))
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(sources))]
        ax.bar(xs, [results[label][s].accuracy for s in sources], width,
               yerr=[results[label][s].confidence for s in sources], capsize=3, label=label)
    ax.set_xticks(range(len(sources)), sources, rotation=20)
    ax.set_ylabel("accuracy % (95 % interval)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def print_table(results: dict[str, dict[str, SourceResult]], paired: dict[str, dict[str, SourceResult]],
                title: str) -> None:
    """One row per source: every model's accuracy ± interval, then the paired gain of the last model over the
    one before it (same episodes; its interval is the gain's own)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("source")
    for label in results:
        table.add_column(label, justify="right")
    last_pair = list(paired)[-1] if paired else None
    if last_pair:
        table.add_column(f"gain: {last_pair} (paired)", justify="right")
    for source in next(iter(results.values())):
        cells = [f"{per[source].accuracy:.1f} ± {per[source].confidence:.1f}" for per in results.values()]
        if last_pair:
            gain = paired[last_pair][source]
            cells.append(f"{gain.accuracy:+.1f} ± {gain.confidence:.1f}")
        table.add_row(source, *cells)
    Console(width=max(100, 24 * (len(results) + 2))).print(table)
