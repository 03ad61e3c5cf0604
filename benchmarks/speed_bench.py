"""Training speed as Markdown: one LITE task of this tree against the previous release, side by side, on CPU at
32, 84 and 224 px, and where the time goes (set encoder, backbone with its FiLM sites, FiLM generator, Simple
CNAPs head, optimizer) before and after.

The previous release is the tree at `PREVIOUS_RELEASE` (the last landing before the speed work), extracted
with `git archive` into bench-out/ and imported from there in its own processes. Both sides run the same
task: the same random weights (seed 0), images, labels and LITE subsets (pinned), one torch thread; the
two trees alternate in interleaved rounds and each row keeps its best round. The losses of the two trees are
compared as well (they must agree to float32 rounding).

Real training (`training_vs_previous`, also `gpu_bench --vs-previous` on a GPU): each tree's own `train` on
the same converted source of 500x375 JPEGs, MD's variable way/shot (so the two trees draw the same
episodes, checked), H = 40; tasks/s over the tasks after a warm-up, what 10,000 tasks (LITE's default run)
would take.

Usage: python -m benchmarks.speed_bench [--quick] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import emit

PREVIOUS_RELEASE = "1686c17"  # landed before the speed work (issues 14 and 16)
# (image px, support N, query M, ways): the 32 and 224-px episodes, and an 84-px one in between
EPISODES = ((32, 20, 20, 5), (84, 30, 20, 5), (224, 30, 20, 5))
H = 10
_REPO = Path(__file__).resolve().parents[1]


def _task(image_size: int, n: int, m: int, ways: int):
    import torch

    from lite_train.model import LiteModel

    torch.manual_seed(0)
    model = LiteModel().train()
    gen = torch.Generator().manual_seed(0)
    data = {"support": torch.rand(n, 3, image_size, image_size, generator=gen) * 2 - 1,  # (N, 3, S, S)
            "support_labels": torch.arange(n) % ways, "query": torch.rand(m, 3, image_size, image_size,
                                                                          generator=gen) * 2 - 1,
            "query_labels": torch.arange(m) % ways, "subset": torch.randperm(n, generator=gen)[:H]}
    return model, data


def measure_task(image_size: int, n: int, m: int, ways: int, repeats: int) -> dict:
    """s/task of `lite_task_backward` (best of `repeats` after one warm-up) and the task's loss."""
    import torch

    from lite_train.train.step import lite_task_backward

    torch.set_num_threads(1)
    model, d = _task(image_size, n, m, ways)

    def task():
        model.zero_grad(set_to_none=True)
        return lite_task_backward(model, d["support"], d["support_labels"], d["query"], d["query_labels"], h=H,
                                  chunk_size=40, tasks_per_step=16, subsets=[d["subset"]])

    loss = task()["loss"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        task()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "loss": loss}


def measure_parts(image_size: int, n: int, m: int, ways: int, repeats: int) -> dict:
    """Seconds of each part of a task, forward and backward, timed on its own with the task's shapes (both
    trees' public LiteModel pieces): set encoder (no-grad pass over N in chunks of 40, gradient pass over H),
    backbone (no-grad pass over N, gradient pass over H + M, back to the FiLM parameters), FiLM generator,
    head (fit on N features, logits of M), Adam step."""
    import torch

    torch.set_num_threads(1)
    model, d = _task(image_size, n, m, ways)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    support, query = d["support"], d["query"]
    grad_rows = support[d["subset"]]
    z = torch.randn(1, 64)
    feats = torch.randn(n, 1280) * 3
    qfeats = torch.randn(m, 1280) * 3

    def set_encoder():
        with torch.no_grad():
            model.set_encoder_embeddings(support, 40)
        model.set_encoder.pre_pool(grad_rows).sum().backward()

    def backbone():
        film = [(g.detach().requires_grad_(), b.detach().requires_grad_()) for g, b in model.film_params(z)]
        with torch.no_grad():
            model.features_by_chunks(support, film, 40)
        (model.features(grad_rows, film).sum() + model.features(query, film).sum()).backward()

    def generator():
        z_ = z.clone().requires_grad_()
        sum(g.sum() + b.sum() for g, b in model.film_params(z_)).backward()

    def head():
        f, q = feats.clone().requires_grad_(), qfeats.clone().requires_grad_()
        model.classify(model.fit_classifier(f, d["support_labels"]), q).sum().backward()

    def adam():
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        optimizer.step()

    out = {}
    for name, part in (("set encoder", set_encoder), ("backbone + FiLM sites", backbone),
                       ("FiLM generator", generator), ("Simple CNAPs head", head), ("Adam step", adam)):
        part()
        times = []
        for _ in range(repeats):
            model.zero_grad(set_to_none=name == "Adam step")
            start = time.perf_counter()
            part()
            times.append(time.perf_counter() - start)
        out[name] = min(times)
    return out


