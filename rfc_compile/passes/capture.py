"""Capture: the model's forward as one FX graph, via torch.export (non-strict).

The graph keeps ``nn_module_stack`` metadata on every node, which is how regions are
found; parameters stay shared with the original module (get_attr on the same tensors),
so weights changed in place after optimizing are seen by the cached model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CapturedGraph:
    """The exported forward: an FX graph over the flattened ``kwargs`` pytree."""

    graph_module: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    input_names: list[str]  # placeholder names, in flat order

    def flatten_inputs(self, kwargs: dict[str, Any]) -> list[Any]:
        flat, spec = pytree.tree_flatten(((), kwargs))
        if spec != self.in_spec:
            raise ValueError(f"inputs do not match the captured structure:\n{spec}\nvs\n{self.in_spec}")
        return flat


def capture(model: torch.nn.Module, kwargs: dict[str, Any]) -> CapturedGraph:
    """Export ``model(**kwargs)`` and return its graph with module-path metadata."""
    start = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(model, (), kwargs, strict=False)
    gm = exported.module()
    info = gm.graph._codegen.pytree_info
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    logger.info("captured %s: %d nodes in %.1fs", type(model).__name__, len(gm.graph.nodes),
                time.perf_counter() - start)
    return CapturedGraph(gm, info.in_spec, info.out_spec, names)
