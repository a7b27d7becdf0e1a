"""Triton Inference Server model repository for an exported cached step.

Layout written by :func:`write_triton_repository` (``to_onnx(..., triton=True)``)::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/1/model.onnx          (+ model.onnx.data for models over 2 GB)

One *sequence* (a correlation ID) is one generation: the client sends one request per
denoising step with the step's model inputs (``hidden_states``, ``timestep``, ...), START on
the first step's request and END on the last. The cache lives in Triton's *implicit state*
(``sequence_batching.state``): one entry per cache tensor, ``state.<name>`` in and
``state_out.<name>`` out, so the client never sees or sends it. ``state_out.last_full`` is
also a regular output: a client can request it to learn whether the step ran in full
(== the step index).

How START resets the cache (ours): both ways, so neither depends on the other.
* every state entry has ``initial_state { zero_data: true }``: Triton hands the model zeros as
  the state input of a sequence's first request;
* the model also gets the ``START`` control input and zeroes every state input itself when it
  is 1 (``Where(START, 0, state)`` inserted in front of the graph), so a server that does not
  apply initial_state, or a sequence slot reused without it, still starts a clean generation.
A graph with dynamic dims (``dynamic_batch``, ``dynamic_dims``; e.g. one FLUX model for every
resolution) has variable-size state (``dims: -1`` where the sidecar names a dim; Triton's
implicit state allows it, and the input and output state need not match in shape). Its
``initial_state`` is zeros at the export's example shape, which a first request at another
shape cannot use, so for those entries the START reset is an ``If``: zeros of the shape the
sidecar's expressions give at this request's input sizes (read with ``Shape``), else the state.
``READY`` (1 when the slot holds a real request) gates the update: ``state_out = READY ?
new state : old state``. With ``max_batch_size: 0`` (one sequence per execution; the graph's
batch is the CFG/prompt batch, baked at export or dynamic) READY is always 1.

Triton state tensors need at least one dimension, so the 0-d counters (``step``,
``last_full``, ``full_steps_seen``) are shape ``[1]`` in the Triton model (a Reshape to and
from ``[]`` is inserted around the graph). The Triton model therefore differs from the plain
ONNX file: START/READY inputs, the reset/gate nodes and the ``[1]``-shaped counters, and
the cache outputs that the plain file returns empty on skipped steps (the sidecar's
``kept_on_skip``, skip_state.py) are full-size copies again: Triton threads every state output
back as the next input.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from .errors import ExportError
from ..dims import linear_dim
from .onnx_sizes import SizeNodes
from .sidecar import Sidecar
from .proto import check_model, save_model
from .skip_state import restore_skip_copies

logger = logging.getLogger(__name__)

_TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}
CONTROL_START = "START"
CONTROL_READY = "READY"


def _triton_dims(shape) -> list[int]:
    return list(shape) if len(shape) else [1]


def add_sequence_controls(model_proto, sidecar: Sidecar):
    """Return a copy of ``model_proto`` with START/READY inputs, reset/gate nodes, [1]-shaped counters."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    graph = model.graph
    state = sidecar.state
    in_names = {s.input for s in state}
    out_names = {s.output for s in state}
    reset_name = {s.input: s.input + "/after_start" for s in state}
    raw_name = {s.output: s.output + "/before_ready" for s in state}

    def rename(g):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in reset_name:
                    node.input[i] = reset_name[name]
                elif name in raw_name:
                    node.input[i] = raw_name[name]
            for i, name in enumerate(node.output):
                if name in raw_name:
                    node.output[i] = raw_name[name]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    rename(attr.g)
                for sub in attr.graphs:
                    rename(sub)

    rename(graph)
    produced = {o for n in graph.node for o in n.output}
    pre: list = []
    post: list = []
    inits = [
        numpy_helper.from_array(np.array([], dtype=np.int64), "rfc_triton/scalar_shape"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "rfc_triton/one_shape"),
    ]
    pre += [
        helper.make_node("Cast", [CONTROL_START], ["rfc_triton/start_b1"], to=TensorProto.BOOL),
        helper.make_node("Reshape", ["rfc_triton/start_b1", "rfc_triton/scalar_shape"], ["rfc_triton/start"]),
        helper.make_node("Cast", [CONTROL_READY], ["rfc_triton/ready_b1"], to=TensorProto.BOOL),
        helper.make_node("Reshape", ["rfc_triton/ready_b1", "rfc_triton/scalar_shape"], ["rfc_triton/ready"]),
    ]
    from .sidecar import numpy_dtype

    sizes = _state_sizes(sidecar, pre, inits)
    for s in state:
        zero = f"rfc_triton/zero/{s.name}"
        inits.append(numpy_helper.from_array(np.zeros((), dtype=numpy_dtype(s.dtype)), zero))
        source = s.input
        if not s.shape:  # Triton state needs >= 1 dim: [1] outside, [] inside
            pre.append(helper.make_node("Reshape", [s.input, "rfc_triton/scalar_shape"], [s.input + "/scalar"]))
            source = s.input + "/scalar"
        if all(isinstance(d, int) for d in s.shape):
            pre.append(helper.make_node("Where", ["rfc_triton/start", zero, source], [reset_name[s.input]]))
        else:  # the state may arrive at another shape (initial_state): zeros at this request's sizes
            zeros = helper.make_graph(
                [helper.make_node("ConstantOfShape", [_shape(sizes, s.shape)], [f"{zero}/full"],
                                  value=numpy_helper.from_array(np.zeros((1,), dtype=numpy_dtype(s.dtype))))],
                f"{zero}/then", [], [helper.make_tensor_value_info(f"{zero}/full", _onnx_type(s.dtype), None)])
            keep = helper.make_graph(
                [helper.make_node("Identity", [source], [f"{zero}/kept"])],
                f"{zero}/else", [], [helper.make_tensor_value_info(f"{zero}/kept", _onnx_type(s.dtype), None)])
            pre.append(helper.make_node("If", ["rfc_triton/start"], [reset_name[s.input]],
                                        then_branch=zeros, else_branch=keep))
        raw = raw_name[s.output]
        if raw not in produced:  # the graph passes the input through unchanged
            pre.append(helper.make_node("Identity", [reset_name[s.input]], [raw]))
        gated = s.output if s.shape else s.output + "/scalar"
        post.append(helper.make_node("Where", ["rfc_triton/ready", raw, reset_name[s.input]], [gated]))
        if not s.shape:
            post.append(helper.make_node("Reshape", [gated, "rfc_triton/one_shape"], [s.output]))

    nodes = pre + list(graph.node) + post
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    graph.input.extend([
        helper.make_tensor_value_info(CONTROL_START, TensorProto.INT32, [1]),
        helper.make_tensor_value_info(CONTROL_READY, TensorProto.INT32, [1]),
    ])
    for vi in list(graph.input) + list(graph.output):
        if (vi.name in in_names or vi.name in out_names) and len(vi.type.tensor_type.shape.dim) == 0:
            vi.type.tensor_type.shape.dim.add().dim_value = 1
    # drop stale value_info of renamed values (shape inference recomputes what it needs)
    keep = [vi for vi in graph.value_info if vi.name not in in_names and vi.name not in out_names]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    check_model(model)  # a model past protobuf's cap is checked once saved (write_triton_repository)
    return model


