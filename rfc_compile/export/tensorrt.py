"""TensorRT: build an engine from the exported ONNX, and run it with state buffers bound in place.

``tensorrt`` (and a CUDA build of torch for the runner) is imported only when these are used;
neither installs on CPU-only machines. :func:`tensorrt_available` says why not, for skips.

The ONNX ``If`` node becomes an ``IIfConditional``: only the taken branch runs (TensorRT reads
the 0-d predicate on the host, one sync per step). The engine has the ONNX graph's I/O names,
so the sidecar is copied next to it as ``<engine>.rfc.json`` (plus an ``engine`` entry).
The engine is built from the graph with the skipped branch's state copies restored
(skip_state.restore_skip_copies; its ``kept_on_skip`` is ``[]``): the runner binds state
buffers of the current call's sizes. Returning those outputs empty would need TensorRT's
data-dependent output shapes (IOutputAllocator), not done here.

Dynamic dims (``to_onnx(..., dynamic_batch=True)`` / ``dynamic_dims``): the engine gets one
optimisation profile, each named dim's (min, opt, max) from ``build_engine(dims=...)``
(:func:`profile_shapes` turns them into every input's and state input's shapes, a FLUX single
block's ``image_tokens + text_tokens`` included); the engine's sidecar records those ranges, and
``TrtCachedModel`` sets the input shapes of each new size and refuses sizes outside them.
Not yet built with TensorRT (none here): its builder must find the ``If`` outputs' shapes equal
in both branches. The graph names ``batch``/``image_tokens``/``text_tokens`` alike on the state
and the model inputs (ONNX named dims, which TensorRT's parser takes as equal), but a size that
is an expression (a FLUX single block's cache) gets a name of its own (``s0``), which TensorRT
may not prove equal to what the recompute branch computes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError, InputMismatchError, ModelFileError
from .runner import StatefulRunner, torch_dtype
from .sidecar import Dim, Sidecar, bind_shape, sidecar_path

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when TensorRT and a CUDA device can be used, else (False, why not)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return False, f"TensorRT is not installed (import tensorrt: {exc})"
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return True, trt.__version__


DimRange = tuple[int, int, int]  # a dynamic dim's (min, opt, max) in an optimisation profile


def profile_dims(sidecar: Sidecar, dims: dict[str, DimRange] | None = None) -> dict[str, DimRange]:
    """Each dynamic dim's (min, opt, max): ``dims`` where given, else (the export's min, its example,
    its example), i.e. an engine that serves up to the size it was exported at. Checked against
    the export's ranges."""
    dims = dict(dims or {})
    ranges = sidecar.dim_ranges
    unknown = sorted(set(dims) - set(ranges))
    if unknown:
        raise ValueError(f"dims {unknown} are not dynamic in this export "
                         f"(its dynamic dims: {sorted(ranges) or 'none'})")
    corners = {}
    for name, example in sidecar.example_dims.items():
        lo, opt, hi = (int(v) for v in dims.get(name, (ranges[name][0], example, example)))
        if not ranges[name][0] <= lo <= opt <= hi <= ranges[name][1]:
            raise ValueError(f"dims[{name!r}] = {(lo, opt, hi)}: need {ranges[name][0]} <= min <= opt <= max <= "
                             f"{ranges[name][1]}")
        corners[name] = (lo, opt, hi)
    return corners


