"""Unit tests of the pure RFC math (rfc.py) against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rfc_compile import rfc


def _gram(ladder: torch.Tensor) -> torch.Tensor:
    """The Gram matrix a full step keeps for this ladder's rows D1..Dm."""
    return rfc.taylor_gram(ladder[:, 1:].unbind(1))


def _ladder_after(values: list[torch.Tensor], steps: list[int], order: int) -> torch.Tensor:
    ladder = torch.zeros(values[0].shape[0], order + 1, *values[0].shape[1:])
    for i, (v, n) in enumerate(zip(values, steps)):
        gap = torch.tensor(n - steps[i - 1] if i else 1)
        ladder = rfc.update_ladder(ladder, v, gap, torch.tensor(i + 1))
    return ladder


@settings(max_examples=30, deadline=None)
@given(a=st.floats(-2, 2), b=st.floats(-2, 2), c=st.floats(-1, 1), gap=st.integers(1, 4), k=st.integers(1, 6))
def test_order2_ladder_extrapolates_a_quadratic_with_uniform_gaps(a, b, c, gap, k):
    """With equal gaps N the ladder is Newton's forward differences: order 2 is exact on
    quadratics up to the k(k-N)/2 correction of a falling-factorial basis."""
    f = lambda n: torch.full((2, 3), a + b * n + c * n * n)
    steps = [0, gap, 2 * gap]
    ladder = _ladder_after([f(n) for n in steps], steps, order=2)
    assert torch.allclose(ladder[:, 0], f(2 * gap))
    pred = rfc.taylor_predict(ladder, torch.tensor(k), torch.tensor(3))
    # TaylorSeer's estimate: D1 = backward slope, D2 = second difference / N^2
    d1 = (f(2 * gap) - f(gap)) / gap
    d2 = ((f(2 * gap) - f(gap)) / gap - (f(gap) - f(0)) / gap) / gap
    expected = f(2 * gap) + k * d1 + k * k / 2 * d2
    assert torch.allclose(pred, expected, atol=1e-4)


def test_depth_grows_with_full_steps():
    ladder = torch.zeros(1, 3, 2)
    ladder = rfc.update_ladder(ladder, torch.ones(1, 2), torch.tensor(1), torch.tensor(1))
    assert torch.equal(ladder[:, 1:], torch.zeros(1, 2, 2))  # one full step: only D0
    ladder = rfc.update_ladder(ladder, 3 * torch.ones(1, 2), torch.tensor(2), torch.tensor(2))
    assert torch.allclose(ladder[:, 1], torch.ones(1, 2)) and torch.equal(ladder[:, 2], torch.zeros(1, 2))
    # with d = 1, the order-2 term must not be used even if D2 were non-zero
    ladder[:, 2] = 100.0
    assert torch.allclose(rfc.taylor_term(ladder, torch.tensor(2), torch.tensor(2)), 2 * torch.ones(1, 2))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 6), seen=st.integers(1, 4))
def test_rfe_prediction_equals_the_formula_with_a_direct_norm(seed, k, seen):
    """The Gram-matrix norm and the one per-sample contraction give RFC_METHOD.md's
    D0 + s |dX| T / |T| with T and |T| computed directly."""
    gen = torch.Generator().manual_seed(seed)
    ladder = torch.randn(2, 3, 5, 7, generator=gen)
    ratio, dx = torch.rand(2, generator=gen) * 3, torch.rand(2, generator=gen) * 2
    k_t, seen_t = torch.tensor(k), torch.tensor(seen)
    depth = min(2, seen - 1)
    term = sum(k**i / math.factorial(i) * ladder[:, i] for i in range(1, depth + 1)) + 0 * ladder[:, 0]
    norm = torch.clamp(rfc.sample_norm(term), min=1e-6).reshape(2, 1, 1)
    expected = ladder[:, 0] + (ratio * dx).reshape(2, 1, 1) * term / norm
    got = rfc.rfe_predict(ladder, _gram(ladder), ratio, dx, k_t, seen_t, 1e-6)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(rfc.taylor_predict(ladder, k_t, seen_t), ladder[:, 0] + term, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), gap=st.integers(1, 5), seen_after=st.integers(2, 5))
