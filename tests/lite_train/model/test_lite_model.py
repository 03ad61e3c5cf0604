"""LiteModel: checkpoint names, parameter counts, heads registry, the test path's chunking rules and quirk
switches, modes and dtypes (tiny images; numbers against LITE are in test_lite_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lite_train.model import HEADS, LiteModel, ModelConfig, query_chunks, set_encoder_chunks

KEYS = Path(__file__).parent / "golden" / "lite_checkpoint_keys.json"
SIZE = 32


@pytest.fixture(scope="module")
def model() -> LiteModel:
    torch.manual_seed(0)
    return LiteModel()


def _task(n_way=3, shots=(1, 2, 3), queries=4, size=SIZE, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((s,), k, dtype=torch.int64) for k, s in enumerate(shots[:n_way])])
    support = (torch.rand(len(labels), 3, size, size, generator=gen) * 2 - 1).to(dtype)
    query = (torch.rand(queries, 3, size, size, generator=gen) * 2 - 1).to(dtype)
    return support, labels, query


def test_state_dict_has_exactly_lites_647_keys_and_shapes(model):
    reference = json.loads(KEYS.read_text())["keys"]
    assert len(reference) == 647
    ours = model.state_dict()
    assert list(ours) == [k["key"] for k in reference]  # same names, same order
    for k in reference:
        assert tuple(ours[k["key"]].shape) == tuple(k["shape"]), k["key"]
        assert str(ours[k["key"]].dtype) == "torch." + k["dtype"], k["key"]


def test_synthetic_647_key_checkpoint_loads_strictly(tmp_path):
    reference = json.loads(KEYS.read_text())["keys"]
    gen = torch.Generator().manual_seed(1)
    state = {k["key"]: (torch.randn(k["shape"], generator=gen) if k["dtype"] == "float32"
                        else torch.ones(k["shape"], dtype=getattr(torch, k["dtype"])))
             for k in reference}
    torch.save(state, tmp_path / "meta-trained_lite_224.pt")
    model = LiteModel()
    model.load_state_dict(torch.load(tmp_path / "meta-trained_lite_224.pt", weights_only=True,
                                     map_location="cpu"), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_parameter_counts_match_the_reference(model):
    # lite.md §1.1: set encoder 150,144; FiLM generator 1,510,272; backbone 4,007,548 (all frozen).
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.set_encoder) == 150_144
    assert count(model.feature_adaptation_network) == 1_510_272
    assert count(model.feature_extractor) == 4_007_548
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_660_416


def test_backbone_stays_in_eval_mode(model):
    model.train()
    assert model.training and not model.feature_extractor.training
    assert not any(m.training for m in model.feature_extractor.modules())
    model.eval()
    assert not model.feature_extractor.training


def test_reference_chunking_rules():
    # LITE:src/run.py: no query / feature chunk of size 1.
    assert query_chunks(10, 40) == [(0, 10)]
    assert query_chunks(80, 40) == [(0, 40), (40, 80)]
    assert query_chunks(81, 40) == [(0, 40), (40, 81)]
    assert query_chunks(41, 40) == [(0, 41)]
    assert query_chunks(82, 40) == [(0, 40), (40, 80), (80, 82)]
    # LITE:src/model.py set encoder: no merge in the chunk count -> a trailing duplicate of the last image.
    assert set_encoder_chunks(81, 40, size1_quirk=True) == [(0, 40), (40, 81), (80, 81)]
    assert set_encoder_chunks(81, 40, size1_quirk=False) == [(0, 40), (40, 81)]
    assert set_encoder_chunks(80, 40, size1_quirk=True) == [(0, 40), (40, 80)]
    with pytest.raises(ValueError, match="chunk_size"):
        query_chunks(5, 1)


def test_set_encoder_size1_quirk_counts_the_last_image_twice(model):
    support, labels, query = _task(shots=(1, 1, 1))  # N = 3, chunk 2 -> N mod chunk == 1
    quirk = model.predict_details(support, labels, query, chunk_size=2)
    assert quirk["support_embeddings"].shape == (4, 64)
    torch.testing.assert_close(quirk["support_embeddings"][3], model.set_encoder.pre_pool(support[2:3])[0])
    fixed_model = LiteModel(ModelConfig(set_encoder_size1_chunk_quirk=False))
    fixed_model.load_state_dict(model.state_dict())
    fixed = fixed_model.predict_details(support, labels, query, chunk_size=2)
    assert fixed["support_embeddings"].shape == (3, 64)
    torch.testing.assert_close(fixed["support_embeddings"], quirk["support_embeddings"][:3])
    assert not torch.allclose(fixed["task_embedding"], quirk["task_embedding"])


def test_predict_columns_follow_sorted_support_labels(model):
    support, labels, query = _task()
    logits = model.predict(support, labels, query)
    assert logits.shape == (4, 3) and not logits.requires_grad
    relabelled = torch.tensor([7, 2, 9])[labels]  # 0 -> 7, 1 -> 2, 2 -> 9: sorted columns are 2, 7, 9
    torch.testing.assert_close(model.predict(support, relabelled, query), logits[:, [1, 0, 2]])


def test_predict_does_not_change_the_model(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.predict(*_task())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_predict_in_float64(model):
    support, labels, query = _task(dtype=torch.float64)
    model64 = LiteModel()
    model64.load_state_dict(model.state_dict())
    model64.double()
    logits64 = model64.predict(support, labels, query)
    assert logits64.dtype == torch.float64
    logits32 = model.predict(support.float(), labels, query.float())
    torch.testing.assert_close(logits64.float(), logits32, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_classifies_points_near_their_class_mean(name):
    head = HEADS[name]()
    gen = torch.Generator().manual_seed(2)
    centres = 5 * torch.randn(4, 16, generator=gen, dtype=torch.float64)
    labels = torch.tensor([3, 3, 0, 0, 0, 5, 8, 8])  # classes 0, 3, 5 (one shot), 8
    features = centres[torch.searchsorted(torch.tensor([0, 3, 5, 8]), labels)] + 0.1 * torch.randn(
        8, 16, generator=gen, dtype=torch.float64)
    stats = head.fit(features, labels)
    assert stats.classes.tolist() == [0, 3, 5, 8]
    query = centres + 0.1 * torch.randn(4, 16, generator=gen, dtype=torch.float64)
    logits = head.logits(stats, query)
    assert logits.shape == (4, 4)
    assert logits.argmax(dim=1).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_runs_in_the_model(name, model):
    named = LiteModel(ModelConfig(classifier=name))
    named.load_state_dict(model.state_dict())
    assert named.predict(*_task()).shape == (4, 3)


def test_unknown_head_is_rejected():
    with pytest.raises(ValueError, match="unknown classifier"):
        ModelConfig(classifier="maml")


def test_simple_cnaps_precisions_stay_right_after_set_num_threads():
    # torch's batched CPU inverse (MKL) raises or returns garbage once torch.set_num_threads(k > 1) has been
    # called in the process (torch 2.14.1): a trainer or test that sets its thread count must not get wrong
    # precisions. Expected values from a float64 inverse of the same matrices.
    from lite_train.model.heads import make_head

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        features = torch.randn(12, 1280, generator=gen)  # (N, D)
        labels = torch.arange(12) % 3
        stats = make_head("simple_cnaps", True).fit(features, labels)
        expected = make_head("simple_cnaps", True).fit(features.double(), labels).precision_matrices()
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(stats.precision_matrices()).all()
    assert torch.allclose(stats.precision_matrices().double(), expected, atol=1e-4)


@pytest.mark.parametrize("dim, shots, quirk", [
    (1280, (1, 2, 3, 4, 5), True),  # Woodbury (r = n_k + N < D), a 1-shot class with the reference's quirk
    (1280, (1, 2, 3, 4, 5), False),  # ... and with the corrected zero class covariance
    (1280, (1,), True),  # one support image in all: the task covariance is the quirk's scalar too
    (16, (3, 9, 12), True),  # more task rows than D (and a class with more): compressed to D rows first
    (1280, (2, 2, 3, 3, 3, 7, 1), True),  # classes of equal shot count share their task factor
])
def test_cholesky_solver_gives_the_explicit_inverse_logits_and_gradients(dim, shots, quirk):
    # The reference's explicit inverse in float64 is the yardstick (heads.SimpleCnapsHead(solver="inverse") is
    # the reference's code path); the factored solve (lite_train.model._lowrank) must give the same logits and
    # the same gradients.
    from lite_train.model.heads import SimpleCnapsHead

    gen = torch.Generator().manual_seed(len(shots) + dim)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(shots)])
    support = (3 * torch.randn(len(labels), dim, generator=gen, dtype=torch.float64)).requires_grad_()
    query = (3 * torch.randn(7, dim, generator=gen, dtype=torch.float64)).requires_grad_()
    results = []
    for solver in ("inverse", "cholesky"):
        head = SimpleCnapsHead(one_shot_covariance_quirk=quirk, solver=solver)
        stats = head.fit(support, labels)
        logits = head.logits(stats, query)  # (7, K)
        grads = torch.autograd.grad((logits * torch.arange(logits.numel()).view_as(logits)).sum(), (support, query))
        results.append((logits.detach(), grads, stats.precision_matrices().detach()))
    (ref_logits, ref_grads, ref_prec), (logits, grads, prec) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-8)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-8 * ref.abs().max().item())
    torch.testing.assert_close(prec, ref_prec, rtol=1e-9, atol=1e-12)


def test_cholesky_solver_keeps_float32_logits_closer_to_float64_than_the_inverse():
    # Why it is computed in float64: in float32 an explicit inverse of Sigma (eigenvalues up to ~1e3 here) loses
    # digits that the factored float64 solve keeps.
    from lite_train.model.heads import SimpleCnapsHead

    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(5).repeat_interleave(4)
    support, query = 10 * torch.randn(20, 1280, generator=gen), 10 * torch.randn(9, 1280, generator=gen)
    exact = SimpleCnapsHead(solver="inverse")
    truth = exact.logits(exact.fit(support.double(), labels), query.double())
    errors = {}
    for solver in ("inverse", "cholesky"):
        head = SimpleCnapsHead(solver=solver)
        errors[solver] = (head.logits(head.fit(support, labels), query).double() - truth).abs().max().item()
    assert errors["cholesky"] < errors["inverse"] / 10, errors


def test_covariances_that_lose_their_identity_to_rounding_are_a_one_line_error():
    # Sigma = I + covariance is positive definite by construction, but not in floating point once the features
    # are so large that the identity drowns (a ProtoNets model's features, a random uncalibrated backbone):
    # the reference's inverse returns garbage there; this head says so.
    from lite_train.model.heads import SimpleCnapsHead

    features = torch.randn(20, 1280, generator=torch.Generator().manual_seed(0)) * 1e12
    with pytest.raises(ValueError, match="Simple CNAPs: the .* covariance is not positive definite"):
        SimpleCnapsHead().fit(features, torch.arange(20) % 5)
