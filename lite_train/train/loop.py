"""A `TrainConfig` in, a run folder out: the meta-training loop of LITE:src/run.py, resumable bit for bit.

Run folder: config.json, checkpoint.pt (every `checkpoint_every` tasks, on SIGTERM/Ctrl-C and at the end),
metrics.csv (one row per task), validation.csv, events.out.tfevents.* (TensorBoard), best_validation.pt and
fully_trained.pt (plain model state dicts, like the reference's files).

Read top to bottom, one task = one episode:
    episode i (global index) -> shuffle support and query with the task's generator (reference
    `prepare_task`) -> the step of `train_method` (gradients accumulate in .grad) -> every `tasks_per_step`
    tasks (and after the last) one Adam step -> every `val_freq` tasks (not after the last) validation
    with the "better on at least half of the sources" rule -> checkpoint.

Every random draw derives from `cfg.seed`: model init (global torch seed before construction), the episode
stream (the loader), and the per-task generator (task shuffles, LITE subsets) seeded from (seed, i), so
task i is the same whether the run was resumed or not, and whatever the number of processes.

Data parallel (torchrun): process r of K trains the global tasks i = r (mod K); after each round of K tasks
the gradients are summed over processes before an Adam step, so K processes take the same steps as one
(up to the order of the floating-point sum); parameters start from rank 0's and stay identical.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lite_train.data.episode_description import EpisodeDescriptionConfig
from lite_train.data.loader import EpisodeLoaderConfig, make_episode_loader
from lite_train.train import checkpoint as ckpt
from lite_train.train.config import TrainConfig, set_tf32
from lite_train.train.evaluate import SourceResult, better_on_half, evaluate
from lite_train.train.logs import (METRICS_COLUMNS, METRICS_FILE, VALIDATION_COLUMNS, VALIDATION_FILE, CsvLog,
                                   EventWriter)

_TASK_STREAM = 0x7A5C  # SeedSequence key of the per-task generators


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a call to `train` did."""

    iteration: int  # the next global task index (== cfg.iterations when finished)
    finished: bool  # False: stopped by a signal (checkpoint written)
    best_validation: dict  # {source: SourceResult}
    seconds: float  # wall time of the task loop (this call)
    wait_seconds: float  # of which the trainer waited for the next episode from the loader


