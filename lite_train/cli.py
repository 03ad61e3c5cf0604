"""`lite-train`: command-line entry points; each parses flags and calls one library function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TF-free LITE runtime: episode sampling and loading on converted shards.")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command()
def describe(
    spec: Optional[Path] = typer.Option(None, help="A Meta-Dataset dataset_spec.json (no images needed)."),
    data: Optional[Path] = typer.Option(None, help="Root of converted sources (instead of --spec)."),
    source: Optional[str] = typer.Option(None, help="Source name under --data, e.g. omniglot."),
    split: str = typer.Option("train", help="train | valid | test"),
    seed: int = typer.Option(0, help="As MD's sampling.RNG.seed(seed) before the sampler is built."),
    count: int = typer.Option(10, min=1, help="Number of episodes."),
    ignore_hierarchy: bool = typer.Option(False, help="Ignore the ImageNet DAG / Omniglot alphabets."),
) -> None:
    """Print K episode descriptions as JSON lines: [[class id in split, support shots, query shots], ...]."""
    from lite_train.data.describe import describe as describe_episodes
    from manifests import ManifestError, open_source
    from manifests.md_spec import load_md_spec

    try:
        if (spec is None) == (data is None):
            _fail("give either --spec or --data with --source")
        if spec is not None:
            md_spec = load_md_spec(spec)
        else:
            if source is None:
                _fail("--data needs --source")
            from lite_train.data.episodes import sampling_spec
            md_spec = sampling_spec(open_source(data, source))
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
    out: Path = typer.Option(Path("episodes.png"), help="Where to write the picture (PNG)."),
) -> None:
    """Draw sampled episodes as a labelled image grid: support per class on the left, query on the right."""
    from lite_train.data.episode_grid import render_episodes
    from lite_train.data.loader import EpisodeLoaderConfig, make_episode_loader
    from manifests import ManifestError

    cfg = EpisodeLoaderConfig(data=str(data), sources=(source,), split=split, seed=seed,
                              image_size=image_size, order=order, num_episodes=n, num_workers=0)
    try:
        loader = make_episode_loader(cfg)
        drawn = list(loader)
        reader = loader.readers[0]
        names = dict(zip(reader.classes["class_id"].to_pylist(), reader.classes["name"].to_pylist()))
        picture = render_episodes(drawn, names)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        picture.save(tmp, format="PNG")
        tmp.replace(out)
    except (ValueError, ManifestError) as e:
        _fail(str(e))
    for ep in drawn:
        typer.echo(f"episode {ep['index']}: {ep['source']}, {int(ep['support_labels'].max()) + 1} ways, "
                   f"{len(ep['support_labels'])} support, {len(ep['query_labels'])} query")
    typer.echo(f"wrote {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
