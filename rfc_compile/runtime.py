"""Runtime: CachedModel holds the cache state, counts steps, resets, reports stats.

It is a drop-in for the wrapped model (same forward signature and return type, attribute
access such as ``.config``/``.dtype`` forwarded, ``state_dict()`` is the original's), so
``pipe.transformer = rfc_compile.optimize(pipe.transformer)`` just works.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .backends import BACKENDS, make_runner
from .config import RFCConfig
from .passes import capture, check_supported, find_regions, rewrite
from .passes.capture import accelerate_hooks
from .passes.patterns import DEFAULT_VARYING_INPUTS, model_timestep_rises
from .state import StateSpec
from .watch import ModelWatch

logger = logging.getLogger(__name__)

_KEEP_FINISHED = 1000  # finished generations whose stats a session keeps
_MANY_SETTINGS = 8  # graphs for one input signature under different model settings: warned about


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
    """Shapes/dtypes/devices of tensors, values of everything else and the autocast state: what a
    graph bakes in."""
    leaves, spec = pytree.tree_flatten(call)
    key = []
    devices = {"cpu"}
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            key.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device.type, leaf.device.index))
            devices.add(leaf.device.type)
        else:
            key.append(("V", type(leaf).__name__, repr(leaf)))
    return (str(spec), tuple(key), _autocast_key(devices))


def _autocast_key(device_types: set[str]) -> tuple:
    """Where ``torch.autocast`` is on, and to which dtype: a graph captured under autocast holds its
    casts (run without it, its matmuls mixed bfloat16 and float32 and failed), and its cache holds
    the cast outputs, so each autocast state gets a graph and a cache of its own, as a dtype does."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in sorted(device_types) if _autocast_enabled(d))


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


#: The names a model's denoising timestep argument goes by (diffusers: ``timestep``).
TIMESTEP_NAMES = ("timestep", "t", "timesteps", "sigma", "audio_timestep", "audio_sigma")


def timestep_value(t: Any) -> float | None:
    """A call's denoising timestep, or None: the mean of its elements, which a batch shares. Not
    the first element: video-to-world pipelines (Cosmos 2, 2.5) pass one timestep per frame, the
    conditioning frames' fixed near 0, and only the others move from step to step (the first
    element stayed put, so a new generation was never seen and every step looked repeated)."""
    import numpy as np

    if t is None:
        return None
    if isinstance(t, Tensor):
        return float(t.double().mean()) if t.numel() else None
    values = np.asarray(t, dtype=np.float64)
    return float(values.mean()) if values.size else None


def call_timestep(call: dict[str, Any]) -> float | None:
    """The denoising timestep of a call's (normalized) keyword arguments, or None. Read once per
    call: a CUDA timestep's value is a device sync."""
    return timestep_value(next((call[n] for n in TIMESTEP_NAMES if n in call), None))


#: The names a model's latents argument goes by (the varying inputs that are not the timestep).
LATENT_NAMES = tuple(n for n in DEFAULT_VARYING_INPUTS if n not in TIMESTEP_NAMES)


class BranchFollower:
    """Which branch of a denoising step a call is, for pipelines that call the model separately
    for the conditional and unconditional branches *without* diffusers' ``cache_context``
    (ChromaPipeline, FluxKontextPipeline's true CFG, Krea2Pipeline, Lumina2Pipeline, ...): a
    call at the previous call's timestep with the same latents is the step's next branch (1, 2,
    ...); any other call is branch 0. Each branch needs a cache of its own: one shared cache would
    mix the branches' outputs in one Taylor ladder and count each step twice. A call at the same
    timestep with other latents stays branch 0: a second-order sampler (Heun) evaluates the model
    twice at one timestep, and those are two denoising steps."""

    def __init__(self) -> None:
        self._timestep: float | None = None
        self._latents: list[tuple[Tensor, int]] = []
        self._branch = 0

    def branch(self, call: dict[str, Any], now: float | None) -> int:
        latents = [t for name in LATENT_NAMES if name in call
                   for t in pytree.tree_leaves(call[name]) if isinstance(t, Tensor)]
        if latents and now is not None and now == self._timestep and self._same(latents):
            self._branch += 1
        else:
            self._timestep, self._branch = now, 0
            self._latents = [_snapshot(t) for t in latents]
        return self._branch

    def _same(self, latents: list[Tensor]) -> bool:
        if len(latents) != len(self._latents):
            return False
        for new, (old, version) in zip(latents, self._latents):
            if version is not None and old._version != version:  # modified in place: content unknown
                return False
            if new is not old and (new.shape != old.shape or new.dtype != old.dtype or new.device != old.device
                                   or not torch.equal(new, old)):
                return False
        return True


