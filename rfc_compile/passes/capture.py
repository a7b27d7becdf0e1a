"""Capture: the model's forward as one FX graph, via torch.export (non-strict).

The graph keeps ``nn_module_stack`` metadata on every node, which is how regions are
found; parameters stay shared with the original module (get_attr on the same tensors),
so weights changed in place after optimizing are seen by the cached model.

With ``dynamic_batch=True`` the batch size is a symbol (``BATCH``) instead of the example's
number: every tensor input whose first dim equals the first input's is marked dynamic there
(DiT's ``hidden_states``/``timestep``/``class_labels``; FLUX's ``img_ids``/``txt_ids`` have no
batch dim). The exporters use it for graphs that serve any batch size.
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

#: The symbolic batch size of a graph captured with ``dynamic_batch=True`` (shared by the
#: model inputs and the cache state of the rewritten step, so both get one symbol).
BATCH_MAX = 65536
BATCH = torch.export.Dim("batch", min=1, max=BATCH_MAX)


@dataclasses.dataclass
class CapturedGraph:
    """The exported forward: an FX graph over the flattened ``kwargs`` pytree."""

    graph_module: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    input_names: list[str]  # placeholder names, in flat order
    dynamic_shapes: dict[str, Any] | None = None  # torch.export's, for the kwargs (dynamic batch)

    def flatten_inputs(self, kwargs: dict[str, Any]) -> list[Any]:
        flat, spec = pytree.tree_flatten(((), kwargs))
        if spec != self.in_spec:
            raise ValueError(f"inputs do not match the captured structure:\n{spec}\nvs\n{self.in_spec}")
        return flat


def is_batched(leaf: Any, batch: int) -> bool:
    """A tensor with the batch as its first dim (``batch``: the first tensor input's first dim)."""
    return isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch


def example_batch(kwargs: dict[str, Any]) -> int:
    """The batch size of example inputs: the first tensor input's first dim."""
    tensors = [t for t in pytree.tree_leaves(kwargs) if isinstance(t, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        raise ValueError("dynamic_batch needs a first tensor input with a batch dimension")
    return int(tensors[0].shape[0])


def batch_dynamic_shapes(kwargs: dict[str, Any]) -> dict[str, Any]:
    """torch.export ``dynamic_shapes`` marking dim 0 as ``BATCH`` on every batched tensor input."""
    batch = example_batch(kwargs)
    return pytree.tree_map(lambda leaf: {0: BATCH} if is_batched(leaf, batch) else None, kwargs)


def capture(model: torch.nn.Module, kwargs: dict[str, Any], dynamic_batch: bool = False) -> CapturedGraph:
    """Export ``model(**kwargs)`` and return its graph with module-path metadata."""
    start = time.perf_counter()
    dynamic_shapes = batch_dynamic_shapes(kwargs) if dynamic_batch else None
    with torch.no_grad():
        exported = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    gm = exported.module()
    info = gm.graph._codegen.pytree_info
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    logger.info("captured %s: %d nodes in %.1fs", type(model).__name__, len(gm.graph.nodes),
                time.perf_counter() - start)
    return CapturedGraph(gm, info.in_spec, info.out_spec, names, dynamic_shapes)
