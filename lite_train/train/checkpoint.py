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
    rows              {"metrics": n, "validation": m}: rows already in metrics.csv / validation.csv (a resumed
                      run truncates rows written after the checkpoint)
    model_meta        what the model files of the run carry (lite_train.model.model_file)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lite_train.files import atomic_write
from lite_train.model.model_file import CHECKPOINT_FORMAT, load_tensors, with_metadata

CHECKPOINT = "checkpoint.pt"
FORMAT = CHECKPOINT_FORMAT  # bumped when the layout above changes (2: "rows", "model_meta")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: temp file in the same folder, fsync, rename, fsync the folder.

    Raises:
        ValueError: one line naming the file ("no space left on device: <path>"), or the model holds a
            non-finite value; the old file stays.
    """
    _check_finite(state["model"], path)
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f), fsync=True)


def _check_finite(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """No NaN or infinity ever reaches a saved file: the last good one stays."""
    bad = next((k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"training diverged: {bad} holds NaN or infinite values; {path} was not written (the "
                         "last one written holds finite values); lower the learning rate")


def last_good_state(out: Path, saved: int | None, unit: str = "task") -> str:
    """Where a diverged run's last finite state is, for its error message: the checkpoint written (or resumed
    from) after `saved` tasks or batches, or none (a run that diverges before its first checkpoint must not
    point at one)."""
    if saved is None:
        return "no checkpoint was written yet"
    return f"{out / CHECKPOINT} holds the last good state ({unit} {saved})"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` onto the CPU.

    Raises:
        ValueError: the file is missing, empty, unreadable, or not a lite-train checkpoint of this format
            (one line naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, not a checkpoint (a write was interrupted?); remove it to start "
                         "the run over, or restore it")
    state = load_tensors(path, "a checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise ValueError(f"{path}: not a lite-train checkpoint of format {FORMAT}"
                         + (f" (format {found}: written by another version)" if found is not None else ""))
    return state


def save_model_file(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """A plain state dict as LITE writes its models (fully_trained.pt, best_validation.pt), carrying `meta`
    where `load_state_dict` does not look (lite_train.model.model_file.with_metadata), written atomically."""
    _check_finite(state_dict, path)
    state = with_metadata({k: v.detach().cpu() for k, v in state_dict.items()}, meta)
    atomic_write(path, lambda f: torch.save(state, f), fsync=True)


def rng_state() -> dict[str, Any]:
    """Every global torch RNG state (the trainer's own draws use per-task generators; these cover any
    library code that draws from the global generators)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
