"""The RFC math of RFC_METHOD.md as pure tensor functions.

Everything here is traced into the cached graph: no Python branching on tensor values,
norms per sample (over every dim but the batch dim) computed in float32, every division
guarded by eps. A *ladder* is a tensor of shape (B, m + 1, *feature_shape) holding
[D0, D1, ..., Dm] of every sample; counters (step, last full step, full steps seen) are 0-d
int64 tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


# --- per-sample norms ---------------------------------------------------------------

def _sample_sum(x: Tensor) -> Tensor:
    """Sum over every dim but dim 0: shape (B,). Reduced over those dims directly, not through a
    reshape to (B, -1): the same kernel in onnxruntime, one graph node fewer per norm."""
    return x.sum(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


def sample_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample dot product over all dims but dim 0, in float32: shape (B,)."""
    return _sample_sum(a.float() * b.float())


def sample_sq_norm(x: Tensor) -> Tensor:
    """Per-sample squared L2 norm over all dims but dim 0, in float32: shape (B,).

    Written as sum(x * x) rather than ``vector_norm``: exported to ONNX that is Mul + ReduceSum,
    which onnxruntime's CPU provider runs ~2.5x faster than ReduceSumSquare or ReduceL2
    (benchmarks/ort_cpu_norms.py; its CUDA provider runs ReduceL2 ~100x slower, export/reduce_l2.py);
    inductor fuses either form into one reduction."""
    return sample_dot(x, x)


def sample_norm(x: Tensor, p: float = 2.0) -> Tensor:
    """Per-sample p-norm (p = 1 or 2) over all dims but dim 0, in float32: shape (B,)."""
    if p == 1.0:  # Abs + ReduceSum in ONNX (ReduceL1 is ~3x slower on onnxruntime's CPU provider)
        return _sample_sum(x.float().abs())
    if p != 2.0:
        raise ValueError(f"sample_norm supports p = 1 or 2, got {p}")
    return torch.sqrt(sample_sq_norm(x))


def tuple_norm(xs: Sequence[Tensor]) -> Tensor:
    """L2 norm of a tuple of tensors taken as one vector: sqrt(sum of squared norms)."""
    return torch.sqrt(sum(sample_sq_norm(x) for x in xs))


def tuple_l1(xs: Sequence[Tensor]) -> Tensor:
    """L1 norm of a tuple of tensors taken as one vector."""
    return sum(sample_norm(x, 1.0) for x in xs)


# --- Taylor ladder --------------------------------------------------------------------
# A ladder is stored batch first, (B, m + 1, *features): sample b's rows D0..Dm are contiguous,
# so a prediction with per-sample coefficients (RFE's magnitude) is ONE batched contraction
# over the whole ladder (a (B, 1, m+1) @ (B, m+1, F) matmul): no row copies, no extra passes.

def ladder_depth(full_steps_seen: Tensor, order: int) -> Tensor:
    """d = min(m, full steps seen - 1): how many finite differences a ladder holds."""
    return torch.clamp(full_steps_seen - 1, min=0, max=order)


def ladder_rows(ladder: Tensor, value: Tensor, gap: Tensor, full_steps_seen_after: Tensor) -> list[Tensor]:
    """The new rows [D0, ..., Dm] at a full step: D0 <- Y; D_i <- (D_{i-1}(new) - D_{i-1}(old)) / N.

    gap is N = n - p (ignored while no previous full step exists); rows past the new depth
    min(m, full steps seen - 1) are zero. They are selected (``where``), not multiplied by a 0/1
    mask: after the non-finite guard restarts the ladders, the old rows may hold NaN/Inf, and
    0 * NaN would keep the restarted ladder poisoned. The zero is a scalar, so the exported graph
    reads no zeros tensor (ONNX ``Where`` with a scalar: ~15 % cheaper per update on onnxruntime's CPU).
    """
    order = ladder.shape[1] - 1
    depth = ladder_depth(full_steps_seen_after, order)
    gap_f = torch.clamp(gap.to(torch.float32), min=1.0)
    new = [value.to(ladder.dtype)]
    for i in range(1, order + 1):
        diff = ((new[i - 1].float() - ladder[:, i - 1].float()) / gap_f).to(ladder.dtype)
        new.append(torch.where(depth >= i, diff, 0.0))
    return new


def update_ladder(ladder: Tensor, value: Tensor, gap: Tensor, full_steps_seen_after: Tensor) -> Tensor:
    """The ladder after a full step (``ladder_rows`` stacked batch first)."""
    return torch.stack(ladder_rows(ladder, value, gap, full_steps_seen_after), dim=1)


def taylor_coeffs(k: Tensor, full_steps_seen: Tensor, order: int, d0: float = 0.0) -> Tensor:
    """[d0, k/1!, k^2/2!, ..., k^m/m!] with the entries past depth d zeroed: shape (m + 1,).

    Contracted with the ladder this is T_k (d0 = 0) or TaylorSeer's D0 + T_k (d0 = 1)."""
    depth = ladder_depth(full_steps_seen, order)
    k_f = k.to(torch.float32)
    zero = torch.zeros_like(k_f)
    return torch.stack([torch.full_like(k_f, d0)] + [torch.where(depth >= i, k_f**i / math.factorial(i), zero)
                                                     for i in range(1, order + 1)])


