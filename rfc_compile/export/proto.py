"""Small helpers over ONNX protos shared by the export fix-ups."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: Past this many bytes a model does not fit one protobuf message (2 GB cap, with margin): it is
#: saved with its weights in a ``<file>.data`` next to it, and onnx's checker needs its path.
PROTOBUF_SAFE_BYTES = 1_800_000_000

#: Initializers above this size are left out of the model shape inference sees (as typed graph inputs).
INFERENCE_MAX_INITIALIZER_BYTES = 1 << 16


def subgraphs(node) -> list:
    """The graphs a node carries in its attributes (an ``If``'s branches, a ``Loop``'s body)."""
    found = []
    for attribute in node.attribute:
        if attribute.HasField("g"):
            found.append(attribute.g)
        found.extend(attribute.graphs)
    return found


def all_graphs(graph) -> Iterator:
    """``graph`` and every graph nested in its nodes (``If`` branches, ``Loop`` bodies), depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from all_graphs(sub)


def element_types(model_proto) -> dict[str, int]:
    """Every typed value's ONNX element type (``TensorProto.<TYPE>``), subgraphs included: graph
    inputs/outputs, value_info, initializers and ``Constant`` outputs; one dict for the whole model,
    as the exporter names every value uniquely, branches included."""
    types: dict[str, int] = {}
    for graph in all_graphs(model_proto.graph):
        for info in (*graph.input, *graph.output, *graph.value_info):
            if info.type.HasField("tensor_type"):
                types[info.name] = info.type.tensor_type.elem_type
        for init in graph.initializer:
            types[init.name] = init.data_type
        for node in graph.node:
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    types[node.output[0]] = value.data_type
    return types


def operand_types(model_proto, op_type: str, operands: slice = slice(None)) -> dict[str, int]:
    """:func:`element_types`, completed by onnx's shape inference (best effort) when the ``operands`` of an
    ``op_type`` node have no type in the exporter's value_info; a fix-up leaves an untyped node alone."""
    types = element_types(model_proto)
    if any(node.op_type == op_type and any(name not in types for name in node.input[operands])
           for graph in all_graphs(model_proto.graph) for node in graph.node):
        try:
            types = {**element_types(infer_shapes(model_proto, strict_mode=False)), **types}
        except Exception as exc:
            logger.warning("shape inference failed (%s); %s nodes without types left alone", exc, op_type)
    return types


def replace_nodes(model_proto, matches, replacement) -> int:
    """Replace every node for which ``matches(node)`` holds, in the main graph and in every
    subgraph, by the list of nodes ``replacement(node)`` returns; returns how many were replaced."""
    changed = 0

    def walk(graph) -> None:
        nonlocal changed
        nodes, found = [], False
        for node in graph.node:
            for sub in subgraphs(node):
                walk(sub)
            if matches(node):
                nodes += replacement(node)
                changed += 1
                found = True
            else:
                nodes.append(node)
        if found:
            del graph.node[:]
            graph.node.extend(nodes)

    walk(model_proto.graph)
    return changed


def fits_one_message(model_proto) -> bool:
    return model_proto.ByteSize() < PROTOBUF_SAFE_BYTES


def check_model(model_proto) -> None:
    """onnx's checker on a model that fits one protobuf message; a larger one is checked by
    path once saved (:func:`save_model`'s caller), as the checker cannot take it in memory."""
    import onnx

    if fits_one_message(model_proto):
        onnx.checker.check_model(model_proto)


def external_data_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_model` puts the weights of a model too large for one message: ``<path>.data``."""
    return Path(str(path) + ".data")


def save_model(model_proto, path: str | os.PathLike) -> Path | None:
    """Save ``model_proto`` to ``path``, its weights in :func:`external_data_path` when it does not
    fit one protobuf message; returns that file, or None. A stale data file is removed first
    (onnx appends to an existing one)."""
    import onnx

    path, data = Path(path), external_data_path(path)
    for stale in (path, data):
        if stale.exists():
            stale.unlink()
    if fits_one_message(model_proto):
        onnx.save_model(model_proto, str(path))
        return None
    onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name)
    return data


def infer_shapes(model_proto, max_initializer_bytes: int = INFERENCE_MAX_INITIALIZER_BYTES, **options):
    """onnx's shape inference over ``model_proto``, also for models past protobuf's 2 GB cap.

    ``onnx.shape_inference.infer_shapes`` serializes the model, weights included, and fails on
    a > 2 GB one (a float32 PixArt-Sigma, any float16 FLUX). It needs the weights' shapes, not
    their values, so it gets a copy in which every initializer larger than
    ``max_initializer_bytes`` is a graph input of the same type and shape; small ones (shape
    tensors, axes, scalars) stay, as data propagation reads them. ``options`` go to onnx.
    """
    import onnx

    light = onnx.ModelProto()
    _copy_fields(model_proto, light, skip="graph")
    _copy_fields(model_proto.graph, light.graph, skip="initializer")
    for init in model_proto.graph.initializer:
        if init.ByteSize() <= max_initializer_bytes:
            light.graph.initializer.append(init)
        else:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return onnx.shape_inference.infer_shapes(light, **options)


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of one proto message into another but ``skip``."""
    from google.protobuf.message import Message

    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, Message):
            getattr(target, field.name).CopyFrom(value)
        elif isinstance(value, (str, bytes, int, float)):
            setattr(target, field.name, value)
        else:  # a repeated field
            getattr(target, field.name).extend(value)
