"""Development check against LITE's own numbers (../shared/data/lite_reference_seed1, ~45 MB, not a test):
loads LITE's state dict strictly, runs `predict` on the episode in float32 and float64 and compares logits
and every intermediate, then runs one `lite_task_backward` with the reference's gradient subset and compares
loss and every gradient. Prints one line per comparison and exits non-zero if any is out of tolerance.

    .venv/bin/python tools/check_lite_reference.py [REFERENCE_DIR] [--device cuda] [--no-tf32]

On CUDA, PyTorch runs float32 convolutions in TF32 by default (cuDNN); `--no-tf32` turns that off so the
float32 comparison measures float32 arithmetic.
"""

from __future__ import annotations

import argparse
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


def check_test_path(ref_dir: Path, dtype: torch.dtype, suffix: str, logit_tol: float, tol: float,
                    device: torch.device):
    episode = torch.load(ref_dir / "episode.pt", weights_only=True, map_location="cpu")
    state = torch.load(ref_dir / "state_dict.pt", weights_only=True, map_location="cpu")
    ref = torch.load(ref_dir / f"intermediates{suffix}.pt", weights_only=True, map_location="cpu")
    ref_logits = torch.load(ref_dir / f"logits{suffix}.pt", weights_only=True, map_location="cpu")
    model = LiteModel()
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype)
    s, q = episode["support_images"].to(device, dtype), episode["query_images"].to(device, dtype)
    labels = episode["support_labels"].to(device)
    details = model.predict_details(s, labels, q)
    logits = model.predict(s, labels, q)
    tag = str(dtype).replace("torch.", "")
    compare(f"{tag} logits", logits, ref_logits, logit_tol)
    compare(f"{tag} support_embeddings", details["support_embeddings"], ref["support_embeddings"], tol)
    compare(f"{tag} task_embedding", details["task_embedding"], ref["task_embedding"], tol)
    for i, (g, b) in enumerate(details["film"]):
        compare(f"{tag} film[{i}].gamma", g, ref["film"][i]["gamma"], tol)
        compare(f"{tag} film[{i}].beta", b, ref["film"][i]["beta"], tol)
    compare(f"{tag} support_features", details["support_features"], ref["support_features"], tol)
    compare(f"{tag} class_means", details["stats"].means, ref["class_means"], tol)
    compare(f"{tag} precision_diag", torch.diagonal(details["stats"].precision_matrices(), dim1=1, dim2=2),
            ref["precision_diag"], tol)
    compare(f"{tag} query_features", details["query_features"], ref["query_features"], tol)


def check_train_step(ref_dir: Path, device: torch.device):
    episode = torch.load(ref_dir / "episode.pt", weights_only=True, map_location="cpu")
    state = torch.load(ref_dir / "state_dict.pt", weights_only=True, map_location="cpu")
    ref = torch.load(ref_dir / "train_step.pt", weights_only=True, map_location="cpu")
    model = LiteModel()
    model.load_state_dict(state, strict=True)
    model.to(device).train()
    e = {k: v.to(device) for k, v in episode.items() if isinstance(v, torch.Tensor)}
    stats = lite_task_backward(model, e["support_images"], e["support_labels"], e["query_images"],
                               e["query_labels"], h=ref["h"], chunk_size=40, tasks_per_step=16,
                               subsets=[ref["grad_indices"].to(device)])
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
        ours = None if params[name].grad is None else params[name].grad.detach().cpu()
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-tf32", action="store_true", help="CUDA: float32 convolutions and matmuls in float32")
    args = ap.parse_args()
    ref_dir, device = args.ref_dir, torch.device(args.device)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)}, cuDNN TF32 "
                                f"{torch.backends.cudnn.allow_tf32})" if device.type == "cuda" else ""))
    if not (ref_dir / "meta.json").is_file():
        print(f"{ref_dir}: not a LITE reference folder (no meta.json)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    check_test_path(ref_dir, torch.float32, "", logit_tol=1e-3, tol=1e-3, device=device)
    check_test_path(ref_dir, torch.float64, "_f64", logit_tol=1e-8, tol=1e-8, device=device)
    check_train_step(ref_dir, device)
    print("all within tolerance" if not failures else f"{len(failures)} comparisons out of tolerance")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
