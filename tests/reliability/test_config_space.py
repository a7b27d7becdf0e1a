"""[reliability] RFCConfig: every invalid value is named; valid configs never crash."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_dit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rfc_compile
from rfc_compile import RFCConfig

INVALID = [
    ("threshold", -1.0, ValueError), ("threshold", float("nan"), ValueError), ("threshold", float("inf"), ValueError),
    ("threshold", "0.1", TypeError), ("order", -1, ValueError), ("order", 1000, ValueError), ("order", 2.0, TypeError),
    ("warmup_steps", -1, ValueError), ("interval", 0, ValueError), ("interval", "4", TypeError),
    ("max_interval", 0, ValueError), ("max_interval", 2.5, TypeError), ("eps", 0.0, ValueError),
    ("eps", -1e-3, ValueError), ("mode", "teacache", ValueError), ("mode", None, TypeError),
    ("guard_nonfinite", 1, TypeError), ("order", True, TypeError),
]


@pytest.mark.parametrize("field,value,error", INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_values_name_the_field(field, value, error):
    with pytest.raises(error, match=field):
        RFCConfig(**{field: value})


@pytest.mark.parametrize("mode", ["rfe", "rfc"])
def test_relational_modes_need_two_warmup_steps(mode):
    with pytest.raises(ValueError, match="warmup_steps"):
        RFCConfig(mode=mode, warmup_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        RFCConfig(mode=mode, warmup_steps=1)


def test_optimize_rejects_non_config():
    with pytest.raises(TypeError, match="RFCConfig"):
        rfc_compile.optimize(make_tiny_dit(), {"mode": "rfc"})


configs = st.builds(
    lambda mode, order, threshold, warmup, max_interval, interval: RFCConfig(
        mode=mode, order=order, threshold=threshold,
        warmup_steps=max(warmup, 2) if mode in ("rfe", "rfc") else warmup,
        max_interval=max_interval, interval=interval),
    mode=st.sampled_from(rfc_compile.MODES), order=st.integers(0, 3), threshold=st.floats(0, 5),
    warmup=st.integers(0, 4), max_interval=st.none() | st.integers(1, 5), interval=st.integers(1, 6),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs)
def test_valid_configs_never_crash(config):
    model = make_tiny_dit(layers=1)
    cached = rfc_compile.optimize(model, config)
    x = torch.randn(2, 4, 8, 8)
    for n in range(6):
        out = cached(hidden_states=x * (1 - 0.05 * n), timestep=torch.full((2,), 900 - 100 * n),
                     class_labels=torch.tensor([1, 2]), return_dict=False)[0]
        assert torch.isfinite(out).all()
    stats = cached.stats
    assert stats.full_steps[0] == 0 and 1 <= stats.nfc <= 6
    if config.mode == "full":
        assert stats.nfc == 6
    if config.max_interval is not None:
        gaps = [b - a for a, b in zip(stats.full_steps, stats.full_steps[1:] + [6])]
        assert max(gaps) <= config.max_interval + 1
