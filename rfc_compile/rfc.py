"""The RFC math of RFC_METHOD.md as pure tensor functions.

Everything here is traced into the cached graph: no Python branching on tensor values,
norms per sample (over every dim but the batch dim) computed in float32, every division
guarded by eps. A *ladder* is a tensor of shape (m + 1, *feature_shape) holding
[D0, D1, ..., Dm]; counters (step, last full step, full steps seen) are 0-d int64 tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


# --- per-sample norms ---------------------------------------------------------------

def sample_norm(x: Tensor, p: float = 2.0) -> Tensor:
    """Per-sample p-norm over all dims but dim 0, in float32: shape (B,)."""
    return torch.linalg.vector_norm(x.float().reshape(x.shape[0], -1), ord=p, dim=1)


def tuple_norm(xs: Sequence[Tensor]) -> Tensor:
    """L2 norm of a tuple of tensors taken as one vector: sqrt(sum of squared norms)."""
    return torch.sqrt(sum(sample_norm(x) ** 2 for x in xs))


def tuple_l1(xs: Sequence[Tensor]) -> Tensor:
    """L1 norm of a tuple of tensors taken as one vector."""
    return sum(sample_norm(x, 1.0) for x in xs)


def _per_sample(s: Tensor, like: Tensor) -> Tensor:
    """Broadcast a (B,) vector against a (B, ...) tensor."""
    return s.reshape((s.shape[0],) + (1,) * (like.dim() - 1))


# --- Taylor ladder --------------------------------------------------------------------

def ladder_depth(full_steps_seen: Tensor, order: int) -> Tensor:
    """d = min(m, full steps seen - 1): how many finite differences a ladder holds."""
    return torch.clamp(full_steps_seen - 1, min=0, max=order)


def update_ladder(ladder: Tensor, value: Tensor, gap: Tensor, full_steps_seen_after: Tensor) -> Tensor:
    """Ladder update at a full step: D0 <- Y; D_i <- (D_{i-1}(new) - D_{i-1}(old)) / N.

    gap is N = n - p (ignored while no previous full step exists); entries past the new depth
    min(m, full steps seen - 1) stay zero.
    """
    order = ladder.shape[0] - 1
    depth = ladder_depth(full_steps_seen_after, order)
    gap_f = torch.clamp(gap.to(torch.float32), min=1.0)
    new = [value.to(ladder.dtype)]
    for i in range(1, order + 1):
        diff = ((new[i - 1].float() - ladder[i - 1].float()) / gap_f).to(ladder.dtype)
        new.append(torch.where(depth >= i, diff, torch.zeros_like(diff)))
    return torch.stack(new)


def taylor_term(ladder: Tensor, k: Tensor, full_steps_seen: Tensor) -> Tensor:
    """T_k = sum_{i=1..d} k^i / i! * D_i (zero when d = 0), in float32."""
    order = ladder.shape[0] - 1
    if order == 0:
        return torch.zeros(ladder.shape[1:], dtype=torch.float32, device=ladder.device)
    depth = ladder_depth(full_steps_seen, order)
    k_f = k.to(torch.float32)
    coeffs = torch.stack([torch.where(depth >= i, k_f**i / math.factorial(i), torch.zeros_like(k_f))
                          for i in range(1, order + 1)])
    # one contraction over the ladder rows instead of a copy per row
    return (coeffs @ ladder[1:].reshape(order, -1).float()).reshape(ladder.shape[1:])


def taylor_predict(ladder: Tensor, k: Tensor, full_steps_seen: Tensor) -> Tensor:
    """TaylorSeer's prediction D0 + T_k (FORA when the ladder has order 0)."""
    return (ladder[0].float() + taylor_term(ladder, k, full_steps_seen)).to(ladder.dtype)


# --- RFE: relational feature estimation ----------------------------------------------

def relational_ratio(y_new: Tensor, y_prev: Tensor, x_change_norm: Tensor, eps: float) -> Tensor:
    """s = ||Y_n - Y_p|| / max(||X_n - X_p||, eps), per sample."""
    return sample_norm(y_new - y_prev) / torch.clamp(x_change_norm, min=eps)


def rfe_predict(ladder: Tensor, ratio: Tensor, x_change_norm: Tensor, k: Tensor,
                full_steps_seen: Tensor, eps: float) -> Tensor:
    """Y_hat = D0 + s * ||X_n - X_last|| * T_k / max(||T_k||, eps)."""
    term = taylor_term(ladder, k, full_steps_seen)
    # one scale per sample first: a graph runtime that does not fuse (onnxruntime) then
    # makes one pass over the features instead of one for the direction and one for the magnitude
    scale = ratio * x_change_norm / torch.clamp(sample_norm(term), min=eps)
    return (ladder[0].float() + _per_sample(scale, term) * term).to(ladder.dtype)


def direction_agreement(term: Tensor, change: Tensor, eps: float) -> Tensor:
    """cos(T, Y_n - D0) per sample, clamped to [0, 1] (ours, RFCConfig.rfe_shrink).

    Measured at a full step between the Taylor term the old ladder would have predicted and the
    change that actually happened. When the direction is only partly right, the error
    ||c * T_hat - d|| over magnitudes c is smallest at c = cos * ||d||, so RFE's magnitude
    s * ||dX|| (an estimate of ||d||) is scaled by it; a ladder with no direction yet gives 1.
    """
    dot = (term.float() * change.float()).reshape(term.shape[0], -1).sum(dim=1)
    norms = sample_norm(term) * sample_norm(change)
    cos = torch.clamp(dot / torch.clamp(norms, min=eps), min=0.0, max=1.0)
    return torch.where(norms > eps, cos, torch.ones_like(cos))


# --- RCS: relational cache scheduling -------------------------------------------------

def rcs_error(x: Sequence[Tensor], x_hat: Sequence[Tensor], eps: float) -> Tensor:
    """e_n = ||X_n - X_hat||_1 / max(||X_n||_1, eps), per sample."""
    num = tuple_l1([a.float() - b.float() for a, b in zip(x, x_hat)])
    return num / torch.clamp(tuple_l1(x), min=eps)


def rcs_accumulate(acc: Tensor, error: Tensor) -> Tensor:
    """A_n = A_{n-1} + e_n (the caller resets A to 0 at full steps)."""
    return acc + error


def rcs_wants_full(acc: Tensor, threshold: float) -> Tensor:
    """One decision per call: full when A_n > tau for any sample."""
    return (acc > threshold).any()


# --- schedules ------------------------------------------------------------------------

def forced_full(step: Tensor, full_steps_seen: Tensor, since_full: Tensor,
                warmup_steps: int, max_interval: int | None) -> Tensor:
    """Full steps no estimate may skip: warm-up, the very first call, k > max_interval."""
    forced = (step < warmup_steps) | (full_steps_seen == 0)
    if max_interval is not None:
        forced = forced | (since_full > max_interval)
    return forced


def final_full(step: Tensor, num_steps: int, final_full_steps: int) -> Tensor:
    """The last ``final_full_steps`` of a ``num_steps`` generation run in full (ours)."""
    return step >= num_steps - final_full_steps


def fixed_interval_full(step: Tensor, full_steps_seen: Tensor, since_full: Tensor,
                        warmup_steps: int, interval: int) -> Tensor:
    """Fixed schedule (TaylorSeer's convention): full iff n < warmup or n - last_full >= N."""
    return forced_full(step, full_steps_seen, since_full, warmup_steps, None) | (since_full >= interval)