def _snapshot(t: Tensor) -> tuple[Tensor, int | None]:
    """A call's latents as the next call compares them: the tensor and its version counter (changed
    in place since?), or a copy where there is no counter (tensors made under
    ``torch.inference_mode()``, which pipelines are often run in)."""
    if t.is_inference():
        return t.clone(), None
    return t, t._version


def branch_cache_name(branch: int) -> str:
    """The cache_context name of branch ``branch`` >= 1 of a step (BranchFollower)."""
    return f"rfc_compile:branch{branch}"


def follow_timestep(session: Any, value: float | None, step_index: int | None = None) -> None:
    """Denoising timesteps only go down (up for the models of patterns.RISING_TIMESTEP_BLOCKS:
    ``session.timestep_rises``): one going back (``value``, the call's :func:`call_timestep`)
    starts a new generation (with ``session.auto_reset``). Two calls in a row at one timestep are
    most likely a pipeline's conditional and unconditional branches called separately, which must
    not share a cache: warned about once per cache. ``session``: a CacheSession or an export runner
    (both keep ``_first_timestep``, ``_last_timestep``, ``_last_step_index``, ``_history``, ``_warned_repeat``,
    ``auto_reset`` and ``timestep_rises``, and have ``reset()``).

    A pipeline that numbers its steps (diffusers' ``cache_context(name, step_index=i)``, as
    WanPipeline does; ``step_index``) says more: a step index not above the previous call's starts
    a new generation whatever the timestep. The timestep alone cannot tell a generation that starts
    where the last one ended (a Wan 2.2 expert that runs one step per generation, always at the
    same timestep) from a second-order sampler's next evaluation.

    Without a step index, a call at the previous call's timestep while every call of the
    generation so far was at that timestep (``session._first_timestep``) starts a new generation:
    one-step generations (distilled models: SANA-Sprint, FLUX.1-schnell at one step) and a
    generation after one interrupted at its first step are all called at the schedule's first
    timestep, while a second-order sampler's repeated timesteps come after its first (Heun's
    schedule: t0, t1, t1, t2, t2, ...)."""
    last_step, session._last_step_index = session._last_step_index, step_index
    if step_index is not None and last_step is not None and session._history:
        if session.auto_reset and step_index <= last_step:
            session.reset()
            session._last_step_index = step_index
    elif value is None:
        return
    elif session._last_timestep is not None and session._history:
        went_back = value < session._last_timestep if session.timestep_rises else value > session._last_timestep
        repeated = value == session._last_timestep
        if session.auto_reset and (went_back or (repeated and value == session._first_timestep)):
            session.reset()
        elif repeated and not session._warned_repeat:
            session._warned_repeat = True
            warnings.warn(
                f"rfc_compile: two calls in a row at timestep {value:g} share one cache and count as two denoising "
                "steps (right for a second-order sampler's two evaluations, on other latents). If they are separate "
                "branches of one step, wrap each in cached.cache_context('cond' / 'uncond'), as diffusers pipelines "
                "do (outside one, with auto_reset, calls with the same latents get a cache per branch by "
                "themselves).", stacklevel=4)
    if not session._history:  # this call is the generation's first
        session._first_timestep = value
    session._last_timestep = value


