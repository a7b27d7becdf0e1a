"""RFCConfig: the user-facing knobs of Relational Feature Caching (see RFC_METHOD.md)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

Mode = Literal["full", "fora", "taylorseer", "rfe", "rcs", "rfc"]
MODES: tuple[str, ...] = ("full", "fora", "taylorseer", "rfe", "rcs", "rfc")
#: Modes that decide with a fixed interval N (RFC_METHOD.md "Modes"); "rcs" and "rfc" use RCS.
FIXED_INTERVAL_MODES: tuple[str, ...] = ("fora", "taylorseer", "rfe")
MAX_ORDER = 8


@dataclasses.dataclass(frozen=True)
class RFCConfig:
    """How a model is cached.

    Args:
        mode: "full" (no caching), "fora" (reuse, order 0), "taylorseer" (Taylor prediction),
            "rfe" (Taylor direction, relational magnitude) at a fixed interval, "rcs" (TaylorSeer
            prediction + RCS schedule: the paper's "+RCS" ablation row, an extra of this project)
            or "rfc" (RFE prediction + RCS schedule).
        order: Taylor ladder order m (ignored by "fora", which is order 0).
        threshold: RCS threshold tau on the accumulated input-prediction error (modes "rcs", "rfc").
        warmup_steps: the first steps always computed in full (RFE needs two for its ratio).
        max_interval: force a full step when k = n - last_full would exceed it (None: no cap).
        interval: the fixed schedule's N for fora/taylorseer/rfe: step n is full iff
            n < warmup_steps or n - last_full >= N.
        eps: guard for every division by a norm.
        guard_nonfinite: check the cache for NaN/Inf where a full step writes it and, if any,
            compute the next step in full and restart the ladders (one reduction over the written
            state per full step; skipped steps only check the RCS accumulator).

    Options beyond the paper (ours; defaults are the paper's method, see benchmarks/RESULTS.md
    for what each one measured):
        rfe_shrink: scale RFE's magnitude by the cosine between the Taylor term and the change
            measured at the last full step (the least-squares magnitude when the direction is
            only partly right).
        num_steps, final_full_steps: with the generation length known, compute the last
            ``final_full_steps`` steps in full (where quality is decided).
    """

    mode: Mode = "rfc"
    order: int = 2
    threshold: float = 0.1
    warmup_steps: int = 2
    max_interval: int | None = None
    interval: int = 4
    eps: float = 1e-6
    guard_nonfinite: bool = True
    rfe_shrink: bool = False
    num_steps: int | None = None
    final_full_steps: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str):
            raise TypeError(f"RFCConfig.mode must be a str, got {type(self.mode).__name__}")
        if self.mode not in MODES:
            raise ValueError(f"RFCConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("order", "warmup_steps", "interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"RFCConfig.{name} must be an int, got {type(value).__name__}")
        if not 0 <= self.order <= MAX_ORDER:
            raise ValueError(f"RFCConfig.order must be in [0, {MAX_ORDER}], got {self.order}")
        if self.warmup_steps < 0:
            raise ValueError(f"RFCConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.mode in ("rfe", "rfc") and self.warmup_steps < 2:
            raise ValueError(
                f"RFCConfig.warmup_steps must be >= 2 for mode {self.mode!r} "
                f"(the relational ratio needs two full steps), got {self.warmup_steps}"
            )
        if self.interval < 1:
            raise ValueError(f"RFCConfig.interval must be >= 1, got {self.interval}")
        if self.max_interval is not None:
            if isinstance(self.max_interval, bool) or not isinstance(self.max_interval, int):
                raise TypeError(
                    f"RFCConfig.max_interval must be an int or None, got {type(self.max_interval).__name__}"
                )
            if self.max_interval < 1:
                raise ValueError(f"RFCConfig.max_interval must be >= 1 or None, got {self.max_interval}")
        for name in ("threshold", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"RFCConfig.{name} must be a float, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"RFCConfig.{name} must be finite and >= 0, got {value}")
        if not isinstance(self.guard_nonfinite, bool):
            raise TypeError(f"RFCConfig.guard_nonfinite must be a bool, got {type(self.guard_nonfinite).__name__}")
        if not isinstance(self.rfe_shrink, bool):
            raise TypeError(f"RFCConfig.rfe_shrink must be a bool, got {type(self.rfe_shrink).__name__}")
        if isinstance(self.final_full_steps, bool) or not isinstance(self.final_full_steps, int):
            raise TypeError(f"RFCConfig.final_full_steps must be an int, got {type(self.final_full_steps).__name__}")
        if self.final_full_steps < 0:
            raise ValueError(f"RFCConfig.final_full_steps must be >= 0, got {self.final_full_steps}")
        if self.num_steps is not None:
            if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int):
                raise TypeError(f"RFCConfig.num_steps must be an int or None, got {type(self.num_steps).__name__}")
            if self.num_steps < 1:
                raise ValueError(f"RFCConfig.num_steps must be >= 1 or None, got {self.num_steps}")
        if self.final_full_steps and self.num_steps is None:
            raise ValueError("RFCConfig.final_full_steps needs num_steps (the generation length)")
        if self.eps <= 0:
            raise ValueError(f"RFCConfig.eps must be > 0, got {self.eps}")

    @property
    def ladder_order(self) -> int:
        """Order of the cached ladders actually kept (FORA keeps only D0)."""
        return 0 if self.mode in ("fora", "full") else self.order

    @property
    def uses_rcs(self) -> bool:
        return self.mode in ("rcs", "rfc")

    @property
    def uses_rfe(self) -> bool:
        return self.mode in ("rfe", "rfc")

    def replace(self, **changes) -> "RFCConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