def contract(ladder: Tensor, coeffs: Tensor) -> Tensor:
    """sum_i coeffs[.., i] * D_i in float32: coeffs (m+1,) for every sample, or per sample as
    (B, m+1) or already as the matmul's (B, 1, m+1)."""
    batch = ladder.shape[0]
    rows = ladder.reshape(batch, ladder.shape[1], -1).float()
    weights = coeffs.float()
    if weights.dim() != 3:
        weights = weights.reshape(-1, 1, ladder.shape[1])  # (1 or B, 1, m+1)
    return (weights @ rows).reshape((batch,) + tuple(ladder.shape[2:]))


def taylor_term(ladder: Tensor, k: Tensor, full_steps_seen: Tensor) -> Tensor:
    """T_k = sum_{i=1..d} k^i / i! * D_i (zero when d = 0), in float32."""
    return contract(ladder, taylor_coeffs(k, full_steps_seen, ladder.shape[1] - 1))


def taylor_predict(ladder: Tensor, k: Tensor, full_steps_seen: Tensor) -> Tensor:
    """TaylorSeer's prediction D0 + T_k (FORA when the ladder has order 0)."""
    return contract(ladder, taylor_coeffs(k, full_steps_seen, ladder.shape[1] - 1, d0=1.0)).to(ladder.dtype)


def taylor_gram(rows: Sequence[Tensor]) -> Tensor:
    """Per-sample Gram matrix of the Taylor rows D1..Dm, G[b, i, j] = <D_i+1, D_j+1>: (B, m, m).

    Kept next to the ladder (computed at full steps from the new rows, m(m+1)/2 dot products) so
    that a skipped step gets ||T_k||^2 = c^T G c from m numbers instead of a pass over the features.
    """
    m = len(rows)
    dots = {(i, j): sample_dot(rows[i], rows[j]) for i in range(m) for j in range(i, m)}
    return torch.stack([torch.stack([dots[min(i, j), max(i, j)] for j in range(m)], dim=1) for i in range(m)],
                       dim=1)


# --- RFE: relational feature estimation ----------------------------------------------

def relational_ratio(y_change_norm: Tensor, x_change_norm: Tensor, eps: float) -> Tensor:
    """s = ||Y_n - Y_p|| / max(||X_n - X_p||, eps), per sample."""
    return y_change_norm / torch.clamp(x_change_norm, min=eps)


def output_change_norm(gram: Tensor, gap: Tensor) -> Tensor:
    """||Y_n - Y_p|| at a full step from the new ladder's Gram matrix: N * ||D1||, per sample.

    Once a previous full step exists (the only time the ratio is kept), the new D1 is exactly
    (Y_n - Y_p) / N, and G[:, 0, 0] = ||D1||^2 is already computed: no pass over the features."""
    return torch.clamp(gap.to(torch.float32), min=1.0) * torch.sqrt(gram[:, 0, 0])


def rfe_predict(ladder: Tensor, gram: Tensor | None, ratio: Tensor, x_change_norm: Tensor, k: Tensor,
                full_steps_seen: Tensor, eps: float) -> Tensor:
    """Y_hat = D0 + s * ||X_n - X_last|| * T_k / max(||T_k||, eps).

    ||T_k|| comes from the Gram matrix of D1..Dm (``taylor_gram``), and D0 plus the scaled T_k is
    one contraction with per-sample coefficients [1, a_b c_1, ..., a_b c_m]: a skipped step reads
    each ladder once, as TaylorSeer's prediction does."""
    if ladder.shape[1] == 1 or gram is None:  # order 0: no Taylor term (and no Gram), the prediction is D0
        return ladder[:, 0].clone()
    order = ladder.shape[1] - 1
    coeffs = taylor_coeffs(k, full_steps_seen, order)  # (m+1,), coeffs[0] = 0
    taylor = coeffs[1:]
    # max(||T_k||, eps) as sqrt(max(c^T G c, eps^2)): the same number, one node fewer per region
    # (eps^2 floored at float32's smallest normal, so that a zero term, e.g. depth 0, gets a
    # finite scale and its zero coefficients stay zero)
    floor = max(eps * eps, torch.finfo(torch.float32).tiny)
    term_norm = torch.sqrt(torch.clamp((gram @ taylor) @ taylor, min=floor))  # (B,)
    scale = ratio * x_change_norm / term_norm
    d0 = (torch.arange(order + 1, device=coeffs.device) == 0).float()  # [1, 0, .., 0]: D0's coefficient
    per_sample = scale.reshape(-1, 1, 1) * coeffs + d0  # (B, 1, m+1): [1, a c_1, ..., a c_m]
    return contract(ladder, per_sample).to(ladder.dtype)


def direction_agreement(term: Tensor, change: Tensor, eps: float) -> Tensor:
    """cos(T, Y_n - D0) per sample, clamped to [0, 1] (ours, RFCConfig.rfe_shrink).

    Measured at a full step between the Taylor term the old ladder would have predicted and the
    change that actually happened. When the direction is only partly right, the error
    ||c * T_hat - d|| over magnitudes c is smallest at c = cos * ||d||, so RFE's magnitude
    s * ||dX|| (an estimate of ||d||) is scaled by it; a ladder with no direction yet gives 1.
    """
    dot = sample_dot(term, change)
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
