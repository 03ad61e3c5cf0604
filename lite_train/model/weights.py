"""A weights file the user already has in, the frozen EfficientNet-B0 backbone of a `LiteModel` filled
(nothing is ever downloaded). Three layouts are recognised by their keys:

- "efficientnet_pytorch": lukemelas' EfficientNet-PyTorch release file (`efficientnet-b0-355c32eb.pth`,
  what LITE's 224-px model starts from), names as ours plus a 1000-way `_fc`, which is dropped;
- "timm": timm's `tf_efficientnet_b0` state dict (TF-ported weights, "same" padding), renamed by
  `timm_to_lite_backbone` -- the mapping is kept apart from the architecture, as timm does for foreign
  checkpoints;
- "lite": a LITE / lite-train checkpoint (647 keys); its `feature_extractor.*` tensors are used.

Every file is read with `torch.load(..., weights_only=True, map_location=...)`; the key set and every
shape are checked before a single tensor is copied. `num_batches_tracked` counters are optional (files
ported from TF may lack them) and are never read by the eval-mode backbone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lite_train.model.efficientnet import B0_BLOCKS

# timm groups the 16 blocks in 7 stages; stage sizes of EfficientNet-B0.
_TIMM_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
# timm name -> ours, per block; block 0 has no expansion conv, so its BN names shift (bn1 = depthwise BN).
_TIMM_BLOCK0 = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "se.conv_reduce": "_se_reduce",
                "se.conv_expand": "_se_expand", "conv_pw": "_project_conv", "bn2": "_bn2"}
_TIMM_BLOCK = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
               "se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand", "conv_pwl": "_project_conv",
               "bn3": "_bn2"}
_TIMM_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1"}
_TIMM_CLASSIFIER = ("classifier.weight", "classifier.bias")
_EP_CLASSIFIER = ("_fc.weight", "_fc.bias")
_LITE_PREFIX = "feature_extractor."
_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")


def _timm_block_index(stage: int, index: int) -> int:
    return sum(_TIMM_STAGE_SIZES[:stage]) + index


def timm_to_lite_backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm `tf_efficientnet_b0` names -> FilmEfficientNet names (classifier dropped). Raises on any key
    it cannot place."""
    out = {}
    for key, value in state.items():
        if key in _TIMM_CLASSIFIER:
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)\.(weight|bias|running_mean|running_var|num_batches_tracked)",
                         key)
        if m:
            block = _timm_block_index(int(m.group(1)), int(m.group(2)))
            table = _TIMM_BLOCK0 if block == 0 else _TIMM_BLOCK
            if block >= len(B0_BLOCKS) or m.group(3) not in table:
                raise ValueError(f"timm key {key!r} has no place in EfficientNet-B0")
            out[f"_blocks.{block}.{table[m.group(3)]}.{m.group(4)}"] = value
            continue
        module, _, leaf = key.partition(".")
        if module not in _TIMM_TOP:
            raise ValueError(f"timm key {key!r} has no place in EfficientNet-B0")
        out[f"{_TIMM_TOP[module]}.{leaf}"] = value
    return out


def backbone_state(raw: Any, origin: str) -> tuple[dict[str, torch.Tensor], str]:
    """(backbone tensors under FilmEfficientNet names without `_fc`, layout name) from a loaded weights file
    (`torch.load` output; a {"state_dict" | "model_state_dict" | "model": ...} wrapper is unwrapped)."""
    state = raw
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:  # checkpoint dicts that wrap the state dict
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{origin}: not a state dict of tensors")
    if any(k.startswith(_LITE_PREFIX) for k in state):
        kind = "lite"
        state = {k[len(_LITE_PREFIX):]: v for k, v in state.items() if k.startswith(_LITE_PREFIX)}
    elif "_conv_stem.weight" in state:
        kind = "efficientnet_pytorch"
    elif "conv_stem.weight" in state:
        kind = "timm"
        try:
            state = timm_to_lite_backbone(state)
        except ValueError as e:
            raise ValueError(f"{origin}: {e}") from None
    else:
        raise ValueError(f"{origin}: neither an EfficientNet-PyTorch, a timm tf_efficientnet_b0 nor a LITE "
                         "state dict (no stem convolution key)")
    return {k: v for k, v in state.items() if k not in _EP_CLASSIFIER}, kind