class CacheSession:
    """One generation's cache state, held by the caller (one per request in a server).

    ``cached.new_session()`` makes one; ``session(**kwargs)`` runs one denoising step of the
    optimized model with this session's state. Sessions of one model share its graphs and
    weights but never their state, so requests at different steps can be interleaved, from
    different threads too (each session has its own lock; the graphs are pure functions).

    Each input signature (shapes, dtypes, non-tensor arguments) has a cache of its own. A
    pipeline that calls the model twice per step with different inputs (SD3's skip-layer
    guidance: a batch-1 call with ``skip_layers`` after the CFG batch) keeps one cache per call
    kind: the cache of the other kind is set aside and resumed if it missed no denoising step
    (every call in between was at its last timestep or at this one), else it starts empty.
    """

    #: What one signature's cache is (set aside and resumed as a whole).
    _CACHE_FIELDS = ("_key", "_spec", "_device", "_state", "_history", "_first_timestep", "_last_timestep",
                     "_last_step_index", "_warned_repeat")

    def __init__(self, owner: "CachedModel", auto_reset: bool = True):
        self._owner = owner
        self.auto_reset = auto_reset
        self.timestep_rises = owner.timestep_rises
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._spec: StateSpec | None = None
        self._device = torch.device("cpu")
        self._state: dict[str, Tensor] | None = None
        self._history: list[Tensor] = []  # last_full after each step (0-d tensors, read lazily)
        self._first_timestep: float | None = None  # of the generation's first call
        self._last_timestep: float | None = None
        self._last_step_index: int | None = None  # of the last call (a pipeline's cache_context step_index)
        self.context_step_index: int | None = None  # the current cache_context's step_index
        self._warned_repeat = False
        # other signatures' caches: key -> (cache fields, timesteps called since, other than its last)
        self._set_aside: dict[tuple, tuple[dict[str, Any], set]] = {}
        self.finished: list[RFCStats] = []

    def reset(self) -> None:
        """Start a new generation: the next call is step 0 with an empty cache (for every
        input signature)."""
        for cache, _ in self._set_aside.values():
            self._finish(cache["_history"])
        self._set_aside.clear()
        self._finish(self._history)
        self._empty_cache()

    def _finish(self, history: list[Tensor]) -> None:
        if history:
            self.finished.append(_stats(history))
            del self.finished[:-_KEEP_FINISHED]

    def _empty_cache(self) -> None:
        self._state = self._spec.init(self._device) if self._spec is not None else None
        self._history = []
        self._first_timestep = self._last_timestep = None
        self._last_step_index = None

    def _switch_signature(self, key: tuple, program: _Program, call: dict[str, Any], now: float | None) -> None:
        """Set the current cache aside and take ``key``'s: resumed if it missed no step, else empty."""
        if self._key is not None and self._history:
            self._set_aside[self._key] = ({f: getattr(self, f) for f in self._CACHE_FIELDS}, set())
        cache, seen = self._set_aside.pop(key, (None, set()))
        if cache is not None and now is not None and seen <= {now}:
            for field, value in cache.items():
                setattr(self, field, value)
            return
        if cache is not None:
            self._finish(cache["_history"])
        if self._key is not None:
            logger.info("input signature changed: a fresh cache for the new one (step 0)")
        self._key, self._spec, self._device = key, program.state_spec, _device_of(call)
        self._warned_repeat = False
        self._empty_cache()

    @property
    def generations(self) -> list[RFCStats]:
        """Stats of the finished generations (the last 1000), then of the ones in progress: other
        input signatures' caches set aside, and the current one."""
        in_progress = [_stats(cache["_history"]) for cache, _ in self._set_aside.values()]
        return self.finished + in_progress + ([self.stats] if self._history else [])

    @property
    def stats(self) -> RFCStats:
        return _stats(self._history)

    @property
    def state(self) -> dict[str, Tensor] | None:
        """The current cache state (see state.py for names)."""
        return self._state

    def __call__(self, *args, **kwargs):
        call = self._owner._normalize(args, kwargs)
        return self.run(call, call_timestep(call))

    def run(self, call: dict[str, Any], now: float | None):
        """One step on normalized forward kwargs whose timestep is ``now`` (``call_timestep``)."""
        owner = self._owner
        _refuse_inputs_requiring_grad(owner, call)
        with self._lock:
            key, program = owner._program_for(call)
            if key != self._key:
                self._switch_signature(key, program, call, now)
            follow_timestep(self, now, self.context_step_index)
            with torch.no_grad():
                out, new_state = program.run(kwargs=call, state=self._state)
            self._state = new_state
            self._history.append(new_state["last_full"])
            self._note_call_elsewhere(now)
        return out

    def _note_call_elsewhere(self, now: float | None) -> None:
        """Record a call at ``now`` for the caches set aside; one that has seen two other
        timesteps than its last has missed a step whatever comes next: finished now."""
        for key, (cache, seen) in list(self._set_aside.items()):
            if now != cache["_last_timestep"]:
                seen.add(now)
            if len(seen) > 1 or None in seen:
                self._finish(cache["_history"])
                del self._set_aside[key]