def _previous_tree(root: Path) -> Path | None:
    """The previous release's lite_train and manifests under `root` (extracted once), or None without git."""
    tree = root / f"previous-{PREVIOUS_RELEASE}"
    if (tree / "lite_train").is_dir():
        return tree
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(_REPO), "archive", PREVIOUS_RELEASE, "lite_train", "manifests"],
                             capture_output=True)
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def _call_in_tree(tree: Path, function: str, args: tuple) -> dict:
    """`benchmarks.speed_bench.<function>(*args)` in a fresh process that imports lite_train and manifests from
    `tree` (this repository's benchmarks second on the path); its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = (f"import json, sys; sys.path[:0] = [{str(tree)!r}, {str(_REPO)!r}]; "
            f"from benchmarks.speed_bench import {function}; print(json.dumps({function}(*{args!r})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks.speed_bench: {function} failed in {tree}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run(tree: Path, what: str, episode: tuple, repeats: int) -> dict:
    return _call_in_tree(tree, f"measure_{what}", (*episode, repeats))


def measure_training(data: str, out: str, image_size: int, warmup: int, tasks: int, workers: int,
                     device: str) -> dict:
    """`train` of the tree first on sys.path (either release's API): warm-up + timed tasks in one run, float32
    with TF32 off on CUDA. Returns tasks/s over the timed tasks, the loop's share spent waiting for episodes,
    the CUDA peak and the episodes' (ways, support, query) from metrics.csv."""
    import torch

    from lite_train.train import TrainConfig, train

    try:
        from lite_train.runtime import set_tf32
    except ImportError:  # the previous release kept it with the training config
        from lite_train.train.config import set_tf32
    if device.startswith("cuda"):
        set_tf32(False)
        torch.cuda.reset_peak_memory_stats(device)
    stamps = []
    cfg = TrainConfig(data=data, out=out, sources=("bench",), val_sources=(), image_size=image_size,
                      iterations=warmup + tasks, num_workers=workers, checkpoint_every=10**9, device=device)
    r = train(cfg, progress=False, on_task=lambda *_: stamps.append(time.perf_counter()))
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    with open(Path(out) / "metrics.csv") as f:
        episodes = [(int(row["ways"]), int(row["support"]), int(row["query"])) for row in csv.DictReader(f)]
    return {"tasks_per_s": tasks / (stamps[-1] - stamps[warmup - 1]), "wait_share": r.wait_seconds / r.seconds,
            "threads": torch.get_num_threads(),
            "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else None,
            "episodes": episodes}


def training_vs_previous(size: int, warmup: int, tasks: int, rounds: int, classes: int, device: str, workers: int,
                         work: Path) -> str:
    """Markdown: real training (`measure_training`) of the previous release and of this tree, interleaved
    rounds, each tree's best round; on a source of `classes` classes of 500x375 JPEGs (MD's law: up to 50
    ways, 500 support images)."""
    from benchmarks.train_bench import _write_source

    previous = _previous_tree(work)
    if previous is None:
        return f"not run: the previous release {PREVIOUS_RELEASE} cannot be extracted (no git history here)\n"
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "data")
        _write_source(Path(data), classes=classes, per_class=60)
        for i in range(rounds):
            for name, tree in (("previous", previous), ("this", _REPO)):
                r = _call_in_tree(tree, "measure_training",
                                  (data, str(Path(tmp) / f"{name}-{i}"), size, warmup, tasks, workers, device))
                if name not in best or r["tasks_per_s"] > best[name]["tasks_per_s"]:
                    best[name] = r
    a, b = best["previous"], best["this"]
    same = a["episodes"] == b["episodes"]
    timed = b["episodes"][warmup:]
    mean = [sum(e[k] for e in timed) / len(timed) for k in range(3)]
    precision = "float32, TF32 off" if device.startswith("cuda") else "float32"
    lines = [f"Real LITE training (`train`: loader with {workers} workers, one source of {classes} classes of "
             f"500x375 JPEGs, MD's variable way/shot, H = 40, {precision}) at {size} px on {device}, {tasks} "
             f"timed tasks after {warmup} warm-up tasks, best of {rounds} interleaved rounds; the previous release = "
             f"{PREVIOUS_RELEASE}, run from its own tree. Timed episodes: {mean[0]:.1f} ways, {mean[1]:.0f} "
             f"support and {mean[2]:.0f} query images on average; the two trees drew "
             f"{'the same' if same else 'DIFFERENT'} episodes.", "",
             "| tree | torch threads | tasks/s | waiting for episodes | 10,000 tasks | CUDA peak (MB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in (("previous", a), ("this", b)):
        peak = f"{r['peak_mb']:,.0f}" if r["peak_mb"] is not None else "-"
        lines.append(f"| {name} | {r['threads']} | {r['tasks_per_s']:.3g} | {100 * r['wait_share']:.1f} % | "
                     f"{10_000 / r['tasks_per_s'] / 3600:.1f} h | {peak} |")
    lines += ["", f"Speed-up: {b['tasks_per_s'] / a['tasks_per_s']:.2f}x."]
    return "\n".join(lines) + "\n"


def run(quick: bool = False, work: Path | None = None) -> str:
    work = work or _REPO / "bench-out"
    previous = _previous_tree(work)
    if previous is None:
        return f"not run: the previous release {PREVIOUS_RELEASE} cannot be extracted (no git history here)\n"
    episodes = ((32, 10, 10, 5),) if quick else EPISODES
    rounds, repeats = (1, 1) if quick else (3, 2)
    best: dict[tuple, dict] = {}
    for _ in range(rounds):
        for episode in episodes:
            for name, tree in (("previous", previous), ("this", _REPO)):
                for what in ("task", "parts"):
                    r = _run(tree, what, episode, repeats)
                    key = (name, what, episode)
                    if what == "task" and (key not in best or r["seconds"] < best[key]["seconds"]):
                        best[key] = r
                    elif what == "parts":
                        best[key] = {k: min(v, best.get(key, {}).get(k, v)) for k, v in r.items()}
    lines = [f"One LITE training task (`lite_task_backward`, H = {H}, one query chunk, pinned subset), one torch "
             f"thread, CPU; the previous release = {PREVIOUS_RELEASE}, run from its own tree; best of {rounds} "
             "interleaved rounds.", "",
             "| image px | support N | query M | previous s/task | this s/task | speed-up | loss previous | "
             "loss this |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for episode in episodes:
        a, b = best[("previous", "task", episode)], best[("this", "task", episode)]
        lines.append(f"| {episode[0]} | {episode[1]} | {episode[2]} | {a['seconds']:.3f} | {b['seconds']:.3f} | "
                     f"{a['seconds'] / b['seconds']:.2f}x | {a['loss']:.6f} | {b['loss']:.6f} |")
    lines += ["", "Where the time goes: each part's forward and backward timed on its own with the task's shapes "
              "(`measure_parts`; they add up to about one task: the step's own bookkeeping is not in them), "
              "seconds:", "", "| image px | part | previous | this | speed-up |", "|---:|---|---:|---:|---:|"]
    for episode in episodes:
        a, b = best[("previous", "parts", episode)], best[("this", "parts", episode)]
        for part in a:
            lines.append(f"| {episode[0]} | {part} | {a[part]:.3f} | {b[part]:.3f} | {a[part] / b[part]:.2f}x |")
    # Real training: each tree's own `train` loop on MD-like episodes; 0 loader workers, so both trees run
    # torch's 2 threads on this machine (this tree's default subtracts the workers; BENCHMARKS.md "Threads").
    real = (dict(size=32, warmup=1, tasks=2, rounds=1, classes=5) if quick
            else dict(size=84, warmup=1, tasks=3, rounds=2, classes=40))
    lines += ["", "Real training, the loader and the training loop included (each tree's own `train`):", "",
              training_vs_previous(**real, device="cpu", workers=0, work=work)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: one small 32-px task, one round")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        text = run(quick=args.quick, work=Path(tmp) if args.quick else None)
    return emit(text, args.out)


if __name__ == "__main__":
    main()