def backbone_state_from_file(path: str | Path, map_location="cpu") -> tuple[dict[str, torch.Tensor], str]:
    """(backbone tensors under FilmEfficientNet names without `_fc`, layout name) from a weights file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such weights file")
    try:
        raw = torch.load(path, weights_only=True, map_location=map_location)
    except Exception as e:  # damaged, foreign or code-running pickles: one line, no traceback
        raise ValueError(f"{path}: cannot be read as weights ({str(e).strip().splitlines()[0]})") from None
    return backbone_state(raw, str(path))


def copy_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Copies backbone tensors into `model.feature_extractor` (a LiteModel's) after checking that the key set
    and every shape match (one line naming the first that does not)."""
    target = {k: v for k, v in model.feature_extractor.state_dict().items() if k not in _EP_CLASSIFIER}
    required = {k for k in target if not k.endswith("num_batches_tracked")}
    missing = sorted(required - state.keys())
    unexpected = sorted(state.keys() - target.keys())
    if missing or unexpected:
        raise ValueError(f"{origin}: backbone does not fit EfficientNet-B0: {len(missing)} missing "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for key, value in state.items():
        if value.shape != target[key].shape:
            raise ValueError(f"{origin}: {key} has shape {tuple(value.shape)}, EfficientNet-B0 needs "
                             f"{tuple(target[key].shape)}")
    with torch.no_grad():
        for key, value in state.items():
            target[key].copy_(value)


def load_backbone_weights(model: torch.nn.Module, path: str | Path, map_location="cpu") -> str:
    """Copies the backbone weights in `path` into `model.feature_extractor` (a LiteModel's), after checking
    that the key set and every shape match; returns the layout found ("efficientnet_pytorch" | "timm" |
    "lite"). The FiLM generator and set encoder are left untouched."""
    state, kind = backbone_state_from_file(path, map_location)
    copy_backbone(model, state, str(path))
    return kind


BACKBONE_FORMAT = "lite-train-backbone/1"


def save_backbone_file(path: str | Path, backbone: torch.nn.Module, classifier: torch.nn.Linear | None,
                       provenance: dict[str, Any]) -> None:
    """`{"format", "state_dict", "provenance"}` to `path` and the provenance as JSON beside it
    (`<path>.json`, e.g. backbone.pt.json), both atomically.

    `state_dict` is in EfficientNet-PyTorch's layout (our names are lukemelas'; LITE's 84-px
    `efficientnet-b0_84.pt` is the same `{"state_dict": ...}` form), with the pretraining classifier as its
    C-way `_fc`, so the file is also a C-class `EfficientNet.from_name("efficientnet-b0")` checkpoint.
    `lite-train train --backbone-weights` reads it like any EfficientNet-PyTorch file (`_fc` dropped).
    """
    from lite_train.files import atomic_write

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items() if k not in _EP_CLASSIFIER}
    if classifier is not None:
        state["_fc.weight"] = classifier.weight.detach().cpu().contiguous()  # (C, 1280)
        state["_fc.bias"] = classifier.bias.detach().cpu().contiguous()  # (C,)
    payload = {"format": BACKBONE_FORMAT, "state_dict": state, "provenance": provenance}
    atomic_write(path, lambda f: torch.save(payload, f))
    atomic_write(path.with_name(path.name + ".json"), json.dumps(provenance, indent=1, sort_keys=True) + "\n")


def backbone_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance stored in a backbone file written by `save_backbone_file` (None for other files)."""
    state = torch.load(Path(path), weights_only=True, map_location="cpu")
    if isinstance(state, dict) and state.get("format") == BACKBONE_FORMAT:
        return state.get("provenance")
    return None
