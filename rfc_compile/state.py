"""Cache state: the tensors threaded functionally through the cached graph.

Naming scheme (also the ONNX input/output names, prefixed there with ``state.``/``state_out.``):

    step              int64 ()      calls since the last reset (n)
    last_full         int64 ()      index of the last full step
    full_steps_seen   int64 ()      number of full steps so far
    rcs_acc           float32 (B,)  RCS accumulator A (mode "rfc")
    rcs_ladder.<i>    (B, m+1, ...)  Taylor ladder of the watched input X_0's i-th tensor (mode "rfc")
    <region>.ladder.<o>  (B, m+1, *Y_o[1:])  Taylor ladder [D0..Dm] of the region's o-th output,
                         batch first (rfc.py)
    <region>.ratio.<o>   float32 (B,) relational ratio s of that output (modes "rfe", "rfc")
    <region>.cos.<o>     float32 (B,) direction agreement c of that output (rfe_shrink=True)
    <region>.gram.<o>    float32 (B, m, m) Gram matrix of that ladder's rows D1..Dm (modes "rfe", "rfc"; m >= 1)
    <region>.x_last.<i>  like X[i]    the region's i-th feature input at the last full step

``<region>`` is the module path with dots replaced by underscores, e.g.
``transformer_blocks_0_attn1``.

B is the batch. A model that folds another axis into its blocks' batch dim
(patterns.FOLDED_BATCH_INPUTS: Latte's frames, its patch positions) has region tensors of
(B x g) rows; their state holds them grouped by sample, (B, g, ...): ``x_last`` as
(B, g, *X[1:]), a ladder as (B, m+1, g, *Y[1:]), one scalar per sample.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class StateEntry:
    name: str
    shape: tuple[int, ...]  # at the example's sizes
    dtype: torch.dtype
    #: the shape as the capture traced it, where the graph has dynamic dims: each size a sympy
    #: expression in their symbols (a ladder's token count; FLUX single blocks: image + text tokens)
    traced: tuple = dataclasses.field(default=(), compare=False, repr=False)
    #: ``(axis, count)``: axes of the stored tensor that the step reads as one. A size that is a power
    #: of a dynamic dim (DiT's ``grid**2`` tokens) is no size torch.export can be given for an input;
    #: stored as ``grid x grid`` it is two named dims (rewrite.py's ``_unfold_powers``)
    folded: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass
class StateSpec:
    """The ordered list of state tensors a cached graph reads and writes."""

    entries: list[StateEntry]

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def init(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """A fresh state: every tensor zero (a new generation)."""
        return {e.name: torch.zeros(e.shape, dtype=e.dtype, device=device) for e in self.entries}

    def check(self, state: dict[str, torch.Tensor]) -> None:
        """Clear error for a state that does not belong to this graph."""
        missing = [n for n in self.names() if n not in state]
        if missing:
            raise ValueError(f"cache state is missing entries {missing[:5]}")
        for e in self.entries:
            t = state[e.name]
            if tuple(t.shape) != e.shape or t.dtype != e.dtype:
                raise ValueError(
                    f"cache state entry {e.name!r} has shape {tuple(t.shape)} dtype {t.dtype}, "
                    f"expected {e.shape} {e.dtype}"
                )

    def nbytes(self) -> int:
        return sum(torch.Size(e.shape).numel() * torch.empty((), dtype=e.dtype).element_size()
                   for e in self.entries)
