"""Development check against LITE's own numbers (../shared/data/lite_reference_seed1, ~45 MB, not a test):
loads LITE's state dict strictly, runs `predict` on the episode in float32 and float64 and compares logits
and every intermediate, then runs one `lite_task_backward` with the reference's gradient subset and compares
loss and every gradient. Prints one line per comparison and exits non-zero if any is out of tolerance.

    .venv/bin/python tools/check_lite_reference.py [REFERENCE_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lite_train.model import LiteModel
from lite_train.train.step import lite_task_backward

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "lite_reference_seed1"
failures: list[str] = []


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float, relative_to_max: bool = False):
    ours, ref = ours.detach().to(ref.dtype).cpu(), ref.detach()
    if ours.shape != ref.shape:
        failures.append(name)
        print(f"FAIL {name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}")
        return
    diff = (ours - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if relative_to_max and ref.numel() else 1.0
    ok = diff <= tol * max(scale, 1e-30) if relative_to_max else diff <= tol
    if not ok:
        failures.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max|diff| {diff:.3g} (tol {tol:g}{' x max ' + format(scale, '.3g') if relative_to_max else ''})")


def check_test_path(ref_dir: Path, dtype: torch.dtype, suffix: str, logit_tol: float, tol: float):
    episode = torch.load(ref_dir / "episode.pt", weights_only=True, map_location="cpu")
    state = torch.load(ref_dir / "state_dict.pt", weights_only=True, map_location="cpu")
    ref = torch.load(ref_dir / f"intermediates{suffix}.pt", weights_only=True, map_location="cpu")
    ref_logits = torch.load(ref_dir / f"logits{suffix}.pt", weights_only=True, map_location="cpu")
    model = LiteModel()
    model.load_state_dict(state, strict=True)
    model = model.to(dtype)
    s, q = episode["support_images"].to(dtype), episode["query_images"].to(dtype)
    details = model.predict_details(s, episode["support_labels"], q)
    logits = model.predict(s, episode["support_labels"], q)
    tag = str(dtype).replace("torch.", "")
    compare(f"{tag} logits", logits, ref_logits, logit_tol)
    compare(f"{tag} support_embeddings", details["support_embeddings"], ref["support_embeddings"], tol)
    compare(f"{tag} task_embedding", details["task_embedding"], ref["task_embedding"], tol)
    for i, (g, b) in enumerate(details["film"]):
        compare(f"{tag} film[{i}].gamma", g, ref["film"][i]["gamma"], tol)
        compare(f"{tag} film[{i}].beta", b, ref["film"][i]["beta"], tol)
    compare(f"{tag} support_features", details["support_features"], ref["support_features"], tol)
    compare(f"{tag} class_means", details["stats"].means, ref["class_means"], tol)
    compare(f"{tag} precision_diag", torch.diagonal(details["stats"].precisions, dim1=1, dim2=2),
            ref["precision_diag"], tol)
    compare(f"{tag} query_features", details["query_features"], ref["query_features"], tol)


def check_train_step(ref_dir: Path):
    episode = torch.load(ref_dir / "episode.pt", weights_only=True, map_location="cpu")
    state = torch.load(ref_dir / "state_dict.pt", weights_only=True, map_location="cpu")
    ref = torch.load(ref_dir / "train_step.pt", weights_only=True, map_location="cpu")
    model = LiteModel()
    model.load_state_dict(state, strict=True)
    model.train()
    stats = lite_task_backward(model, episode["support_images"], episode["support_labels"],
                               episode["query_images"], episode["query_labels"], h=ref["h"], chunk_size=40,
                               tasks_per_step=16, subsets=[ref["grad_indices"]])
    print(f"loss ours {stats['loss']:.7f} ref {ref['loss']:.7f}; accuracy ours {stats['accuracy']:.3f} "
          f"ref {ref['accuracy']:.3f}")
    compare("train loss", torch.tensor(stats["loss"]), torch.tensor(ref["loss"]), 1e-3, relative_to_max=True)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if trainable != set(ref["grads"]):
        failures.append("gradient names")
        print(f"FAIL gradient names: ours-only {sorted(trainable - set(ref['grads']))[:3]}, "
              f"ref-only {sorted(set(ref['grads']) - trainable)[:3]}")
    worst = 0.0
    for name, g in ref["grads"].items():
        ours = params[name].grad
        if ours is None:
            failures.append(name)
            print(f"FAIL grad {name}: no gradient")
            continue
        if name.startswith("set_encoder.") and name.endswith(".0.bias"):
            # A conv bias right before a batch-statistics BN cancels out: its exact gradient is 0, so both
            # sides hold rounding noise (|g| ~ 1e-7 against weight gradients ~ 1e-2). Compare absolutely.
            noise = max(ours.abs().max().item(), g.abs().max().item())
            ok = noise < 1e-6
            failures.extend([] if ok else [name])
            print(f"{'ok  ' if ok else 'FAIL'} grad {name}: exact value 0, |ours|, |ref| <= {noise:.3g} (tol 1e-6)")
            continue
        rel = (ours - g).abs().max().item() / max(g.abs().max().item(), 1e-30)
        worst = max(worst, rel)
        if rel > 1e-3:
            compare(f"grad {name}", ours, g, 1e-3, relative_to_max=True)
    print(f"{'ok  ' if worst <= 1e-3 else 'FAIL'} the other {len(ref['grads']) - 5} gradients: worst max|diff| / max|ref| "
          f"{worst:.3g} (tol 1e-3)")


def main() -> int:
    ref_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR
    if not (ref_dir / "meta.json").is_file():
        print(f"{ref_dir}: not a LITE reference folder (no meta.json)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    check_test_path(ref_dir, torch.float32, "", logit_tol=1e-3, tol=1e-3)
    check_test_path(ref_dir, torch.float64, "_f64", logit_tol=1e-8, tol=1e-8)
    check_train_step(ref_dir)
    print("all within tolerance" if not failures else f"{len(failures)} comparisons out of tolerance")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
