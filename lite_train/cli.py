"""`lite-train`: command-line entry points; each parses flags and calls one library function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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



MAX_IMAGE_SIZE = 1024


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


def _device(name: str, tf32: bool = False) -> str:
    """The torch device for --device; on CUDA also the float32 policy (`set_tf32`: off unless --tf32)."""
    import torch

    from lite_train.train.config import set_tf32

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        _fail(f"--device {name}: no CUDA device on this machine")
    if tf32 and not name.startswith("cuda"):
        _fail(f"--tf32: TF32 is a CUDA setting; the device is {name}")
    if name.startswith("cuda"):
        set_tf32(tf32)
    return name


def _names(text: Optional[str]) -> Optional[list[str]]:
    return None if not text else [s.strip() for s in text.split(",") if s.strip()]


@app.command()
def train(
    data: Path = typer.Option(..., help="Root of converted sources."),
    out: Path = typer.Option(..., help="Run folder (config.json, checkpoint.pt, metrics.csv, events, models)."),
    sources: Optional[str] = typer.Option(None, help="Training sources, comma-separated [default: the MD-v2 "
                                          "training sources present]."),
    val_sources: Optional[str] = typer.Option(None, help="Validation sources [default: the MD-v2 validation "
                                              "sources present]; 'none' disables validation."),
    view: str = typer.Option("md-v2", help="Class-split view: md-v2 (LITE's) | md-v1."),
    train_method: str = typer.Option("lite", help="lite | small_task | no_lite"),
    classifier: str = typer.Option("simple_cnaps", help="simple_cnaps (LITE) | protonets"),
    h: int = typer.Option(40, help="LITE: support images that carry gradients per query chunk."),
    chunk_size: int = typer.Option(40, help="Query chunk and no-grad pass size (the reference's --batch_size)."),
    tasks_per_step: int = typer.Option(16, help="Tasks per Adam step (gradient accumulation)."),
    learning_rate: float = typer.Option(1e-3),
    iterations: int = typer.Option(10_000, help="Training tasks in total."),
    image_size: int = typer.Option(224),
    max_way_train: int = typer.Option(50),
    max_support_train: int = typer.Option(500),
    max_query_train: int = typer.Option(10, help="Query images per class at most (MD's max_num_query)."),
    val_freq: int = typer.Option(5000, help="Validate every this many tasks (never after the last)."),
    val_episodes: int = typer.Option(200, help="Episodes per validation source."),
    lite_scale: bool = typer.Option(False, help="Multiply the H-subset gradient by N/H (the paper's "
                                    "estimator; docs/fidelity.md M3 says where it is unbiased)."),
    backbone_weights: Optional[Path] = typer.Option(None, help="EfficientNet-B0 weights [default: random]."),
    calibration_images: int = typer.Option(0, min=0, help="Random backbone: set its BN statistics from this "
                                           "many training images first."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:K (torchrun: each process its own GPU)."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast (CUDA only)."),
    tf32: bool = typer.Option(False, help="CUDA: TF32 float32 convolutions/matmuls (faster; moves LITE's "
                              "logits beyond float32 rounding, docs/fidelity.md)."),
    num_workers: int = typer.Option(2, min=0, help="Episode decode processes."),
    checkpoint_every: int = typer.Option(1000, help="Tasks between checkpoint.pt writes."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint.pt (same flags)."),
) -> None:
    """Meta-train LITE on converted sources; Ctrl-C / SIGTERM write a checkpoint before exiting."""
    import os

    from lite_train.train import MD_V2_TRAIN, MD_V2_VALID, TrainConfig, resolve_sources, train as run_train
    from manifests import ManifestError

    try:
        dev = _device(device, tf32)
        if dev == "cuda" and "LOCAL_RANK" in os.environ:
            dev = f"cuda:{os.environ['LOCAL_RANK']}"
        train_sources, missing = resolve_sources(data, _names(sources), MD_V2_TRAIN, "training")
        if missing:
            typer.echo(f"MD-v2 training sources not converted under {data} (training without them): "
                       f"{', '.join(missing)}", err=True)
        if not train_sources:
            _fail(f"{data}: none of the MD-v2 training sources is converted there; pass --sources")
        if val_sources == "none":
            valid = ()
        else:
            valid, missing = resolve_sources(data, _names(val_sources), MD_V2_VALID, "validation")
            if missing:
                typer.echo(f"MD-v2 validation sources not converted under {data} (validating without them): "
                           f"{', '.join(missing)}", err=True)
        cfg = TrainConfig(
            data=str(data), out=str(out), sources=train_sources, val_sources=tuple(valid), view=view,
            train_method=train_method, classifier=classifier, h=h, chunk_size=chunk_size,
            tasks_per_step=tasks_per_step, learning_rate=learning_rate, iterations=iterations,
            image_size=image_size, max_way_train=max_way_train, max_support_train=max_support_train,
            max_query_train=max_query_train, val_freq=val_freq, val_episodes=val_episodes, lite_scale=lite_scale,
            backbone_weights=None if backbone_weights is None else str(backbone_weights),
            calibration_images=calibration_images, seed=seed,
            device=dev, bf16=bf16, tf32=tf32, num_workers=num_workers, checkpoint_every=checkpoint_every)
        result = run_train(cfg, resume=resume, progress=sys.stderr.isatty())
    except (ValueError, ManifestError) as e:
        _fail(str(e))
    if not result.finished:
        typer.echo(f"stopped at task {result.iteration}; checkpoint written to {out}/checkpoint.pt "
                   f"(continue with the same command plus --resume)")
        raise typer.Exit(130)
    typer.echo(f"trained {result.iteration} tasks; models in {out}")


@app.command()
def test(
    checkpoint: Path = typer.Option(..., help="checkpoint.pt, fully_trained.pt, best_validation.pt or a LITE .pt."),
    data: Path = typer.Option(..., help="Root of converted sources."),
    sources: Optional[str] = typer.Option(None, help="Test sources [default: the MD-v2 test sources present]."),
    episodes: int = typer.Option(600, min=1, help="Episodes per source."),
    seed: int = typer.Option(0, help="Same seed, same episodes, same numbers."),
    image_size: Optional[int] = typer.Option(None, help="[default: the checkpoint's training size, else 224]"),
    chunk_size: int = typer.Option(40, help="Images per no-grad pass."),
    view: str = typer.Option("md-v2", help="Class-split view: md-v2 (LITE's) | md-v1."),
    identity_film_baseline: bool = typer.Option(False, help="Also test the same model with identity FiLM "
                                                "(untrained adaptation), side by side."),
    out: Path = typer.Option(Path("test-results"), help="Folder for test_results.json and test_results.png."),
    device: str = typer.Option("auto"),
    tf32: bool = typer.Option(False, help="CUDA: TF32 float32 convolutions/matmuls (docs/fidelity.md)."),
    num_workers: int = typer.Option(2, min=0),
) -> None:
    """Test a model: accuracy mean ± 1.96·std/√n per source (table, JSON, PNG chart)."""
    from lite_train.train import MD_V2_TEST, resolve_sources
    from lite_train.train.testing import run_test, saved_setting
    from manifests import ManifestError

    import torch

    try:
        test_sources, missing = resolve_sources(data, _names(sources), MD_V2_TEST, "test")
        if missing:
            typer.echo(f"MD-v2 test sources not converted under {data} (not tested): {', '.join(missing)}",
                       err=True)
        if not test_sources:
            _fail(f"{data}: none of the MD-v2 test sources is converted there; pass --sources")
        if not checkpoint.is_file():
            _fail(f"{checkpoint}: no such file")
        size = image_size or saved_setting(checkpoint, "image_size") or 224
        run_test(checkpoint, str(data), test_sources, episodes=episodes, seed=seed, image_size=size,
                 device=torch.device(_device(device, tf32)), chunk_size=chunk_size, num_workers=num_workers, out=out,
                 identity_film_baseline=identity_film_baseline, progress=sys.stderr.isatty(), view=view)
    except (ValueError, ManifestError) as e:
        _fail(str(e))
    typer.echo(f"wrote {out}/test_results.json and {out}/test_results.png")


@app.command()
def predict(
    checkpoint: Path = typer.Option(..., help="A trained model (checkpoint.pt, fully_trained.pt, LITE .pt)."),
    support: Path = typer.Option(..., help="Folder with one sub-folder of images per class."),
    query: Path = typer.Option(..., help="Folder of images to classify."),
    out: Path = typer.Option(Path("predictions.csv"), help="CSV: file, predicted class, score per class."),
    image_size: Optional[int] = typer.Option(None, help="[default: the checkpoint's training size, else 224]"),
    chunk_size: int = typer.Option(40),
    device: str = typer.Option("auto"),
    tf32: bool = typer.Option(False, help="CUDA: TF32 float32 convolutions/matmuls (docs/fidelity.md)."),
) -> None:
    """Classify the query images with the classes shown in the support folder."""
    import torch

    from lite_train.train.predict import predict_folders, print_predictions, write_predictions
    from lite_train.train.testing import load_model, saved_setting

    try:
        if not checkpoint.is_file():
            _fail(f"{checkpoint}: no such file")
        dev = torch.device(_device(device, tf32))
        size = image_size or saved_setting(checkpoint, "image_size") or 224
        model = load_model(checkpoint, dev)
        names, files, scores, hidden = predict_folders(model, support, query, size, dev, chunk_size)
        write_predictions(out, names, files, scores)
    except (ValueError, OSError) as e:
        _fail(str(e))
    print_predictions(names, files, scores)
    typer.echo(f"wrote {out} ({len(files)} queries, {len(names)} classes"
               + (f"; {hidden} hidden files ignored)" if hidden else ")"))


@app.command("eval-vtab")
def eval_vtab(
    data: Path = typer.Option(..., help="Root of converted sources (lite-convert vtab --out)."),
    checkpoint: Path = typer.Option(..., help="checkpoint.pt, fully_trained.pt, best_validation.pt or a LITE .pt."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated task ids; default: every converted task."),
    protocol: Optional[str] = typer.Option(None, help="Only tasks converted with this protocol: vtab1k | lite."),
    image_size: int = typer.Option(224, min=32, help="Side S of the model's input (the set encoder needs >= 32)."),
    chunk_size: int = typer.Option(40, min=2, help="Images per no-grad pass and per query batch."),
    preprocess: str = typer.Option("md", help="md (TF1 bilinear) | lite (LITE's PIL LANCZOS resize)."),
    out: Path = typer.Option(Path("vtab-results"), help="Folder for vtab_results.{json,csv,png} and tasks/."),
    resume: bool = typer.Option(False, help="Keep the tasks already scored in --out, score the rest."),
    device: str = typer.Option("auto"),
    tf32: bool = typer.Option(False, help="CUDA: TF32 float32 convolutions/matmuls (docs/fidelity.md)."),
    num_workers: int = typer.Option(2, min=0, help="Decode worker processes."),
    label_misalignment_quirk: bool = typer.Option(False, help="Reference quirk: argmax column taken as the label "
                                                  "(wrong when a class is missing from the support set)."),
    drop_last_query_quirk: bool = typer.Option(False, help="Reference quirk: skip the last query example when "
                                               "the query size mod --chunk-size is 1."),
) -> None:
    """Evaluate a model on converted VTAB tasks: per-task accuracy and group means (table, JSON, CSV, PNG)."""
    from lite_train.vtab import VtabEvalConfig, run_eval_vtab
    from manifests import ManifestError

    if image_size > MAX_IMAGE_SIZE:
        _fail(f"--image-size {image_size}: at most {MAX_IMAGE_SIZE} pixels a side")
    if not checkpoint.is_file():
        _fail(f"{checkpoint}: no such file")
    try:
        cfg = VtabEvalConfig(data=str(data), checkpoint=str(checkpoint), out=str(out), tasks=tuple(_names(tasks) or ()),
                             protocol=protocol, image_size=image_size, chunk_size=chunk_size, preprocess=preprocess,
                             num_workers=num_workers, device=_device(device, tf32), resume=resume,
                             label_misalignment_quirk=label_misalignment_quirk,
                             drop_last_query_quirk=drop_last_query_quirk)
        run_eval_vtab(cfg, progress=sys.stderr.isatty())
    except (ValueError, ManifestError, OSError) as e:
        _fail(_last_line(e))
    typer.echo(f"wrote {out}/vtab_results.json, .csv and .png")


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
