"""An independent, plain-PyTorch implementation of RFC_METHOD.md, for tests only.

It shares no code with rfc_compile: it patches the real region modules' ``forward`` with
Python wrappers that decide with Python control flow, keep ladders in Python lists and take
per-sample norms one sample at a time. If the traced graph and this disagree, one of them
is not the method.
"""

from __future__ import annotations

import math

import torch


def _norm(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Per-sample norm, one sample at a time, in float64 (then float32)."""
    return torch.stack([x[b].double().abs().pow(p).sum().pow(1.0 / p) for b in range(x.shape[0])]).float()


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class _RegionState:
    def __init__(self) -> None:
        self.ladders: list[list[torch.Tensor]] = []  # per output: [D0, D1, ...]
        self.ratios: list[torch.Tensor] = []
        self.x_last: list[torch.Tensor] | None = None


class ReferenceRFC:
    """Wraps region modules of ``model``; call ``begin_step()`` before every model call.

    ``regions``: list of (name, module, feature_arg_names) where feature_arg_names lists the
    module's forward arguments (positional index or kwarg name) that make up X.
    """

    def __init__(self, regions, mode: str, order: int = 2, threshold: float = 0.1, warmup_steps: int = 2,
                 max_interval: int | None = None, interval: int = 4, eps: float = 1e-6):
        self.mode, self.threshold, self.warmup = mode, threshold, warmup_steps
        self.max_interval, self.interval, self.eps = max_interval, interval, eps
        self.order = 0 if mode in ("fora", "full") else order
        self.regions = regions
        self.full_steps: list[int] = []
        self.step = -1
        self.is_full = True
        self.state = {name: _RegionState() for name, _, _ in regions}
        self.watch_ladder: list[list[torch.Tensor]] = []
        self.acc: torch.Tensor | None = None
        for name, module, features in regions:
            self._patch(name, module, features, first=(name == regions[0][0]))

    # --- schedule -------------------------------------------------------------------

    def begin_step(self) -> None:
        self.step += 1

    @property
    def last_full(self) -> int | None:
        return self.full_steps[-1] if self.full_steps else None

    def _taylor(self, ladder: list[torch.Tensor], k: int) -> torch.Tensor:
        d = min(self.order, len(self.full_steps) - 1)
        out = torch.zeros_like(ladder[0], dtype=torch.float32)
        for i in range(1, d + 1):
            out = out + (k**i / math.factorial(i)) * ladder[i].float()
        return out

    def _decide(self, xs: list[torch.Tensor]) -> bool:
        n = self.step
        if self.mode == "full":
            return True
        if not self.full_steps or n < self.warmup:
            forced = True
        else:
            k = n - self.last_full
            forced = self.max_interval is not None and k > self.max_interval
            if self.mode != "rfc":
                forced = forced or k >= self.interval
        if self.mode != "rfc":
            return forced
        # RCS: accumulate the relative L1 error of the watched input's Taylor prediction
        batch = xs[0].shape[0]
        if self.acc is None:
            self.acc = torch.zeros(batch)
        if self.watch_ladder:
            k = n - self.last_full
            num = sum(_norm(x.float() - (lad[0].float() + self._taylor(lad, k)), 1.0)
                      for x, lad in zip(xs, self.watch_ladder))
        else:
            num = sum(_norm(x.float(), 1.0) for x in xs)
        den = torch.clamp(sum(_norm(x.float(), 1.0) for x in xs), min=self.eps)
        self.acc = self.acc + num / den
        full = forced or bool((self.acc > self.threshold).any())
        if full:
            self.acc = torch.zeros(batch)
        return full

    @staticmethod
    def _new_ladder(old: list[torch.Tensor] | None, value: torch.Tensor, gap: int, depth: int, order: int):
        new = [value.clone()]
        for i in range(1, order + 1):
            if i <= depth:
                new.append(((new[i - 1].float() - old[i - 1].float()) / gap).to(value.dtype))
            else:
                new.append(torch.zeros_like(value))
        return new

    # --- region wrappers --------------------------------------------------------------

    def _patch(self, name, module, features, first: bool) -> None:
        original = module.forward

        def features_of(args, kwargs):
            return [args[f] if isinstance(f, int) else kwargs[f] for f in features]

        def wrapped(*args, **kwargs):
            xs = features_of(args, kwargs)
            if first:
                self.is_full = self._decide(xs)
                if self.is_full:
                    gap = self.step - self.last_full if self.full_steps else 1
                    depth = min(self.order, len(self.full_steps))
                    if self.mode == "rfc":
                        old = self.watch_ladder or [None] * len(xs)
                        self.watch_ladder = [self._new_ladder(o, x, gap, depth, self.order)
                                             for o, x in zip(old, xs)]
                    self.full_steps.append(self.step)
            st = self.state[name]
            if self.is_full:
                out = original(*args, **kwargs)
                ys = list(out) if isinstance(out, tuple) else [out]
                seen_before = len(self.full_steps) - 1
                gap = self.step - self.full_steps[-2] if seen_before else 1
                depth = min(self.order, seen_before)
                if self.mode in ("rfe", "rfc") and seen_before:
                    dx = torch.sqrt(sum(_norm(x - xl) ** 2 for x, xl in zip(xs, st.x_last)))
                    st.ratios = [_norm(y - lad[0]) / torch.clamp(dx, min=self.eps)
                                 for y, lad in zip(ys, st.ladders)]
                elif not st.ratios:
                    st.ratios = [torch.zeros(y.shape[0]) for y in ys]
                old = st.ladders or [None] * len(ys)
                st.ladders = [self._new_ladder(o, y, gap, depth, self.order) for o, y in zip(old, ys)]
                st.x_last = [x.clone() for x in xs]
                return out
            k = self.step - self.last_full
            preds = []
            for lad, s in zip(st.ladders, st.ratios):
                t = self._taylor(lad, k)
                if self.mode in ("rfe", "rfc"):
                    dx = torch.sqrt(sum(_norm(x - xl) ** 2 for x, xl in zip(xs, st.x_last)))
                    direction = t / _bcast(torch.clamp(_norm(t), min=self.eps), t)
                    y = lad[0].float() + _bcast(s * dx, t) * direction
                else:
                    y = lad[0].float() + t
                preds.append(y.to(lad[0].dtype))
            return tuple(preds) if len(preds) > 1 else preds[0]

        module.forward = wrapped


def dit_regions(model) -> list:
    """The DiT/PixArt regions: each BasicTransformerBlock's attn1, attn2 (if any), ff; X = arg 0."""
    regions = []
    for i, block in enumerate(model.transformer_blocks):
        regions.append((f"{i}.attn1", block.attn1, [0]))
        if block.attn2 is not None:
            regions.append((f"{i}.attn2", block.attn2, [0]))
        regions.append((f"{i}.ff", block.ff, [0]))
    return regions
