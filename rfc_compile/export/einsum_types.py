"""``einsum_common_type``: an ``Einsum`` over operands of different float types gets ``Cast`` nodes.

``torch.einsum`` promotes its operands to a common type (HiDream-I1's rotary code multiplies
float32 positions by a float64 frequency table), but torch.onnx exports it as one ``Einsum`` node
with the operands as they are; ONNX's ``Einsum`` takes one type, and onnxruntime refuses to load
the graph ("Type parameter (T) of Optype (Einsum) bound to different types"). The positions are
usually constants folded away; they stay in the graph when they follow a dynamic dim (a dynamic
batch). Each operand of another type is cast to ``torch.promote_types`` of them all, the type
torch computes in, so the rewrite is the same function, in the main graph and inside the ``If``
branches.
"""

from __future__ import annotations

import functools
import logging

from .proto import operand_types, replace_nodes

logger = logging.getLogger(__name__)

PREFIX = "rfc_einsum_cast/"


@functools.cache
def _torch_types() -> dict:
    import torch
    from onnx import TensorProto

    return {TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16,
            TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64}


def common_type(onnx_types: list[int]) -> int:
    """The ONNX type torch computes in for operands of these (float) ONNX types."""
    import torch

    to_torch = _torch_types()
    to_onnx = {dtype: onnx_type for onnx_type, dtype in to_torch.items()}
    return to_onnx[functools.reduce(torch.promote_types, [to_torch[t] for t in onnx_types])]


def einsum_common_type(model_proto) -> int:
    """Cast the operands of every mixed-float-type ``Einsum`` in ``model_proto`` (subgraphs included)
    to their common type; returns how many nodes changed."""
    import onnx

    types = operand_types(model_proto, "Einsum")

    def mixed(node) -> bool:
        if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx"):
            return False
        found = {types.get(name) for name in node.input}
        return len(found) > 1 and found <= _torch_types().keys()

    def replacement(node) -> list:
        tag = f"{PREFIX}{node.name or node.output[0]}"
        target = common_type([types[name] for name in node.input])
        casts, inputs = [], []
        for i, name in enumerate(node.input):
            if types[name] == target:
                inputs.append(name)
                continue
            cast = f"{tag}/cast{i}"
            casts.append(onnx.helper.make_node("Cast", [name], [cast], name=cast, to=target))
            inputs.append(cast)
        einsum = onnx.helper.make_node("Einsum", inputs, list(node.output), name=node.name)
        einsum.attribute.extend(node.attribute)
        return casts + [einsum]

    changed = replace_nodes(model_proto, mixed, replacement)
    if changed:
        logger.info("einsum_common_type: %d Einsum nodes had operands cast to one type", changed)
    return changed
