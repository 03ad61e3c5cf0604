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

from lite_train.data.loader import EpisodeLoader, make_episode_loader
from lite_train.progress import Progress
from lite_train.runtime import set_tf32, torch_threads
from lite_train.train import checkpoint as ckpt
from lite_train.train.config import TRAIN_RESUME_FIELDS, TrainConfig
from lite_train.train.distributed import Distributed
from lite_train.evaluate.episodes import SourceResult, better_on_half, evaluate
from lite_train.train.logs import METRICS_COLUMNS, VALIDATION_COLUMNS, RunLogs
from lite_train.train.run_folder import RunFolder
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


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The model at initialisation: seeded from cfg.seed, backbone from `backbone_weights` or random."""
    from lite_train.model import LiteModel, ModelConfig

    torch.manual_seed(cfg.seed)
    model = LiteModel(ModelConfig(classifier=cfg.classifier))
    if cfg.backbone_weights is not None:
        from lite_train.model import load_backbone_weights

        load_backbone_weights(model, cfg.backbone_weights)
    return model


def model_metadata(cfg: TrainConfig, model: torch.nn.Module, tasks: int) -> dict:
    """What every model file of this run carries (lite_train.model.model_file): enough to use it as trained."""
    from lite_train.model.weights import backbone_provenance
    from manifests._version import __version__

    backbone = None
    if cfg.backbone_weights is not None:
        backbone = backbone_provenance(cfg.backbone_weights) or {"file": cfg.backbone_weights}
    return {"made_by": f"lite-train {__version__} train", "image_size": cfg.image_size,
            "classifier": cfg.classifier, "view": cfg.view, "preprocess": "md",
            "model_config": dataclasses.asdict(model.config), "tasks": tasks, "train_config": cfg.to_dict(),
            "backbone": backbone}


def calibrate_random_backbone(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """BN statistics of a random backbone from the first `cfg.calibration_images` images (support, then
    query, episode by episode) of the training stream."""
    from lite_train.model import calibrate_batch_norm

    images, count = [], 0
    with make_episode_loader(cfg.loader_config(num_workers=0), cfg.description()) as loader:
        for episode in loader:
            for part in (episode["support_images"], episode["query_images"]):
                images.append(part.clone())
                count += len(part)
            if count >= cfg.calibration_images:
                break
    calibrate_batch_norm(model.feature_extractor, torch.cat(images)[:cfg.calibration_images].to(device))
    model.train()


def _shuffled(episode: dict, generator: torch.Generator, device: torch.device) -> TrainingTask:
    """Support and query each in a random order (reference `prepare_task`): the loader yields them grouped
    by class, and the query chunks of the step must mix classes as the reference's do."""
    sp = torch.randperm(len(episode["support_labels"]), generator=generator)  # (N,)
    qp = torch.randperm(len(episode["query_labels"]), generator=generator)  # (M,)
    return TrainingTask(episode["support_images"][sp].to(device, non_blocking=True),
                        episode["support_labels"][sp].to(device, non_blocking=True),
                        episode["query_images"][qp].to(device, non_blocking=True),
                        episode["query_labels"][qp].to(device, non_blocking=True), generator)


def _check_gradients(model: torch.nn.Module, first: int, last: int, sources: list[str], cfg: TrainConfig,
                     last_good: str) -> None:
    """Raises ValueError naming the tasks, their sources and the first parameter whose accumulated gradient is
    not finite."""
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise ValueError(f"training diverged: the gradient of {name} is not finite after tasks {first}-{last} "
                             f"({', '.join(dict.fromkeys(sources))}); nothing non-finite was saved ({last_good}); "
                             f"lower --learning-rate (now {cfg.learning_rate:g})")


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
        return _train(cfg, loader, checkpoint_path, progress, on_task, stop, dist, device, status, stack)


