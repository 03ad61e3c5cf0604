"""`lite-convert` command line: flags in, one library call per command, a summary (or `error: ...`) out.

Commands: `md` (Meta-Dataset records -> shards), `mnist` (t10k idx -> shards), `vtab` (prepared TFDS
datasets -> one ordered source per VTAB task), `verify` (shards vs manifests),
`demo-data` (a small real-format MD records folder). Errors the converter detects are printed as one line
`error: <message>` on stderr with exit status 1.
"""

from __future__ import annotations

import functools
import gc
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from manifests import schema

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
_out = Console()
_err = Console(stderr=True)


_ONE_SHOT = False  # True when this process ends with the command (`main`), not in tests that invoke `app`


def _freeze_imports() -> None:
    """In a one-shot process, freeze what is imported by now (it lives until exit): the collector then never
    walks it again, neither in the collections a conversion triggers nor at interpreter exit, and forked
    workers inherit it frozen (BENCHMARKS.md, converter). Not in a process that goes on, such as pytest's."""
    if _ONE_SHOT:
        gc.freeze()


def _guard(fn):
    """Turn a converter error (ValueError, OSError) into `error: <one line>` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            message = " ".join(str(e).split("\n"))
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1) from None

    return wrapper


class _RateColumn(ProgressColumn):
    """records/s and MB read so far (the `bytes` task field)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed or 0.0
        return Text(f"{speed:,.0f} rec/s  {task.fields.get('bytes', 0) / 1e6:,.1f} MB", style="cyan")


def _summary_table(results) -> Table:
    table = Table(title="written")
    for column in ("source", "status", "classes", "samples", "shards", "MB", "seconds"):
        table.add_column(column, justify="left" if column in ("source", "status") else "right")
    for r in results:
        table.add_row(r.source, r.status, str(r.classes), str(r.samples), str(r.shards), f"{r.bytes / 1e6:,.1f}",
                      f"{r.seconds:.2f}")
    return table


# Meta-Dataset's episodes draw at least one support and one query image per class (variable shots); fixed
# shots need shots + query. lite_train's planner refuses a smaller class when it is built (naming it); the
# converter says so as soon as it writes one, instead of hours later at the first training run.
MIN_EPISODE_IMAGES = 2


def _warn_small_classes(out: Path, results) -> None:
    """One warning line per converted class with fewer than MIN_EPISODE_IMAGES images (reads classes.parquet
    with `ParquetFile.read`: `pq.read_table` would import pyarrow.dataset and pandas at every run)."""
    import pyarrow.parquet as pq

    columns = ["class_id", "name", "split", "num_images"]
    for r in results:
        table = pq.ParquetFile(Path(out) / r.source / schema.CLASSES_FILE).read(columns=columns)
        for class_id, name, split, count in zip(*(table[c].to_pylist() for c in columns)):
            if count < MIN_EPISODE_IMAGES:
                _err.print(f"warning: {r.source}: class {class_id} {name!r} ({split}) has {count} image(s); an MD "
                           f"episode needs at least {MIN_EPISODE_IMAGES} per class (fixed shots: shots + query), "
                           "so training or testing on its split will refuse it", markup=False, highlight=False,
                           soft_wrap=True)


# Options shared by the commands that write shards.
_MAX_SHARD_SAMPLES = typer.Option(schema.DEFAULT_MAX_SHARD_SAMPLES, help="Samples per shard at most.")
_MAX_SHARD_BYTES = typer.Option(schema.DEFAULT_MAX_SHARD_BYTES, help="Image bytes per shard at most.")
_FSYNC = typer.Option(False, "--fsync", help="Fsync every shard, manifest and folder before it counts, so the output "
                                             "also survives a power loss (a kill loses nothing without it).")


