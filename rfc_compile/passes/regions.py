"""Find regions: transformer blocks and their cached regions in a captured graph.

Reads ``nn_module_stack`` metadata against the pattern table (patterns.py) and returns a
:class:`RegionPlan`: for each region its nodes, its inputs (feature inputs vs constant side
inputs), and its outputs (the values the block uses after it, before gate and residual).
Anything that does not fit raises :class:`UnsupportedModelError` instead of guessing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import torch
from torch import fx

from ..errors import UnsupportedModelError
from .patterns import BLOCK_PATTERNS, DEFAULT_VARYING_INPUTS, BlockPattern

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Region:
    """One cached region j: nodes computed on full steps, predicted on skipped ones."""

    name: str  # e.g. "transformer_blocks.3.attn1"
    block: str  # e.g. "transformer_blocks.3"
    nodes: list[fx.Node]  # in graph order
    feature_inputs: list[fx.Node]  # X_j: inputs that change across steps
    side_inputs: list[fx.Node]  # constant inputs (encoder states, rotary, masks, weights)
    outputs: list[fx.Node]  # Y_j: region values used outside the region

    @property
    def key(self) -> str:
        """Identifier safe for state names (ONNX inputs, Triton state entries)."""
        return self.name.replace(".", "_")


@dataclasses.dataclass
class RegionPlan:
    """Regions in call order, and the span of graph nodes that holds all of them."""

    regions: list[Region]
    block_classes: dict[str, str]  # block path -> class name
    span_start: int  # index (graph order) of the first region node
    span_end: int  # index of the last region node (inclusive)

    @property
    def watched(self) -> Region:
        """RCS watches the first region: nothing before it is predicted."""
        return self.regions[0]

    def summary(self) -> str:
        return ", ".join(f"{r.name}({len(r.nodes)} nodes)" for r in self.regions)


def _module_path_stack(node: fx.Node) -> list[tuple[str, str]]:
    """[(module path, class name), ...] outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        out.append((path, name.rsplit(".", 1)[-1]))
    return out


def _innermost_block(node: fx.Node) -> tuple[str, str] | None:
    for path, cls in reversed(_module_path_stack(node)):
        if cls in BLOCK_PATTERNS:
            return path, cls
    return None


