"""Training state in, `checkpoint.pt` out (and back): written atomically, loaded with `weights_only=True`.

A checkpoint is a dict of tensors and plain Python values only (so `weights_only=True` loads it):

    config            TrainConfig.to_dict()
    model             model.state_dict()
    optimizer         optimizer.state_dict()
    grads             {parameter name: accumulated .grad} (a run killed between two Adam steps resumes
                      with the gradients of the tasks already done in that step)
    iteration         the next global task index
    best_validation   {source: {"accuracy", "confidence", "n"}} of the best validation so far ({} = none)
    rng               {"torch": CPU generator state, "cuda": [per-device states]}
    loader            EpisodeLoader.state_dict(): data config, next episode index, source fingerprints
    metrics_rows      rows already in metrics.csv (a resumed run truncates rows written after the checkpoint)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"
FORMAT = 1  # bumped when the layout above changes


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: temp file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` onto the CPU.

    Raises:
        ValueError: the file is missing, unreadable, or not a lite-train checkpoint (message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for corrupt or foreign files
        raise ValueError(f"{path}: cannot be read as a checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a lite-train checkpoint (format {FORMAT} expected)")
    return state


def model_state_from_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict in a file: a lite-train checkpoint, or a plain state dict (LITE's releases,
    our `fully_trained.pt` / `best_validation.pt`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a model file: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and state.get("format") == FORMAT and "model" in state:
        return state["model"]
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state
    raise ValueError(f"{path}: neither a lite-train checkpoint nor a state dict of tensors")


def save_state_dict(path: str | Path, state_dict: dict[str, torch.Tensor]) -> None:
    """A plain state dict (fully_trained.pt, best_validation.pt), written atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state_dict, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def rng_state() -> dict[str, Any]:
    """Every global torch RNG state (the trainer's own draws use per-task generators; these cover any
    library code that draws from the global generators)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
