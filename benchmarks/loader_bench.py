"""Episode loader on photographs: images/s vs TF's decode+resize bound, memory per process, open files,
the read-time checksum's cost and the episode sampler's speed on the real MD specs, as Markdown.

One run, the same converted shards (photos from benchmarks/photos.py) for every row:
  - loader episodes/s and images/s with 0, 1, 2 workers at 84 and 224 px (variable way/shot episodes);
  - TF's own per-image decode + TF1 bilinear resize on the same JPEGs, in as many processes as workers
    (benchmarks.decode_bench, each process single-threaded): the physical bound to compare against;
  - memory per process from /proc/<pid>/smaps: PSS and Private_Dirty of the main process and of each
    worker, without the shared episode buffers, which are reported apart (resident, counted once);
  - the read-time checksum (EpisodeLoaderConfig.verify_checksums) on vs off, and crc32 vs decode per image;
  - worker memory and descriptors for a source with few vs many classes;
  - descriptions/s of the episode-description sampler on the specs shipped in manifests/md_specs, plans/s
    of the planner. A row that cannot run says so in the table.

Usage: python -m benchmarks.loader_bench [--episodes 30] [--warm 10] [--quick] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import re
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from benchmarks import decode_bench
from benchmarks.photos import PhotoConfig, photo_jpegs, summary
from lite_train.data.decode import decode_resize_into
from lite_train.data.episode_description import EpisodeDescriptionConfig, EpisodeDescriptionSampler, sampler_rngs
from lite_train.data.episodes import EpisodePlanner, open_readers
from lite_train.data.loader import EpisodeLoader, EpisodeLoaderConfig
from manifests import ClassRecord, SourceWriter
from manifests.md_spec import load_shipped_spec

# Mappings of the shared episode buffers: the loader's memfd, or torch's own shared-memory files (fallback).
_BUFFER_MAPPINGS = ("lite-train-episode", "/torch_")
_MAPPING_HEADER = re.compile(r"[0-9a-f]+-[0-9a-f]+ ")
_MB = 1024.0  # smaps counts kB
CHECKSUM_FIELD = "verify_checksums"


@dataclasses.dataclass(frozen=True)
class Memory:
    """One process's memory from /proc/<pid>/smaps, MB; `own_*` exclude the shared episode buffers."""

    own_pss: float  # proportional set size: private pages + each shared page / number of sharers
    own_private_dirty: float  # pages only this process has written: what one more such process costs
    buffer_pss: float  # this process's share of the resident episode-buffer pages


def process_memory(pid: int) -> Memory:
    """PSS and Private_Dirty of a live process, split into the episode buffers and the rest."""
    totals = {"Pss": 0.0, "Private_Dirty": 0.0}
    buffers = {"Pss": 0.0, "Private_Dirty": 0.0}
    in_buffer = False
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            if _MAPPING_HEADER.match(line):  # "start-end perms offset dev inode [path]" opens a mapping
                in_buffer = any(name in line for name in _BUFFER_MAPPINGS)
                continue
            key, _, rest = line.partition(":")
            if key in totals:
                kb = float(rest.split()[0])
                totals[key] += kb
                if in_buffer:
                    buffers[key] += kb
    return Memory((totals["Pss"] - buffers["Pss"]) / _MB, (totals["Private_Dirty"] - buffers["Private_Dirty"]) / _MB,
                  buffers["Pss"] / _MB)


def open_files(pid: int) -> tuple[int, int]:
    """(open descriptors, of which .tar shards) of a live process."""
    targets = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            pass
    return len(targets), sum(t.endswith(".tar") for t in targets)


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
               seed: int = 0, **options) -> dict:
    """Loader rates over `episodes` steady-state episodes and over the `warm` episodes before them, then the
    memory and descriptors of the main process and each worker, read while the last episode is held.

    Episode 0 (worker start-up) is timed in neither window. The warm-up window pays for the first use of
    the recycled episode buffers (every page faulted once); a training run lasts thousands of episodes, so
    the steady-state window is the rate it sees. /proc is read after the clock stops, so it costs no time.
    `options`: further EpisodeLoaderConfig fields.
    """
    cfg = EpisodeLoaderConfig(data=str(root), sources=(source,), split="train", seed=seed, image_size=size,
                              num_episodes=1 + warm + episodes, num_workers=workers, **options)
    marks, counts = {}, {"warm": 0, "steady": 0}
    main, worker_pids = os.getpid(), []
    result: dict = {}
    for i, ep in enumerate(EpisodeLoader(cfg)):
        if i in (0, warm):
            marks[i] = time.perf_counter()
        elif i > 0:
            counts["warm" if i < warm else "steady"] += len(ep["support_labels"]) + len(ep["query_labels"])
        if i == warm + episodes:  # the last one: workers are still alive
            end = time.perf_counter()
            worker_pids = _children(main) if workers else []
            result["main"] = process_memory(main)
            result["workers"] = [process_memory(pid) for pid in worker_pids]
            result["fds"] = [open_files(pid) for pid in (worker_pids or [main])]
    if len(result.get("workers", ())) != workers:
        raise RuntimeError(f"expected {workers} worker processes, found {len(result.get('workers', ()))}")
    result.update(episodes_per_s=episodes / (end - marks[warm]), images_per_s=counts["steady"] / (end - marks[warm]),
                  warm_images_per_s=counts["warm"] / (marks[warm] - marks[0]))
    return result


