"""Runtime: CachedModel holds the cache state, counts steps, resets, reports stats.

It is a drop-in for the wrapped model (same forward signature and return type, attribute
access such as ``.config``/``.dtype`` forwarded, ``state_dict()`` is the original's), so
``pipe.transformer = rfc_compile.optimize(pipe.transformer)`` just works.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .config import RFCConfig
from .passes import capture, check_supported, find_regions, rewrite
from .state import StateSpec

logger = logging.getLogger(__name__)

BACKENDS = ("eager", "inductor")


@dataclasses.dataclass(frozen=True)
class RFCStats:
    """What the current generation did: which steps ran in full."""

    steps: int
    full_steps: list[int]

    @property
    def nfc(self) -> int:
        """Number of full computations (full steps) in the current generation."""
        return len(self.full_steps)

    @property
    def skipped_steps(self) -> list[int]:
        return [n for n in range(self.steps) if n not in set(self.full_steps)]


@dataclasses.dataclass
class _Program:
    """One captured + rewritten graph, valid for one input signature."""

    run: Callable[..., Any]
    state_spec: StateSpec
    graph_module: torch.fx.GraphModule
    num_regions: int


def _input_key(call: dict[str, Any]) -> tuple:
    """Shapes/dtypes/devices of tensors and values of everything else: what a graph bakes in."""
    leaves, spec = pytree.tree_flatten(call)
    key = []
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            key.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device.type, leaf.device.index))
        else:
            key.append(("V", type(leaf).__name__, repr(leaf)))
    return (str(spec), tuple(key))


class CachedModel(torch.nn.Module):
    """A model whose transformer blocks run through the traced RFC graph."""

    def __init__(self, model: torch.nn.Module, config: RFCConfig | None = None, backend: str = "eager",
                 compile_options: dict[str, Any] | None = None, auto_reset: bool = True):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_supported(model)
        self.model = model
        self.rfc_config = config if config is not None else RFCConfig()
        self.backend = backend
        self.compile_options = dict(compile_options or {})
        self.auto_reset = auto_reset
        self._signature = inspect.signature(model.forward)
        self._programs: dict[tuple, _Program] = {}
        self._key: tuple | None = None
        self._state: dict[str, Tensor] | None = None
        self._history: list[Tensor] = []  # last_full after each step (0-d tensors, read lazily)
        self._last_timestep: float | None = None

    # --- drop-in behaviour -------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def state_dict(self, *args, **kwargs):  # the original model's weights, same keys
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    # --- generations -------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new generation: the next call is step 0 with an empty cache."""
        program = self._programs.get(self._key) if self._key is not None else None
        self._state = program.state_spec.init(self._device) if program else None
        self._history = []
        self._last_timestep = None

    @property
    def stats(self) -> RFCStats:
        last_full = [int(t) for t in self._history]
        return RFCStats(steps=len(last_full), full_steps=[n for n, lf in enumerate(last_full) if lf == n])

    @property
    def graph_module(self) -> torch.fx.GraphModule | None:
        """The rewritten graph for the latest input signature (None before the first call)."""
        program = self._programs.get(self._key) if self._key is not None else None
        return program.graph_module if program else None

    @property
    def state_spec(self) -> StateSpec | None:
        """Names, shapes and dtypes of the state tensors for the latest input signature."""
        program = self._programs.get(self._key) if self._key is not None else None
        return program.state_spec if program else None

    @property
    def state(self) -> dict[str, Tensor] | None:
        """The current cache state (read-only view; see state.py for names)."""
        return self._state

    # --- capture -> find regions -> rewrite -> backend ---------------------------------

    def _normalize(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = self._signature.bind(*args, **kwargs)
        call: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            param = self._signature.parameters[name]
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                raise TypeError(f"{type(self.model).__name__}.forward takes *{name}; pass keyword arguments")
            else:
                call[name] = value
        return call

    def _build(self, call: dict[str, Any]) -> _Program:
        captured = capture(self.model, call)
        plan = find_regions(captured.graph_module) if self.rfc_config.mode != "full" else None
        if plan is None:
            find_regions(captured.graph_module)  # a full-mode model must still be one we understand
        gm, step = rewrite(captured, plan, self.rfc_config, call)
        run: Callable[..., Any] = gm
        if self.backend == "inductor":
            run = torch.compile(gm, fullgraph=True, **self.compile_options)
        return _Program(run, step.state_spec, gm, len(plan.regions) if plan else 0)

    def prepare(self, *args, **kwargs) -> None:
        """Capture and rewrite for these example inputs now instead of on the first call."""
        self._select(self._normalize(args, kwargs))

    def _select(self, call: dict[str, Any]) -> _Program:
        key = _input_key(call)
        if key != self._key:
            if key not in self._programs:
                self._programs[key] = self._build(call)
            if self._key is not None:
                logger.info("input signature changed: new generation with a fresh cache")
            self._key = key
            self._device = next((t.device for t in pytree.tree_leaves(call) if isinstance(t, Tensor)),
                                torch.device("cpu"))
            self.reset()
        return self._programs[key]

    def _detect_new_generation(self, call: dict[str, Any]) -> None:
        """Denoising timesteps only go down; one going back up starts a new generation."""
        t = call.get("timestep", call.get("t"))
        if t is None:
            return
        value = float(t.reshape(-1)[0]) if isinstance(t, Tensor) else float(t)
        if self._last_timestep is not None and value > self._last_timestep and self._history:
            self.reset()
        self._last_timestep = value

    def forward(self, *args, **kwargs):
        call = self._normalize(args, kwargs)
        program = self._select(call)
        if self.auto_reset:
            self._detect_new_generation(call)
        with torch.no_grad():
            out, new_state = program.run(kwargs=call, state=self._state)
        self._state = new_state
        self._history.append(new_state["last_full"])
        return out


def optimize(model: torch.nn.Module, config: RFCConfig | None = None, backend: str = "eager", *,
             example_inputs: dict[str, Any] | None = None, compile_options: dict[str, Any] | None = None,
             auto_reset: bool = True) -> CachedModel:
    """Rewrite ``model``'s transformer blocks into traced RFC and return a drop-in module.

    Capture happens on the first call (or now, with ``example_inputs`` as forward kwargs) and
    again whenever input shapes/dtypes change. ``backend`` is "eager" (the rewritten
    GraphModule) or "inductor" (``torch.compile(fullgraph=True)`` of it). With ``auto_reset``
    a timestep that goes back up starts a new generation; ``reset()`` does it explicitly.
    """
    cached = CachedModel(model, config, backend, compile_options, auto_reset)
    if example_inputs is not None:
        cached.prepare(**example_inputs)
    return cached
