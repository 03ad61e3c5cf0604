"""Per-class image order: MD's cursor + flush rule, and the two per-pass orders."""

from __future__ import annotations

import numpy as np
import pytest

from lite_train.data.class_stream import ClassStream


@pytest.mark.parametrize("order,n", [("md", 40), ("md", 1300), ("uniform", 40), ("uniform", 6000)])
def test_no_image_repeats_until_the_pass_ends(order, n):
    stream = ClassStream(n, order, np.random.RandomState(0))
    seen = []
    while stream.passes == 0:
        need = 7
        if need > n - stream.cursor:
            break
        seen.extend(stream.take(need).tolist())
    assert len(seen) == len(set(seen)) and all(0 <= i < n for i in seen)


@pytest.mark.parametrize("order,n", [("md", 30), ("md", 1100), ("uniform", 30), ("uniform", 5000)])
def test_a_request_that_does_not_fit_flushes_the_rest_of_the_pass(order, n):
    stream = ClassStream(n, order, np.random.RandomState(1))
    first = stream.take(n - 5)
    assert stream.cursor == n - 5
    second = stream.take(6)  # does not fit in the 5 left: they are discarded
    assert stream.passes == 1 and stream.cursor == 6
    assert len(set(second.tolist())) == 6
    assert len(set(first.tolist())) == n - 5


@pytest.mark.parametrize("order,n", [("md", 1000), ("md", 1500), ("uniform", 5000)])
def test_a_whole_pass_is_a_permutation_of_the_class(order, n):
    stream = ClassStream(n, order, np.random.RandomState(2))
    assert sorted(stream.take(n).tolist()) == list(range(n))


def test_md_order_for_small_classes_is_uniform():
    n, trials = 20, 4000
    rng = np.random.RandomState(3)
    first_pick = np.zeros(n)
    for _ in range(trials):
        first_pick[ClassStream(n, "md", rng).take(1)[0]] += 1
    expected = trials / n
    chi2 = ((first_pick - expected) ** 2 / expected).sum()
    assert chi2 < 50  # 19 degrees of freedom: p ~ 1e-4


def test_md_order_for_big_classes_follows_the_shuffle_buffer():
    # Output j of a pass is drawn from records 0 .. 999 + j (MD reference: all of the first 300 draws < 1300).
    n = 3000
    stream = ClassStream(n, "md", np.random.RandomState(4))
    out = stream.take(n)
    assert all(out[j] < 1000 + j + 1 for j in range(n))
    assert out[:300].max() < 1300


def test_uniform_order_for_big_classes_is_not_biased_to_file_order():
    stream = ClassStream(3000, "uniform", np.random.RandomState(5))
    first = stream.take(300)
    assert (first >= 1300).mean() > 0.4  # ~57 % expected for a uniform permutation


def test_same_rng_state_gives_the_same_stream():
    a = ClassStream(1200, "md", np.random.RandomState(6))
    b = ClassStream(1200, "md", np.random.RandomState(6))
    for need in (5, 50, 500, 700, 3):
        assert np.array_equal(a.take(need), b.take(need))


def test_asking_for_more_images_than_the_class_has_is_an_error():
    with pytest.raises(ValueError, match="asked for 11 images of a class that has 10"):
        ClassStream(10, "md", np.random.RandomState(0)).take(11)
    with pytest.raises(ValueError, match="order"):
        ClassStream(10, "random", np.random.RandomState(0))
