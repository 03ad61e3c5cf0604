"""A model file + converted test sources in, `lite-train test`'s outputs out: a rich table, a JSON file and
a PNG chart of accuracy ± 95 % interval per source (optionally next to the same model with identity FiLM)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch

from lite_train.train.checkpoint import FORMAT, model_state_from_file
from lite_train.train.evaluate import SourceResult, evaluate

RESULTS_JSON = "test_results.json"
RESULTS_PNG = "test_results.png"


def load_model(path: str | Path, device: torch.device, identity_film: bool = False) -> torch.nn.Module:
    """A LiteModel with the weights in `path` (lite-train checkpoint or plain state dict, strict).

    identity_film: zero the FiLM generator's regularisers, so gamma = 1 and beta = 0 at every site
    (reference §1.4: gamma = 1 + g(z)·r_gamma, beta = b(z)·r_beta): the same backbone, not adapted.
    """
    from lite_train.model import LiteModel, ModelConfig

    model = LiteModel(ModelConfig(classifier=saved_setting(path, "classifier") or "simple_cnaps"))
    try:
        model.load_state_dict(model_state_from_file(path), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: does not fit the LITE model: {str(e).splitlines()[0]}") from None
    if identity_film:
        zero_film_regularisers(model)
    return model.to(device).eval()


def zero_film_regularisers(model: torch.nn.Module) -> int:
    """Set every `*_regularizers.*` parameter to 0 (identity FiLM); returns how many tensors were zeroed."""
    zeroed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_regularizers." in name:
                p.zero_()
                zeroed += 1
    if zeroed == 0:
        raise ValueError("the model has no FiLM regularizer parameters to zero")
    return zeroed


def saved_setting(path: str | Path, key: str):
    """A TrainConfig field stored in a lite-train checkpoint (None for plain state dicts)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and state.get("format") == FORMAT and "config" in state:
        return state["config"][key]
    return None


def write_results(out: Path, results: dict[str, dict[str, SourceResult]], meta: dict) -> tuple[Path, Path]:
    """`test_results.json` ({meta..., "models": {label: {source: {accuracy, confidence, n}}}}) and the chart."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "models": {label: {s: dataclasses.asdict(r) for s, r in per.items()}
                                  for label, per in results.items()}}
    json_path, png_path = out / RESULTS_JSON, out / RESULTS_PNG
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(json_path)
    _chart(png_path, results, f"{meta['episodes']} episodes per source, seed {meta['seed']}")
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
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(path)


def print_table(results: dict[str, dict[str, SourceResult]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("source")
    for label in results:
        table.add_column(label, justify="right")
    for source in next(iter(results.values())):
        table.add_row(source, *(f"{per[source].accuracy:.1f} ± {per[source].confidence:.1f}"
                                for per in results.values()))
    Console().print(table)


def run_test(checkpoint: str | Path, data: str, sources: Sequence[str], *, episodes: int, seed: int,
             image_size: int, device: torch.device, chunk_size: int, num_workers: int, out: Path,
             identity_film_baseline: bool = False, progress: bool = True,
             view: str = "md-v2") -> dict[str, dict[str, SourceResult]]:
    """Evaluate the model in `checkpoint` (and, if asked, the same model with identity FiLM) on `episodes`
    test episodes per source; print the table, write the JSON and the chart."""
    variants = {"model": False} if not identity_film_baseline else {"identity FiLM": True, "model": False}
    total = episodes * len(sources) * len(variants)
    results = {}
    with _Progress(progress, total) as tick:
        for label, identity in variants.items():
            model = load_model(checkpoint, device, identity_film=identity)
            results[label] = evaluate(model, data, sources, "test", episodes, seed, image_size, device,
                                      chunk_size=chunk_size, num_workers=num_workers, on_episode=tick, view=view)
    meta = {"checkpoint": str(checkpoint), "data": str(data), "episodes": episodes, "seed": seed,
            "image_size": image_size, "chunk_size": chunk_size, "view": view}
    print_table(results, f"{Path(checkpoint).name}: test accuracy % ± 95 % interval, {episodes} episodes")
    write_results(out, results, meta)
    return results


class _Progress:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda source: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(TextColumn("test {task.fields[source]}"), BarColumn(), MofNCompleteColumn())
        self.progress.start()
        bar = self.progress.add_task("test", total=self.total, source="")
        return lambda source: self.progress.update(bar, advance=1, source=source)

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()
