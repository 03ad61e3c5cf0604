"""`lite-train`: command-line entry points; each parses flags and calls one library function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from lite_train.options import MAX_IMAGE_SIZE, config_command
from lite_train.runtime import DEVICE_HELP, resolve_device
from lite_train.train.config import TrainConfig
from lite_train.evaluate.predict import PredictConfig
from lite_train.train.pretrain_config import PretrainConfig
from lite_train.evaluate.testing import TestConfig
from lite_train.evaluate.vtab.config import VtabEvalConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="TF-free LITE runtime: episode sampling and loading, meta-training, testing, prediction.")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command()
def describe(
    spec: Optional[Path] = typer.Option(None, help="A Meta-Dataset dataset_spec.json (no images needed)."),
    dataset: Optional[str] = typer.Option(None, help="A spec shipped with lite-train instead of --spec: omniglot, "
                                                     "ilsvrc_2012, aircraft, ... (manifests/md_specs/)."),
    data: Optional[Path] = typer.Option(None, help="Root of converted sources (instead of --spec)."),
    source: Optional[str] = typer.Option(None, help="Source name under --data, e.g. omniglot."),
    split: str = typer.Option("train", help="train | valid | test"),
    seed: int = typer.Option(0, help="As MD's sampling.RNG.seed(seed) before the sampler is built."),
    count: int = typer.Option(10, min=1, help="Number of episodes."),
    ignore_hierarchy: bool = typer.Option(False, help="Ignore the ImageNet DAG / Omniglot alphabets."),
    view: str = typer.Option("md-v1", help="Class-split view: md-v1 (the spec as converted) or md-v2 (LITE's)."),
) -> None:
    """Print K episode descriptions as JSON lines: [[class id in split, support shots, query shots], ...]."""
    from lite_train.data.describe import describe as describe_episodes
    from manifests import ManifestError, open_source
    from manifests.md_spec import load_md_spec, load_shipped_spec, spec_view

    try:
        if (spec is not None) + (dataset is not None) + (data is not None) != 1:
            _fail("give one of --spec, --dataset, or --data with --source")
        if spec is not None:
            md_spec = spec_view(load_md_spec(spec), view)
        elif dataset is not None:
            md_spec = spec_view(load_shipped_spec(dataset), view)
        else:
            if source is None:
                _fail("--data needs --source")
            from lite_train.data.episodes import sampling_spec
            md_spec = sampling_spec(open_source(data, source), view)
        for episode in describe_episodes(md_spec, split, seed, count, ignore_hierarchy):
            sys.stdout.write(json.dumps(episode, separators=(",", ":")) + "\n")
    except (ValueError, ManifestError) as e:
        _fail(str(e))


@app.command()
def episodes(
    data: Path = typer.Option(..., help="Root of converted sources."),
    source: str = typer.Option(..., help="Source name, e.g. omniglot."),
    split: str = typer.Option("test", help="train | valid | test"),
    seed: int = typer.Option(0),
    n: int = typer.Option(3, min=1, help="Number of episodes to draw."),
    image_size: int = typer.Option(84, min=8),
    order: str = typer.Option("md", help="Per-pass image order: md | uniform."),
    view: str = typer.Option("md-v1", help="Class-split view: md-v1 (the spec as converted) or md-v2 (LITE's)."),
    out: Path = typer.Option(Path("episodes.png"), help="Where to write the picture (PNG)."),
) -> None:
    """Draw sampled episodes as a labelled image grid: support per class on the left, query on the right."""
    from lite_train.data.episode_grid import render_episodes
    from lite_train.data.loader import EpisodeLoaderConfig, make_episode_loader
    from manifests import ManifestError

    if image_size > MAX_IMAGE_SIZE:
        _fail(f"--image-size {image_size}: at most {MAX_IMAGE_SIZE} pixels a side (MD and LITE use 84 or 224)")
    _check_writable_file(out, "--out")
    cfg = EpisodeLoaderConfig(data=str(data), sources=(source,), split=split, seed=seed,
                              image_size=image_size, order=order, view=view, num_episodes=n,
                              num_workers=0)
    try:
        with make_episode_loader(cfg) as loader:
            drawn = list(loader)
            reader = loader.readers[0]
            names = dict(zip(reader.classes["class_id"].to_pylist(), reader.classes["name"].to_pylist()))
        picture = render_episodes(drawn, names)
        _write_atomic(out, lambda f: picture.save(f, format="PNG"))
    except (ValueError, ManifestError) as e:
        _fail(str(e))
    for ep in drawn:
        typer.echo(f"episode {ep['index']}: {ep['source']}, {int(ep['support_labels'].max()) + 1} ways, "
                   f"{len(ep['support_labels'])} support, {len(ep['query_labels'])} query")
    typer.echo(f"wrote {out}")



def _check_writable_file(path: Path, flag: str) -> None:
    """Fail (one line) unless `path` can be written as a file: not a folder, under a writable folder."""
    import os

    if path.is_dir():
        _fail(f"{flag} {path}: is a folder; give a file name, e.g. {path / 'episodes.png'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        _fail(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        _fail(f"{flag} {path}: {parent} is not writable")


def _write_atomic(path: Path, write) -> None:
    """`write(file)` to `path` via a temporary file and rename; on failure, leave nothing behind (not even
    the folders created for it) and fail with one line."""
    import os

    created = []
    folder = path.parent
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        _fail(f"{path}: cannot write: {e.strerror or e}")


@config_command(app, "pretrain", PretrainConfig)
def pretrain(values: dict,
             device: str = typer.Option("auto", help=DEVICE_HELP),
             resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint.pt (same "
                                                     "settings).")) -> None:
    """Pretrain the EfficientNet-B0 backbone with cross-entropy on the training classes of --sources (as
    Meta-Dataset's batch baselines pretrain on ImageNet's): writes <out>/backbone.pt for `lite-train train
    --backbone-weights`. Ctrl-C / SIGTERM write a checkpoint before exiting."""
    from lite_train.train.pretraining import pretrain as run_pretrain

    with _one_line_errors():
        cfg = PretrainConfig(**values, device=resolve_device(device))
        result = run_pretrain(cfg, resume=resume)
    if not result.finished:
        typer.echo(f"stopped at batch {result.batches}; checkpoint written to {cfg.out}/checkpoint.pt "
                   "(continue with the same command plus --resume)")
        raise typer.Exit(130)
    held = "" if result.held_out_accuracy is None else f", held-out accuracy {result.held_out_accuracy:.1f} %"
    curves = f" (curves: {cfg.out}/curves.png)" if result.batches else " (random: BN statistics only)"
    typer.echo(f"pretrained {result.batches} batches{held}; backbone in {result.backbone}{curves}")


@config_command(app, "train", TrainConfig)
def train(values: dict,
          device: str = typer.Option("auto", help=DEVICE_HELP),
          resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint.pt (same "
                                                  "settings).")) -> None:
    """Meta-train LITE on converted sources; Ctrl-C / SIGTERM write a checkpoint before exiting."""
    from lite_train.train.config import resolve_train_config
    from lite_train.train.loop import train as run_train

    with _one_line_errors():
        cfg, notes = resolve_train_config(values, resolve_device(device, values.get("tf32", False)))
        for note in notes:
            typer.echo(note, err=True)
        result = run_train(cfg, resume=resume)
    if not result.finished:
        typer.echo(f"stopped at task {result.iteration}; checkpoint written to {cfg.out}/checkpoint.pt "
                   f"(continue with the same command plus --resume)")
        raise typer.Exit(130)
    typer.echo(f"trained {result.iteration} tasks; models in {cfg.out} (curves: {cfg.out}/curves.png)")


@config_command(app, "test", TestConfig)
def test(values: dict, device: str = typer.Option("auto", help=DEVICE_HELP)) -> None:
    """Test models on the same seeded episodes: accuracy mean ± 1.96·std/√n per source and model, and the
    paired gain of each model over the one before it (table, JSON, PNG chart)."""
    from lite_train.evaluate.testing import run_test

    with _one_line_errors():
        cfg = TestConfig(**values, device=resolve_device(device, values.get("tf32", False)))
        run_test(cfg)
    typer.echo(f"wrote {cfg.out}/test_results.json and {cfg.out}/test_results.png")


@config_command(app, "predict", PredictConfig)
def predict(values: dict, device: str = typer.Option("auto", help=DEVICE_HELP)) -> None:
    """Classify the query images with the classes shown in the support folder."""
    import dataclasses

    import torch

    from lite_train.model.model_file import read_model_file
    from lite_train.runtime import torch_threads
    from lite_train.evaluate.predict import predict_folders, print_predictions, write_predictions

    with _one_line_errors():
        cfg = PredictConfig(**values, device=resolve_device(device, values.get("tf32", False)))
        cfg.check_output()
        with torch_threads(cfg.threads, 0):  # reading the file checks every tensor: --threads counts there too
            model_file = read_model_file(cfg.checkpoint)
            size, note = model_file.image_size(cfg.image_size)
            if note:
                typer.echo(note, err=True)
            model = model_file.build(cfg.device)
            names, files, scores, hidden = predict_folders(model, Path(cfg.support), Path(cfg.query), size,
                                                           torch.device(cfg.device), cfg.chunk_size)
        write_predictions(Path(cfg.out), names, files, scores, {"config": dataclasses.asdict(cfg), "image_size": size,
                                                                "model": model_file.meta})
    print_predictions(names, files, scores)
    typer.echo(f"wrote {cfg.out} ({len(files)} queries, {len(names)} classes, {size} px"
               + (f"; {hidden} hidden files ignored)" if hidden else ")"))


@config_command(app, "eval-vtab", VtabEvalConfig)
def eval_vtab(values: dict, device: str = typer.Option("auto", help=DEVICE_HELP)) -> None:
    """Evaluate a model on converted VTAB tasks: per-task accuracy and group means (table, JSON, CSV, PNG)."""
    from lite_train.evaluate.vtab import run_eval_vtab

    with _one_line_errors():
        cfg = VtabEvalConfig(**values, device=resolve_device(device, values.get("tf32", False)))
        run_eval_vtab(cfg)
    typer.echo(f"wrote {cfg.out}/vtab_results.json, .csv and .png")


@app.command()
def plot(runs: list[Path] = typer.Argument(..., help="Run folders of lite-train train or pretrain."),
         out: Path = typer.Option(Path("curves.png"), help="PNG to write.")) -> None:
    """Draw the training curves of one or several runs (overlaid): loss and accuracy, smoothed, with the
    validation points."""
    from lite_train.train.curves import plot_runs

    with _one_line_errors():
        plot_runs(runs, out)
    typer.echo(f"wrote {out}")


class _one_line_errors:
    """Context manager: a ValueError (ManifestError included) or OSError becomes `error: <one line>`, exit 1."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, ValueError):
            text = _last_line(error)
        elif isinstance(error, OSError):
            from lite_train.files import write_error

            text = str(write_error(Path(error.filename), error)) if error.filename else str(error)
        else:
            return False
        typer.echo(f"error: {text}", err=True)
        raise typer.Exit(1)


def _last_line(e: Exception) -> str:
    """One line for an error; a DataLoader worker's re-raised error carries the worker's traceback, whose last
    line is `<Type>: <message>`."""
    text = str(e).strip()
    if "Original Traceback" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(e).__name__


def main() -> None:
    app()


if __name__ == "__main__":
    main()
