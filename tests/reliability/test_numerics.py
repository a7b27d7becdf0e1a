"""[reliability] numerics: low precision, zero motion, non-finite cache."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_CLASSES, make_tiny_dit

import rfc_compile
from rfc_compile import RFCConfig


def _call(model, x, t):
    labels = torch.arange(x.shape[0]) % NUM_CLASSES
    return model(hidden_states=x, timestep=torch.full((x.shape[0],), t), class_labels=labels, return_dict=False)[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_run_with_float32_norms(dtype):
    model = make_tiny_dit().to(dtype)
    cached = rfc_compile.optimize(model, RFCConfig(mode="rfc", threshold=0.8))
    x = torch.randn(2, 4, 8, 8, dtype=dtype)
    outs = [_call(cached, x * (1 - 0.05 * n), 900 - 50 * n) for n in range(8)]
    assert all(torch.isfinite(o).all() and o.dtype == dtype for o in outs)
    state = cached.state
    assert state["rcs_acc"].dtype == torch.float32
    assert all(state[n].dtype == torch.float32 for n in state if ".ratio." in n)
    full = rfc_compile.optimize(make_tiny_dit().to(dtype), RFCConfig(mode="full"))
    assert torch.equal(_call(full, x, 500), _call(model, x, 500))


def test_repeated_identical_input_stays_finite():
    cached = rfc_compile.optimize(make_tiny_dit(), RFCConfig(mode="rfe", interval=3))
    x = torch.randn(2, 4, 8, 8)
    outs = [_call(cached, x, 500) for _ in range(8)]  # ||X_n - X_p|| = 0 everywhere
    assert cached.stats.nfc < 8
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(torch.isfinite(t).all() for t in cached.state.values() if t.is_floating_point())


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["rfc", "taylorseer"])
def test_nonfinite_written_into_the_cache_restarts_it(poison, mode):
    """A full step whose outputs overflow (here: a poisoned input) writes NaN/Inf into the cache;
    the guard, checked where the cache is written, forces the next step full and restarts it."""
    model = make_tiny_dit()
    config = RFCConfig(mode=mode, threshold=1e9, interval=100, warmup_steps=3)  # full only when forced
    cached = rfc_compile.optimize(model, config)
    x = torch.randn(2, 4, 8, 8)
    for n in range(2):
        _call(cached, x * (1 - 0.02 * n), 900 - 10 * n)
    bad = x.clone()
    bad[0, 0, 0, 0] = poison
    assert not torch.isfinite(_call(cached, bad, 880)).all()  # step 2: forced full by warm-up
    poisoned = [n for n, t in cached.state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert any(".ladder." in n for n in poisoned)
    x_next = x * 0.9
    out = _call(cached, x_next, 850)
    assert cached.stats.full_steps == [0, 1, 2, 3]
    torch.testing.assert_close(out, _call(model, x_next, 850), atol=1e-5, rtol=1e-5)
    later = [_call(cached, x_next * (1 - 0.01 * n), 840 - 10 * n) for n in range(3)]
    assert cached.stats.full_steps == [0, 1, 2, 3]  # the restarted cache predicts again
    assert all(torch.isfinite(o).all() for o in later)
    assert all(torch.isfinite(t).all() for t in cached.state.values() if t.is_floating_point())


@pytest.mark.parametrize("mode", ["rfe", "taylorseer"])
def test_guard_sees_nonfinite_in_a_higher_ladder_row_only(mode):
    """A full step that writes NaN into D2 alone (D2 <- (D1 new - D1 old) / N with a poisoned old
    D1; D0 = Y and D1 are finite) still trips the guard: RFE checks D1..Dm through the Gram
    matrix's diagonal, TaylorSeer sums the whole ladder."""
    model = make_tiny_dit()
    cached = rfc_compile.optimize(model, RFCConfig(mode=mode, interval=3, order=2))
    x = torch.randn(2, 4, 8, 8)
    for n in range(4):  # full steps 0 and 1
        _call(cached, x * (1 - 0.02 * n), 900 - 10 * n)
    state = dict(cached.state)
    name = next(n for n in state if ".ladder." in n)
    ladder = state[name].clone()
    ladder[:, 1] = float("nan")
    state[name] = ladder
    cached.state = state
    out = _call(cached, x * 0.9, 850)  # step 4: full, writes a NaN D2 into that ladder only
    assert torch.isfinite(out).all()
    assert not torch.isfinite(cached.state[name][:, 2]).all() and torch.isfinite(cached.state[name][:, :2]).all()
    assert int(cached.state["full_steps_seen"]) == 0  # the guard tripped: the ladders restart
    later = [_call(cached, x * (0.89 - 0.01 * n), 840 - 10 * n) for n in range(4)]
    assert cached.stats.full_steps == [0, 1, 4, 5, 8]  # one forced full step, then every 3rd
    assert all(torch.isfinite(o).all() for o in later)
    assert all(torch.isfinite(t).all() for t in cached.state.values() if t.is_floating_point())


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_rcs_accumulator_forces_a_full_step(poison):
    """NaN > tau is False: without the per-step check a NaN accumulator would skip forever."""
    model = make_tiny_dit()
    cached = rfc_compile.optimize(model, RFCConfig(mode="rfc", threshold=1e9))
    x = torch.randn(2, 4, 8, 8)
    for n in range(4):
        _call(cached, x * (1 - 0.02 * n), 900 - 10 * n)
    assert cached.stats.full_steps == [0, 1]
    state = dict(cached.state)
    state["rcs_acc"] = state["rcs_acc"].clone().fill_(poison)
    cached.state = state
    x_next = x * 0.9
    out = _call(cached, x_next, 850)
    assert cached.stats.full_steps == [0, 1, 4]
    torch.testing.assert_close(out, _call(model, x_next, 850), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(cached.state["rcs_acc"]).all()


def test_guard_can_be_turned_off():
    cached = rfc_compile.optimize(make_tiny_dit(), RFCConfig(mode="fora", interval=10, guard_nonfinite=False))
    x = torch.randn(1, 4, 8, 8)
    for n in range(3):
        _call(cached, x, 900 - n)
    state = dict(cached.state)
    name = next(n for n in state if ".ladder." in n)
    state[name] = state[name].clone().fill_(float("nan"))
    cached.state = state
    assert not torch.isfinite(_call(cached, x, 800)).all()  # documented: no guard, no fallback