def _tensor_valued(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


_aten = torch.ops.aten

#: Ops whose result depends on their first argument's shape only, never on its values. A graph
#: serves one shape per generation, so what they compute is the same at every step: a model
#: that reads ``hidden_states.shape[0]`` (symbolic with ``dynamic_batch``) to build its rotary
#: embeddings or to reshape the text states does not make those vary with the latents.
_SHAPE_ONLY = frozenset({
    _aten.sym_size.int, _aten.sym_numel.default, _aten.sym_stride.int, _aten.sym_storage_offset.default,
    _aten.ones_like.default, _aten.zeros_like.default, _aten.empty_like.default, _aten.full_like.default,
    _aten.new_ones.default, _aten.new_zeros.default, _aten.new_empty.default, _aten.new_full.default,
})


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes whose *values* ``node`` reads (a shape-only op's first argument left out)."""
    if node.target in _SHAPE_ONLY and node.args and isinstance(node.args[0], fx.Node):
        return [arg for arg in node.all_input_nodes if arg is not node.args[0]]
    return node.all_input_nodes


def _varying_nodes(graph: fx.Graph, varying_inputs: Iterable[str]) -> set[fx.Node]:
    """Nodes whose value depends on an input that changes across denoising steps (through its
    values, not its shape)."""
    names = set(varying_inputs)
    varying: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in names:
            varying.add(node)
        elif any(arg in varying for arg in _value_inputs(node)):
            varying.add(node)
    return varying


def describe_blocks(model: torch.nn.Module) -> str:
    """What a model holds, for error messages: classes found in its ModuleLists."""
    classes: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for child in module:
                classes[type(child).__name__] = classes.get(type(child).__name__, 0) + 1
    if not classes:
        return "no nn.ModuleList of blocks"
    return ", ".join(f"{n} x{c}" for n, c in classes.items())


def check_supported(model: torch.nn.Module) -> None:
    """Cheap check before capture: the model holds at least one known block class."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not any(type(m).__name__ in BLOCK_PATTERNS for m in model.modules()):
        raise UnsupportedModelError(
            f"{type(model).__name__}: no known transformer block found "
            f"(found: {describe_blocks(model)}; known blocks: {sorted(BLOCK_PATTERNS)})"
        )


def find_regions(gm: fx.GraphModule, varying_inputs: Iterable[str] = DEFAULT_VARYING_INPUTS) -> RegionPlan:
    """Group the captured graph's nodes into blocks and cached regions."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    varying = _varying_nodes(gm.graph, varying_inputs)

    # 1. members: nodes under block_path.<member submodule>, per (block, region pattern)
    block_classes: dict[str, str] = {}
    members: dict[tuple[str, str], list[fx.Node]] = {}
    patterns: dict[str, BlockPattern] = {}
    for node in nodes:
        found = _innermost_block(node)
        if found is None or _size_arithmetic(node):
            continue
        block_path, cls = found
        pattern = BLOCK_PATTERNS[cls]
        block_classes.setdefault(block_path, cls)
        patterns[block_path] = pattern
        paths = [p for p, _ in _module_path_stack(node)]
        for region in pattern.regions:
            if any(f"{block_path}.{m}" in paths for m in region.members):
                members.setdefault((block_path, region.name), []).append(node)
                break

    if not members:
        raise UnsupportedModelError(
            "no cached region found in the captured graph "
            f"(blocks seen: {sorted(set(block_classes.values())) or 'none'})"
        )

    regions: list[Region] = []
    constant: list[str] = []  # regions whose inputs do not change across steps
    for block_path, pattern in patterns.items():
        for rp in pattern.regions:
            region_members = members.get((block_path, rp.name))
            if not region_members:
                if rp.optional:
                    continue
                raise UnsupportedModelError(
                    f"{block_path} ({pattern.block_class}): region {rp.name!r} "
                    f"(submodules {rp.members}) not found in the graph"
                )
            region = _build_region(f"{block_path}.{rp.name}", block_path, region_members, nodes, position, varying)
            if region.feature_inputs:
                regions.append(region)
            else:
                constant.append(region.name)
    if constant:
        # e.g. Z-Image's context refiner, which runs on the caption alone: its output is the same
        # at every step, and runs on every step like the block's other uncached ops
        logger.info("not cached, no input depends on the denoising state: %s", ", ".join(constant))
    if not regions:
        raise UnsupportedModelError(
            f"no input of any cached region ({', '.join(constant)}) depends on the denoising state: the "
            f"model's inputs named {sorted(set(varying_inputs))} (those that change between steps) were not "
            f"found or are not used")
    regions.sort(key=lambda r: position[r.nodes[0]])
    _check_disjoint_ranges(regions, position)

    plan = RegionPlan(
        regions=regions,
        block_classes=block_classes,
        span_start=position[regions[0].nodes[0]],
        span_end=max(position[r.nodes[-1]] for r in regions),
    )
    logger.info("found %d regions in %d blocks: %s", len(regions), len(block_classes), plan.summary())
    return plan


def _build_region(name: str, block: str, region_members: list[fx.Node], nodes: list[fx.Node],
                  position: dict[fx.Node, int], varying: set[fx.Node]) -> Region:
    first, last = position[region_members[0]], position[region_members[-1]]
    member_set = set(region_members)
    # Nodes sandwiched between members on the data path belong to the region as well.
    downstream: set[fx.Node] = set(member_set)
    for node in nodes[first:last + 1]:
        if any(a in downstream for a in node.all_input_nodes):
            downstream.add(node)
    upstream: set[fx.Node] = set(member_set)
    for node in reversed(nodes[first:last + 1]):
        if any(u in upstream for u in node.users):
            upstream.add(node)
    body_set = {n for n in nodes[first:last + 1] if n in member_set or (n in downstream and n in upstream)}
    # A value computed after the region starts that only the region uses (e.g. HunyuanVideo's
    # single block slices the modulated input between proj_mlp and attn) joins the region.
    inputs = _region_inputs(nodes[first:last + 1], body_set)
    while pulled := [a for a in inputs if position[a] > first and all(u in body_set for u in a.users)]:
        body_set.update(pulled)
        inputs = _region_inputs(nodes[first:last + 1], body_set)
    body = [n for n in nodes[first:last + 1] if n in body_set]
    late = [a.name for a in inputs if position[a] > first and not _size_arithmetic(a)]
    if late:
        raise UnsupportedModelError(
            f"region {name}: inputs {late} are computed after the region starts; cannot cache it as one unit"
        )
    outputs = [n for n in body if any(u not in body_set for u in n.users)]
    bad = [n.name for n in outputs if not _tensor_valued(n)]
    if bad or not outputs:
        raise UnsupportedModelError(f"region {name}: outputs {bad or 'none'} are not tensors")
    feature_inputs = [a for a in inputs if a in varying and _tensor_valued(a)]
    side_inputs = [a for a in inputs if a not in feature_inputs]
    return Region(name, block, body, feature_inputs, side_inputs, outputs)


def _size_arithmetic(node: fx.Node) -> bool:
    """A symbolic size (e.g. FLUX's image + text token count under a dynamic shape) computed in a
    block's module scope from sizes read outside it: not part of any region (each branch of the
    rewritten step recomputes it)."""
    return (node.op == "call_function" and isinstance(node.meta.get("val"), torch.SymInt)
            and not any(_tensor_valued(a) for a in node.all_input_nodes))


def _region_inputs(candidates: list[fx.Node], body_set: set[fx.Node]) -> list[fx.Node]:
    inputs: list[fx.Node] = []
    for node in candidates:
        if node in body_set:
            for arg in node.all_input_nodes:
                if arg not in body_set and arg not in inputs:
                    inputs.append(arg)
    return inputs


def _check_disjoint_ranges(regions: list[Region], position: dict[fx.Node, int]) -> None:
    for prev, cur in zip(regions, regions[1:]):
        if position[cur.nodes[0]] <= position[prev.nodes[-1]]:
            raise UnsupportedModelError(f"regions {prev.name} and {cur.name} interleave in the graph")
