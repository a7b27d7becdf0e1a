"""ONNX fix-up ``dims_from_inputs``: the ``dims.<name>`` inputs of the traced step become nodes.

A graph exported with an input size given as a multiple of a named dim (``"2*grid_height"``:
the latent height of a model that cuts it into 2x2 patches) is traced with one more input per
such dim, a tensor of that length (CachedStep's ``dims``, rewrite.py), so that torch.export
sees the patch grid as the symbol. A user of the ONNX graph should not have to feed it: each
one is rebuilt inside the graph from the input it sizes, ``ConstantOfShape((size - offset) /
scale)``, and leaves the graph's inputs.
"""

from __future__ import annotations

from typing import Any

from ..passes.capture import DerivedDim


def dims_from_inputs(proto: Any, prefix: str, derived: tuple[DerivedDim, ...]) -> int:
    """Rebuild each graph input ``<prefix><root>`` from the first input sized by that root; returns
    how many were rebuilt (0 where the exporter dropped them: nothing in the graph read them)."""
    from onnx import TensorProto, helper

    graph = proto.graph
    inputs = {i.name: i for i in graph.input}
    nodes = []
    for root in dict.fromkeys(d.root for d in derived):
        name = prefix + root
        if name not in inputs:
            continue
        source = next(d for d in derived if d.root == root)
        size = f"{name}/size"
        nodes.append(helper.make_node("Shape", [source.input], [size], start=source.index, end=source.index + 1))
        if source.offset:
            offset = helper.make_tensor(f"{name}/offset", TensorProto.INT64, [1], [source.offset])
            graph.initializer.append(offset)
            nodes.append(helper.make_node("Sub", [size, offset.name], [f"{size}-offset"]))
            size = f"{size}-offset"
        if source.scale != 1:
            scale = helper.make_tensor(f"{name}/scale", TensorProto.INT64, [1], [source.scale])
            graph.initializer.append(scale)
            nodes.append(helper.make_node("Div", [size, scale.name], [f"{size}/scale"]))
            size = f"{size}/scale"
        dtype = inputs[name].type.tensor_type.elem_type
        nodes.append(helper.make_node("ConstantOfShape", [size], [name],
                                      value=helper.make_tensor("zero", dtype, [1], [0])))
        graph.input.remove(inputs[name])
    for position, node in enumerate(nodes):  # first: the graph's nodes are in topological order
        graph.node.insert(position, node)
    return sum(1 for node in nodes if node.op_type == "ConstantOfShape")