def sampler_speed(n: int) -> list[tuple[str, str]]:
    """(spec/split, descriptions/s or "not run: why") on the MD specs shipped in manifests/md_specs."""
    rows = []
    for name, split in (("omniglot", "train"), ("ilsvrc_2012", "train"), ("aircraft", "train")):
        try:
            spec = load_shipped_spec(name)
        except (ValueError, OSError) as e:
            rows.append((f"{name}/{split}", f"not run: {e}"))
            continue
        sampler = EpisodeDescriptionSampler(spec, split, EpisodeDescriptionConfig(), sampler_rngs(0, 1)[0])
        t = time.perf_counter()
        for _ in range(n):
            sampler.sample()
        rows.append((f"{name}/{split}", f"{n / (time.perf_counter() - t):.0f}"))
    return rows


def planner_speed(root: Path, source: str, n: int) -> float:
    planner = EpisodePlanner(open_readers(root, [source]), "train", 0, num_episodes=n)
    t = time.perf_counter()
    for _ in planner:
        pass
    return n / (time.perf_counter() - t)


def crc_vs_decode(images: list[bytes], size: int) -> tuple[float, float]:
    """(µs per image for zlib.crc32 of its bytes, µs per image for the exact decode + resize), one process."""
    out = np.empty((3, size, size), np.float32)
    t = time.perf_counter()
    for b in images:
        zlib.crc32(b)
    crc = (time.perf_counter() - t) / len(images)
    t = time.perf_counter()
    for b in images:
        decode_resize_into(b, out, size)
    return crc * 1e6, (time.perf_counter() - t) / len(images) * 1e6


def _memory_cells(r: dict) -> str:
    main, workers = r["main"], r["workers"]
    procs = [main, *workers]
    worker_cells = (f"{max(w.own_pss for w in workers):.0f} | {max(w.own_private_dirty for w in workers):.0f}"
                    if workers else "- | -")
    return (f"{main.own_pss:.0f} | {main.own_private_dirty:.0f} | {worker_cells} | "
            f"{sum(p.own_pss for p in procs):.0f} | {sum(p.own_private_dirty for p in procs):.0f} | "
            f"{sum(p.buffer_pss for p in procs):.0f} | {max(f[0] for f in r['fds'])} | {max(f[1] for f in r['fds'])}")


