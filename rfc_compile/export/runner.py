"""What the ONNX Runtime and TensorRT runners share: the drop-in call, generations, stats.

A runner is called like the torch model (``runner(hidden_states=..., timestep=...,
class_labels=..., return_dict=False)`` -> tuple; default ``return_dict=True`` -> an object with
``.sample``), threads the cache state between calls on its device, starts a new generation
when the timestep goes back up (as rfc_compile's CachedModel does) or on ``reset()``, and
reports ``stats`` (an :class:`rfc_compile.RFCStats`) from the graph's ``state_out.last_full``.

It also stands in for the transformer of a diffusers pipeline (``pipe.transformer = runner``):
``config`` reads like a diffusers config (attribute access), ``dtype`` is the model input's, and
``cache_context(name)`` gives pipelines that call the transformer separately for the conditional
and unconditional branches (Wan, true CFG) one cache per name, as rfc_compile's CachedModel does.

A graph with dynamic dims (``to_onnx(..., dynamic_batch=True)`` or ``dynamic_dims=...``):
``self.sidecar`` is the sidecar with its dims bound to the sizes of the current generation
(``self.dims``); a call with other sizes (another batch, another resolution) binds those and
starts a new generation (the cache is per sample and per token).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..dims import linear_dim, root_size
from ..runtime import BranchFollower, RFCStats, branch_cache_name, call_timestep, follow_timestep
from .errors import InputMismatchError
from .graph import flatten_kwargs
from .sidecar import BATCH_DIM, Sidecar, numpy_dtype

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "float64": torch.float64, "int64": torch.int64,
    "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
    "bfloat16": torch.bfloat16,
}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def _output_object(sample: torch.Tensor):
    try:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
    except ImportError:  # pragma: no cover - diffusers is a dependency
        from types import SimpleNamespace

        return SimpleNamespace(sample=sample)
    return Transformer2DModelOutput(sample=sample)


class StatefulRunner:
    """Base class; subclasses implement ``_zero_state``, ``_step``, ``_read_state``, ``_write_state``
    and keep their state buffers in ``self._buffers`` (two sets, ping-pong) and ``self._current``."""

    #: What one cache is (swapped as a whole by ``cache_context``).
    _CACHE_FIELDS = ("_buffers", "_current", "_history", "_first_timestep", "_last_timestep", "_last_step_index",
                     "_warned_repeat", "_dims")

    def __init__(self, sidecar: Sidecar, auto_reset: bool = True):
        self.graph_sidecar = sidecar  # as exported (named dims where the graph has dynamic ones)
        self.auto_reset = auto_reset
        self.timestep_rises = sidecar.timestep_rises  # auto-reset's direction (runtime.follow_timestep)
        self._bind_dims(sidecar.example_dims)
        self._buffers: list[dict[str, Any]] = [{}, {}]
        self._current = 0
        self._history: list[int] = []
        self._stats_history = self._history  # the cache the last call used (see cache_context)
        self._first_timestep: float | None = None  # of the generation's first call (runtime.follow_timestep)
        self._last_timestep: float | None = None
        self._last_step_index: int | None = None  # of the last call (runtime.follow_timestep)
        self._context_step_index: int | None = None  # the current cache_context's step_index
        self._warned_repeat = False
        self._named_caches: dict[str, dict[str, Any]] = {}
        self._context_depth = 0  # inside cache_context: no automatic branch caches
        self._branches = BranchFollower()
        self._generation_ended = False  # a pipeline said so (_reset_stateful_cache)
        self._signature = self._model_signature()

    # --- public API ----------------------------------------------------------------------

    @property
    def config(self):
        """The exported model's (diffusers) config, as recorded in the sidecar: a dict that also
        reads like diffusers' (``runner.config.in_channels``), for pipelines."""
        from diffusers.configuration_utils import FrozenDict

        return FrozenDict(self.sidecar.raw.get("model", {}).get("config", {}))

    def __getattr__(self, name: str) -> Any:
        """A config entry read as an attribute (``transformer.in_channels``, as ZImagePipeline
        reads it), as a diffusers model allows; only reached when nothing else has the name."""
        config = None if name.startswith("_") else self.__dict__.get("graph_sidecar")
        if config is not None and name in config.raw.get("model", {}).get("config", {}):
            return config.raw["model"]["config"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``hidden_states`` (else of the first floating-point input), as pipelines read
        ``transformer.dtype`` to cast their latents; a float16 graph's timestep stays float32."""
        floating = [d for d in self.graph_sidecar.inputs if d.dtype.startswith(("float", "bfloat"))]
        floating.sort(key=lambda d: d.name != "hidden_states")
        return torch_dtype(floating[0].dtype) if floating else torch.float32

    @contextlib.contextmanager
    def cache_context(self, name: str, **_context_kwargs: Any) -> Iterator["StatefulRunner"]:
        """Calls inside use the cache named ``name`` (diffusers' CacheMixin protocol, as
        CachedModel.cache_context): pipelines that run the conditional and unconditional branches
        as separate calls wrap each in ``cache_context("cond")`` / ``("uncond")``, and the two
        caches never mix. A name's cache starts empty and lives as long as the runner. A
        ``step_index`` (WanPipeline passes one) tells a new generation where the timestep cannot."""
        self._start_generation_if_ended()
        outer, outer_step = self._take_cache(), self._context_step_index
        self._context_step_index = _context_kwargs.get("step_index")
        if name in self._named_caches:
            self._put_cache(self._named_caches[name])
        else:
            self._new_cache()
        self._context_depth += 1
        try:
            yield self
        finally:
            self._context_depth -= 1
            self._context_step_index = outer_step
            self._named_caches[name] = self._take_cache()
            self._put_cache(outer)

    def new_session(self, auto_reset: bool | None = None) -> "StatefulRunner":
        """A runner with a cache of its own that shares this one's graph and backend session (one
        onnxruntime InferenceSession or TensorRT engine, its weights loaded once): one per request
        when serving, as CachedModel.new_session. Sessions never share state; onnxruntime runs
        calls of different sessions from different threads (TensorRT: each gets its own
        execution context and stream)."""
        session = copy.copy(self)
        session.auto_reset = self.auto_reset if auto_reset is None else auto_reset
        session._named_caches = {}
        session._context_depth = 0
        session._branches = BranchFollower()
        session._generation_ended = False
        session._bind_dims(self.graph_sidecar.example_dims)
        session._new_backend_session()
        session._new_cache()
        return session

    def _new_cache(self) -> None:
        """An empty cache of its own (new buffer lists: _zero_state fills them in place, and the
        cache they replace keeps its own)."""
        self._buffers, self._current = [{}, {}], 0
        self._warned_repeat = False
        self._start_generation()

    @property
    def rfc_config(self) -> dict[str, Any]:
        return self.sidecar.rfc_config

    @property
    def stats(self) -> RFCStats:
        """Steps and full steps of the current generation of the cache the last call used."""
        return RFCStats(steps=len(self._stats_history),
                        full_steps=[n for n, lf in enumerate(self._stats_history) if lf == n])

    def reset(self) -> None:
        """Start a new generation: every state tensor zero, the next call is step 0; the caches of
        other ``cache_context`` names start empty too (as CachedModel.reset)."""
        self._named_caches.clear()
        self._start_generation()

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """Diffusers' signal that a denoising run ended or begins (pipelines call it at the end of
        ``__call__``): with ``auto_reset`` the next call starts a new generation, as
        CachedModel._reset_stateful_cache; ``stats`` keep the ended one's until then."""
        self._generation_ended = True

    def _start_generation_if_ended(self) -> None:
        if self._generation_ended and not self._context_depth:  # inside a context, the outer cache is set aside
            self._generation_ended = False
            if self.auto_reset:
                self.reset()
                self._branches = BranchFollower()

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the current cache state (state.py names)."""
        return {name: torch.from_numpy(np.array(value)) for name, value in self._read_state().items()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Replace the cache state (e.g. to resume a generation); checked against the sidecar."""
        if not isinstance(state, dict):
            raise InputMismatchError(f"state must be a dict of tensors, got {type(state).__name__}")
        missing = [n for n in self._state_desc if n not in state]
        extra = [n for n in state if n not in self._state_desc]
        if missing or extra:
            raise InputMismatchError(f"state does not match the exported graph: missing {missing[:5]}, "
                                     f"unknown {extra[:5]}")
        arrays = {}
        for name, desc in self._state_desc.items():
            value = state[name]
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if tuple(array.shape) != desc.shape:
                raise InputMismatchError(f"state tensor {name!r} has shape {list(array.shape)}, the exported "
                                         f"graph expects {list(desc.shape)} (dtype {desc.dtype})")
            if array.dtype != np.dtype(numpy_dtype(desc.dtype)):
                raise InputMismatchError(f"state tensor {name!r} has dtype {array.dtype}, the exported graph "
                                         f"expects {desc.dtype}")
            arrays[name] = np.array(array, order="C", copy=True)  # (ascontiguousarray makes 0-d 1-d)
        self._write_state(arrays)
        step = int(arrays["step"]) if "step" in arrays else 0
        self._history = self._stats_history = self._history[:step]

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        call = self._normalize(args, kwargs)
        now = call_timestep(call)
        self._start_generation_if_ended()
        branch = self._branches.branch(call, now) if self.auto_reset and not self._context_depth else 0
        if branch:  # a step's next branch, called without cache_context: a cache of its own (BranchFollower)
            with self.cache_context(branch_cache_name(branch)):
                return self._forward(call, now)
        return self._forward(call, now)

    def _forward(self, call: dict[str, Any], now: float | None):
        return_dict = bool(call.pop("return_dict", True))
        leaves = dict(flatten_kwargs(call))
        dims = self._call_dims(leaves)
        if dims != self.dims:
            self.graph_sidecar.check_dims(dims)
            self._bind_dims(dims)
            self.reset()
        feeds = self._feeds(leaves)
        follow_timestep(self, now, self._context_step_index)
        outputs, last_full = self._step(feeds)
        self._history.append(last_full)
        self._stats_history = self._history
        output = self.graph_sidecar.nest(outputs)
        if not return_dict:
            return output
        if not isinstance(output, tuple):  # a sample the model returns bare
            return _output_object(output)
        if len(output) != 1:
            raise ValueError("return_dict=True needs a single-output model; pass return_dict=False")
        return _output_object(output[0])

    @property
    def batch_size(self) -> int | None:
        """The batch the cache is allocated for (dynamic-batch graphs), else None."""
        return self.dims.get(BATCH_DIM)

    @property
    def dims(self) -> dict[str, int]:
        """The dynamic dims' sizes the current cache is allocated for ({} for a static graph; outside
        a ``cache_context``, the default cache's, whatever sizes the named caches have)."""
        return dict(self._dims)

    # --- helpers -------------------------------------------------------------------------

    def _new_backend_session(self) -> None:
        """What ``new_session`` gives each session of its own beyond the cache (subclasses)."""

    def _start_generation(self) -> None:
        """The current cache empty: state zero, the next call is step 0."""
        self._zero_state()
        self._history = self._stats_history = []
        self._first_timestep = self._last_timestep = None
        self._last_step_index = None

    def _take_cache(self) -> dict[str, Any]:
        return {field: getattr(self, field) for field in self._CACHE_FIELDS}

    def _put_cache(self, cache: dict[str, Any]) -> None:
        dims = cache["_dims"]
        if dims != self._dims:
            self._bind_dims(dims)
        for field, value in cache.items():
            setattr(self, field, value)

    def _bind_dims(self, dims: dict[str, int]) -> None:
        """Concrete shapes for the dynamic dims' ``dims`` ({}: a static graph, shapes as exported)."""
        self._dims = dict(dims)
        self.sidecar = self.graph_sidecar.with_dims(dims) if dims else self.graph_sidecar
        self._inputs = {d.name: d for d in self.sidecar.inputs}
        self._state_desc = self.sidecar.state_by_name()

    def _call_dims(self, leaves: dict[str, Any]) -> dict[str, int]:
        """The dynamic dims' sizes in a call (``leaves``: its flattened kwargs), read where an input's
        shape names them or a multiple of them (``"2*grid_height"``); dims it does not show keep their
        current size (``_feeds`` then reports any shape that still differs)."""
        dims = dict(self._dims)
        if not dims:
            return dims
        seen: dict[str, tuple[str, int]] = {}
        for desc in self.graph_sidecar.inputs:
            value = leaves.get(desc.name)
            if value is None or np.ndim(value) != len(desc.shape):
                continue
            shape = value.shape if isinstance(value, torch.Tensor) else np.shape(value)
            for dim, size in zip(desc.shape, shape):
                linear = linear_dim(dim) if isinstance(dim, str) else None
                if linear is None or linear[0] not in dims:
                    continue
                root, scale, offset = linear  # a dim, or a multiple of one plus a constant ("2*grid_height")
                size_of_root = root_size(scale, offset, int(size))
                if size_of_root is None or size_of_root < 1:
                    raise InputMismatchError(f"input {desc.name!r} has size {int(size)} where the graph takes {dim}, "
                                             f"for a whole {root} of 1 or more")
                if root in seen and seen[root][1] != size_of_root:
                    raise InputMismatchError(
                        f"inputs {seen[root][0]!r} and {desc.name!r} disagree on the size of {root!r} "
                        f"({seen[root][1]} vs {size_of_root})")
                seen[root] = (desc.name, size_of_root)
                dims[root] = size_of_root
        return dims

    def _model_signature(self) -> inspect.Signature | None:
        model = self.sidecar.raw.get("model", {})
        try:
            cls = getattr(importlib.import_module(model["module"]), model["class"])
            return inspect.signature(cls.forward)
        except Exception:  # only keyword calls then
            return None

    def _normalize(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        if not args:
            return dict(kwargs)
        if self._signature is None:
            raise TypeError(f"{type(self).__name__}: pass the model inputs as keyword arguments")
        bound = self._signature.bind(None, *args, **kwargs)  # None stands for self
        call = {}
        for name, value in list(bound.arguments.items())[1:]:
            if self._signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            else:
                call[name] = value
        return call

    def _feeds(self, leaves: dict[str, Any]) -> dict[str, Any]:
        """Model inputs by ONNX name (``leaves``: the call's flattened kwargs), checked against the
        sidecar (torch tensors or arrays)."""
        feeds: dict[str, Any] = {}
        for name, desc in self._inputs.items():
            if name not in leaves or leaves[name] is None:
                raise InputMismatchError(f"input {name!r} is required by the exported graph "
                                         f"(shape {list(desc.shape)}, {desc.dtype})")
            value = leaves[name]
            if isinstance(value, torch.Tensor):
                shape = tuple(value.shape)
            else:
                value = np.asarray(value)
                shape = value.shape
            if shape != desc.shape:
                exported = next(d.shape for d in self.graph_sidecar.inputs if d.name == name)
                raise InputMismatchError(
                    f"input {name!r} has shape {list(shape)}, but the graph was exported for {list(exported)} "
                    f"(dynamic dims: {sorted(self._dims) or 'none'}; other sizes are static: export again with "
                    "example inputs of this shape, or name the dim in to_onnx's dynamic_dims)")
            if np.issubdtype(numpy_dtype(desc.dtype), np.integer) and _has_fraction(value):
                raise InputMismatchError(
                    f"input {name!r} has fractional values but the graph takes {desc.dtype} (the cast would "
                    "truncate them): export with a float example (flow-matching pipelines pass float timesteps)")
            feeds[name] = value
        constants, per_sample = self.sidecar.constants, self.sidecar.per_sample_constants
        for argument, entry in per_sample.items():
            self._check_per_sample(argument, entry, leaves)
        for name, value in leaves.items():
            if (name in self._inputs or name == "return_dict" or _argument(name) in per_sample
                    or _argument(name) in self.sidecar.ignored_arguments):
                continue
            if isinstance(value, (torch.Tensor, np.ndarray)):
                if name in constants:
                    raise InputMismatchError(f"input {name!r} was {constants[name]!r} at export; the graph "
                                             "has no such input (export again with it)")
                continue  # an input the graph does not use
            if name in constants:
                if _jsonable(value) != constants[name]:
                    raise InputMismatchError(f"argument {name!r}={value!r} differs from the exported value "
                                             f"{constants[name]!r} (non-tensor arguments are baked into the graph)")
            elif not self._is_default(name, value):  # e.g. joint_attention_kwargs={"scale": 0.5}, exported None
                exported = {k: v for k, v in constants.items() if _argument(k) == _argument(name)}
                raise InputMismatchError(f"argument {name!r}={value!r} was not given at export (exported: "
                                         f"{exported or 'not passed'}); non-tensor arguments are baked into the "
                                         "graph: export again with it")
        passed = {_argument(leaf) for leaf in leaves}
        missing = [name for name, value in constants.items()
                   if name != "return_dict" and _argument(name) not in passed and not self._is_default(name, value)]
        if missing:
            raise InputMismatchError(f"arguments {missing} were {[constants[n] for n in missing]} at export and are "
                                     "baked into the graph; pass them (or export again without them)")
        return feeds

    def _check_per_sample(self, argument: str, entry: Any, leaves: dict[str, Any]) -> None:
        """A per-sample argument (sidecar's ``per_sample_constants``) is one copy of the exported entry
        per sample of the call."""
        batch = self.dims.get(BATCH_DIM) or 0
        given = {name: _jsonable(value) for name, value in leaves.items() if _argument(name) == argument}
        if given != dict(flatten_kwargs({argument: [entry] * batch})):
            raise InputMismatchError(f"argument {argument!r} must hold one entry per sample ({batch}), each {entry!r} "
                                     "as at export (the model reads the first sample's entry; the graph holds it)")

    def _is_default(self, name: str, value: Any) -> bool:
        """None, or a top-level argument at the model's forward default: what leaving it out gives."""
        if value is None:
            return True
        param = self._signature.parameters.get(name) if self._signature is not None else None
        return param is not None and param.default is not inspect.Parameter.empty and \
            _jsonable(param.default) == _jsonable(value)

    def _as_numpy(self, name: str, value: Any) -> np.ndarray:
        dtype = numpy_dtype(self._inputs[name].dtype)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return np.asarray(value, dtype=dtype, order="C")  # keeps 0-d arrays 0-d

    # --- backend hooks -------------------------------------------------------------------

    def _zero_state(self) -> None:
        raise NotImplementedError

    def _step(self, feeds: dict[str, Any]) -> tuple[list[torch.Tensor], int]:
        raise NotImplementedError

    def _read_state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _write_state(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


def _argument(leaf: str) -> str:
    """The forward argument a flattened leaf belongs to (``joint_attention_kwargs.scale`` ->
    ``joint_attention_kwargs``)."""
    return leaf.split(".")[0]


def _has_fraction(value: Any) -> bool:
    """Whether a float tensor/array holds a non-integral value (an integer input would truncate it)."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not torch.equal(value, value.trunc())
    array = np.asarray(value)
    return np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.trunc(array))


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
