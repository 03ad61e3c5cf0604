"""The training methods of lite_train.train.step on tiny tasks: with h = N the LITE gradient is the no_lite
gradient; gradients accumulate; pinned subsets are validated. (LITE's own loss and gradients for one step
are compared by tools/check_lite_reference.py.)"""

from __future__ import annotations

import pytest
import torch

from lite_train.model import LiteModel
from lite_train.train import lite_task_backward, no_lite_backward, small_task_backward
from tests.lite_train.tiny_models import tiny_lite_model

SIZE = 32


@pytest.fixture(scope="module")
def model64() -> LiteModel:
    return tiny_lite_model(SIZE, calibration_images=8)


def _task(n=5, m=4, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    support = (torch.rand(n, 3, SIZE, SIZE, generator=gen) * 2 - 1).to(dtype)
    support_labels = torch.tensor([0, 1, 1, 2, 2, 0, 1][:n])
    query = (torch.rand(m, 3, SIZE, SIZE, generator=gen) * 2 - 1).to(dtype)
    query_labels = torch.tensor([0, 1, 2, 1, 0, 2][:m])
    return support, support_labels, query, query_labels


def _assert_grads_close(ours: dict, theirs: dict, tol: float) -> None:
    """Per tensor: max|ours - theirs| <= tol * max|theirs| (the elementwise error of a float64 sum with
    cancellation is relative to the tensor's scale, not to each element)."""
    assert ours.keys() == theirs.keys()
    largest = max(g.abs().max().item() for g in theirs.values())
    for name, g in theirs.items():
        if name.startswith("set_encoder.") and name.endswith(".0.bias"):
            # A conv bias before a batch-statistics BN cancels: exact gradient 0, both sides rounding noise.
            assert max(ours[name].abs().max().item(), g.abs().max().item()) <= tol * largest, name
            continue
        scale = g.abs().max().item()
        assert scale > 0, f"{name}: zero gradient, the comparison would be vacuous"
        assert (ours[name] - g).abs().max().item() <= tol * scale, name


def _grads(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_lite_with_h_equal_n_gives_the_no_lite_gradient(model64):
    task = _task()
    model64.zero_grad(set_to_none=True)
    lite = lite_task_backward(model64, *task, h=5, chunk_size=40, tasks_per_step=16,
                              subsets=[torch.tensor([3, 0, 4, 1, 2])])
    lite_grads = _grads(model64)
    full = no_lite_backward(model64, *task, tasks_per_step=16)
    full_grads = _grads(model64)
    assert lite["loss"] == pytest.approx(full["loss"], rel=1e-8)
    assert len(full_grads) == 272  # every set-encoder and FiLM-generator tensor, nothing of the backbone
    # Same maths, rows in another order: the 1280-d covariance inverses amplify float64 rounding to ~1e-7.
    _assert_grads_close(lite_grads, full_grads, 1e-5)


def test_small_task_with_one_chunk_gives_the_no_lite_gradient(model64):
    task = _task()
    model64.zero_grad(set_to_none=True)
    small_task_backward(model64, *task, chunk_size=40, tasks_per_step=16)
    small = _grads(model64)
    no_lite_backward(model64, *task, tasks_per_step=16)
    _assert_grads_close(small, _grads(model64), 1e-9)


def test_lite_subset_gradients_differ_from_the_full_gradient_and_accumulate(model64):
    task = _task()
    model64.zero_grad(set_to_none=True)
    subset = [torch.tensor([1, 3])]
    lite_task_backward(model64, *task, h=2, subsets=subset)
    once = _grads(model64)
    lite_task_backward(model64, *task, h=2, subsets=subset)
    lite_task_backward(model64, *task, h=2, subsets=subset)
    twice = _grads(model64)
    _assert_grads_close(twice, {name: 2 * g for name, g in once.items()}, 1e-9)
    no_lite_backward(model64, *task)
    full = _grads(model64)
    name = "set_encoder.pre_pooling_fn.layer1.0.weight"
    assert not torch.allclose(once[name], full[name])


def test_lite_chunks_draw_one_subset_each_from_the_generator(model64):
    task = _task(m=5)  # chunk_size 2 -> query chunks (0, 2), (2, 5)
    model64.zero_grad(set_to_none=True)
    stats = lite_task_backward(model64, *task, h=2, chunk_size=2, generator=torch.Generator().manual_seed(3))
    drawn = _grads(model64)
    gen = torch.Generator().manual_seed(3)
    subsets = [torch.randperm(5, generator=gen)[:2] for _ in range(2)]
    pinned = lite_task_backward(model64, *task, h=2, chunk_size=2, subsets=subsets)
    # Pinned subsets fix the gradient rows; the cached rows come in another order (rounding only).
    assert stats["chunks"] == 2 and stats["loss"] == pytest.approx(pinned["loss"], rel=1e-9)
    _assert_grads_close(drawn, _grads(model64), 1e-5)


def test_lite_rejects_bad_subsets_and_hidden_randomness(model64):
    task = _task()
    with pytest.raises(ValueError, match="2 distinct support indices"):
        lite_task_backward(model64, *task, h=2, subsets=[torch.tensor([1, 1])])
    with pytest.raises(ValueError, match="2 distinct support indices"):
        lite_task_backward(model64, *task, h=2, subsets=[torch.tensor([1, 5])])
    with pytest.raises(ValueError, match="subsets given for 1 query chunks"):
        lite_task_backward(model64, *task, h=2, subsets=[torch.tensor([0, 1])] * 2)
    with pytest.raises(ValueError, match="needs `subsets` or a `generator`"):
        lite_task_backward(model64, *task, h=2)
    support, support_labels, query, query_labels = task
    with pytest.raises(ValueError, match="do not occur in the support set"):
        no_lite_backward(model64, support, support_labels, query, query_labels + 5)
    model64.zero_grad(set_to_none=True)
