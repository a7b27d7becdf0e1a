"""``bool_where_as_logic``: a ``Where`` that selects between bool tensors becomes And/Or/Not.

``aten.masked_fill`` of a bool mask (HunyuanVideo builds its attention mask with
``mask.masked_fill(indices, False)``) exports as ``Where(cond, x, y)`` with bool ``x``/``y``;
onnxruntime's CPU provider has no bool ``Where`` kernel, so the graph fails to load ("Could not
find an implementation for Where(16)"). For bools ``Where(c, x, y) == Or(And(c, x), And(Not(c), y))``,
the same function with the same multidirectional broadcasting, so the rewrite is unconditional,
in the main graph and inside the ``If`` branches.
"""

from __future__ import annotations

import logging

from .proto import operand_types, replace_nodes

logger = logging.getLogger(__name__)

PREFIX = "rfc_bool_where/"


def bool_where_as_logic(model_proto) -> int:
    """Rewrite every ``Where`` over bool values in ``model_proto`` (subgraphs included); returns how many.

    Types come from the exporter's value_info; where it has none, from onnx's shape inference."""
    import onnx

    types = operand_types(model_proto, "Where", slice(1, None))  # the selected values' types

    def replacement(node) -> list:
        tag = f"{PREFIX}{node.name or node.output[0]}"
        cond, x, y = node.input
        make = onnx.helper.make_node
        return [
            make("And", [cond, x], [tag + "/when_true"], name=tag + "/when_true"),
            make("Not", [cond], [tag + "/not_cond"], name=tag + "/not_cond"),
            make("And", [tag + "/not_cond", y], [tag + "/when_false"], name=tag + "/when_false"),
            make("Or", [tag + "/when_true", tag + "/when_false"], list(node.output), name=tag + "/or"),
        ]

    changed = replace_nodes(model_proto, lambda n: _is_bool_where(n, types), replacement)
    if changed:
        logger.info("bool_where_as_logic: %d bool Where -> Or(And(c, x), And(Not(c), y))", changed)
    return changed


def _is_bool_where(node, types: dict[str, int]) -> bool:
    from onnx import TensorProto

    return (node.op_type == "Where" and node.domain in ("", "ai.onnx") and len(node.input) == 3
            and types.get(node.input[1]) == TensorProto.BOOL and types.get(node.input[2]) == TensorProto.BOOL)
