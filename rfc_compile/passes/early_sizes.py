"""Read each symbolic size off the first tensor that has it.

torch.export emits one ``sym_size`` node per symbolic size, where the trace first asked for it,
and every later use of that size reads the same node. With a dynamic resolution, Hunyuan-DiT first
asks for its token count (``grid_height*grid_width``) inside the first block's attention (its patch
embedding never reads it), so every later block's reshapes read a size computed inside a cached
region: on a skipped step that region does not run, and region finding refuses a region whose
output is a size. The size is the same number on any tensor that has it, so each ``sym_size`` node
is made to read the first tensor in the graph with a dim of that size (here the patch embedding's
output, before every region).
"""

from __future__ import annotations

import logging

import sympy
import torch
from torch import fx

logger = logging.getLogger(__name__)


def _symbolic_dims(node: fx.Node) -> list[tuple[int, sympy.Expr]]:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return []
    return [(i, size.node.expr) for i, size in enumerate(value.shape)
            if isinstance(size, torch.SymInt) and not size.node.expr.is_number]


def read_sizes_early(gm: fx.GraphModule) -> fx.GraphModule:
    """Make every ``aten.sym_size.int`` read the earliest tensor that has its size (placed right after
    that tensor, or after the graph's inputs); the graph computes the same values."""
    nodes = list(gm.graph.nodes)
    last_input = max((n for n in nodes if n.op == "placeholder"), key=nodes.index, default=None)
    first: dict[sympy.Expr, tuple[fx.Node, int]] = {}
    moved = 0
    for node in nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.sym_size.int:
            value = node.meta.get("val")
            expr = value.node.expr if isinstance(value, torch.SymInt) else None
            source = first.get(expr)
            if source is not None and source != (node.args[0], node.args[1]):
                tensor, dim = source
                node.args = (tensor, dim)
                anchor = last_input if tensor.op == "placeholder" else tensor
                anchor.append(node)
                stack = tensor.meta.get("nn_module_stack")
                if stack is not None:  # it belongs where it now reads, not to the module that asked first
                    node.meta["nn_module_stack"] = dict(stack)
                else:
                    node.meta.pop("nn_module_stack", None)
                moved += 1
        for dim, expr in _symbolic_dims(node):
            first.setdefault(expr, (node, dim))
    if moved:
        gm.graph.lint()
        gm.recompile()
        logger.info("moved %d size read(s) to the first tensor of that size", moved)
    return gm