def _refuse_inputs_requiring_grad(owner: "CachedModel", call: dict[str, Any]) -> None:
    """The cached step runs without autograd (its cache is state carried from call to call): an
    output of a call whose inputs require grad would be silently cut from the user's graph (a
    guidance loss through it lost the model's term, mode "full" included)."""
    if not torch.is_grad_enabled():
        return
    needing = [name for name, value in call.items()
               if any(isinstance(t, Tensor) and t.requires_grad for t in pytree.tree_leaves(value))]
    if needing:
        raise RuntimeError(
            f"{type(owner.model).__name__} optimized by rfc_compile: input(s) {needing} require grad, but the cached "
            "step runs without autograd (its cache is state carried between calls). Call the original model "
            "(cached.model) where gradients must flow, or pass detached inputs / run under torch.no_grad()")


def _stats(history: list[Tensor]) -> RFCStats:
    last_full = [int(t) for t in history]
    return RFCStats(steps=len(last_full), full_steps=[n for n, lf in enumerate(last_full) if lf == n])


class CachedModel(torch.nn.Module):
    """A model whose transformer blocks run through the traced RFC graph."""

    def __init__(self, model: torch.nn.Module, config: RFCConfig | None = None, backend: str = "eager",
                 compile_options: dict[str, Any] | None = None, auto_reset: bool = True):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_supported(model)
        self.rfc_config = config if config is not None else RFCConfig()
        if not isinstance(self.rfc_config, RFCConfig):
            raise TypeError(f"config must be an RFCConfig, got {type(self.rfc_config).__name__}")
        self.model = model
        _take_over_offload_hook(model, self)  # before the watch: it restores model.forward
        _check_weights_materialized(model)
        self.backend = backend
        self.compile_options = dict(compile_options or {})
        self._signature = inspect.signature(model.forward)
        self._programs: dict[tuple, _Program] = {}
        self._programs_lock = threading.Lock()
        self._watch = ModelWatch(model)
        #: the model's timestep counts up over a generation (Z-Image): auto-reset's direction
        self.timestep_rises = model_timestep_rises(model)
        self._key: tuple | None = None
        self._default_session = CacheSession(self, auto_reset)
        self._named_sessions: dict[str, CacheSession] = {}
        self._session = self._default_session  # the one forward() uses now
        self._last_session = self._default_session  # the one stats/state report
        self._branches = BranchFollower()  # separate cond/uncond calls outside cache_context
        self._generation_ended = False  # a pipeline said so (_reset_stateful_cache)

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

    def __deepcopy__(self, memo):
        """A copy with its own weights, graphs rebuilt on first use, and an empty cache."""
        clone = CachedModel(copy.deepcopy(self.model, memo), self.rfc_config, self.backend,
                            self.compile_options, self._default_session.auto_reset)
        memo[id(self)] = clone
        return clone

    # --- generations -------------------------------------------------------------------

    def new_session(self, auto_reset: bool = True) -> CacheSession:
        """A cache state of its own (one per request/generation when serving)."""
        return CacheSession(self, auto_reset)

    def reset(self) -> None:
        """Start a new generation: the next call is step 0 with an empty cache."""
        self._default_session.reset()
        for session in self._named_sessions.values():
            session.reset()

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """Diffusers' signal that a denoising run ended or begins: every pipeline calls it on each
        component at the end of ``__call__`` (``maybe_free_model_hooks``), some between runs. With
        ``auto_reset`` the next call starts a new generation, wherever the timestep starts (an
        img2img call at a low strength, a generation after one interrupted); ``stats`` keep the
        ended generation's until then. The model's own hooks get the call too."""
        self._generation_ended = True
        own = getattr(self.model, "_reset_stateful_cache", None)
        if own is not None:
            own(recurse)

    def _start_generation_if_ended(self) -> None:
        if self._generation_ended:
            self._generation_ended = False
            if self._default_session.auto_reset:
                self.reset()
                self._branches = BranchFollower()

    @contextlib.contextmanager
    def cache_context(self, name: str, **_context_kwargs: Any) -> Iterator[CacheSession]:
        """Calls inside use the cache named ``name`` (diffusers' CacheMixin protocol).

        Pipelines that run the conditional and unconditional branches as separate calls
        (Wan, FLUX/HunyuanVideo true CFG) wrap each in ``transformer.cache_context("cond")`` /
        ``("uncond")``; each name gets a cache of its own, so the two never mix. A ``step_index``
        (WanPipeline passes one) tells a new generation where the timestep cannot
        (:func:`follow_timestep`); diffusers' other context fields are not needed.
        """
        previous = self._session
        session = self._named_sessions.get(name)
        if session is None:
            session = self._named_sessions[name] = CacheSession(self, self._default_session.auto_reset)
        self._session = session
        outer_step, session.context_step_index = session.context_step_index, _context_kwargs.get("step_index")
        try:
            yield session
        finally:
            session.context_step_index = outer_step
            self._session = previous

    @property
    def stats(self) -> RFCStats:
        """Stats of the current generation of the cache used last (see cache_context)."""
        return self._last_session.stats

    @property
    def generations(self) -> list[RFCStats]:
        """Stats of every generation of the cache used last (finished ones, then those in progress)."""
        return self._last_session.generations

    @property
    def all_generations(self) -> list[RFCStats]:
        """Stats of every generation of every cache: the default one's, then each ``cache_context``'s
        (a pipeline's cond and uncond branches called separately: one generation per branch)."""
        sessions = [self._default_session, *self._named_sessions.values()]
        return [stats for session in sessions for stats in session.generations]

    @property
    def auto_reset(self) -> bool:
        return self._session.auto_reset

    @property
    def state(self) -> dict[str, Tensor] | None:
        """The current cache state of the default session (see state.py for names)."""
        return self._session.state

    @state.setter
    def state(self, value: dict[str, Tensor]) -> None:
        if self._session._spec is None:
            raise RuntimeError("no graph captured yet: call the model (or prepare()) first")
        self._session._spec.check(value)
        self._session._state = dict(value)

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
        model = self.model
        was_training = model.training
        if was_training:
            warnings.warn(f"{type(model).__name__} is in train mode; rfc_compile captures it in eval mode "
                          "(cached models are for inference)", stacklevel=4)
            model.eval()
        try:
            captured = capture(model, call)
        finally:
            model.train(was_training)
        plan = find_regions(captured.graph_module)  # also for "full": only models we understand
        if self.rfc_config.mode == "full":
            plan = None
        gm, step = rewrite(captured, plan, self.rfc_config, call)
        run = make_runner(gm, self.backend, self.compile_options)
        return _Program(run, step.state_spec, gm, len(plan.regions) if plan else 0)

    def _program_for(self, call: dict[str, Any]) -> tuple[tuple, _Program]:
        """The graph for this call: one per input signature and model settings (watch.py; all
        dropped, freeing old weights, when the model's tensors or modules are replaced)."""
        with self._programs_lock:
            replaced, settings = self._watch.check()
            if replaced:
                logger.warning("the model's parameters or modules were replaced after optimize(); re-capturing")
                self._programs.clear()
            key = (settings, _input_key(call))
            if key not in self._programs:
                variants = sum(k[1] == key[1] for k in self._programs)
                if variants:
                    (logger.warning if variants == _MANY_SETTINGS else logger.info)(
                        "the model's settings, hooks or attention processors changed: capturing it with them "
                        "(%d graphs for these inputs%s)", variants + 1,
                        "; do its modules change a plain attribute in forward?" if variants >= _MANY_SETTINGS else "")
                self._programs[key] = self._build(call)
                _, after = self._watch.check()
                if after != key[0]:  # the trace itself ran code that sets attributes (a counting hook)
                    logger.warning("capturing %s changed plain attributes of its modules (Python code in forward or "
                                   "a hook sets them); the graph does not run that code", type(self.model).__name__)
                    self._programs[(after, key[1])] = self._programs[key]
                    key = (after, key[1])
            self._key = key
            return key, self._programs[key]

    def prepare(self, *args, **kwargs) -> None:
        """Capture and rewrite for these example inputs now instead of on the first call."""
        self._program_for(self._normalize(args, kwargs))

    @torch.compiler.disable(reason="rfc_compile's cached step decides and keeps its cache in Python around "
                                   "its graphs: compile them with optimize(model, backend='inductor')")
    def forward(self, *args, **kwargs):
        call = self._normalize(args, kwargs)
        now = call_timestep(call)
        self._start_generation_if_ended()
        follow = self._session is self._default_session and self._session.auto_reset
        branch = self._branches.branch(call, now) if follow else 0
        if branch:  # a step's next branch, called without cache_context: a cache of its own
            with self.cache_context(branch_cache_name(branch)) as session:
                self._last_session = session
                return session.run(call, now)
        self._last_session = self._session
        return self._session.run(call, now)


