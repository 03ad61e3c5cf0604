"""Episode loader throughput, open files and worker memory vs TF's decode+resize bound, as Markdown.

One run, the same converted shards for every row:
  - loader episodes/s and images/s with 0, 1, 2 workers at 84 and 224 px (variable way/shot episodes);
  - TF's own per-image decode + TF1 bilinear resize on the same JPEGs, in as many processes as workers
    (benchmarks.decode_bench, each process single-threaded): the physical bound to compare against;
  - open descriptors, peak and private RSS per worker, and RSS for a source with 50 vs 5,000 classes;
  - descriptions/s of the episode-description sampler alone and plans/s of the planner, on real MD specs.

Usage: python -m benchmarks.loader_bench [--episodes 30] [--warm 10] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import decode_bench
from lite_train.data.episode_description import EpisodeDescriptionConfig, EpisodeDescriptionSampler, sampler_rngs
from lite_train.data.episodes import EpisodePlanner, open_readers
from lite_train.data.loader import EpisodeLoader, EpisodeLoaderConfig
from manifests import ClassRecord, SourceWriter
from manifests.md_spec import load_md_spec

SPECS = Path(__file__).resolve().parents[2] / "shared" / "data" / "md_specs"


def _process_stats(pid: int) -> tuple[int, int, float, float, float]:
    """(open descriptors, of which .tar shards, peak RSS, private RSS, shared-memory RSS; MB) of a live
    process, from /proc. Peak RSS (VmHWM) counts the pages of the shared episode buffers the process has
    touched, which every worker and the main process map; private RSS (RssAnon) is the process's own."""
    fd_dir = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in fd_dir.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            pass
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    mb = {key: int(status[key].split()[0]) / 1024 for key in ("VmHWM", "RssAnon", "RssShmem")}
    return len(targets), sum(t.endswith(".tar") for t in targets), mb["VmHWM"], mb["RssAnon"], mb["RssShmem"]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def write_source(root: Path, name: str, images: list[bytes], num_classes: int, per_class: int) -> None:
    spec = {"__class__": "DatasetSpecification", "name": name,
            "classes_per_split": {"TRAIN": num_classes, "VALID": 0, "TEST": 0},
            "images_per_class": {str(c): per_class for c in range(num_classes)},
            "class_names": {str(c): f"class_{c}" for c in range(num_classes)},
            "path": "", "file_pattern": "{}.tfrecords"}
    writer = SourceWriter(root, "md", name, fingerprint={}, max_shard_samples=200)
    for c in range(num_classes):
        for i in range(per_class):
            writer.add(c, i, images[(c * per_class + i) % len(images)], "jpg")
    classes = [ClassRecord(c, f"class_{c}", "train", None, per_class) for c in range(num_classes)]
    writer.finish(classes, dict(origin="benchmark", converter_version="0", benchmark="md-v1",
                                dataset_spec=spec, sampling_spec=spec))


def run_loader(root: Path, source: str, size: int, workers: int, episodes: int, warm: int = 10,
               seed: int = 0) -> dict:
    """Loader rates over `episodes` steady-state episodes and over the `warm` episodes before them, plus
    worker descriptors and memory.

    Episode 0 (worker start-up) is timed in neither window. The warm-up window pays for the first use of
    the recycled episode buffers (every page faulted once); a training run lasts thousands of episodes, so
    the steady-state window is the rate it sees.
    """
    cfg = EpisodeLoaderConfig(data=str(root), sources=(source,), split="train", seed=seed, image_size=size,
                              num_episodes=1 + warm + episodes, num_workers=workers)
    marks, counts, stats = {}, {"warm": 0, "steady": 0}, []
    for i, ep in enumerate(EpisodeLoader(cfg)):
        if i in (0, warm):
            marks[i] = time.perf_counter()
        elif i > 0:
            counts["warm" if i < warm else "steady"] += len(ep["support_labels"]) + len(ep["query_labels"])
        pids = _children(os.getpid()) if workers else [os.getpid()]
        stats += [_process_stats(pid) for pid in pids]
    end = time.perf_counter()
    return {"episodes_per_s": episodes / (end - marks[warm]), "images_per_s": counts["steady"] / (end - marks[warm]),
            "warm_images_per_s": counts["warm"] / (marks[warm] - marks[0]),
            "max_open_fds": max(s[0] for s in stats), "max_shard_fds": max(s[1] for s in stats),
            "peak_rss_mb": max(s[2] for s in stats), "private_rss_mb": max(s[3] for s in stats),
            "shared_rss_mb": max(s[4] for s in stats)}


