"""A `PretrainConfig` in, a run folder with `backbone.pt` out: supervised pretraining of the EfficientNet-B0
backbone on the training classes of chosen sources, as Meta-Dataset's batch baselines pretrain on ImageNet's
training classes (LITE itself starts from ImageNet weights, which an offline cluster may not have).

Run folder: config.json, checkpoint.pt, metrics.csv (one row per batch), validation.csv (held-out accuracy
after every epoch, and once more after the final BN statistics), TensorBoard events, curves.png, and
backbone.pt (+ backbone.pt.json, its provenance), which `lite-train train --backbone-weights` takes.

Read top to bottom:
    batch b of epoch e (BatchLoader: training classes only, minus the held-out images) -> augment (random
    crop + flip, a generator seeded by (seed, b)) -> plain EfficientNet-B0 (no FiLM) + a linear classifier
    -> label-smoothed cross-entropy -> SGD with Nesterov momentum, weight decay, linear warm-up then cosine
    learning rate -> after each epoch the held-out accuracy -> at the end BN statistics recomputed as the
    mean over `bn_batches` shuffled training batches -> held-out accuracy again -> backbone.pt.

Every random draw derives from `cfg.seed` (initialisation: the global torch seed before construction;
holdout, batch order and augmentation: seeded streams), so the same command gives the same backbone, and a
resumed run continues at the batch where it stopped, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lite_train.data.batches import BatchLoader, BatchLoaderConfig
from lite_train.model.efficientnet import FEATURE_DIM, FilmEfficientNet, calibrate_batch_norm
from lite_train.model.weights import save_backbone_file
from lite_train.progress import Progress
from lite_train.runtime import torch_threads
from lite_train.train import checkpoint as ckpt
from lite_train.train.distributed import Distributed
from lite_train.train.logs import PRETRAIN_METRICS_COLUMNS, PRETRAIN_VALIDATION_COLUMNS, RunLogs
from lite_train.train.pretrain_config import PRETRAIN_RESUME_FIELDS, PretrainConfig
from lite_train.train.run_folder import RunFolder
from lite_train.train.signals import StopRequest

BACKBONE_FILE = "backbone.pt"
PRETRAIN_BN_MOMENTUM = 0.1  # PyTorch's default while the backbone trains (its TF 0.01 lags a short run, P2)
_AUGMENT_STREAM = 0xA6


@dataclasses.dataclass(frozen=True)
class PretrainResult:
    """What a call to `pretrain` did."""

    batches: int  # global batches done (== epochs * batches_per_epoch when finished)
    finished: bool  # False: stopped by a signal (checkpoint written)
    held_out_accuracy: float | None  # final held-out accuracy in % (None: not finished, or nothing held out)
    backbone: Path | None  # the backbone file (when finished)
    seconds: float


class PretrainNet(nn.Module):
    """EfficientNet-B0 (trainable, no FiLM) + a linear classifier: images (n, 3, S, S) -> logits (n, C).

    Initialised as TF's EfficientNet (`FilmEfficientNet`), except that the last BN of every residual block
    starts with weight 0, so each block starts as the identity (Goyal et al. 2017, timm's `zero_init_last`):
    from scratch on small data it trains faster and more stably (docs/fidelity.md P1 has the measurement)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.backbone = FilmEfficientNet()
        self.backbone.requires_grad_(True)
        self.backbone._fc.requires_grad_(False)  # the reference's empty Linear(1280, 0): no parameters to learn
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = PRETRAIN_BN_MOMENTUM
        with torch.no_grad():
            for block in self.backbone._blocks:
                if block.spec.residual:
                    block._bn2.weight.zero_()
        self.classifier = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images))  # (n, C)


