"""``branch_cse``: common-subexpression elimination in the main graph and inside the ``If`` branches.

Every region of the rewritten step computes its Taylor coefficients from the same two counters
(``k`` steps since the last full step, full steps seen: rfc.py's ``taylor_term``), so the
exported predict branch repeats the same ~10 scalar nodes (Cast, Pow, Div, GreaterOrEqual,
Where, Concat, and their Constants) once per region. The exporter's optimizer (onnxscript,
onnx_ir's CSE) does not look inside ``If`` branches, and onnxruntime runs every one of them: on a
GPU each is a kernel launch, and a small model's step time there follows the number of nodes it
runs (benchmarks/RESULTS_ONNX.md, the H200 section). On DiT-S this pass takes the TaylorSeer
predict branch from 806 to ~300 nodes and the RFE one from 1376 to ~870.

A node is replaced by an earlier one with the same domain, op type, inputs and attributes
(Constant values compared by bytes, up to ``MAX_CONSTANT_ELEMENTS``); nodes with subgraph
attributes, random ops and nodes that produce a graph output are left alone. The replaced
node's outputs are renamed to the kept node's everywhere after it.
"""

from __future__ import annotations

import logging

from .proto import subgraphs

logger = logging.getLogger(__name__)

MAX_CONSTANT_ELEMENTS = 16
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
               "Bernoulli", "Dropout"}


def _key(node) -> tuple | None:
    """What makes two nodes interchangeable, or None when the node must stay."""
    import numpy as np
    from onnx import AttributeProto, numpy_helper

    if node.op_type in _RANDOM_OPS:
        return None
    attributes = []
    for attribute in node.attribute:
        if attribute.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            return None
        if attribute.type == AttributeProto.TENSOR:
            if int(np.prod(attribute.t.dims)) > MAX_CONSTANT_ELEMENTS:
                return None
            value = numpy_helper.to_array(attribute.t)
            attributes.append((attribute.name, value.dtype.str, value.shape, value.tobytes()))
        else:
            copy = AttributeProto()
            copy.CopyFrom(attribute)
            copy.ClearField("doc_string")
            attributes.append((attribute.name, copy.SerializeToString(deterministic=True)))
    return (node.domain or "", node.op_type, node.overload, tuple(node.input), len(node.output),
            tuple(sorted(attributes)))


def _cse_graph(graph) -> int:
    """One pass over ``graph`` in order (valid ONNX is topologically sorted): chains of
    duplicates collapse because inputs are renamed before the later nodes are keyed."""
    outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}
    seen: dict[tuple, object] = {}
    kept_nodes = []
    removed = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        for sub in subgraphs(node):  # subgraphs may read this graph's values by name
            _rename_captured(sub, renamed)
        # a node that makes a graph output stays itself: later passes (skip_state.py's
        # restore_skip_copies) find and replace branch outputs' producers by name
        key = None if outputs.intersection(node.output) else _key(node)
        original = seen.get(key) if key is not None else None
        if original is None:
            if key is not None:
                seen[key] = node
            kept_nodes.append(node)
            continue
        removed += 1
        for mine, theirs in zip(node.output, original.output):
            if mine:
                renamed[mine] = theirs
    if removed:
        del graph.node[:]
        graph.node.extend(kept_nodes)
    return removed


def _rename_captured(graph, renamed: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        for sub in subgraphs(node):
            _rename_captured(sub, renamed)
    for output in graph.output:
        if output.name in renamed:  # a branch returning an outer value by name
            graph.node.append(_identity(renamed[output.name], output.name))


def _identity(source: str, target: str):
    from onnx import helper

    return helper.make_node("Identity", [source], [target], name=f"{target}_cse")


def branch_cse(model_proto) -> int:
    """CSE in the main graph, then in every subgraph; returns the number of nodes removed."""
    removed = _cse_graph(model_proto.graph)

    def walk(graph) -> None:
        nonlocal removed
        for node in graph.node:
            for sub in subgraphs(node):
                removed += _cse_graph(sub)
                walk(sub)

    walk(model_proto.graph)
    if removed:
        logger.info("branch_cse: %d duplicate nodes removed", removed)
    return removed