def _device_of(call: dict[str, Any]) -> torch.device:
    return next((t.device for t in pytree.tree_leaves(call) if isinstance(t, Tensor)), torch.device("cpu"))


def _take_over_offload_hook(model: torch.nn.Module, cached: "CachedModel") -> None:
    """``pipe.enable_model_cpu_offload()`` before ``optimize()`` leaves accelerate's ``CpuOffload``
    hook on the model: capture traced into it, and its ``module.to(device)`` failed inside
    torch.export ("Couldn't swap Linear.weight"). The hook moves the whole model to the device
    before each call, so it belongs around the cached model: it moves there (diffusers re-applies
    offloading to its components, the cached model now, after each pipeline call). Hooks on the
    model's parts (``device_map``, sequential offload) move weights inside forward: refused."""
    parts = accelerate_hooks(model)
    hook = parts.pop("", None)
    if hook is None and not parts:
        return
    from accelerate.hooks import CpuOffload, add_hook_to_module, remove_hook_from_module

    from .errors import UnsupportedModelError

    if parts or not isinstance(hook, CpuOffload):
        where = (type(hook).__name__ if hook is not None
                 else f"{len(parts)} submodules ({', '.join(list(parts)[:3])}, ...)")
        raise UnsupportedModelError(
            f"{type(model).__name__} carries accelerate hooks ({where}: a device_map or "
            "enable_sequential_cpu_offload) that move weights inside forward, which a captured graph cannot do; "
            "optimize a model whose weights stay where they are (enable_model_cpu_offload works)")
    remove_hook_from_module(model)
    add_hook_to_module(cached, hook)
    logger.info("accelerate's CpuOffload hook moved from %s to the cached model", type(model).__name__)


