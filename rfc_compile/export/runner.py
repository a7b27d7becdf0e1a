"""What the ONNX Runtime and TensorRT runners share: the drop-in call, generations, stats.

A runner is called like the torch model (``runner(hidden_states=..., timestep=...,
class_labels=..., return_dict=False)`` -> tuple; default ``return_dict=True`` -> an object with
``.sample``), threads the cache state between calls on its device, starts a new generation
when the timestep goes back up (as rfc_compile's CachedModel does) or on ``reset()``, and
reports ``stats`` (an :class:`rfc_compile.RFCStats`) from the graph's ``state_out.last_full``.

A dynamic-batch graph (``to_onnx(..., dynamic_batch=True)``): ``self.sidecar`` is the
sidecar with its "batch" dims bound to the batch of the current generation; a call with
another batch size binds that one and starts a new generation (the cache is per sample).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any

import numpy as np
import torch

from ..runtime import RFCStats
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
    """Base class; subclasses implement ``_zero_state``, ``_step``, ``_read_state``, ``_write_state``."""

    def __init__(self, sidecar: Sidecar, auto_reset: bool = True):
        self.graph_sidecar = sidecar  # as exported ("batch" dims in a dynamic-batch graph)
        self.auto_reset = auto_reset
        self._bind_batch(sidecar.example_batch)
        self._history: list[int] = []
        self._last_timestep: float | None = None
        self._signature = self._model_signature()

    # --- public API ----------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The exported model's (diffusers) config, as recorded in the sidecar."""
        return dict(self.sidecar.raw.get("model", {}).get("config", {}))

    @property
    def rfc_config(self) -> dict[str, Any]:
        return self.sidecar.rfc_config

    @property
    def stats(self) -> RFCStats:
        return RFCStats(steps=len(self._history),
                        full_steps=[n for n, lf in enumerate(self._history) if lf == n])

    def reset(self) -> None:
        """Start a new generation: every state tensor zero, the next call is step 0."""
        self._zero_state()
        self._history = []
        self._last_timestep = None

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
        self._history = self._history[:step]

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        call = self._normalize(args, kwargs)
        return_dict = bool(call.pop("return_dict", True))
        leaves = dict(flatten_kwargs(call))
        batch = self._call_batch(leaves)
        if batch is not None and batch != self.batch_size:
            self._bind_batch(batch)
            self.reset()
        feeds = self._feeds(leaves)
        if self.auto_reset:
            self._detect_new_generation(call)
        outputs, last_full = self._step(feeds)
        self._history.append(last_full)
        if return_dict:
            if len(outputs) != 1:
                raise ValueError("return_dict=True needs a single-output model; pass return_dict=False")
            return _output_object(outputs[0])
        return tuple(outputs)

    @property
    def batch_size(self) -> int | None:
        """The batch the cache is allocated for (dynamic-batch graphs), else None."""
        return self._batch

    # --- helpers -------------------------------------------------------------------------

    def _bind_batch(self, batch: int | None) -> None:
        """Concrete shapes for ``batch`` (None: a static graph, shapes as exported)."""
        self._batch = batch
        self.sidecar = self.graph_sidecar if batch is None else self.graph_sidecar.with_batch(batch)
        self._inputs = {d.name: d for d in self.sidecar.inputs}
        self._state_desc = self.sidecar.state_by_name()

    def _call_batch(self, leaves: dict[str, Any]) -> int | None:
        """The batch size of a call to a dynamic-batch graph (``leaves``: the call's flattened
        kwargs): dim 0 of its first batched input."""
        if self._batch is None:
            return None
        for desc in self.graph_sidecar.inputs:
            value = leaves.get(desc.name)
            if desc.shape and desc.shape[0] == BATCH_DIM and value is not None and np.ndim(value) > 0:
                return int(value.shape[0] if isinstance(value, torch.Tensor) else np.shape(value)[0])
        return None

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
                    "(shapes other than a dynamic batch are static: export again with example inputs of this shape)")
            feeds[name] = value
        constants = self.sidecar.constants
        for name, value in leaves.items():
            if name in self._inputs or name == "return_dict":
                continue
            if isinstance(value, (torch.Tensor, np.ndarray)):
                if name in constants:
                    raise InputMismatchError(f"input {name!r} was {constants[name]!r} at export; the graph "
                                             "has no such input (export again with it)")
                continue  # an input the graph does not use
            if name in constants and _jsonable(value) != constants[name]:
                raise InputMismatchError(f"argument {name!r}={value!r} differs from the exported value "
                                         f"{constants[name]!r} (non-tensor arguments are baked into the graph)")
        return feeds

    def _as_numpy(self, name: str, value: Any) -> np.ndarray:
        dtype = numpy_dtype(self._inputs[name].dtype)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return np.asarray(value, dtype=dtype, order="C")  # keeps 0-d arrays 0-d

    def _detect_new_generation(self, call: dict[str, Any]) -> None:
        """Denoising timesteps only go down; one going back up starts a new generation."""
        t = call.get("timestep", call.get("t"))
        if t is None:
            return
        if isinstance(t, torch.Tensor):
            if t.numel() == 0:
                return
            value = float(t.reshape(-1)[0])
        else:
            array = np.asarray(t).reshape(-1)
            if array.size == 0:
                return
            value = float(array[0])
        if self._last_timestep is not None and value > self._last_timestep and self._history:
            self.reset()
        self._last_timestep = value

    # --- backend hooks -------------------------------------------------------------------

    def _zero_state(self) -> None:
        raise NotImplementedError

    def _step(self, feeds: dict[str, Any]) -> tuple[list[torch.Tensor], int]:
        raise NotImplementedError

    def _read_state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _write_state(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
