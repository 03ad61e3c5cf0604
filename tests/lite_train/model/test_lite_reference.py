"""The head, the FiLM generator and the regulariser against LITE's own numbers (a reduced case of
shared/data/lite_reference_seed1 beside the repository, see golden/README.md). The full image-to-logits
comparison is the development check tools/check_lite_reference.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lite_train.model import LiteModel, SimpleCnapsHead
from lite_train.model.film import FilmLayerGenerator

GOLDEN = Path(__file__).parent / "golden" / "lite_seed1_reduced.pt"


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, weights_only=True)


def test_simple_cnaps_head_gives_lite_means_precisions_and_logits(golden):
    g = golden["head"]
    head = SimpleCnapsHead()
    stats = head.fit(g["support_features"], g["support_labels"])  # float64, as LITE's float64 run
    assert stats.classes.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(stats.means, g["class_means"], rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.diagonal(stats.precision_matrices(), dim1=1, dim2=2), g["precision_diag"],
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(head.logits(stats, g["query_features"]), g["logits"], rtol=0, atol=1e-8)


def test_corrected_one_shot_covariance_changes_only_the_one_shot_class(golden):
    g = golden["head"]
    shots = torch.bincount(g["support_labels"])
    one_shot = int((shots == 1).nonzero()[0])
    quirk = SimpleCnapsHead().fit(g["support_features"], g["support_labels"])
    fixed = SimpleCnapsHead(one_shot_covariance_quirk=False).fit(g["support_features"], g["support_labels"])
    differs = [not torch.allclose(a, b) for a, b in zip(quirk.precision_matrices(), fixed.precision_matrices())]
    assert differs == [k == one_shot for k in range(len(shots))]
    # Corrected: Sigma = 0.5 * task covariance + I for the one-shot class.
    features = g["support_features"]
    task_cov = torch.cov(features.t())
    expected = torch.inverse(0.5 * task_cov + torch.eye(features.shape[1], dtype=features.dtype))
    torch.testing.assert_close(fixed.precision_matrices()[one_shot], expected, rtol=1e-7, atol=1e-9)


def test_film_generator_gives_lite_gamma_and_beta(golden):
    g = golden["film"]
    for position, site in enumerate(g["sites"]):
        prefix = f"feature_adaptation_network.layers.{site}."
        state = {k[len(prefix):]: v for k, v in g["generator_state"].items() if k.startswith(prefix)}
        channels = state["gamma_regularizers.0"].numel()
        layer = FilmLayerGenerator(channels)
        layer.load_state_dict(state, strict=True)
        gamma, beta = layer.double()(g["task_embedding"])
        torch.testing.assert_close(gamma, g["gamma"][position], rtol=0, atol=1e-12)
        torch.testing.assert_close(beta, g["beta"][position], rtol=0, atol=1e-12)


def test_regularization_term_equals_lite(golden):
    model = LiteModel()
    model.load_state_dict(golden["regularizer"]["state"], strict=False)
    assert model.regularization_term().item() == pytest.approx(golden["regularizer"]["regularization_term"],
                                                               rel=1e-6)