def _check_weights_materialized(model: torch.nn.Module) -> None:
    meta = [n for n, p in itertools.chain(model.named_parameters(), model.named_buffers()) if p.is_meta]
    if meta:
        raise ValueError(f"{type(model).__name__} has weights on the meta device ({meta[:3]}...); "
                         "load real weights (e.g. to_empty + load_state_dict) before optimize()")


def optimize(model: torch.nn.Module, config: RFCConfig | None = None, backend: str = "eager", *,
             example_inputs: dict[str, Any] | None = None, compile_options: dict[str, Any] | None = None,
             auto_reset: bool = True) -> CachedModel:
    """Rewrite ``model``'s transformer blocks into traced RFC and return a drop-in module.

    Capture happens on the first call (or now, with ``example_inputs`` as forward kwargs) and
    again whenever input shapes/dtypes change. ``backend`` is "eager" (the rewritten
    GraphModule) or "inductor" (``torch.compile(fullgraph=True)`` of it). With ``auto_reset``
    the cache follows the timestep: one that goes back up starts a new generation, and a call
    at the previous call's timestep with the same latents (a CFG branch called separately,
    outside ``cache_context``) gets a cache of its own (BranchFollower). Without it the caller
    drives the cache: ``reset()`` starts a generation, every call is the next step.
    An already optimized model is optimized again from the model it wraps (a new config).
    """
    if isinstance(model, CachedModel):  # torch.export cannot trace through a CachedModel's own graph
        logger.info("optimize(): given a CachedModel, optimizing the %s it wraps", type(model.model).__name__)
        model = model.model
    cached = CachedModel(model, config, backend, compile_options, auto_reset)
    if example_inputs is not None:
        cached.prepare(**example_inputs)
    return cached
