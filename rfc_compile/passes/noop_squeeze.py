"""Drop ``squeeze(dim)`` calls that squeeze nothing.

PyTorch's ``x.squeeze(d)`` is a no-op when ``x.shape[d] != 1``; the ONNX exporter lowers it to
``Squeeze(x, axes=[d])`` regardless, which onnxruntime refuses at run time for a size that is not 1
("Squeeze ... Dimension of input 1 must be 1"). PixArt squeezes its output tokens this way
(``hidden_states.squeeze(1)``). At a fixed size the ONNX fix-up (export/onnx.py ``fix_squeeze``)
sees the size; at a dynamic one (a resolution given as a grid of patches) the tokens are a symbol
there. The trace already decided: a squeeze whose output keeps its input's rank did nothing, for
every size the exported graph serves, so the node is replaced by its input.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_SQUEEZES = (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims)


def drop_noop_squeezes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace each ``aten.squeeze`` whose traced output has its input's rank by the input."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SQUEEZES:
            continue
        source, value = node.args[0].meta.get("val"), node.meta.get("val")
        if not isinstance(source, torch.Tensor) or not isinstance(value, torch.Tensor) or value.dim() != source.dim():
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        dropped += 1
    if dropped:
        gm.graph.lint()
        gm.recompile()
        logger.info("dropped %d squeeze(s) of a dim that is not 1", dropped)
    return gm
