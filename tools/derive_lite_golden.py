"""Derives the small in-repo golden case tests/lite_train/model/golden/lite_seed1_reduced.pt from LITE's own
outputs in ../shared/data/lite_reference_seed1 (run once; the tests never read ../shared). Every tensor is
copied, none is computed here:

- head: the float64 test-path `classifier_features`, `classifier_labels`, `query_features`, and LITE's
  `class_means`, `precision_diag`, logits (`logits_f64.pt`);
- film: LITE's float32 generator weights of FiLM sites 0-3 (32, 32, 96, 144 channels), the float64
  `task_embedding` and LITE's float64 gamma/beta of those sites;
- the float32 regularizer vectors of all 18 sites and LITE's train-step `regularization_term`.

    .venv/bin/python tools/derive_lite_golden.py [REFERENCE_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO.parent / "shared" / "data" / "lite_reference_seed1"
OUT = REPO / "tests" / "lite_train" / "model" / "golden" / "lite_seed1_reduced.pt"
FILM_SITES = (0, 1, 2, 3)


def main() -> int:
    ref = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR
    load = lambda name: torch.load(ref / name, weights_only=True, map_location="cpu")  # noqa: E731
    state, inter64, step = load("state_dict.pt"), load("intermediates_f64.pt"), load("train_step.pt")
    generator = {k: v.clone() for k, v in state.items()
                 if k.startswith("feature_adaptation_network.layers.")
                 and int(k.split(".")[2]) in FILM_SITES}
    regularizers = {k: v.clone() for k, v in state.items() if "_regularizers." in k}
    golden = {
        "head": {
            "support_features": inter64["classifier_features"].clone(),
            "support_labels": inter64["classifier_labels"].clone(),
            "query_features": inter64["query_features"].clone(),
            "class_means": inter64["class_means"].clone(),
            "precision_diag": inter64["precision_diag"].clone(),
            "logits": load("logits_f64.pt").clone(),
        },
        "film": {
            "sites": list(FILM_SITES),
            "generator_state": generator,
            "task_embedding": inter64["task_embedding"].clone(),
            "gamma": [inter64["film"][i]["gamma"].clone() for i in FILM_SITES],
            "beta": [inter64["film"][i]["beta"].clone() for i in FILM_SITES],
        },
        "regularizer": {"state": regularizers, "regularization_term": step["regularization_term"]},
    }
    torch.save(golden, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
