"""What a meta-training run holds between tasks, and its checkpoint: model, optimizer, accumulated gradients,
task counter, best validation, logs; `start` builds it fresh or restores it from checkpoint.pt, `save` writes
it, `record` / `step_if_due` do the per-task bookkeeping (divergence checks, the Adam step every
`tasks_per_step` tasks)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch

from lite_train.data.loader import EpisodeLoader, make_episode_loader
from lite_train.evaluate.episodes import SourceResult
from lite_train.progress import Progress
from lite_train.train import checkpoint as ckpt
from lite_train.train.config import TrainConfig
from lite_train.train.distributed import Distributed
from lite_train.train.logs import METRICS_COLUMNS, VALIDATION_COLUMNS, RunLogs


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


@dataclasses.dataclass
class TrainingRun:
    """The state of a run between tasks (module docstring)."""

    cfg: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: EpisodeLoader
    dist: Distributed
    logs: RunLogs | None  # rank 0 only
    iteration: int = 0  # the next global task index
    best: dict = dataclasses.field(default_factory=dict)  # {source: SourceResult} of the best validation
    saved: int | None = None  # the task of the last checkpoint written or resumed from
    step_sources: list = dataclasses.field(default_factory=list)  # of the tasks accumulated since the last step

    @classmethod
    def start(cls, cfg: TrainConfig, loader: EpisodeLoader, checkpoint: Path | None, dist: Distributed,
              device: torch.device, status: Progress, stack: contextlib.ExitStack) -> "TrainingRun":
        """A fresh run (the random backbone calibrated if asked), or the one saved in `checkpoint`."""
        model = build_model(cfg).to(device)
        # Adam over all parameters, as the reference: the frozen backbone never gets a gradient, so Adam skips it.
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
        state = None
        if checkpoint is not None:
            state = ckpt.load_checkpoint(checkpoint)
            status.status(f"resuming at task {state['iteration']} of {cfg.iterations} ({checkpoint})")
        elif cfg.calibration_images:
            status.status(f"setting the random backbone's BN statistics from {cfg.calibration_images} training "
                          "images")
            calibrate_random_backbone(model, cfg, device)
        logs = None
        if dist.rank == 0:
            logs = RunLogs(Path(cfg.out), METRICS_COLUMNS, VALIDATION_COLUMNS,
                           None if state is None else state["rows"], purge_step=0 if state is None else
                           int(state["iteration"]))
            stack.callback(logs.close)  # also on an error: what was logged reaches the files
        run = cls(cfg, model, optimizer, loader, dist, logs)
        if state is not None:
            run._restore(state, checkpoint, device)
        dist.broadcast_state(model)
        return run

    def _restore(self, state: dict, path: Path, device: torch.device) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        params = dict(self.model.named_parameters())
        for name, grad in state["grads"].items():
            params[name].grad = grad.to(device)
        self.iteration = self.saved = int(state["iteration"])
        self.best = {s: SourceResult(**r) for s, r in state["best_validation"].items()}
        ckpt.set_rng_state(state["rng"])
        self.loader.load_state_dict(state["loader"])
        if state["loader"]["next_episode"] != self.iteration:
            raise ValueError(f"{path}: loader position {state['loader']['next_episode']} != iteration "
                             f"{self.iteration}")

    def save(self) -> None:
        """checkpoint.pt at the current task (rank 0; every process calls it)."""
        self.saved = self.iteration
        if self.logs is None:
            return
        self.logs.flush()
        model, now = self.model, self.iteration
        ckpt.save_checkpoint(Path(self.cfg.out) / ckpt.CHECKPOINT, {
            "config": self.cfg.to_dict(), "model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "grads": {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None},
            "iteration": now, "best_validation": {s: dataclasses.asdict(r) for s, r in self.best.items()},
            "rng": ckpt.rng_state(), "loader": self.loader.state_dict(), "rows": self.logs.rows(),
            "model_meta": model_metadata(self.cfg, model, now)})

    def last_good(self) -> str:
        return ckpt.last_good_state(Path(self.cfg.out), self.saved)

    def record(self, episode: dict, stats: dict) -> list[list]:
        """Every process's row of this round (metrics.csv), after checking the losses are finite; advances the
        task counter by one round."""
        row = [episode["index"], episode["source"], int(episode["support_labels"].max()) + 1,
               len(episode["support_labels"]), len(episode["query_labels"]), float(stats["loss"]),
               float(stats["accuracy"])]
        rows = self.dist.gather_rows(row)
        bad = [r for r in rows if not np.isfinite(r[5])]
        if bad:
            raise ValueError(f"training diverged: task {bad[0][0]} ({bad[0][1]}) has loss {bad[0][5]}; nothing "
                             f"non-finite was saved ({self.last_good()}); lower --learning-rate (now "
                             f"{self.cfg.learning_rate:g})")
        if self.logs is not None:
            for r in rows:
                self.logs.metric(r, r[0], {"train/loss": r[5], "train/accuracy": r[6]})
        self.iteration += self.dist.world  # one round: every process did one task
        self.step_sources += [r[1] for r in rows]
        return rows

    def step_if_due(self) -> None:
        """Every `tasks_per_step` tasks (and after the last): gradients summed over processes, checked, one Adam
        step."""
        cfg, model = self.cfg, self.model
        if self.iteration % cfg.tasks_per_step and self.iteration != cfg.iterations:
            return
        self.dist.sum_grads(model)
        first = (self.iteration - 1) // cfg.tasks_per_step * cfg.tasks_per_step
        for name, p in model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise ValueError(f"training diverged: the gradient of {name} is not finite after tasks "
                                 f"{first}-{self.iteration - 1} ({', '.join(dict.fromkeys(self.step_sources))}); "
                                 f"nothing non-finite was saved ({self.last_good()}); lower --learning-rate (now "
                                 f"{cfg.learning_rate:g})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_sources = []
        self.dist.broadcast_buffers(model)  # parameters agree already: same start, same summed gradients
