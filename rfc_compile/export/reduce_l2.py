"""``reduce_l2_as_sum_square``: every ``ReduceL2`` becomes ``Sqrt(ReduceSumSquare)``.

The per-sample norms of RFC (rfc.py's ``sample_norm``: ``vector_norm(x.reshape(B, -1), dim=1)``)
export as ``ReduceL2(x, axes=[1])`` on a ``(B, tokens * D)`` tensor. onnxruntime's CUDA
execution provider runs that one through a slow path: on an H200 (onnxruntime-gpu 1.31.1),
``ReduceL2`` of a (2, 98304) float tensor took 4.5 ms per call against 36 us for
``Sqrt(ReduceSumSquare)`` of the same tensor (benchmarks/ort_cuda.py's diagnostics), and a
DiT-S RFE step, 48 norms, went from ~8.5 to ~225 ms. The two forms are the same function
(ONNX defines ReduceL2 as the square root of ReduceSumSquare), so the rewrite is unconditional;
on CPU both are single reductions. Attributes and the axes input carry over unchanged, in the
main graph and inside the ``If`` branches.
"""

from __future__ import annotations

import logging

from .proto import subgraphs

logger = logging.getLogger(__name__)

PREFIX = "rfc_reduce_l2/"


def reduce_l2_as_sum_square(model_proto) -> int:
    """Rewrite every ``ReduceL2`` node in ``model_proto`` (subgraphs included); returns how many."""
    import onnx

    changed = 0

    def walk(graph) -> None:
        nonlocal changed
        nodes = []
        for node in graph.node:
            for sub in subgraphs(node):
                walk(sub)
            if node.op_type != "ReduceL2" or node.domain not in ("", "ai.onnx"):
                nodes.append(node)
                continue
            squares = f"{PREFIX}{node.name or node.output[0]}/sum_square"
            sum_square = onnx.helper.make_node("ReduceSumSquare", list(node.input), [squares],
                                               name=squares)
            sum_square.attribute.extend(node.attribute)
            nodes += [sum_square, onnx.helper.make_node("Sqrt", [squares], list(node.output),
                                                        name=f"{PREFIX}{node.name or node.output[0]}/sqrt")]
            changed += 1
        if changed:
            del graph.node[:]
            graph.node.extend(nodes)

    walk(model_proto.graph)
    if changed:
        logger.info("reduce_l2_as_sum_square: %d ReduceL2 -> Sqrt(ReduceSumSquare)", changed)
    return changed