def test_output_change_from_the_gram_matrix_is_the_direct_norm(seed, gap, seen_after):
    """||Y_n - Y_p|| = N ||D1_new|| read off the new Gram matrix once a previous full step exists."""
    gen = torch.Generator().manual_seed(seed)
    ladder, y = torch.randn(2, 3, 4, 6, generator=gen), torch.randn(2, 4, 6, generator=gen)
    rows = rfc.ladder_rows(ladder, y, torch.tensor(gap), torch.tensor(seen_after))
    got = rfc.output_change_norm(rfc.taylor_gram(rows[1:]), torch.tensor(gap))
    assert torch.allclose(got, rfc.sample_norm(y - ladder[:, 0]), rtol=1e-5)


def test_norms_are_per_sample():
    x = torch.stack([torch.full((3, 4), 1.0), torch.full((3, 4), 2.0)])
    assert torch.allclose(rfc.sample_norm(x), torch.tensor([math.sqrt(12), 2 * math.sqrt(12)]))
    assert torch.allclose(rfc.tuple_norm([x, x]), math.sqrt(2) * rfc.sample_norm(x))
    assert torch.allclose(rfc.tuple_l1([x]), torch.tensor([12.0, 24.0]))


def test_rfe_prediction_takes_direction_from_taylor_and_magnitude_from_input():
    ladder = torch.zeros(2, 2, 4)
    ladder[:, 0] = 1.0
    ladder[:, 1] = torch.tensor([[3.0, 0, 0, 0], [0, 0, 0, -5.0]])
    ratio = torch.tensor([2.0, 0.5])
    dx = torch.tensor([1.5, 4.0])
    y = rfc.rfe_predict(ladder, _gram(ladder), ratio, dx, torch.tensor(3), torch.tensor(5), 1e-6)
    assert torch.allclose(y[0], torch.tensor([1.0 + 3.0, 1, 1, 1]))  # |s dx| = 3 along +e0
    assert torch.allclose(y[1], torch.tensor([1.0, 1, 1, 1 - 2.0]))  # |s dx| = 2 along -e3


def test_rfe_is_finite_when_nothing_moved():
    ladder = torch.zeros(2, 3, 4)
    y = rfc.rfe_predict(ladder, _gram(ladder), torch.zeros(2), torch.zeros(2), torch.tensor(1),
                        torch.tensor(3), 1e-6)
    assert torch.isfinite(y).all() and torch.equal(y, ladder[:, 0])
    r = rfc.relational_ratio(torch.zeros(2), torch.zeros(2), 1e-6)
    assert torch.isfinite(r).all()


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_rfe_with_no_taylor_term_yet_predicts_d0(eps):
    """Depth 0 (one full step seen): every Taylor coefficient is 0, so the prediction is D0, even
    with eps = 0 and a large input change (a 0 * inf in the scale would make it NaN)."""
    ladder = torch.randn(2, 3, 4)
    gram = _gram(ladder)
    y = rfc.rfe_predict(ladder, gram, torch.tensor([3.0, 1e3]), torch.tensor([2.0, 1e4]), torch.tensor(2),
                        torch.tensor(1), eps)
    assert torch.equal(y, ladder[:, 0])


def test_rcs_error_and_decision():
    x = [torch.ones(2, 4)]
    x_hat = [torch.tensor([[1.0, 1, 1, 1], [0.0, 1, 1, 1]])]
    e = rfc.rcs_error(x, x_hat, 1e-6)
    assert torch.allclose(e, torch.tensor([0.0, 0.25]))
    acc = rfc.rcs_accumulate(torch.tensor([0.0, 0.1]), e)
    assert bool(rfc.rcs_wants_full(acc, 0.3)) and not bool(rfc.rcs_wants_full(acc, 0.4))


def test_fixed_interval_schedule():
    full, last = [], 0
    for n in range(12):
        seen = torch.tensor(len(full))
        pred = rfc.fixed_interval_full(torch.tensor(n), seen, torch.tensor(n - last), 2, 4)
        if pred:
            full.append(n)
            last = n
    assert full == [0, 1, 5, 9]
