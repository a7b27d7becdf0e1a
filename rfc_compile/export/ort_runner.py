"""OnnxCachedModel: run an exported cached step with onnxruntime, state threaded with IOBinding.

The state lives in OrtValues on the session's device. Small state (counters, the RCS
accumulator) uses two sets (ping-pong): step n binds set A as ``state.*`` inputs and set B as
``state_out.*`` outputs, step n+1 the other way round. The cache tensors listed in the
sidecar's ``kept_on_skip`` (skip_state.py) are bound as inputs from the one current OrtValue
and as outputs *without* a buffer (onnxruntime allocates on the session's device): a skipped
step returns them empty and the runner keeps the current OrtValue (nothing copied), a full
step returns new ones and the runner adopts them. No state tensor is copied between steps
and, with the CUDA execution provider, none leaves the GPU (only the 8-byte
``state_out.last_full`` is read back, for ``stats``).
Model inputs given as CUDA torch tensors are bound in place (and the output is written
into a CUDA torch tensor); CPU tensors / arrays are bound from host memory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ModelFileError
from .proto import external_data_path
from .runner import StatefulRunner, torch_dtype
from .sidecar import Sidecar, numpy_dtype

logger = logging.getLogger(__name__)


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def open_session(path: Path, sidecar: Sidecar, providers: list | None = None,
                 session_options=None):
    """An InferenceSession for ``path``, with clear errors for missing/corrupt files and a
    sidecar that does not describe the graph."""
    import onnxruntime as ort

    from .onnx import graph_io_from_session

    if not path.is_file():
        raise ModelFileError(f"ONNX file {path} does not exist")
    if path.stat().st_size == 0:
        raise ModelFileError(f"ONNX file {path} is empty")
    weights = sidecar.raw.get("external_data")
    if weights and not (path.parent / weights).is_file():
        raise ModelFileError(f"{path} keeps its weights in {weights}, which is not next to it (copy both files)")
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options,
                                       providers=providers or default_providers())
    except Exception as exc:  # onnxruntime raises its own (pybind) exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "INVALID_PROTOBUF" in first or "Protobuf parsing failed" in first:
            why = "the file is truncated, corrupted or not an ONNX model"
        elif "External data" in first or "external data" in first:
            data_file = external_data_path(path).name
            why = f"its external weights file ({data_file}, next to it) is missing or does not match"
        else:
            why = "the graph is not valid for this onnxruntime (re-export it, or check the onnxruntime version)"
        raise ModelFileError(f"onnxruntime could not load {path}: {why} ({type(exc).__name__}: {first[:500]})") from None
    graph_in, graph_out = graph_io_from_session(session)
    sidecar.check_io(graph_in, graph_out, where=str(path))
    return session


class OnnxCachedModel(StatefulRunner):
    """Drop-in runner for an ONNX file written by :func:`rfc_compile.export.to_onnx`.

    Args:
        path: the ``.onnx`` file (its ``.rfc.json`` sidecar must be beside it).
        providers: onnxruntime execution providers (default: CUDA when available, then CPU).
        session_options: an ``onnxruntime.SessionOptions`` (threads, graph optimisation level).
        auto_reset: follow the timestep: one that goes back up starts a new generation, a call at the
            previous call's timestep with the same latents gets a cache per branch (runtime.BranchFollower).
    """

    def __init__(self, path: str | os.PathLike, providers: list | None = None, session_options=None,
                 auto_reset: bool = True):
        self.path = Path(path)
        sidecar = Sidecar.load(self.path)
        bf16 = sidecar.names_of_dtype("bfloat16")
        if bf16:  # onnxruntime's Python API makes no OrtValue from a bfloat16 array, its CPU provider has no kernels
            raise ModelFileError(f"{self.path} has bfloat16 tensors ({bf16[:3]}...): OnnxCachedModel supports float32 "
                                 "and float16; serve a bfloat16 export with TensorRT (TrtCachedModel), or export "
                                 "the model in float16 for onnxruntime")
        super().__init__(sidecar, auto_reset)
        self.session = open_session(self.path, sidecar, providers, session_options)
        self.providers = self.session.get_providers()
        self.device_type = "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.device_id = 0
        if self.device_type == "cuda":
            for provider, options in zip(self.providers, self.session.get_provider_options().values()):
                if provider == "CUDAExecutionProvider":
                    self.device_id = int(options.get("device_id", 0))
        self._kept = set(sidecar.kept_on_skip)
        self.reset()

    def __repr__(self) -> str:
        return (f"OnnxCachedModel({str(self.path)!r}, model={self.sidecar.model_class}, "
                f"mode={self.rfc_config.get('mode')!r}, providers={self.providers})")

    # --- state buffers -------------------------------------------------------------------

    def _ortvalue(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(array, self.device_type, self.device_id)

    def _zero_state(self) -> None:
        for parity in (0, 1):
            self._buffers[parity] = {
                d.name: self._ortvalue(np.zeros(d.shape, dtype=numpy_dtype(d.dtype)))
                for d in self.sidecar.state if d.name not in self._kept or parity == 0
            }
        self._current = 0

    def _read_state(self) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in self._buffers[self._current].items()}

    def _write_state(self, arrays: dict[str, np.ndarray]) -> None:
        self._buffers[self._current] = {name: self._ortvalue(array) for name, array in arrays.items()}

    # --- one step ------------------------------------------------------------------------

    def _step(self, feeds: dict[str, Any]) -> tuple[list[torch.Tensor], int]:
        binding = self.session.io_binding()
        on_gpu = self.device_type == "cuda"
        cuda_inputs = False
        for name, value in feeds.items():
            desc = self._inputs[name]
            if on_gpu and isinstance(value, torch.Tensor) and value.is_cuda:
                tensor = value.detach().to(torch_dtype(desc.dtype)).contiguous()
                feeds[name] = tensor  # keep alive until the run ends
                binding.bind_input(name, "cuda", tensor.device.index or 0, numpy_dtype(desc.dtype),
                                   list(desc.shape), tensor.data_ptr())
                cuda_inputs = True
            else:
                binding.bind_cpu_input(name, self._as_numpy(name, value))
        outputs: list[torch.Tensor] = []
        for d in self.sidecar.outputs:
            if cuda_inputs:
                out = torch.empty(d.shape, dtype=torch_dtype(d.dtype), device=f"cuda:{self.device_id}")
                binding.bind_output(d.name, "cuda", self.device_id, numpy_dtype(d.dtype), list(d.shape),
                                    out.data_ptr())
                outputs.append(out)
            else:
                binding.bind_output(d.name, "cpu")
        # model outputs are bound first: get_outputs() lists them in binding order
        current, nxt = self._buffers[self._current], self._buffers[1 - self._current]
        kept_at: list[tuple[int, str]] = []  # (position in get_outputs(), state name)
        position = len(self.sidecar.outputs)
        for d in self.sidecar.state:
            binding.bind_ortvalue_input(d.input, current[d.name])
            if d.name in self._kept:  # onnxruntime allocates; empty when the step left it unchanged
                binding.bind_output(d.output, self.device_type, self.device_id)
                kept_at.append((position, d.name))
            else:
                binding.bind_ortvalue_output(d.output, nxt[d.name])
            position += 1
        if cuda_inputs:
            torch.cuda.current_stream().synchronize()  # inputs written by torch are ready for ORT
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs() if (kept_at or not cuda_inputs) else []
        if not cuda_inputs:
            outputs = [torch.from_numpy(values[i].numpy()) for i in range(len(self.sidecar.outputs))]
        for i, name in kept_at:
            value = values[i]
            shape = value.shape()
            if 0 in shape:  # the step left it unchanged: keep the buffer, nothing copied
                nxt[name] = current[name]
            elif tuple(shape) == self._state_desc[name].shape:
                nxt[name] = value  # a full step's new tensor, already on the session's device
            else:
                raise RuntimeError(f"{self.path}: state output {self._state_desc[name].output!r} came back with "
                                   f"shape {list(shape)}, expected {list(self._state_desc[name].shape)} or empty")
        self._current = 1 - self._current
        last_full = int(nxt["last_full"].numpy())
        return outputs, last_full


__all__ = ["OnnxCachedModel", "open_session", "default_providers"]
