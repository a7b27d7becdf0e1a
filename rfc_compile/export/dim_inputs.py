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
from .onnx_sizes import SizeNodes


def dims_from_inputs(proto: Any, prefix: str, derived: tuple[DerivedDim, ...]) -> int:
    """Rebuild each graph input ``<prefix><root>`` from the first input sized by that root; returns
    how many were rebuilt (0 where the exporter dropped them: nothing in the graph read them)."""
    from onnx import helper

    graph = proto.graph
    inputs = {i.name: i for i in graph.input}
    where = {}
    for d in derived:
        where.setdefault(d.root, (d.input, d.index, d.scale, d.offset))
    nodes: list = []
    inits: list = []
    sizes = SizeNodes(where, nodes, inits, prefix=prefix)
    rebuilt = [root for root in where if prefix + root in inputs]
    for root in rebuilt:
        name = prefix + root
        dtype = inputs[name].type.tensor_type.elem_type
        nodes.append(helper.make_node("ConstantOfShape", [sizes.dim(root)], [name],
                                      value=helper.make_tensor("zero", dtype, [1], [0])))
        graph.input.remove(inputs[name])
    graph.initializer.extend(inits)
    for position, node in enumerate(nodes):  # first: the graph's nodes are in topological order
        graph.node.insert(position, node)
    return len(rebuilt)
