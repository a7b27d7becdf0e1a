"""``reduce_l2_as_sum_of_squares``: every ``ReduceL2`` becomes ``Sqrt(ReduceSum(Mul(x, x)))``.

RFC's own norms (rfc.py's ``sample_norm``) are written as ``sum(x * x)`` and export in that form
already; this pass catches the ``ReduceL2`` a model's own code may bring (e.g. ``F.normalize``).
Why it matters, measured: on onnxruntime's CUDA provider (onnxruntime-gpu 1.31.1, H200)
``ReduceL2`` of a (2, 98304) float tensor took 4.5 ms per call against 36-38 us for
``Sqrt(ReduceSumSquare)`` or ``Sqrt(ReduceSum(x * x))`` (benchmarks/ort_cuda_reduce_l2.py,
gpu_runs/reduce_l2_h200_2026-11-30.log); on its CPU provider (one thread) a squared distance
took 254 us as Sub + ``ReduceL2``, 271 us as Sub + ``ReduceSumSquare`` and 102 us as Sub + ``Mul`` +
``ReduceSum`` (benchmarks/ort_cpu_norms.py). The forms are the same
function (ONNX defines ReduceL2 as the square root of the sum of squares), so the rewrite is
unconditional, in the main graph and inside the ``If`` branches; ``keepdims`` and
``noop_with_empty_axes`` carry over, and the axes move from attribute to input where the opset
requires it.
"""

from __future__ import annotations

import logging

from .proto import replace_nodes

logger = logging.getLogger(__name__)

PREFIX = "rfc_reduce_l2/"


def _opset(model_proto) -> int:
    return next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def reduce_l2_as_sum_of_squares(model_proto) -> int:
    """Rewrite every ``ReduceL2`` node in ``model_proto`` (subgraphs included); returns how many."""
    import onnx

    opset = _opset(model_proto)

    def replacement(node) -> list:
        tag = f"{PREFIX}{node.name or node.output[0]}"
        x = node.input[0]
        inputs = [tag + "/square"] + list(node.input[1:])
        new = [onnx.helper.make_node("Mul", [x, x], [tag + "/square"], name=tag + "/square")]
        attrs = [a for a in node.attribute if a.name != "axes"]
        axes = next((a for a in node.attribute if a.name == "axes"), None)
        if axes is not None and opset >= 13:  # ReduceSum takes its axes as an input from opset 13
            new.append(onnx.helper.make_node("Constant", [], [tag + "/axes"], name=tag + "/axes",
                                             value=onnx.helper.make_tensor(tag + "/axes", onnx.TensorProto.INT64,
                                                                           [len(axes.ints)], list(axes.ints))))
            inputs = [tag + "/square", tag + "/axes"]
        elif axes is not None:
            attrs.append(axes)
        total = onnx.helper.make_node("ReduceSum", inputs, [tag + "/sum"], name=tag + "/sum")
        total.attribute.extend(attrs)
        return new + [total, onnx.helper.make_node("Sqrt", [tag + "/sum"], list(node.output), name=tag + "/sqrt")]

    changed = replace_nodes(model_proto, lambda n: n.op_type == "ReduceL2" and n.domain in ("", "ai.onnx"),
                            replacement)
    if changed:
        logger.info("reduce_l2_as_sum_of_squares: %d ReduceL2 -> Sqrt(ReduceSum(x * x))", changed)
    return changed