def _onnx_type(dtype: str) -> int:
    from onnx import helper

    from .sidecar import numpy_dtype

    return helper.np_dtype_to_tensor_dtype(np.dtype(numpy_dtype(dtype)))


def _state_sizes(sidecar: Sidecar, nodes: list, inits: list) -> SizeNodes:
    """Size nodes over the request's inputs: each dynamic dim read off the first input that shows it."""
    where: dict = {}
    for desc in sidecar.inputs:
        for axis, dim in enumerate(desc.shape):
            linear = linear_dim(dim) if isinstance(dim, str) else None
            if linear is not None:
                where.setdefault(linear[0], (desc.name, axis, *linear[1:]))
    return SizeNodes(where, nodes, inits, prefix="rfc_triton/")


def _shape(sizes: SizeNodes, shape) -> str:
    try:
        return sizes.shape(shape)
    except ValueError as exc:
        raise ExportError(f"state shape {shape!r}: cannot compute it in the Triton model ({exc})") from None


def config_pbtxt(sidecar: Sidecar, name: str, max_sequence_idle_microseconds: int = 60_000_000) -> str:
    """The model's config.pbtxt (text-format ``inference.ModelConfig``); a dynamic dim is ``-1``,
    except in ``initial_state``, which has the export's example shape (see module docstring)."""
    example = sidecar.with_dims(sidecar.example_dims)
    example_shape = {s.name: s.shape for s in example.state}

    def dims(shape) -> str:
        return "[ " + ", ".join(str(d if isinstance(d, int) else -1) for d in _triton_dims(shape)) + " ]"

    def ttype(dtype: str) -> str:
        try:
            return _TRITON_TYPES[dtype]
        except KeyError:
            raise ExportError(f"dtype {dtype} has no Triton equivalent") from None

    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        "max_batch_size: 0",
        "input [",
        ",\n".join(f'  {{\n    name: "{d.name}"\n    data_type: {ttype(d.dtype)}\n    dims: {dims(d.shape)}\n  }}'
                   for d in sidecar.inputs),
        "]",
        "output [",
        ",\n".join(
            [f'  {{\n    name: "{d.name}"\n    data_type: {ttype(d.dtype)}\n    dims: {dims(d.shape)}\n  }}'
             for d in sidecar.outputs]
            + [f'  {{\n    name: "{s.output}"\n    data_type: {ttype(s.dtype)}\n    dims: {dims(s.shape)}\n  }}'
               for s in sidecar.state if s.output == sidecar.decision_output]),
        "]",
        "sequence_batching {",
        f"  max_sequence_idle_microseconds: {max_sequence_idle_microseconds}",
        "  control_input [",
        f'    {{\n      name: "{CONTROL_START}"\n      control [\n        {{\n'
        "          kind: CONTROL_SEQUENCE_START\n          int32_false_true: [ 0, 1 ]\n        }\n      ]\n    },",
        f'    {{\n      name: "{CONTROL_READY}"\n      control [\n        {{\n'
        "          kind: CONTROL_SEQUENCE_READY\n          int32_false_true: [ 0, 1 ]\n        }\n      ]\n    }",
        "  ]",
        "  state [",
        ",\n".join(
            f'    {{\n      input_name: "{s.input}"\n      output_name: "{s.output}"\n'
            f"      data_type: {ttype(s.dtype)}\n      dims: {dims(s.shape)}\n"
            f"      initial_state: {{\n        data_type: {ttype(s.dtype)}\n        dims: {dims(example_shape[s.name])}\n"
            f'        zero_data: true\n        name: "zero"\n      }}\n    }}'
            for s in sidecar.state),
        "  ]",
        "}",
    ]
    return "\n".join(lines) + "\n"


