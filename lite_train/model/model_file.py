"""A model file in, one `ModelFile` out (read once, checked), and the metadata that every model file lite-train
writes carries: what `test`, `predict` and `eval-vtab` need to use it as it was trained.

Files read (`read_model_file`), by content, not by name:
- "checkpoint": a training checkpoint (`checkpoint.pt`: {"format", "config", "model", ...});
- "model": a plain LiteModel state dict, as LITE writes its files (`fully_trained.pt`, `best_validation.pt`,
  LITE's released `meta-trained_lite_224.pt`); lite-train's own carry their metadata inside the state dict's
  `_metadata[""]["lite_train"]` (see `with_metadata`), which `load_state_dict` ignores, so LITE's code still
  loads them strictly. A state dict without it (LITE's releases) has no recorded image size;
- "backbone": EfficientNet-B0 weights alone (`lite-train pretrain`'s backbone.pt, EfficientNet-PyTorch or
  timm files): the LITE model built on them runs with identity FiLM (gamma = 1, beta = 0), i.e. the plain
  backbone under the Simple CNAPs head.

Every file is read with `torch.load(weights_only=True)` (no code runs), and every error is one line naming
the file: unreadable, truncated, not a model, a missing or misshapen key, non-finite weights.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

MODEL_FORMAT = "lite-train-model/1"  # the metadata's "format"
CHECKPOINT_FORMAT = 2  # training checkpoints' "format" (lite_train.train.checkpoint); bumped on layout changes
REFERENCE_IMAGE_SIZE = 224  # LITE's released models and its default


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """A model file, read and checked."""

    path: Path
    kind: str  # "checkpoint" | "model" | "backbone" (module docstring)
    state: dict[str, torch.Tensor]  # LiteModel state dict ("model", "checkpoint") or backbone tensors ("backbone")
    meta: dict[str, Any]  # {"image_size", "classifier", "view", "preprocess", "model_config", ...}; {} if none

    @property
    def identity_film_only(self) -> bool:
        """A backbone alone: no FiLM generator was trained, the model runs with identity FiLM."""
        return self.kind == "backbone"

    def image_size(self, requested: int | None) -> tuple[int, str | None]:
        """(image size to use, a note for the user or None): `requested` if given, else the recorded one,
        else LITE's 224 with a note saying so."""
        recorded = self.meta.get("image_size")
        if requested:
            note = None
            if recorded and requested != recorded:
                note = f"{self.path}: trained at {recorded} px, used at {requested} px (--image-size)"
            return requested, note
        if recorded:
            return int(recorded), None
        return REFERENCE_IMAGE_SIZE, (f"{self.path}: no image size recorded (a LITE release or a foreign file); "
                                      f"using {REFERENCE_IMAGE_SIZE} px, LITE's; pass --image-size to choose")

    def build(self, device: torch.device | str = "cpu", identity_film: bool = False):
        """The LiteModel of this file in eval mode on `device` (identity FiLM for backbones, or if asked)."""
        from lite_train.model.lite import LiteModel, ModelConfig
        from lite_train.model.weights import copy_backbone

        config = dict(self.meta.get("model_config") or {})
        try:
            model = LiteModel(ModelConfig(**config))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.path}: its model settings are not this version's: {e}") from None
        if self.kind == "backbone":
            copy_backbone(model, self.state, str(self.path))
            identity_film = True
        else:
            _load_strict(model, self.state, self.path)
        if identity_film:
            model.use_identity_film()
        return model.to(device).eval()


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """load_state_dict(strict) with a one-line error naming the first missing, unexpected or misshapen key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else [])
        raise ValueError(f"{path}: does not fit the LITE model: {', '.join(parts)}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the LITE model needs "
                             f"{tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True)


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensor{'s' if len(bad) > 1 else ''} with NaN or infinite values "
                         f"(e.g. {bad[0]}): the run that wrote it diverged; use an earlier model")


def with_metadata(state: dict[str, torch.Tensor], meta: dict[str, Any]):
    """`state` as an OrderedDict carrying `meta` in `_metadata[""]["lite_train"]` (what torch.save keeps and
    `load_state_dict` ignores), plus the format tag."""
    import collections

    out = collections.OrderedDict(state)
    metadata = getattr(state, "_metadata", None)
    out._metadata = collections.OrderedDict(metadata or {})
    root = dict(out._metadata.get("", {}))
    root["lite_train"] = {"format": MODEL_FORMAT, **meta}
    out._metadata[""] = root
    return out


def _metadata_of(state) -> dict[str, Any]:
    meta = (getattr(state, "_metadata", None) or {}).get("", {}).get("lite_train")
    return dict(meta) if isinstance(meta, dict) and meta.get("format") == MODEL_FORMAT else {}


def load_tensors(path: Path, what: str) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU: tensors and plain values only, no code runs; torch's
    warnings about the file are not shown.

    Raises:
        ValueError: one line naming the file: it holds other objects (naming the first), or it is not a PyTorch
            file or is damaged (with torch's reason).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for damaged or foreign files
        text = str(e)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe:
            raise ValueError(f"{path}: holds a {unsafe.group(1)}, not only tensors and plain values; refused "
                             "(loading it could run code)") from None
        # Under weights_only every unpickling failure says "Weights only load failed", whatever the cause: the
        # cause is after "WeightsUnpickler error:" (e.g. "Unsupported operand 0" for bytes that are no pickle).
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
        reason = (detail.group(1) if detail else text).strip().split("\n")[0].split(". ")[0]
        if not isinstance(e, (RuntimeError, pickle.UnpicklingError)) or not reason:  # e.g. KeyError: 101
            reason = f"{type(e).__name__}: {reason}".rstrip(": ")
        raise ValueError(f"{path}: cannot be read as {what} (not a PyTorch file, or a damaged one: {reason})") from None


def read_model_file(path: str | Path) -> ModelFile:
    """Read and check a model file (module docstring).

    Raises:
        ValueError: one line naming the file and what is wrong.
    """
    from lite_train.model.weights import BACKBONE_FORMAT, backbone_state

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, not a model")
    raw = load_tensors(path, "a model file")
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT and "model" in raw:
        config = raw.get("config") or {}
        meta = {"image_size": config.get("image_size"), "classifier": config.get("classifier"),
                "view": config.get("view"), "preprocess": "md",
                "model_config": {"classifier": config.get("classifier", "simple_cnaps")}, "train_config": config}
        meta = {**meta, **(raw.get("model_meta") or {})}
        kind, state = "checkpoint", raw["model"]
    elif isinstance(raw, dict) and isinstance(raw.get("format"), int) and "model" in raw:
        raise ValueError(f"{path}: a checkpoint of format {raw['format']}, this version reads format "
                         f"{CHECKPOINT_FORMAT}; use its fully_trained.pt, or train again")
    elif isinstance(raw, dict) and raw.get("format") == BACKBONE_FORMAT or _looks_like_backbone(raw):
        state, _ = backbone_state(raw, str(path))
        provenance = raw.get("provenance") if isinstance(raw, dict) else None
        kind = "backbone"
        meta = {"image_size": (provenance or {}).get("image_size"), "preprocess": "md", "backbone": provenance}
    elif isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        kind, state, meta = "model", raw, _metadata_of(raw)
    else:
        raise ValueError(f"{path}: neither a LITE model (state dict), a lite-train checkpoint nor backbone weights")
    _check_finite(state, path)
    return ModelFile(path, kind, dict(state), meta)


def _looks_like_backbone(raw: Any) -> bool:
    """EfficientNet-PyTorch / timm weights (possibly wrapped in {"state_dict": ...}) rather than a LITE model."""
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    return isinstance(raw, dict) and ("_conv_stem.weight" in raw or "conv_stem.weight" in raw)