def checksum_rows(root: Path, size: int, episodes: int, warm: int, bound: float) -> list[str]:
    """Loader images/s with the read-time checksum off and on (interleaved, best of two each)."""
    if CHECKSUM_FIELD not in {f.name for f in dataclasses.fields(EpisodeLoaderConfig)}:
        return [f"| {size} | 2 | not run: EpisodeLoaderConfig has no `{CHECKSUM_FIELD}` field in this tree "
                "(issue 6's read-time check) | | |"]
    best = {False: 0.0, True: 0.0}
    for _ in range(2):
        for on in (False, True):
            r = run_loader(root, "bench", size, 2, episodes, warm, **{CHECKSUM_FIELD: on})
            best[on] = max(best[on], r["images_per_s"])
    return [f"| {size} | 2 | off | {best[False]:.0f} ({best[False] / bound:.2f}) | 1.00 |",
            f"| {size} | 2 | on | {best[True]:.0f} ({best[True] / bound:.2f}) | {best[True] / best[False]:.3f} |"]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=30, help="steady-state episodes per loader row")
    ap.add_argument("--warm", type=int, default=10, help="warm-up episodes before them (reported apart)")
    ap.add_argument("--unique-images", type=int, default=1000, help="photos in the fixture (repeated across samples)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny source, few episodes, 84 px only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    classes, per_class, sizes, many, n_desc = 40, 60, (84, 224), (50, 5000), 2000
    if args.quick:
        args.episodes, args.warm, args.unique_images = 3, 2, 24
        classes, per_class, sizes, many, n_desc = 8, 20, (84,), (10, 100), 50
    images = photo_jpegs(PhotoConfig(count=args.unique_images))
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_source(root, "bench", images, num_classes=classes, per_class=per_class)
        data_file = root / "images.pkl"
        data_file.write_bytes(pickle.dumps(images))
        rows, bounds = [], {}
        for size in sizes:
            bounds[size] = {p: decode_bench.measure("tf", size, p, str(data_file), 2) for p in (1, 2)}
            rows += [(size, w, run_loader(root, "bench", size, w, args.episodes, args.warm)) for w in (0, 1, 2)]
        lines += [f"Loader on one converted source: {classes} classes x {per_class} samples drawn from "
                  f"{summary(images)}. MD variable way/shot episodes, {args.episodes} steady-state episodes per row "
                  f"after {args.warm} warm-up episodes (timed apart: they pay for the first use of the recycled "
                  "episode buffers); TF bound = tf.io.decode_jpeg + TF1 bilinear align_corners in as many "
                  "single-threaded processes as workers (1 for 0 workers).", "",
                  "| size | workers | episodes/s | images/s | TF bound images/s | ratio | warm-up images/s (ratio) |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for size, w, r in rows:
            bound = bounds[size][max(w, 1)]
            lines.append(f"| {size} | {w} | {r['episodes_per_s']:.2f} | {r['images_per_s']:.0f} | {bound:.0f} | "
                         f"{r['images_per_s'] / bound:.2f} | {r['warm_images_per_s']:.0f} "
                         f"({r['warm_images_per_s'] / bound:.2f}) |")
        lines += ["", "Memory of the same runs, MB, read from /proc/<pid>/smaps while the last episode is held. PSS "
                  "(proportional set size) splits each shared page among the processes mapping it, so PSS summed "
                  "over the processes is their real footprint; Private_Dirty is what only that process has written, "
                  "i.e. what one more worker costs. Both exclude the shared episode buffers, shown apart "
                  "(resident pages, each counted once; with 0 workers the buffers are ordinary memory of the main "
                  "process and counted there). Budget for N workers: about the PSS of all processes here + (N - 2) x "
                  "Private_Dirty per worker + the episode buffers.", "",
                  "| size | workers | main PSS | main Private_Dirty | PSS per worker (max) | Private_Dirty per "
                  "worker (max) | PSS, all processes | Private_Dirty, all processes | episode buffers | "
                  "open fds per process | shard fds per process |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {size} | {w} | {_memory_cells(r)} |" for size, w, r in rows]

        size = max(sizes)
        crc_us, decode_us = crc_vs_decode(images, size)
        lines += ["", f"Read-time checksum (issue 6: within 5 % of the loader's images/s), {size} px, 2 workers, "
                  "best of two interleaved runs each; per image in one process: zlib.crc32 of the bytes "
                  f"{crc_us:.1f} µs vs exact decode + resize {decode_us:.0f} µs ({100 * crc_us / decode_us:.1f} %).", "",
                  "| size | workers | checksum | images/s (ratio to TF bound) | vs off |", "|---:|---:|---|---:|---:|"]
        lines += checksum_rows(root, size, args.episodes, args.warm, bounds[size][2])

        tiny = [images[0]]
        steady, warm = (3, 2) if args.quick else (15, 5)
        lines += ["", f"Memory and descriptors vs number of classes (2 workers, 84 px, {steady} episodes after {warm} "
                  "warm-up, 20 images per class, 1 image repeated; MB, as above):",
                  "", "| classes | shards | samples | PSS per worker | Private_Dirty per worker | open fds per "
                  "worker | shard fds per worker |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for n in many:
            write_source(root, f"c{n}", tiny, num_classes=n, per_class=20)
            r = run_loader(root, f"c{n}", 84, 2, steady, warm=warm)
            lines.append(f"| {n} | {-(-n * 20 // 200)} | {n * 20} | {max(w.own_pss for w in r['workers']):.0f} | "
                         f"{max(w.own_private_dirty for w in r['workers']):.0f} | {max(f[0] for f in r['fds'])} | "
                         f"{max(f[1] for f in r['fds'])} |")
        lines += ["", "Sampling alone (main process, no images):", "", "| what | per second |", "|---|---:|"]
        lines += [f"| descriptions, {name} (shipped MD spec) | {rate} |" for name, rate in sampler_speed(n_desc)]
        lines.append(f"| plans (descriptions + image selection), bench source | "
                     f"{planner_speed(root, 'bench', n_desc // 4):.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    main()