def augment(images: torch.Tensor, generator: torch.Generator, crop: bool = True, flip: bool = True) -> torch.Tensor:
    """Random crop and/or horizontal flip of every image (n, 3, S, S): crop = the image padded by max(1, S/8)
    pixels on each side (edges replicated), a random S x S window of it; flip = mirrored with probability 1/2.
    The draws are the same whichever is on, so switching one off leaves the other's unchanged."""
    n, _, s, _ = images.shape
    pad = max(1, s // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")  # (n, 3, S + 2p, S + 2p)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    if not crop:
        dy.fill_(pad)
        dx.fill_(pad)
    if not flip:
        flips.fill_(False)
    flip = flips
    span = torch.arange(s)
    rows = (dy[:, None] + span).to(images.device)  # (n, S)
    cols = torch.where(flip[:, None], dx[:, None] + span.flip(0), dx[:, None] + span).to(images.device)  # (n, S)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(3, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # (n, 3, S, S)


def learning_rate(cfg: PretrainConfig, step: int, total: int, per_epoch: int) -> float:
    """Linear warm-up from 0 over `warmup_epochs`, then cosine from the peak to 0 at the last step."""
    warmup = min(int(round(cfg.warmup_epochs * per_epoch)), total)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(cfg: PretrainConfig, model: PretrainNet) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]  # conv and linear weights
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]  # BN parameters, biases
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                           lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def _held_out(model: PretrainNet, loader: BatchLoader, device: torch.device) -> tuple[float, float, int]:
    """(accuracy %, mean cross-entropy, images) on the held-out images, in eval mode (running BN statistics)."""
    model.eval()
    correct, loss, count = 0, 0.0, 0
    with torch.no_grad():
        for batch in loader.held_out():
            images = batch["images"].to(device).contiguous(memory_format=torch.channels_last)
            labels = batch["labels"].to(device)
            logits = model(images)  # (n, C)
            correct += int((logits.argmax(dim=1) == labels).sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
    model.train()
    return (100.0 * correct / count, loss / count, count) if count else (math.nan, math.nan, 0)


def _final_bn_statistics(model: PretrainNet, loader: BatchLoader, cfg: PretrainConfig, device) -> int:
    """Every BN's running statistics := the mean of its batch statistics over `bn_batches` shuffled training
    batches (no augmentation), as precise-BN does: the running averages of a short run lag its last weights."""
    batches = [b["images"].to(device).contiguous(memory_format=torch.channels_last)
               for b in loader.calibration(cfg.bn_batches)]
    if batches:
        calibrate_batch_norm(model.backbone, batches)
    return len(batches)


def pretrain(cfg: PretrainConfig, *, resume: bool = False, progress: bool | None = None,
             on_batch: Callable[[int, float], None] | None = None) -> PretrainResult:
    """Pretrain as configured; with `resume`, continue the run in `cfg.out` where it stopped.

    progress: a live bar (True), plain lines (False) or a bar exactly when stderr is a terminal (None).
    on_batch(batch_index, loss) is called after each SGD step.

    Raises:
        ValueError: bad data, run folder or checkpoint (one line naming the file), or a non-finite loss.
    """
    started = time.perf_counter()
    with StopRequest() as stop, torch_threads(cfg.threads, cfg.num_workers), contextlib.ExitStack() as stack:
        device = torch.device(cfg.device)
        dist = Distributed(device)
        status = Progress("pretrain", 0, "batches", enabled=dist.rank == 0, live=False)
        status.status(f"opening {', '.join(cfg.sources)} ({cfg.view} training classes)")
        # The data is checked before the run folder is touched: a bad --sources leaves nothing behind.
        loader = stack.enter_context(BatchLoader(BatchLoaderConfig(
            data=cfg.data, sources=cfg.sources, split="train", view=cfg.view, seed=cfg.seed,
            image_size=cfg.image_size, batch_size=cfg.batch_size, holdout=cfg.holdout,
            num_workers=cfg.num_workers, pin_memory=device.type == "cuda", rank=dist.rank, world_size=dist.world)))
        checkpoint_path = None
        if dist.rank == 0:
            folder = stack.enter_context(RunFolder(cfg.out, "lite-train pretrain"))
            checkpoint_path = folder.prepare(cfg.to_dict(), resume, PRETRAIN_RESUME_FIELDS)
        checkpoint_path = dist.broadcast_object(checkpoint_path)
        return _pretrain(cfg, loader, checkpoint_path, progress, on_batch, stop, dist, device, status, started, stack)


def _pretrain(cfg: PretrainConfig, loader: BatchLoader, checkpoint_path: Path | None, progress: bool | None,
              on_batch, stop: StopRequest, dist: Distributed, device: torch.device, status: Progress,
              started: float, stack: contextlib.ExitStack) -> PretrainResult:
    out = Path(cfg.out)
    per_epoch, classes = loader.batches_per_epoch, loader.num_classes
    total = cfg.epochs * per_epoch
    torch.manual_seed(cfg.seed)
    model = PretrainNet(classes).to(device).to(memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, model)
    done, state = 0, None
    if checkpoint_path is not None:
        state = ckpt.load_checkpoint(checkpoint_path)
        loader.check_state(state["loader"], str(checkpoint_path))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        done = int(state["batches"])
        status.status(f"resuming at batch {done} of {total} ({checkpoint_path})")
    dist.broadcast_state(model)
    logs = RunLogs(out, PRETRAIN_METRICS_COLUMNS, PRETRAIN_VALIDATION_COLUMNS,
                   None if state is None else state["rows"], purge_step=done) if dist.rank == 0 else None
    if logs is not None:
        stack.callback(logs.close)  # also on an error: what was logged reaches the files
    held_out_images = len(loader.planner.held_out.sample)
    saved = None if state is None else done  # the batch of the last checkpoint (for divergence messages)

    def save(batches: int, finished: bool = False) -> None:
        nonlocal saved
        saved = batches
        if logs is not None:
            logs.flush()
            ckpt.save_checkpoint(out / ckpt.CHECKPOINT, {
                "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "batches": batches, "rows": logs.rows(), "loader": loader.state_dict(), "finished": finished})

    if state is not None and state["finished"]:
        status.status(f"{out} is a finished run; its backbone is {out / BACKBONE_FILE}")
        if logs is not None:
            logs.close()
        return PretrainResult(done, True, None, out / BACKBONE_FILE, time.perf_counter() - started)

    status.status(f"{classes} classes, {len(loader.planner.train.sample)} training and {held_out_images} "
                  f"held-out images, {per_epoch} batches of {cfg.batch_size} per epoch")
    view = Progress("pretrain", total, "batches", done, enabled=dist.rank == 0, live=progress)
    model.train()
    while done < total and not dist.any(stop.requested):
        epoch, position = divmod(done, per_epoch)
        for batch in loader.epoch(epoch, position):
            step = batch["index"]  # == done
            lr = learning_rate(cfg, step, total, per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = batch["images"]
            if "crop" in cfg.augment or "flip" in cfg.augment:
                seed = np.random.SeedSequence([cfg.seed, _AUGMENT_STREAM, step]).generate_state(1)[0]
                images = augment(images, torch.Generator().manual_seed(int(seed)), "crop" in cfg.augment,
                                 "flip" in cfg.augment)
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            labels = batch["labels"].to(device, non_blocking=True)
            logits = model(images)  # (b, C), b = this process's rows of the batch
            # Each process adds its rows' share of the global batch mean; summed gradients = one process's.
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing,
                                   reduction="sum") / cfg.batch_size
            if not torch.isfinite(loss):
                raise ValueError(f"pretraining diverged: the loss of batch {step} (epoch {epoch}) is "
                                 f"{float(loss.detach())}; nothing non-finite was saved "
                                 f"({ckpt.last_good_state(out, saved, 'batch')}); lower --learning-rate (now "
                                 f"{cfg.learning_rate:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.sum_grads(model)
            bad = next((n for n, p in model.named_parameters() if p.grad is not None
                        and not torch.isfinite(p.grad).all()), None)
            if bad is not None:
                raise ValueError(f"pretraining diverged: the gradient of {bad} is not finite at batch {step} (epoch "
                                 f"{epoch}); nothing non-finite was saved "
                                 f"({ckpt.last_good_state(out, saved, 'batch')}); lower --learning-rate (now "
                                 f"{cfg.learning_rate:g})")
            optimizer.step()
            done = step + 1
            rows = dist.gather_rows([loss.item() * dist.world, float((logits.argmax(1) == labels).float().mean())])
            mean_loss, mean_acc = (float(np.mean(v)) for v in zip(*rows))
            if logs is not None:
                logs.metric([step, epoch, mean_loss, mean_acc, lr], step,
                            {"pretrain/loss": mean_loss, "pretrain/accuracy": mean_acc, "pretrain/lr": lr})
            view.advance(1, loss=mean_loss, acc=mean_acc)
            if on_batch is not None:
                on_batch(step, mean_loss)
            stopping = dist.any(stop.requested)
            if done % per_epoch == 0 and logs is not None and held_out_images:
                acc, mean_ce, n = _held_out(model, loader, device)
                logs.validate([done, epoch, acc, mean_ce, n, "running"], done, {"held_out/accuracy": acc})
                view.status(f"epoch {epoch + 1}/{cfg.epochs}: held-out accuracy {acc:.1f} % ({n} images)")
            if stopping or done % per_epoch == 0 or done % cfg.checkpoint_every == 0:
                save(done)
            if stopping:
                break
    view.close()
    if done < total:
        if done == 0:  # stopped during start-up: a checkpoint all the same, so that --resume finds one
            save(done)
        return PretrainResult(done, False, None, None, time.perf_counter() - started)
    held_out, backbone = None, None
    if dist.rank == 0:
        used = 0
        if cfg.bn_batches:
            status.status(f"recomputing BN statistics over {cfg.bn_batches} shuffled training batches")
            used = _final_bn_statistics(model, loader, cfg, device)
        if held_out_images and cfg.epochs:
            held_out, mean_ce, n = _held_out(model, loader, device)
            logs.validate([done, cfg.epochs, held_out, mean_ce, n, f"recomputed over {used} batches"], done,
                          {"held_out/accuracy_final": held_out})
            status.status(f"held-out accuracy with the final BN statistics: {held_out:.1f} % ({n} images)")
        backbone = out / BACKBONE_FILE
        save_backbone_file(backbone, model.backbone, model.classifier, _provenance(cfg, loader, held_out, used))
        save(done, finished=True)
        logs.close()
        if total:  # a random backbone (no epochs) has no curves
            from lite_train.train.curves import write_curves

            write_curves(out)
    dist.barrier()
    return PretrainResult(done, True, held_out, backbone, time.perf_counter() - started)


def _provenance(cfg: PretrainConfig, loader: BatchLoader, held_out: float | None, bn_batches: int) -> dict:
    """What the backbone file says about itself (also in backbone.pt.json)."""
    from manifests._version import __version__

    return {"made_by": f"lite-train {__version__} pretrain", "sources": list(cfg.sources), "view": cfg.view,
            "split": "train", "image_size": cfg.image_size, "epochs": cfg.epochs, "seed": cfg.seed,
            "classes": loader.num_classes, "class_names": list(loader.planner.classes.names),
            "training_images": int(len(loader.planner.train.sample)),
            "held_out_images": int(len(loader.planner.held_out.sample)),
            "held_out_accuracy": held_out, "bn_statistics_batches": bn_batches,
            "config": cfg.to_dict()}