def task_generator(seed: int, task: int) -> torch.Generator:
    """The CPU generator of global task `task`: its shuffles and LITE subsets, independent of resumes."""
    words = np.random.SeedSequence([seed, _TASK_STREAM, task]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The model at initialisation: seeded from cfg.seed, backbone from `backbone_weights` or random."""
    from lite_train.model import LiteModel, ModelConfig

    torch.manual_seed(cfg.seed)
    model = LiteModel(ModelConfig(classifier=cfg.classifier))
    if cfg.backbone_weights is not None:
        from lite_train.model import load_backbone_weights

        load_backbone_weights(model, cfg.backbone_weights)
    return model


def calibrate_random_backbone(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """BN statistics of a random backbone from the first `cfg.calibration_images` images (support, then
    query, episode by episode) of the training stream."""
    from lite_train.model import calibrate_batch_norm

    loader = make_episode_loader(EpisodeLoaderConfig(
        data=cfg.data, sources=cfg.sources, split="train", seed=cfg.seed, image_size=cfg.image_size,
        view=cfg.view, num_workers=0), _description(cfg))
    images, count = [], 0
    for episode in loader:
        for part in (episode["support_images"], episode["query_images"]):
            images.append(part.clone())
            count += len(part)
        if count >= cfg.calibration_images:
            break
    calibrate_batch_norm(model.feature_extractor, torch.cat(images)[:cfg.calibration_images].to(device))
    model.train()


def _description(cfg: TrainConfig) -> EpisodeDescriptionConfig:
    return EpisodeDescriptionConfig(max_ways_upper_bound=cfg.max_way_train, max_support_set_size=cfg.max_support_train,
                                    max_num_query=cfg.max_query_train)


def _step_function(cfg: TrainConfig) -> Callable:
    from lite_train.train.step import lite_task_backward, no_lite_backward, small_task_backward

    if cfg.train_method == "lite":
        return lambda model, s, sl, q, ql, gen: lite_task_backward(
            model, s, sl, q, ql, h=cfg.h, chunk_size=cfg.chunk_size, tasks_per_step=cfg.tasks_per_step,
            generator=gen, lite_scale=cfg.lite_scale)
    if cfg.train_method == "small_task":
        return lambda model, s, sl, q, ql, gen: small_task_backward(
            model, s, sl, q, ql, chunk_size=cfg.chunk_size, tasks_per_step=cfg.tasks_per_step)
    return lambda model, s, sl, q, ql, gen: no_lite_backward(model, s, sl, q, ql,
                                                             tasks_per_step=cfg.tasks_per_step)


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop finishes the task at hand, checkpoints and returns."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            import torch.distributed as dist

            self.dist = dist
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def broadcast_state(self, model: torch.nn.Module) -> None:
        """Every tensor of the state (parameters and buffers) from rank 0."""
        if self.world > 1:
            for tensor in model.state_dict().values():
                self.dist.broadcast(tensor, 0)

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """BN running statistics from rank 0 (the set encoder's differ per process; they are never used)."""
        if self.world > 1:
            for tensor in model.buffers():
                self.dist.broadcast(tensor, 0)

    def sum_grads(self, model: torch.nn.Module) -> None:
        if self.world > 1:
            for p in model.parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    self.dist.all_reduce(p.grad)

    def gather_rows(self, row: list, device: torch.device) -> list[list]:
        """Every process's row of this round, in rank order (rank 0 logs them all)."""
        if self.world == 1:
            return [row]
        rows = [None] * self.world
        self.dist.all_gather_object(rows, row)
        return rows

    def any(self, flag: bool, device: torch.device) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=device)
        self.dist.all_reduce(t)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()


def _shuffled(episode: dict, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Support and query each in a random order (reference `prepare_task`): the loader yields them grouped
    by class, and the query chunks of the step must mix classes as the reference's do."""
    sp = torch.randperm(len(episode["support_labels"]), generator=generator)  # (N,)
    qp = torch.randperm(len(episode["query_labels"]), generator=generator)  # (M,)
    return (episode["support_images"][sp], episode["support_labels"][sp],
            episode["query_images"][qp], episode["query_labels"][qp])


def _prepare_run_folder(cfg: TrainConfig, resume: bool, rank: int) -> dict | None:
    out = Path(cfg.out)
    if resume:
        state = ckpt.load_checkpoint(out / ckpt.CHECKPOINT)
        saved = TrainConfig.from_dict(state["config"], origin=str(out / ckpt.CHECKPOINT))
        differs = [f.name for f in dataclasses.fields(TrainConfig)
                   if f.name not in ("device", "num_workers", "checkpoint_every", "data", "out")
                   and getattr(saved, f.name) != getattr(cfg, f.name)]
        if differs:
            raise ValueError(f"{out / ckpt.CHECKPOINT}: saved config differs in {', '.join(differs)}")
        return state
    if rank != 0:  # rank 0 alone checks and creates the folder (others would race its config.json)
        return None
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: run folder exists and is not empty (resume it with --resume, or pick --out)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".config.json.tmp"
    tmp.write_text(cfg.to_json())
    tmp.replace(out / "config.json")
    return None


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
          on_task: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Meta-train as configured; with `resume`, continue the run in `cfg.out` exactly where it stopped.

    `on_task(task_index, stats)` is called after each task (after its Adam step, if it ends a step).

    Raises:
        ValueError: bad run folder, checkpoint or data (the message names the file).
    """
    device = torch.device(cfg.device)
    if device.type == "cuda":
        set_tf32(cfg.tf32)
    dist = _Dist(device)
    if cfg.tasks_per_step % dist.world or cfg.iterations % dist.world:
        raise ValueError(f"tasks_per_step ({cfg.tasks_per_step}) and iterations ({cfg.iterations}) must be "
                         f"multiples of the number of processes ({dist.world})")
    state = _prepare_run_folder(cfg, resume, dist.rank)
    dist.barrier()
    out = Path(cfg.out)

    model = build_model(cfg).to(device)
    # Adam over all parameters, as the reference: the frozen backbone never gets a gradient, so Adam skips it.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    loader = make_episode_loader(EpisodeLoaderConfig(
        data=cfg.data, sources=cfg.sources, split="train", seed=cfg.seed, image_size=cfg.image_size,
        view=cfg.view, num_workers=cfg.num_workers, pin_memory=device.type == "cuda", rank=dist.rank,
        world_size=dist.world),
        _description(cfg))

    iteration, best = 0, {}
    if state is None and cfg.calibration_images:
        calibrate_random_backbone(model, cfg, device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        params = dict(model.named_parameters())
        for name, grad in state["grads"].items():
            params[name].grad = grad.to(device)
        iteration = int(state["iteration"])
        best = {s: SourceResult(**r) for s, r in state["best_validation"].items()}
        ckpt.set_rng_state(state["rng"])
        loader.load_state_dict(state["loader"])
        if state["loader"]["next_episode"] != iteration:
            raise ValueError(f"{out / ckpt.CHECKPOINT}: loader position {state['loader']['next_episode']} "
                             f"!= iteration {iteration}")
    dist.broadcast_state(model)

    step = _step_function(cfg)
    logs = _Logs(out, iteration if state is not None else None) if dist.rank == 0 else None

    def save(now: int) -> None:
        if dist.rank != 0:
            return
        ckpt.save_checkpoint(out / ckpt.CHECKPOINT, {
            "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "grads": {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None},
            "iteration": now, "best_validation": {s: dataclasses.asdict(r) for s, r in best.items()},
            "rng": ckpt.rng_state(), "loader": loader.state_dict(), "metrics_rows": now})

    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    finished = iteration >= cfg.iterations
    with _StopRequest() as stop, _progress(progress and dist.rank == 0, cfg.iterations, iteration) as bar:
        model.train()
        episodes = iter(loader) if not finished else iter(())
        started, waited = time.perf_counter(), 0.0
        while not finished:
            before = time.perf_counter()
            episode = next(episodes)
            waited += time.perf_counter() - before
            task = episode["index"]  # global task index, == iteration + rank
            gen = task_generator(cfg.seed, task)
            support, support_labels, query, query_labels = (t.to(device, non_blocking=True)
                                                            for t in _shuffled(episode, gen))
            with torch.autocast(**autocast):
                stats = step(model, support, support_labels, query, query_labels, gen)
            row = [task, episode["source"], int(episode["support_labels"].max()) + 1, len(support_labels),
                   len(query_labels), float(stats["loss"]), float(stats["accuracy"])]
            rows = dist.gather_rows(row, device)
            iteration += dist.world  # one round: every process did one task
            if iteration % cfg.tasks_per_step == 0 or iteration == cfg.iterations:
                dist.sum_grads(model)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                dist.broadcast_buffers(model)  # parameters agree already: same start, same summed gradients
            if logs is not None:
                logs.tasks(rows)
            bar(rows)
            if on_task is not None:
                on_task(task, stats)

            finished = iteration >= cfg.iterations
            if cfg.val_sources and iteration % cfg.val_freq == 0 and not finished:
                best = _validate(cfg, model, device, dist, logs, iteration, best)
            stopping = dist.any(stop.requested, device)
            if finished or stopping or iteration % cfg.checkpoint_every == 0:
                if logs is not None:
                    logs.flush()
                save(iteration)
            if stopping:
                break
    seconds = time.perf_counter() - started
    loader.close()  # stop its workers, free its shared episode memory
    if logs is not None:
        if finished:
            ckpt.save_state_dict(out / "fully_trained.pt", model.state_dict())
        logs.close()
    dist.barrier()
    return TrainResult(iteration, finished, best, seconds, waited)


def _validate(cfg: TrainConfig, model, device, dist: _Dist, logs, iteration: int, best: dict) -> dict:
    """Rank 0 validates; `best` and best_validation.pt change when the new result is better on half."""
    if dist.rank == 0:
        results = evaluate(model, cfg.data, cfg.val_sources, "valid", cfg.val_episodes, cfg.seed, cfg.image_size,
                           device, chunk_size=cfg.chunk_size, num_workers=cfg.num_workers,
                           autocast_bf16=cfg.bf16, view=cfg.view)
        improved = better_on_half(results, best)
        logs.validation(iteration, results, improved)
        if improved:
            best = results
            ckpt.save_state_dict(Path(cfg.out) / "best_validation.pt", model.state_dict())
    if dist.world > 1:
        shared = [best]
        dist.dist.broadcast_object_list(shared, 0)
        best = shared[0]
    model.train()
    return best


class _Logs:
    """metrics.csv, validation.csv and TensorBoard scalars of rank 0."""

    def __init__(self, out: Path, resumed_at: int | None):
        self.metrics = CsvLog(out / METRICS_FILE, METRICS_COLUMNS, keep_rows=resumed_at)
        self.validation_log = CsvLog(out / VALIDATION_FILE, VALIDATION_COLUMNS,
                                     keep_rows=None if resumed_at is None else _rows_before(
                                         out / VALIDATION_FILE, resumed_at))
        self.events = EventWriter(out, purge_step=resumed_at)

    def tasks(self, rows: list[list]) -> None:
        for row in rows:
            self.metrics.write(row)
            self.events.scalar("train/loss", row[5], row[0])
            self.events.scalar("train/accuracy", row[6], row[0])

    def validation(self, iteration: int, results: dict, improved: bool) -> None:
        for source, r in results.items():
            self.validation_log.write([iteration, source, r.accuracy, r.confidence, r.n, int(improved)])
            self.events.scalar(f"valid/{source}", r.accuracy, iteration)
        self.validation_log.flush()

    def flush(self) -> None:
        self.metrics.flush()
        self.validation_log.flush()
        self.events.flush()

    def close(self) -> None:
        self.metrics.close()
        self.validation_log.close()
        self.events.close()


def _rows_before(path: Path, iteration: int) -> int:
    """Rows of validation.csv written at tasks <= iteration (those a resumed run keeps)."""
    import csv

    if not path.exists():
        return 0
    with open(path, newline="") as f:
        return sum(1 for row in list(csv.reader(f))[1:] if int(row[0]) <= iteration)


class _progress:
    """A rich progress bar (loss, accuracy, tasks/s) or nothing; called with each round's rows."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self):
        if not self.enabled:
            return lambda rows: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.3f} "
                                            "{task.fields[rate]:.2f} tasks/s"), TimeRemainingColumn())
        self.progress.start()
        self.bar = self.progress.add_task("train", total=self.total, completed=self.done, loss=math.nan,
                                          acc=math.nan, rate=0.0)
        self.started, self.count = time.monotonic(), 0
        self.recent: list[tuple[float, float]] = []

        def update(rows):
            self.count += len(rows)
            self.recent = (self.recent + [(r[5], r[6]) for r in rows])[-100:]  # running mean of 100 tasks
            loss, acc = (float(np.mean(v)) for v in zip(*self.recent))
            rate = self.count / max(time.monotonic() - self.started, 1e-9)
            self.progress.update(self.bar, advance=len(rows), loss=loss, acc=acc, rate=rate)

        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()
