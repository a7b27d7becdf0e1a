"""Export a cached model: ONNX (+ onnxruntime runner), Triton model repository, TensorRT engine.

    from rfc_compile.export import to_onnx, OnnxCachedModel
    to_onnx(model, "dit.onnx", example_inputs, RFCConfig(mode="rfc", threshold=0.8))
    runner = OnnxCachedModel("dit.onnx")          # drop-in for the torch model
    out = runner(hidden_states=x, timestep=t, class_labels=y).sample
    runner.stats.full_steps

Graph I/O: the model's tensor kwargs keep their names (nested ones dotted, e.g.
``added_cond_kwargs.resolution``), outputs are ``sample`` (or ``output.<i>``); each cache tensor
is an input ``state.<name>`` and an output ``state_out.<name>`` (names from rfc_compile/state.py),
zero at the start of a generation; ``state_out.last_full == state.step`` iff the step ran in
full. The ``<file>.rfc.json`` sidecar (sidecar.py) describes all of it; the cache tensors it
lists as ``kept_on_skip`` come back empty from a step that left them unchanged, and a runner
then keeps its previous buffer (skip_state.py). Shapes are static unless named dynamic
(``to_onnx``'s ``dynamic_batch`` / ``dynamic_dims``; sidecar.py says how the sizes are
recorded). Triton model repository with implicit state: triton.py. TensorRT parts
(``build_engine``, ``TrtCachedModel``) import ``tensorrt`` only when used (tensorrt.py).
Errors are ValueErrors: ModelFileError (missing/corrupt file or sidecar), SidecarMismatchError,
InputMismatchError (wrong input/state shape or dtype), ExportError.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ExportError, InputMismatchError, ModelFileError, SidecarMismatchError

_LAZY = {
    "to_onnx": ".onnx", "OnnxExport": ".onnx",
    "OnnxCachedModel": ".ort_runner",
    "Sidecar": ".sidecar",
    "write_triton_repository": ".triton", "validate_triton_config": ".triton",
    "build_engine": ".tensorrt", "TrtCachedModel": ".tensorrt", "tensorrt_available": ".tensorrt",
}

__all__ = ["to_onnx", "OnnxExport", "OnnxCachedModel", "Sidecar", "write_triton_repository",
           "validate_triton_config", "build_engine", "TrtCachedModel", "tensorrt_available",
           "ExportError", "ModelFileError", "SidecarMismatchError", "InputMismatchError"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