def _train(cfg: TrainConfig, loader: EpisodeLoader, checkpoint_path: Path | None, progress: bool | None,
           on_task, stop: StopRequest, dist: Distributed, device: torch.device, status: Progress,
           stack: contextlib.ExitStack) -> TrainResult:
    out = Path(cfg.out)
    model = build_model(cfg).to(device)
    # Adam over all parameters, as the reference: the frozen backbone never gets a gradient, so Adam skips it.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    iteration, best, state = 0, {}, None
    if checkpoint_path is not None:
        state = ckpt.load_checkpoint(checkpoint_path)
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
            raise ValueError(f"{checkpoint_path}: loader position {state['loader']['next_episode']} != iteration "
                             f"{iteration}")
        status.status(f"resuming at task {iteration} of {cfg.iterations} ({checkpoint_path})")
    elif cfg.calibration_images:
        status.status(f"setting the random backbone's BN statistics from {cfg.calibration_images} training images")
        calibrate_random_backbone(model, cfg, device)
    dist.broadcast_state(model)
    logs = RunLogs(out, METRICS_COLUMNS, VALIDATION_COLUMNS, None if state is None else state["rows"],
                   purge_step=iteration) if dist.rank == 0 else None
    if logs is not None:
        stack.callback(logs.close)  # also on an error: what was logged reaches the files
    saved = None if state is None else iteration  # the task of the last checkpoint (for divergence messages)

    def save(now: int) -> None:
        nonlocal saved
        saved = now
        if logs is not None:
            logs.flush()
            ckpt.save_checkpoint(out / ckpt.CHECKPOINT, {
                "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "grads": {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None},
                "iteration": now, "best_validation": {s: dataclasses.asdict(r) for s, r in best.items()},
                "rng": ckpt.rng_state(), "loader": loader.state_dict(), "rows": logs.rows(),
                "model_meta": model_metadata(cfg, model, now)})

    step = STEPS[cfg.train_method]
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    view = Progress("train", cfg.iterations, "tasks", iteration, enabled=dist.rank == 0, live=progress)
    started, waited = time.perf_counter(), 0.0
    episodes = iter(loader)
    step_sources: list[str] = []  # of the tasks whose gradients are accumulated now
    model.train()
    while iteration < cfg.iterations and not dist.any(stop.requested):
        before = time.perf_counter()
        episode = next(episodes)
        waited += time.perf_counter() - before
        task = episode["index"]  # global task index, == iteration + rank
        with torch.autocast(**autocast):
            stats = step(model, _shuffled(episode, task_generator(cfg.seed, task), device), cfg)
        row = [task, episode["source"], int(episode["support_labels"].max()) + 1, len(episode["support_labels"]),
               len(episode["query_labels"]), float(stats["loss"]), float(stats["accuracy"])]
        rows = dist.gather_rows(row)
        bad = [r for r in rows if not np.isfinite(r[5])]
        if bad:
            raise ValueError(f"training diverged: task {bad[0][0]} ({bad[0][1]}) has loss {bad[0][5]}; nothing "
                             f"non-finite was saved ({ckpt.last_good_state(out, saved)}); lower --learning-rate (now "
                             f"{cfg.learning_rate:g})")
        iteration += dist.world  # one round: every process did one task
        step_sources += [r[1] for r in rows]
        if iteration % cfg.tasks_per_step == 0 or iteration == cfg.iterations:
            dist.sum_grads(model)
            _check_gradients(model, (iteration - 1) // cfg.tasks_per_step * cfg.tasks_per_step, iteration - 1,
                             step_sources, cfg, ckpt.last_good_state(out, saved))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_sources = []
            dist.broadcast_buffers(model)  # parameters agree already: same start, same summed gradients
        if logs is not None:
            for r in rows:
                logs.metric(r, r[0], {"train/loss": r[5], "train/accuracy": r[6]})
        view.advance(len(rows), loss=float(np.mean([r[5] for r in rows])), acc=float(np.mean([r[6] for r in rows])))
        if on_task is not None:
            on_task(task, stats)
        finished = iteration >= cfg.iterations
        if cfg.val_sources and iteration % cfg.val_freq == 0 and not finished:
            best = _validate(cfg, model, device, dist, logs, iteration, best, view,
                             meta=model_metadata(cfg, model, iteration))
        stopping = dist.any(stop.requested)
        if finished or stopping or iteration % cfg.checkpoint_every == 0:
            save(iteration)
    view.close()
    seconds = time.perf_counter() - started
    episodes.close()  # stop the loader's workers, free its shared episode memory
    finished = iteration >= cfg.iterations
    if not finished and iteration == (0 if state is None else int(state["iteration"])):
        save(iteration)  # stopped before its first task (e.g. during start-up): --resume continues from here
    if logs is not None:
        if finished:
            ckpt.save_model_file(out / FULLY_TRAINED, model.state_dict(), model_metadata(cfg, model, iteration))
        logs.close()
        from lite_train.train.curves import write_curves

        write_curves(out)
    dist.barrier()
    return TrainResult(iteration, finished, best, seconds, waited)


def _validate(cfg: TrainConfig, model, device, dist: Distributed, logs: RunLogs | None, iteration: int, best: dict,
              view: Progress, meta: dict) -> dict:
    """Rank 0 validates; `best` and best_validation.pt change when the new result is better on half."""
    if dist.rank == 0:
        results = evaluate({"model": model}, cfg.data, cfg.val_sources, "valid", cfg.val_episodes, cfg.seed,
                           cfg.image_size, device, chunk_size=cfg.chunk_size, num_workers=cfg.num_workers,
                           autocast_bf16=cfg.bf16, view=cfg.view)["model"]
        improved = better_on_half(results, best)
        for source, r in results.items():
            logs.validate([iteration, source, r.accuracy, r.confidence, r.n, int(improved)], iteration,
                          {f"valid/{source}": r.accuracy})
        logs.flush()
        view.status(f"validation after task {iteration}: " + ", ".join(
            f"{s} {r.accuracy:.1f} ± {r.confidence:.1f}" for s, r in results.items())
                    + (" (new best)" if improved else ""))
        if improved:
            best = results
            ckpt.save_model_file(Path(cfg.out) / BEST_VALIDATION, model.state_dict(), meta)
    best = dist.broadcast_object(best)
    model.train()
    return best