@app.command()
@_guard
def md(
    records: Path = typer.Option(..., help="Meta-Dataset records root (one folder per dataset)."),
    out: Path = typer.Option(..., help="Output root; sources go to <out>/md/<dataset>/."),
    datasets: str = typer.Option("", help="Comma-separated dataset folders (default: every one with a spec)."),
    workers: int | None = typer.Option(None, show_default="one per CPU core, at most 8",
                                help="Processes converting in parallel (also inside one dataset)."),
    max_shard_samples: int = _MAX_SHARD_SAMPLES,
    max_shard_bytes: int = _MAX_SHARD_BYTES,
    fsync: bool = _FSYNC,
):
    """Convert Meta-Dataset TFRecords into shards + manifests."""
    from convert.md import ConvertConfig, convert_planned, default_workers, plan_datasets

    _freeze_imports()

    config = ConvertConfig(records=str(records), out=str(out),
                           datasets=tuple(d for d in datasets.split(",") if d),
                           workers=default_workers() if workers is None else workers,
                           max_shard_samples=max_shard_samples,
                           max_shard_bytes=max_shard_bytes, fsync=fsync)
    plans = plan_datasets(config)
    columns = (TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
               TimeElapsedColumn())
    # No refresh thread: the converter forks its workers, and a process that forks must not run threads.
    with Progress(*columns, console=_err, auto_refresh=False) as progress:
        tasks = {p.name: progress.add_task(p.name, total=p.num_records, bytes=0) for p in plans}
        read_bytes = dict.fromkeys(tasks, 0)
        shown = [0.0]

        def report(name: str, n: int, nbytes: int) -> None:
            read_bytes[name] += nbytes
            progress.update(tasks[name], advance=n, bytes=read_bytes[name])
            if time.monotonic() - shown[0] > 0.1:
                shown[0] = time.monotonic()
                progress.refresh()

        results = convert_planned(plans, config, report)
    _out.print(_summary_table(results))
    _warn_small_classes(out, results)


@app.command()
@_guard
def mnist(
    idx_dir: Path = typer.Option(..., help="Folder with t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)."),
    out: Path = typer.Option(..., help="Output root; the source goes to <out>/md/mnist/."),
    lossless: bool = typer.Option(False, help="Store PNG instead of MD's quality-75 JPEG."),
    fsync: bool = _FSYNC,
):
    """Convert the 10,000 MNIST test digits into the `mnist` source."""
    from convert.mnist import MnistConfig, convert_mnist

    _freeze_imports()

    config = MnistConfig(idx_dir=str(idx_dir), out=str(out), lossless=lossless, fsync=fsync)
    with Progress(TextColumn("mnist"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_err) as progress:
        task = progress.add_task("mnist", total=10)
        result = convert_mnist(config, lambda n: progress.advance(task))
    _out.print(_summary_table([result]))


@app.command()
@_guard
def vtab(
    tfds_data_dir: Path = typer.Option(..., help="TFDS data_dir with the prepared VTAB datasets (read offline)."),
    out: Path = typer.Option(..., help="Output root; tasks go to <out>/vtab/<task>/ (--protocol lite: vtab_lite)."),
    manual_dir: Path = typer.Option(None, help="TFDS manual_dir for sun397, resisc45, diabetic_retinopathy."),
    tasks: str = typer.Option("", help="Comma-separated task ids (default: VTAB-v2's 18 tasks; dtd by name)."),
    protocol: str = typer.Option("vtab1k", help="vtab1k (support train800val200, VTAB test) or lite."),
    limit: int = typer.Option(None, help="Smoke runs: at most this many examples per slice."),
    max_shard_samples: int = _MAX_SHARD_SAMPLES,
    max_shard_bytes: int = _MAX_SHARD_BYTES,
    fsync: bool = _FSYNC,
):
    """Convert the VTAB-1k tasks from prepared TFDS datasets into ordered shards + manifests."""
    from convert.vtab.convert import VtabConfig, convert_vtab

    _freeze_imports()

    config = VtabConfig(tfds_data_dir=str(tfds_data_dir), out=str(out),
                        manual_dir=None if manual_dir is None else str(manual_dir),
                        tasks=tuple(t for t in tasks.split(",") if t), protocol=protocol, limit=limit,
                        max_shard_samples=max_shard_samples, max_shard_bytes=max_shard_bytes, fsync=fsync)
    with Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_err) as progress:
        bars: dict[str, int] = {}

        def planned(plans) -> None:
            for p in plans:
                bars[p.task.task_id] = progress.add_task(p.task.task_id, total=p.num_examples)

        results = convert_vtab(config, lambda task_id, n: progress.advance(bars[task_id], n), planned)
    _out.print(_summary_table(results))


