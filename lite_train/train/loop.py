"""A `TrainConfig` in, a run folder out: the meta-training loop of LITE:src/run.py, resumable bit for bit.

Run folder: config.json, checkpoint.pt (every `checkpoint_every` tasks, on SIGTERM/Ctrl-C and at the end),
metrics.csv (one row per task), validation.csv, TensorBoard events, curves.png, best_validation.pt and
fully_trained.pt (LITE's plain state dicts, carrying what `test` and `predict` need to use them:
`lite_train.model.model_file`).

Read top to bottom, one task = one episode:
    episode i (global index) -> shuffle support and query with the task's generator (reference
    `prepare_task`) -> the step of `train_method` (gradients accumulate in .grad; a non-finite loss stops
    the run) -> every `tasks_per_step` tasks (and after the last) one Adam step (non-finite gradients stop
    the run before it) -> every `val_freq` tasks (not after the last) validation with the "better on at
    least half of the sources" rule -> checkpoint.

Every random draw derives from `cfg.seed`: model init (global torch seed before construction), the episode
stream (the loader), and the per-task generator (task shuffles, LITE subsets) seeded from (seed, i), so
task i is the same whether the run was resumed or not, and whatever the number of processes.

Data parallel (torchrun): process r of K trains the global tasks i = r (mod K); after each round of K tasks
the gradients are summed over processes before an Adam step, so K processes take the same steps as one
(up to the order of the floating-point sum); parameters start from rank 0's and stay identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lite_train.data.loader import make_episode_loader
from lite_train.evaluate.episodes import better_on_half, evaluate
from lite_train.progress import Progress
from lite_train.runtime import set_tf32, torch_threads
from lite_train.train import checkpoint as ckpt
from lite_train.train.config import TRAIN_RESUME_FIELDS, TrainConfig
from lite_train.train.distributed import Distributed
from lite_train.train.run_folder import RunFolder
from lite_train.train.run_state import TrainingRun, model_metadata
from lite_train.train.signals import StopRequest
from lite_train.train.step import STEPS, TrainingTask

_TASK_STREAM = 0x7A5C  # SeedSequence key of the per-task generators
FULLY_TRAINED = "fully_trained.pt"
BEST_VALIDATION = "best_validation.pt"


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


def _shuffled(episode: dict, generator: torch.Generator, device: torch.device) -> TrainingTask:
    """Support and query each in a random order (reference `prepare_task`): the loader yields them grouped
    by class, and the query chunks of the step must mix classes as the reference's do."""
    sp = torch.randperm(len(episode["support_labels"]), generator=generator)  # (N,)
    qp = torch.randperm(len(episode["query_labels"]), generator=generator)  # (M,)
    return TrainingTask(episode["support_images"][sp].to(device, non_blocking=True),
                        episode["support_labels"][sp].to(device, non_blocking=True),
                        episode["query_images"][qp].to(device, non_blocking=True),
                        episode["query_labels"][qp].to(device, non_blocking=True), generator)


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None,
          on_task: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Meta-train as configured; with `resume`, continue the run in `cfg.out` exactly where it stopped.

    progress: a live bar (True), plain lines (False) or a bar exactly when stderr is a terminal (None).
    on_task(task_index, stats) is called after each task (after its Adam step, if it ends a step).

    Raises:
        ValueError: bad data, run folder or checkpoint (one line naming the file), or divergence.
    """
    with StopRequest() as stop, torch_threads(cfg.threads, cfg.num_workers), contextlib.ExitStack() as stack:
        device = torch.device(cfg.device)
        if device.type == "cuda":
            set_tf32(cfg.tf32)
        dist = Distributed(device)
        if cfg.tasks_per_step % dist.world or cfg.iterations % dist.world:
            raise ValueError(f"tasks_per_step ({cfg.tasks_per_step}) and iterations ({cfg.iterations}) must be "
                             f"multiples of the number of processes ({dist.world})")
        status = Progress("train", 0, "tasks", enabled=dist.rank == 0, live=False)
        status.status(f"opening {', '.join(cfg.sources)} ({cfg.view} training classes)")
        # The data is checked before the run folder is touched: a bad source leaves nothing behind.
        loader = stack.enter_context(make_episode_loader(cfg.loader_config(dist.rank, dist.world),
                                                         cfg.description()))
        checkpoint_path = None
        if dist.rank == 0:
            folder = stack.enter_context(RunFolder(cfg.out, "lite-train train"))
            checkpoint_path = folder.prepare(cfg.to_dict(), resume, TRAIN_RESUME_FIELDS)
        checkpoint_path = dist.broadcast_object(checkpoint_path)
        run = TrainingRun.start(cfg, loader, checkpoint_path, dist, device, status, stack)
        return _loop(run, progress, on_task, stop, device)


def _loop(run: TrainingRun, progress: bool | None, on_task, stop: StopRequest, device: torch.device) -> TrainResult:
    """The task loop, top to bottom."""
    cfg, model, dist = run.cfg, run.model, run.dist
    step = STEPS[cfg.train_method]
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    view = Progress("train", cfg.iterations, "tasks", run.iteration, enabled=dist.rank == 0, live=progress)
    started, waited, first = time.perf_counter(), 0.0, run.iteration
    episodes = iter(run.loader)
    model.train()
    while run.iteration < cfg.iterations and not dist.any(stop.requested):
        before = time.perf_counter()
        episode = next(episodes)  # global task index episode["index"] == run.iteration + rank
        waited += time.perf_counter() - before
        with torch.autocast(**autocast):
            stats = step(model, _shuffled(episode, task_generator(cfg.seed, episode["index"]), device), cfg)
        rows = run.record(episode, stats)  # checks the losses, logs, advances one round
        run.step_if_due()  # every tasks_per_step tasks: checks the gradients, one Adam step
        view.advance(len(rows), loss=float(np.mean([r[5] for r in rows])), acc=float(np.mean([r[6] for r in rows])))
        if on_task is not None:
            on_task(episode["index"], stats)
        finished = run.iteration >= cfg.iterations
        if cfg.val_sources and run.iteration % cfg.val_freq == 0 and not finished:
            _validate(run, device, view)
        if finished or dist.any(stop.requested) or run.iteration % cfg.checkpoint_every == 0:
            run.save()
    view.close()
    seconds = time.perf_counter() - started
    episodes.close()  # stop the loader's workers, free its shared episode memory
    finished = run.iteration >= cfg.iterations
    if not finished and run.iteration == first:
        run.save()  # stopped before its first task (e.g. during start-up): --resume continues from here
    if run.logs is not None:
        out = Path(cfg.out)
        if finished:
            ckpt.save_model_file(out / FULLY_TRAINED, model.state_dict(), model_metadata(cfg, model, run.iteration))
        run.logs.close()
        from lite_train.train.curves import write_curves

        write_curves(out)
    dist.barrier()
    return TrainResult(run.iteration, finished, run.best, seconds, waited)


def _validate(run: TrainingRun, device: torch.device, view: Progress) -> None:
    """Rank 0 validates; the best result and best_validation.pt change when the new result is better on half."""
    cfg, iteration = run.cfg, run.iteration
    if run.dist.rank == 0:
        results = evaluate({"model": run.model}, cfg.data, cfg.val_sources, "valid", cfg.val_episodes, cfg.seed,
                           cfg.image_size, device, chunk_size=cfg.chunk_size, num_workers=cfg.num_workers,
                           autocast_bf16=cfg.bf16, view=cfg.view)["model"]
        improved = better_on_half(results, run.best)
        for source, r in results.items():
            run.logs.validate([iteration, source, r.accuracy, r.confidence, r.n, int(improved)], iteration,
                              {f"valid/{source}": r.accuracy})
        run.logs.flush()
        view.status(f"validation after task {iteration}: " + ", ".join(
            f"{s} {r.accuracy:.1f} ± {r.confidence:.1f}" for s, r in results.items())
                    + (" (new best)" if improved else ""))
        if improved:
            run.best = results
            ckpt.save_model_file(Path(cfg.out) / BEST_VALIDATION, run.model.state_dict(),
                                 model_metadata(cfg, run.model, iteration))
    run.best = run.dist.broadcast_object(run.best)
    run.model.train()