def profile_shapes(sidecar: Sidecar, dims: dict[str, DimRange] | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The optimisation profile of a dynamic-dim export: ``{input: (min, opt, max)}`` for every model
    input and ``state.*`` input whose shape names a dim (``dims``: see :func:`profile_dims`).

    A size that follows several dims (``"image_tokens + text_tokens"``) is evaluated at the three
    corners, so each state input's range is the one the model inputs' ranges imply."""
    corners = profile_dims(sidecar, dims)
    at = [{name: c[i] for name, c in corners.items()} for i in range(3)]
    shapes = {}
    for name, (shape, _) in sidecar.graph_io()[0].items():
        if all(isinstance(d, int) for d in shape):
            continue
        lo, opt, hi = (bind_shape(shape, sizes) for sizes in at)
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise ValueError(f"{name}'s shape {list(shape)} is not monotone in the dims: {lo} / {opt} / {hi}")
        shapes[name] = (lo, opt, hi)
    return shapes


def _make_progress_monitor(trt):
    """A tqdm bar per build phase via IProgressMonitor (TensorRT >= 10), else None."""
    if not hasattr(trt, "IProgressMonitor"):
        return None
    from tqdm.auto import tqdm

    class TqdmProgressMonitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, Any] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = 0
            parent = parent_phase
            while parent is not None and parent in self._bars:
                depth += 1
                parent = getattr(self._bars[parent], "_rfc_parent", None)
            bar = tqdm(total=num_steps, desc=phase_name, position=depth, leave=depth == 0)
            bar._rfc_parent = parent_phase
            self._bars[phase_name] = bar

        def step_complete(self, phase_name, step):
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # keep building

        def phase_finish(self, phase_name):
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return TqdmProgressMonitor()


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, precision: str = "fp16",
                 shapes: dict[str, tuple] | None = None, workspace_gb: float | None = None,
                 progress: bool = True, verbose: bool = False, dims: dict[str, DimRange] | None = None) -> Path:
    """Build a serialized TensorRT engine from an ONNX file written by ``to_onnx``.

    Args:
        precision: "fp16" (FP16 kernels allowed; I/O and state stay in the ONNX dtypes) or "fp32".
        shapes: optional optimisation profile ``{input: (min, opt, max)}``, overriding the one
            ``dims`` gives (a static export needs neither).
        workspace_gb: cap of the builder's workspace memory pool.
        dims: a dynamic-dim export's sizes to serve, ``{"batch": (1, 2, 8), "image_tokens":
            (256, 1024, 4096)}`` as (min, opt, max) per named dim; a dim left out serves up to
            its export example (:func:`profile_dims`). Every state input's range follows.
        progress: tqdm bars per build phase (TensorRT's IProgressMonitor, when available).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    sidecar = Sidecar.load(onnx_path)
    corners = profile_dims(sidecar, dims)  # a wrong dims fails here, before TensorRT is needed
    profile = {**profile_shapes(sidecar, dims), **(shapes or {})}
    ok, why = tensorrt_available()
    if not ok:
        raise RuntimeError(f"cannot build a TensorRT engine: {why}")
    import tensorrt as trt

    trt_logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from TRT 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    with tempfile.TemporaryDirectory(prefix="rfc_trt_") as tmp:
        parse_path = onnx_path
        if sidecar.kept_on_skip:
            # the runner binds fixed-size state buffers: every state output full-size again
            import onnx

            from .proto import save_model
            from .skip_state import restore_skip_copies

            proto = restore_skip_copies(onnx.load(str(onnx_path)), sidecar.raw["state"], sidecar.kept_on_skip)
            parse_path = Path(tmp) / onnx_path.name
            save_model(proto, parse_path)
        if not parser.parse_from_file(str(parse_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ExportError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if sidecar.names_of_dtype("bfloat16") and hasattr(trt.BuilderFlag, "BF16"):
        config.set_flag(trt.BuilderFlag.BF16)  # a bfloat16 export (the model's dtype) keeps bfloat16 kernels
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if profile:
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            trt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(trt_profile)
        logger.info("optimisation profile: %s", {name: list(c) for name, c in corners.items()})
    if progress:
        monitor = _make_progress_monitor(trt)
        if monitor is not None:
            config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    raw = dict(sidecar.raw)
    raw["artifact"] = engine_path.name
    raw["external_data"] = None  # the engine holds its weights
    raw["kept_on_skip"] = []  # built from the graph with the skip copies restored
    raw["engine"] = {"onnx": onnx_path.name, "precision": precision, "tensorrt": trt.__version__}
    if corners:  # the runner serves, and checks calls against, the profile's ranges
        raw["dynamic_axes"] = {name: {"example": opt, "min": lo, "max": hi} for name, (lo, opt, hi) in corners.items()}
        raw["engine"]["profile"] = {name: list(c) for name, c in corners.items()}
    sidecar_path(engine_path).write_text(json.dumps(raw, indent=2) + "\n")
    return engine_path


class TrtCachedModel(StatefulRunner):
    """Drop-in runner for a TensorRT engine built by :func:`build_engine` (CUDA torch tensors).

    State tensors are two sets of CUDA buffers (ping-pong) whose addresses are bound to the
    ``state.*`` inputs and ``state_out.*`` outputs; nothing is copied between steps except the
    8-byte ``state_out.last_full`` read for ``stats``. An engine with dynamic dims gets its input
    shapes set (and its output shapes checked against the sidecar's) each time the sizes change,
    which also starts a new generation with buffers of the new sizes.
    """

    def __init__(self, engine_path: str | os.PathLike, device: int | str = 0, auto_reset: bool = True):
        ok, why = tensorrt_available()
        if not ok:
            raise RuntimeError(f"TrtCachedModel needs TensorRT and CUDA: {why}")
        import tensorrt as trt
        import torch

        self.path = Path(engine_path)
        sidecar = Sidecar.load(self.path)
        super().__init__(sidecar, auto_reset)
        if not self.path.is_file() or self.path.stat().st_size == 0:
            raise ModelFileError(f"engine file {self.path} is missing or empty")
        self.device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ModelFileError(f"TensorRT could not deserialize {self.path} (corrupted, or built with another "
                                 "TensorRT version / GPU)")
        named = {name: shape for io in sidecar.graph_io() for name, (shape, _) in io.items()}
        io_in, io_out = {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = _TRT_DTYPES.get(str(self.engine.get_tensor_dtype(name)).split(".")[-1], "?")
            target = io_in if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else io_out
            target[name] = (_engine_dims(shape, named.get(name)), dtype)
        sidecar.check_io(io_in, io_out, where=str(self.path))
        self._new_backend_session()
        self.reset()

    def _new_backend_session(self) -> None:
        """A session's execution context holds its input shapes and tensor addresses: one each."""
        import torch

        self.context = self.engine.create_execution_context()
        self._shapes_set_for: dict[str, int] | None = None
        self._stream = torch.cuda.Stream(device=self.device)

    def _zero_state(self) -> None:
        import torch

        for parity in (0, 1):
            self._buffers[parity] = {d.name: torch.zeros(d.shape, dtype=torch_dtype(d.dtype), device=self.device)
                                     for d in self.sidecar.state}
        self._current = 0

    def _read_state(self) -> dict[str, np.ndarray]:
        return {name: t.cpu().numpy() for name, t in self._buffers[self._current].items()}

    def _write_state(self, arrays: dict[str, np.ndarray]) -> None:
        import torch

        self._buffers[self._current] = {name: torch.from_numpy(a).to(self.device) for name, a in arrays.items()}

    def _set_input_shapes(self) -> None:
        """Every input's shape at the current dims (a dynamic engine), outputs checked against the sidecar."""
        inputs, outputs = self.sidecar.graph_io()
        for name, (shape, _) in inputs.items():
            if not self.context.set_input_shape(name, tuple(shape)):
                raise InputMismatchError(f"TensorRT refused shape {list(shape)} for {name!r} (dims {self.dims}; "
                                         f"the engine's profile: {self.sidecar.raw.get('engine', {}).get('profile')})")
        for name, (shape, _) in outputs.items():
            got = tuple(self.context.get_tensor_shape(name))
            if got != tuple(shape):
                raise ExportError(f"the engine gives {name!r} the shape {list(got)} at dims {self.dims}, the "
                                  f"sidecar {list(shape)}: rebuild the engine from this export")
        self._shapes_set_for = self.dims

    def _step(self, feeds: dict[str, Any]):
        import torch

        if self.dims and self._shapes_set_for != self.dims:
            self._set_input_shapes()
        keep = []
        # outputs go back to where the inputs came from (drop-in for a CPU pipeline too)
        first = next(iter(feeds.values()), None)
        home = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
        for name, value in feeds.items():
            desc = self._inputs[name]
            tensor = torch.as_tensor(value).to(self.device, torch_dtype(desc.dtype)).contiguous()
            keep.append(tensor)
            self.context.set_tensor_address(name, tensor.data_ptr())
        current, nxt = self._buffers[self._current], self._buffers[1 - self._current]
        for d in self.sidecar.state:
            self.context.set_tensor_address(d.input, current[d.name].data_ptr())
            self.context.set_tensor_address(d.output, nxt[d.name].data_ptr())
        outputs = []
        for d in self.sidecar.outputs:
            out = torch.empty(d.shape, dtype=torch_dtype(d.dtype), device=self.device)
            self.context.set_tensor_address(d.name, out.data_ptr())
            outputs.append(out)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        self._current = 1 - self._current
        last_full = int(nxt["last_full"].item())  # syncs: the step is done
        del keep
        if home.type != "cuda":
            outputs = [o.to(home) for o in outputs]
        return outputs, last_full


def _engine_dims(shape: tuple[int, ...], sidecar_shape: tuple[Dim, ...] | None) -> tuple[Dim, ...]:
    """An engine tensor's shape for Sidecar.check_io: a dynamic size (-1) takes the sidecar's dim name
    where the sidecar names one (they agree), else "?" (the engine is dynamic where the export was not)."""
    named = sidecar_shape if sidecar_shape is not None and len(sidecar_shape) == len(shape) else (None,) * len(shape)
    return tuple(d if d >= 0 else (n if isinstance(n, str) else "?") for d, n in zip(shape, named))


_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32", "INT8": "int8",
               "UINT8": "uint8", "BOOL": "bool", "BF16": "bfloat16"}

__all__ = ["build_engine", "TrtCachedModel", "tensorrt_available", "profile_dims", "profile_shapes", "PRECISIONS"]