@app.command()
@_guard
def verify(
    out: Path = typer.Argument(..., help="Output root holding <group>/<source>/ folders."),
    decode: bool = typer.Option(False, help="Also decode every image with the runtime's TF-equal decoder."),
    records: Path = typer.Option(None, help="MD records root: also check every md/ source's image bytes and "
                                            "labels against the records it was converted from."),
):
    """Verify every converted source under OUT against its manifests (and, with --records, its records)."""
    from manifests.decode import decode_rgb  # the decoder training uses: verify passes = training reads all
    from manifests.reader import find_sources
    from manifests.verify import verify_source

    _freeze_imports()

    sources = find_sources(out)
    if not sources:
        raise ValueError(f"{out}: no converted source (no <group>/<source>/{schema.SOURCE_FILE})")
    if records is not None and not records.is_dir():
        raise ValueError(f"{records}: records root is not a directory")
    compared = 0
    for path in sources:
        start = time.perf_counter()
        r = verify_source(path, decode=decode_rgb if decode else None)
        decoded = f", {r.decoded} decoded" if decode else ""
        typer.echo(f"ok {path.parent.name}/{r.source}: {r.num_classes} classes, {r.num_samples} samples, "
                   f"{r.num_shards} shards, {r.num_bytes / 1e6:.1f} MB{decoded} ({time.perf_counter() - start:.1f} s)")
        from convert.vtab.labels import rederive_labels  # VTAB tasks: labels vs their stored raw values

        relabelled = rederive_labels(path)
        if relabelled is not None:
            typer.echo(f"labels {path.parent.name}/{r.source}: {relabelled} re-derived from their raw values")
        if records is None:
            continue
        info = schema.SourceInfo.from_json((path / schema.SOURCE_FILE).read_text(), origin=str(path))
        spec = records / path.name / "dataset_spec.json"
        if not info.origin.startswith("meta-dataset tfrecords"):
            typer.echo(f"not compared {path.parent.name}/{path.name}: converted from {info.origin}, not from records")
            continue
        if not spec.is_file():
            typer.echo(f"not compared {path.parent.name}/{path.name}: no {spec}")
            continue
        from convert.compare import compare_with_records

        start = time.perf_counter()
        c = compare_with_records(path, records)
        typer.echo(f"identical {path.parent.name}/{c.source}: {c.images} images ({c.bytes / 1e6:.1f} MB) in "
                   f"{c.classes} classes equal their records, bytes and labels ({time.perf_counter() - start:.1f} s)")
        compared += 1
    if records is not None and not compared:
        raise ValueError(f"{records}: holds none of the converted md/ sources (no <dataset>/dataset_spec.json for "
                         f"any of them): nothing was compared")


@app.command("demo-data")
@_guard
def demo_data(
    directory: Path = typer.Argument(..., help="Folder to create (must not exist or be empty)."),
    seed: int = typer.Option(0, help="Seed of every drawing."),
):
    """Write a small real-format Meta-Dataset records folder (TF writer) plus MNIST idx files."""
    from convert.demo_data import write_demo_data

    start = time.perf_counter()
    made = write_demo_data(directory, seed)
    typer.echo(f"wrote {', '.join(p.name for p in made)} under {directory} ({time.perf_counter() - start:.1f} s)")


def main() -> None:
    """Console-script entry point (`lite-convert`)."""
    global _ONE_SHOT
    _ONE_SHOT = True
    app()


if __name__ == "__main__":
    main()