def write_triton_repository(onnx_path: str | os.PathLike, repository: str | os.PathLike,
                            name: str | None = None, version: int = 1) -> Path:
    """Write ``<repository>/<name>/config.pbtxt`` and ``<repository>/<name>/<version>/model.onnx``.

    Returns the model directory. The config is validated with tritonclient's protobuf when
    tritonclient is installed (see :func:`validate_triton_config`).
    """
    import onnx

    onnx_path = Path(onnx_path)
    sidecar = Sidecar.load(onnx_path)
    name = name or onnx_path.stem
    model_dir = Path(repository) / name
    version_dir = model_dir / str(version)
    if version_dir.exists():
        shutil.rmtree(version_dir)
    version_dir.mkdir(parents=True)
    proto = onnx.load(str(onnx_path))  # external data (if any) is loaded too
    # Triton's implicit state needs every state output full-size on every step
    proto = restore_skip_copies(proto, sidecar.raw["state"], sidecar.kept_on_skip)
    triton_model = add_sequence_controls(proto, sidecar)
    target = version_dir / "model.onnx"
    if save_model(triton_model, target):  # saved with external data: too large to check in memory
        onnx.checker.check_model(str(target))
    text = config_pbtxt(sidecar, name)
    (model_dir / "config.pbtxt").write_text(text)
    try:
        validate_triton_config(text)
    except ImportError:
        logger.info("tritonclient not installed: config.pbtxt written without protobuf validation")
    return model_dir


def validate_triton_config(text_or_path: str | os.PathLike):
    """Parse a config.pbtxt with tritonclient's ``model_config_pb2`` (raises on any error)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = str(text_or_path)
    if not text.lstrip().startswith("name") and Path(text).is_file():
        text = Path(text).read_text()
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ExportError(f"invalid Triton config.pbtxt: {exc}") from None
    seq = config.sequence_batching
    inputs = {i.name for i in config.input}
    for state in seq.state:
        if state.input_name in inputs:
            raise ExportError(f"state {state.input_name} must not also be a regular input")
    return config


__all__ = ["write_triton_repository", "validate_triton_config", "config_pbtxt", "add_sequence_controls"]