def sampler_speed(n: int = 2000) -> list[tuple[str, float, float]]:
    """(dataset/split, descriptions/s, plans/s) on real specs where available."""
    rows = []
    for name, split in (("omniglot", "train"), ("ilsvrc_2012", "train"), ("aircraft", "train")):
        path = SPECS / f"{name}_dataset_spec.json"
        if not path.is_file():
            continue
        spec = load_md_spec(path)
        sampler = EpisodeDescriptionSampler(spec, split, EpisodeDescriptionConfig(), sampler_rngs(0, 1)[0])
        t = time.perf_counter()
        for _ in range(n):
            sampler.sample()
        rows.append((f"{name}/{split}", n / (time.perf_counter() - t)))
    return rows


def planner_speed(root: Path, source: str, n: int = 500) -> float:
    planner = EpisodePlanner(open_readers(root, [source]), "train", 0, num_episodes=n)
    t = time.perf_counter()
    for _ in planner:
        pass
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=30, help="steady-state episodes per loader row")
    ap.add_argument("--warm", type=int, default=10, help="warm-up episodes before them (reported apart)")
    ap.add_argument("--unique-images", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    images = decode_bench.make_images(args.unique_images)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_source(root, "bench", images, num_classes=40, per_class=60)
        data_file = root / "images.pkl"
        data_file.write_bytes(pickle.dumps(images))
        lines += [f"Loader on one converted source: 40 classes x 60 synthetic 500x375 JPEGs "
                  f"(mean {np.mean([len(b) for b in images]) / 1e3:.0f} kB), MD variable way/shot episodes, "
                  f"{args.episodes} steady-state episodes per row after {args.warm} warm-up episodes (timed apart: "
                  "they pay for the first use of the recycled episode buffers); TF bound = tf.io.decode_jpeg + "
                  "TF1 bilinear align_corners in as many single-threaded processes. Per process (the workers, or "
                  "the main process with 0 workers): peak RSS includes the pages of the shared episode buffers "
                  "it has written to, private RSS is its own memory.", "",
                  "| size | workers | episodes/s | images/s | TF bound images/s | ratio | warm-up images/s (ratio) "
                  "| max open fds | shard fds | peak RSS (MB) | private RSS (MB) | shared buffers mapped (MB) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for size in (84, 224):
            bounds = {p: decode_bench.measure("tf", size, p, str(data_file), 2) for p in (1, 2)}
            for workers in (0, 1, 2):
                r = run_loader(root, "bench", size, workers, args.episodes, args.warm)
                bound = bounds[max(workers, 1)]
                lines.append(f"| {size} | {workers} | {r['episodes_per_s']:.2f} | {r['images_per_s']:.0f} | "
                             f"{bound:.0f} | {r['images_per_s'] / bound:.2f} | {r['warm_images_per_s']:.0f} "
                             f"({r['warm_images_per_s'] / bound:.2f}) | {r['max_open_fds']} | {r['max_shard_fds']} | "
                             f"{r['peak_rss_mb']:.0f} | {r['private_rss_mb']:.0f} | {r['shared_rss_mb']:.0f} |")
        tiny = [images[0]]
        lines += ["", "Worker memory vs number of classes (2 workers, 84 px, 15 episodes after 5 warm-up, "
                  "20 images per class, 1 image repeated):",
                  "", "| classes | shards | samples | private RSS/worker (MB) | peak RSS/worker (MB) | open fds/worker "
                  "| shard fds/worker |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for classes in (50, 5000):
            write_source(root, f"c{classes}", tiny, num_classes=classes, per_class=20)
            r = run_loader(root, f"c{classes}", 84, 2, 15, warm=5)
            lines.append(f"| {classes} | {-(-classes * 20 // 200)} | {classes * 20} | {r['private_rss_mb']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['max_open_fds']} | {r['max_shard_fds']} |")
        lines += ["", "Sampling alone (main process, no images):", "", "| what | per second |", "|---|---:|"]
        for name, rate in sampler_speed():
            lines.append(f"| descriptions, {name} (real MD spec) | {rate:.0f} |")
        lines.append(f"| plans (descriptions + image selection), bench source | {planner_speed(root, 'bench'):.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    main()
