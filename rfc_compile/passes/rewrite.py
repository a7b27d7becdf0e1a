"""Rewrite: the captured graph + region plan -> a functional cached step.

``(model kwargs, state) -> (model output, state')`` where the span of graph nodes that holds
every region sits behind ONE ``torch.cond(pred, recompute, predict, operands)`` per step:

* the prefix (embeddings, block 0's modulation up to the first region's input) runs as is;
* ``pred`` is a 0-d bool tensor: the RCS test on the first region's input, or the fixed
  schedule's step test (rfc.py);
* ``recompute`` runs the span and updates every region's ladder, ratio and last input;
* ``predict`` runs the span's cheap ops and replaces each region by its prediction;
* the suffix (final norm, projection, unpatchify) runs as is.

:class:`CachedStep` does this by interpreting the captured graph's nodes; ``rewrite()``
traces it once more with torch.export, so the result is a flat GraphModule holding a
single ``torch.ops.higher_order.cond`` (what the backends compile or export). CachedStep
calls that operator itself, with the span's weights as operands, rather than ``torch.cond``:
torch.cond traces its branches through dynamo, which gives every operand sizes of its own, so a
cache sized by a dynamic dim (a video's frame count, a latent grid) no longer matched the sizes
the branch computed; the operator traces them in the step's own shape environment.
"""

from __future__ import annotations

import logging
import operator
import time
from typing import Any

import sympy
import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

from .. import rfc
from ..config import RFCConfig
from ..errors import UnsupportedModelError
from ..state import StateEntry, StateSpec
from .capture import CapturedGraph, dim_spec, distinct_tensor_arguments, input_leaf, named_dim
from .regions import Region, RegionPlan

logger = logging.getLogger(__name__)

_COUNTERS = ("step", "last_full", "full_steps_seen")
_SCHEDULE = ("rcs_acc",)  # written every step outside the cond


def _meta(node: fx.Node) -> Tensor:
    val = node.meta.get("val")
    if not isinstance(val, Tensor):
        raise UnsupportedModelError(f"node {node.name} carries no tensor metadata")
    return val


def _dense(t: Tensor) -> bool:
    """Row-major strides exactly (cond rejects views such as adaLN chunks, even of size-1 dims)."""
    return tuple(t.stride()) == _row_major_strides([max(int(size), 1) for size in t.shape])


def _copied_operands(nodes: list[fx.Node]) -> set[fx.Node]:
    """Operands that enter the cond as contiguous copies: views that share storage with an
    earlier operand (adaLN chunks; torch.compile's cond rejects aliasing operands) and
    non-row-major ones (inductor may lay them out differently than the branch expects)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    seen, copied = set(), set()
    for node in nodes:
        storage = StorageWeakRef(_meta(node).untyped_storage())
        if storage in seen or not _dense(_meta(node)):
            copied.add(node)
        seen.add(storage)
    return copied


def _all_finite(tensors: tuple[Tensor, ...]) -> Tensor:
    """0-d bool: no NaN/Inf in any tensor (one float32 sum each; a NaN or Inf makes it non-finite)."""
    return torch.stack([t.sum(dtype=torch.float32) for t in tensors]).isfinite().all()


def _sizes(shape) -> tuple[int, ...]:
    """Concrete sizes: a symbolic size (a dynamic dim) is taken at its example value (StateSpec's
    shapes are the example's; a runner of a graph with dynamic dims sizes the state per call)."""
    return tuple(size if isinstance(size, int) else int(size.node.hint) for size in shape)


def _batch_size(plan: RegionPlan, samples: int | None = None) -> int:
    return samples if samples is not None else _sizes(_meta(plan.watched.feature_inputs[0]).shape)[0]


def _groups(node: fx.Node, batch: int, samples: int | None) -> int:
    """Rows per sample of a region tensor: 1, or, where the model folds another axis into its blocks'
    batch dim (``samples``, patterns.FOLDED_BATCH_INPUTS), its rows over the batch. A region whose rows
    are not the watched region's, in a model not known to fold them, is refused: its scalars (one per
    row) would not fit the others'."""
    rows = _sizes(_meta(node).shape)[0] if _meta(node).dim() else 1
    if samples is None:
        if rows != batch:
            raise UnsupportedModelError(
                f"region tensor {node.name} has {rows} rows where the first region's input has {batch}: the model "
                "folds another axis (frames, tokens) into its blocks' batch dim, and its batch is not known here, so "
                "a sample's norms cannot be told from a row's. patterns.FOLDED_BATCH_INPUTS names the input holding "
                "it per model class, for rfc_compile.optimize and the exporters (the rfc torch.compile backend does "
                "not see the model's class)")
        return 1
    if rows % samples:
        raise UnsupportedModelError(f"region tensor {node.name} has {rows} rows, not a multiple of the batch {samples}")
    return rows // samples


def _row_groups(plan: RegionPlan, samples: int | None) -> dict[fx.Node, int]:
    """Rows per sample (``_groups``) of every region tensor, feature inputs and outputs: the one rule
    that sizes the state (build_state_spec) and reshapes the tensors in the branches (CachedStep)."""
    batch = _batch_size(plan, samples)
    return {n: _groups(n, batch, samples) for r in plan.regions for n in (*r.feature_inputs, *r.outputs)}


def _grouped_shape(node: fx.Node, groups: int, traced: bool = False) -> tuple:
    """A region tensor's shape with its rows grouped by sample: (B, rows per sample, ...) (as it is if 1);
    ``traced``: its sizes as the capture traced them (``_traced_sizes``)."""
    rows, *rest = _traced_sizes(_meta(node).shape) if traced else _sizes(_meta(node).shape)
    return (rows // groups, groups, *rest) if groups > 1 else (rows, *rest)


def _traced_sizes(shape) -> tuple[sympy.Expr, ...]:
    """Sizes as sympy expressions in the capture's dynamic-dim symbols (numbers where static)."""
    return tuple(size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size) for size in shape)


def _group(x: Tensor, groups: int) -> Tensor:
    """(B x g, ...) -> (B, g, ...): one sample per row of dim 0, so per-sample norms are the sample's."""
    return x.unflatten(0, (-1, groups)) if groups > 1 else x


def _ungroup(x: Tensor, groups: int) -> Tensor:
    return x.flatten(0, 1) if groups > 1 else x


def _unfold_powers(shape: tuple[int, ...], traced: tuple) -> dict[str, Any]:
    """A state tensor's stored layout: each size traced as a power of one dynamic dim (``grid**2``: DiT's
    tokens, as its latents are square) as that many axes of the dim, which torch.export takes as
    named dims where it takes no power (StateEntry.folded); other sizes as they are."""
    stored, stored_traced, folded = [], [], []
    for size, expr in zip(shape, traced or [None] * len(shape)):
        base, power = expr.as_base_exp() if isinstance(expr, sympy.Pow) else (None, 1)
        if isinstance(base, sympy.Symbol) and isinstance(power, sympy.Integer) and power > 1:
            side = round(size ** (1 / int(power)))
            if side ** int(power) == size:
                folded.append((len(stored), int(power)))
                stored += [side] * int(power)
                stored_traced += [base] * int(power)
                continue
        stored.append(size)
        stored_traced.append(expr)
    return dict(shape=tuple(stored), traced=tuple(stored_traced) if traced else (), folded=tuple(folded))


def _fold(x: Tensor, folded: tuple[tuple[int, int], ...]) -> Tensor:
    """A stored state tensor as the step reads it (StateEntry.folded axes flattened into one), a copy:
    the flattened view's symbolic strides (``Min(16, 16*grid)``) made torch.cond's merge of the two
    branches' outputs fail (an ONNX graph has no strides: no copy there)."""
    for axis, count in reversed(folded):
        x = x.flatten(axis, axis + count - 1).clone(memory_format=torch.contiguous_format)
    return x


def _unfold(x: Tensor, like: Tensor, folded: tuple[tuple[int, int], ...]) -> Tensor:
    """The inverse of :func:`_fold`: ``x`` in the stored layout of ``like``."""
    for axis, count in folded:
        x = x.unflatten(axis, like.shape[axis : axis + count])
    return x


def _ladder_shape(shape: tuple[int, ...], order: int) -> tuple[int, ...]:
    """(B, m+1, *features): batch first, see rfc.py."""
    batch, *features = shape
    return (batch, order + 1, *features)


def _is_symbolic(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _pull_symbolic(span: list[fx.Node], before: set[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    """Sizes the span reads from before it (``sym_size`` of a dynamic dim, and arithmetic on
    it) are not tensors and cannot be cond operands: the span recomputes them itself, from the
    tensors they are read off (which become operands instead)."""
    pulled: set[fx.Node] = set()
    stack = [arg for node in span for arg in node.all_input_nodes if arg in before and _is_symbolic(arg)]
    while stack:
        node = stack.pop()
        if node not in pulled:
            pulled.add(node)
            stack += [arg for arg in node.all_input_nodes if _is_symbolic(arg)]
    return sorted(pulled, key=order.__getitem__)


#: ops that only view their input (no arithmetic): free to run before the cond. The names as
#: torch.export's aten graphs, dynamo's graphs (the rfc backend: torch functions, tensor methods)
#: and Python (getitem on tuples and tensors) spell them.
_VIEW_NAMES = ("unsqueeze", "squeeze", "view", "reshape", "permute", "expand", "transpose", "chunk", "split",
               "narrow", "select", "unbind")
_aten = torch.ops.aten
_VIEW_OPS = {operator.getitem} | {getattr(torch, name) for name in _VIEW_NAMES if hasattr(torch, name)} | {
    _aten.unsqueeze.default, _aten.squeeze.default, _aten.squeeze.dim, _aten.view.default, _aten.reshape.default,
    _aten.permute.default, _aten.expand.default, _aten.transpose.int, _aten.t.default, _aten.alias.default,
    _aten.chunk.default, _aten.split.Tensor, _aten.split_with_sizes.default, _aten.narrow.default,
    _aten.select.int, _aten.slice.Tensor, _aten.unbind.int}


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_NAMES
    return node.op == "call_function" and node.target in _VIEW_OPS


def _hoist_views(span: list[fx.Node], before: set[fx.Node], regions: list[Region]) -> list[fx.Node]:
    """Span nodes outside every region that only view values from before the span (the chunks of
    the first block's adaLN modulation; not views of weights, which the branches read directly at
    their static sizes): computed before the cond, so they enter it as operands and never leave
    it. Left inside, a chunk of a pre-span operand that the step's remaining code reads
    (Qwen-Image's one-block gate) leaves the cond as a copy whose strides torch.cond cannot prove
    row-major (symbolic ``Max(1, size)``) and the rewrite failed."""
    in_region = {n for r in regions for n in r.nodes}
    hoisted: list[fx.Node] = []
    available = {n for n in before if n.op != "get_attr"}  # views of weights stay inside, at their static sizes
    for node in span:
        if _is_view(node) and node not in in_region and all(arg in available for arg in node.all_input_nodes):
            hoisted.append(node)
            available.add(node)
    return hoisted


def _region_state_groups(region: Region, config: RFCConfig) -> list[tuple[str, int]]:
    """A region's state tensors as ordered (kind, count) groups: the one place that says which
    exist for a config (the state names, the spec and the branch modules' arguments follow it)."""
    n_out, n_in = len(region.outputs), len(region.feature_inputs)
    groups = [("ladder", n_out)]
    if config.uses_rfe:
        groups += [("ratio", n_out), ("cos", n_out if config.rfe_shrink else 0),
                   ("gram", n_out if config.ladder_order else 0), ("x_last", n_in)]
    return groups


def build_state_spec(plan: RegionPlan | None, config: RFCConfig, samples: int | None = None) -> StateSpec:
    """The state tensors for this plan and config (see state.py for the naming scheme). ``samples``:
    the batch of a model that folds another axis into its blocks' (CapturedGraph.samples); each
    region tensor's state then has its rows grouped by sample, (B, rows per sample, ...)."""
    entries = [StateEntry(name, (), torch.int64) for name in _COUNTERS]
    if config.mode == "full" or plan is None:
        return StateSpec(entries)
    m = config.ladder_order
    batch = _batch_size(plan, samples)
    groups = _row_groups(plan, samples)

    def like(name: str, node: fx.Node, ladder: bool) -> StateEntry:
        """The state of a region tensor: a ladder of it, or it as it is; its sizes and traced sizes."""
        shape, traced = (_grouped_shape(node, groups[node], traced) for traced in (False, True))
        if ladder:
            shape, traced = _ladder_shape(shape, m), _ladder_shape(traced, m)
        return StateEntry(name, dtype=_meta(node).dtype, **_unfold_powers(shape, traced))

    def per_sample(name: str, *rest: int) -> StateEntry:
        return StateEntry(name, (batch, *rest), torch.float32, (batch_traced, *rest))

    watched = plan.watched.feature_inputs[0]
    batch_traced = _grouped_shape(watched, groups.get(watched, 1), traced=True)[0]
    if config.uses_rcs:
        entries.append(per_sample("rcs_acc"))
        for i, node in enumerate(plan.watched.feature_inputs):
            entries.append(like(f"rcs_ladder.{i}", node, ladder=True))
    for region in plan.regions:
        for kind, count in _region_state_groups(region, config):
            for i in range(count):
                name = f"{region.key}.{kind}.{i}"
                if kind == "ladder":
                    entries.append(like(name, region.outputs[i], ladder=True))
                elif kind == "x_last":
                    entries.append(like(name, region.feature_inputs[i], ladder=False))
                elif kind == "gram":
                    entries.append(per_sample(name, m, m))
                else:  # ratio, cos: one scalar per sample
                    entries.append(per_sample(name))
    return StateSpec(entries)


def _split(args: tuple[Tensor, ...], sizes: list[int]) -> list[tuple[Tensor, ...]]:
    """Cut a flat argument tuple into consecutive groups of the given sizes."""
    groups, start = [], 0
    for size in sizes:
        groups.append(tuple(args[start : start + size]))
        start += size
    return groups


class RegionPredict(torch.nn.Module):
    """Predicted outputs of one region on a skipped step (called from the predict branch).

    ``groups``: rows per sample of each feature input and output (all 1 unless the model folds
    another axis into its blocks' batch dim: the state holds them grouped by sample)."""

    def __init__(self, region: Region, config: RFCConfig, groups: tuple[tuple[int, ...], tuple[int, ...]] | None = None):
        super().__init__()
        self.n_inputs = len(region.feature_inputs)
        self.n_outputs = len(region.outputs)
        self.state_sizes = [count for _, count in _region_state_groups(region, config)]
        self.config = config
        self.in_groups, self.out_groups = groups or ((1,) * self.n_inputs, (1,) * self.n_outputs)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        # args: X, then the region's state groups (_region_state_groups), then k, seen
        cfg = self.config
        k, seen = args[-2], args[-1]
        if not cfg.uses_rfe:
            _, ladders = _split(args, [self.n_inputs] + self.state_sizes)
            return tuple(_ungroup(rfc.taylor_predict(ladder, k, seen), g) for ladder, g in zip(ladders, self.out_groups))
        xs, ladders, ratios, coss, grams, x_last = _split(args, [self.n_inputs] + self.state_sizes)
        xs = tuple(_group(x, g) for x, g in zip(xs, self.in_groups))
        grams = grams or (None,) * self.n_outputs
        if cfg.rfe_shrink:
            ratios = tuple(r * c for r, c in zip(ratios, coss))
        x_change = rfc.tuple_norm([a - b for a, b in zip(xs, x_last)])
        return tuple(_ungroup(rfc.rfe_predict(ladder, gram, ratio, x_change, k, seen, cfg.eps), g)
                     for ladder, gram, ratio, g in zip(ladders, grams, ratios, self.out_groups))


class RegionUpdate(torch.nn.Module):
    """New ladders (and, for RFE, ratios, Gram matrices, last inputs) of one region at a full step
    (``groups`` as RegionPredict's)."""

    def __init__(self, region: Region, config: RFCConfig, groups: tuple[tuple[int, ...], tuple[int, ...]] | None = None):
        super().__init__()
        self.n_inputs = len(region.feature_inputs)
        self.n_outputs = len(region.outputs)
        self.state_sizes = [count for _, count in _region_state_groups(region, config)]
        self.config = config
        self.in_groups, self.out_groups = groups or ((1,) * self.n_inputs, (1,) * self.n_outputs)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        # args: X, Y, then the region's state groups (_region_state_groups), then gap, seen, seen_after
        cfg = self.config
        gap, seen, seen_after = args[-3:]
        sizes = [self.n_inputs, self.n_outputs] + self.state_sizes
        groups = list(self.in_groups) + list(self.out_groups)
        args = tuple(_group(a, g) for a, g in zip(args, groups)) + args[len(groups):]
        if not cfg.uses_rfe:
            _, ys, ladders = _split(args, sizes)
            return _row_major(rfc.update_ladder(ladder, y, gap, seen_after) for ladder, y in zip(ladders, ys))
        xs, ys, ladders, ratios, _, _, x_last = _split(args, sizes)
        new_rows = [rfc.ladder_rows(ladder, y, gap, seen_after) for ladder, y in zip(ladders, ys)]
        new_ladders = tuple(torch.stack(rows, dim=1) for rows in new_rows)
        new_grams = tuple(rfc.taylor_gram(rows[1:]) for rows in new_rows) if cfg.ladder_order else ()
        if new_grams:
            y_change = [rfc.output_change_norm(gram, gap) for gram in new_grams]
        else:  # order 0 keeps no D1
            y_change = [rfc.sample_norm(y.float() - ladder[:, 0].float()) for y, ladder in zip(ys, ladders)]
        x_change = rfc.tuple_norm([a - b for a, b in zip(xs, x_last)])
        new_ratios = tuple(
            torch.where(seen > 0, rfc.relational_ratio(dy, x_change, cfg.eps), torch.zeros_like(ratio))
            for dy, ratio in zip(y_change, ratios)
        )
        new_cos: tuple[Tensor, ...] = ()
        if cfg.rfe_shrink:  # how well the old ladder's direction matched what happened over the gap
            new_cos = tuple(rfc.direction_agreement(rfc.taylor_term(ladder, gap, seen), y.float() - ladder[:, 0].float(),
                                                    cfg.eps)
                            for y, ladder in zip(ys, ladders))
        return _row_major(new_ladders + new_ratios + new_cos + new_grams + tuple(x.clone() for x in xs))


class WatchUpdate(torch.nn.Module):
    """RCS: new Taylor ladder of the watched (first region's) input at a full step (``groups``: rows
    per sample of each input, as RegionPredict's)."""

    def __init__(self, groups: tuple[int, ...] | None = None):
        super().__init__()
        self.groups = groups

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        n = (len(args) - 3) // 2
        xs, ladders = args[:n], args[n : 2 * n]
        xs = tuple(_group(x, g) for x, g in zip(xs, self.groups or (1,) * n))
        gap, _, seen_after = args[-3:]
        return _row_major(rfc.update_ladder(ladder, x, gap, seen_after) for ladder, x in zip(ladders, xs))


def _row_major(tensors) -> tuple[Tensor, ...]:
    """The cache as the skip branch passes it on: row-major, size-1 dims included. A region whose
    input or output is laid out otherwise (Sana's feed-forward runs on a permuted, channels-last
    view) would leave the two branches with different strides, which torch.cond rejects. Copied
    only where the layout is not row-major already."""
    return tuple(t if tuple(t.stride()) == _row_major_strides(t.shape) else t.clone(memory_format=torch.contiguous_format)
                 for t in tensors)


def _row_major_strides(shape) -> tuple:
    """The strides of a row-major tensor of ``shape``. Plain Python: torch.cond traces it (in
    :func:`_row_major`, with symbolic sizes), and dynamo skips torch._prims_common's version."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step = step * size
    return tuple(reversed(strides))


def _region_state_names(region: Region, config: RFCConfig) -> list[str]:
    return [f"{region.key}.{kind}.{i}" for kind, count in _region_state_groups(region, config) for i in range(count)]


class _BranchBuilder:
    """Builds the two cond branches as GraphModules by copying the span's nodes.

    Both take the same flat operands: (span input tensors..., region state..., k, seen,
    seen_after, the weights and buffers the span reads...) and return (span outputs..., region
    state'...).
    """

    def __init__(self, gm: fx.GraphModule, span: list[fx.Node], span_inputs: list[fx.Node],
                 span_outputs: list[fx.Node], plan: RegionPlan, config: RFCConfig, state_names: list[str],
                 groups: dict[fx.Node, int] | None = None):
        self.gm, self.span, self.span_inputs, self.span_outputs = gm, span, span_inputs, span_outputs
        self.plan, self.config, self.state_names = plan, config, state_names
        self.groups = groups or {}  # rows per sample of each region tensor (absent: 1)
        self.operand_inputs = [n for n in span_inputs if n.op != "get_attr"]
        #: the tensors the span reads as attributes (weights, buffers): operands after the counters
        self.weights = list(dict.fromkeys(
            n.target for n in span_inputs + span
            if n.op == "get_attr" and isinstance(operator.attrgetter(n.target)(gm), Tensor)))

    def _region_groups(self, region: Region) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (tuple(self.groups.get(n, 1) for n in region.feature_inputs),
                tuple(self.groups.get(n, 1) for n in region.outputs))

    def _root(self) -> torch.nn.Module:
        """A module holding the span's weights (and the subgraphs of higher-order ops inside it,
        e.g. Z-Image's ``autocast(enabled=False)`` rotary code) under their captured names."""
        root = torch.nn.Module()
        for node in self.span_inputs + self.span:
            if node.op == "get_attr" and node.target not in self.weights:
                *path, leaf = node.target.split(".")
                owner, src = root, self.gm
                for part in path:
                    src = getattr(src, part)
                    if not hasattr(owner, part):
                        owner.add_module(part, torch.nn.Module())
                    owner = getattr(owner, part)
                value = getattr(src, leaf)
                if hasattr(owner, leaf):
                    continue
                if isinstance(value, torch.nn.Parameter):
                    owner.register_parameter(leaf, value)
                elif isinstance(value, torch.nn.Module):
                    owner.add_module(leaf, value)
                else:
                    owner.register_buffer(leaf, value)
        return root

    def _start(self) -> tuple[fx.Graph, dict[fx.Node, fx.Node], dict[str, fx.Node], tuple[fx.Node, ...]]:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in self.operand_inputs:
            env[node] = graph.placeholder(f"in_{node.name}")
            env[node].meta = dict(node.meta)
        state = {name: graph.placeholder("st_" + name.replace(".", "_")) for name in self.state_names}
        counters = tuple(graph.placeholder(n) for n in ("since_full", "seen", "seen_after"))
        weights = {target: graph.placeholder("w_" + target.replace(".", "_")) for target in self.weights}
        for node in self.span_inputs + self.span:
            if node.op == "get_attr":  # a weight is an operand; a submodule (a higher-order op's graph) is read
                env[node] = weights[node.target] if node.target in weights else graph.get_attr(node.target)
        return graph, env, state, counters

    def _outputs(self, graph: fx.Graph, env: dict[fx.Node, fx.Node]) -> tuple[fx.Node, ...]:
        """Span outputs; non-dense views (e.g. chunks of adaLN) leave the cond as copies."""
        outs = []
        for node in self.span_outputs:
            value = env[node]
            if not _dense(_meta(node)):
                value = graph.call_function(torch.ops.aten.clone.default, (value,),
                                            {"memory_format": torch.contiguous_format})
            outs.append(value)
        return tuple(outs)

    def _call(self, graph: fx.Graph, root: torch.nn.Module, name: str, module: torch.nn.Module,
              args: list[fx.Node], n_out: int) -> list[fx.Node]:
        root.add_module(name, module)  # shown in the branch's modules; called as a function: torch's module-stack
        # tracer lost track of it inside the cond's branch trace when the span also held a higher-order op (Z-Image)
        call = graph.call_function(module.forward, tuple(args))
        return [graph.call_function(operator.getitem, (call, i)) for i in range(n_out)]

    def recompute(self) -> fx.GraphModule:
        graph, env, state, (k, seen, seen_after) = self._start()
        root = self._root()
        for node in self.span:
            if node not in env:  # read attributes are in env already (_start)
                env[node] = graph.node_copy(node, lambda n: env[n])
        new_state: dict[str, fx.Node] = {}
        if self.config.uses_rcs:
            watched = self.plan.watched.feature_inputs
            names = [f"rcs_ladder.{i}" for i in range(len(watched))]
            outs = self._call(graph, root, "watch_update",
                              WatchUpdate(tuple(self.groups.get(n, 1) for n in watched)),
                              [env[n] for n in watched] + [state[n] for n in names] + [k, seen, seen_after],
                              len(names))
            new_state.update(zip(names, outs))
        for j, region in enumerate(self.plan.regions):
            names = _region_state_names(region, self.config)
            args = ([env[n] for n in region.feature_inputs] + [env[n] for n in region.outputs]
                    + [state[n] for n in names] + [k, seen, seen_after])
            outs = self._call(graph, root, f"update_{j}", RegionUpdate(region, self.config, self._region_groups(region)),
                              args, len(names))
            new_state.update(zip(names, outs))
        written = tuple(new_state[n] for n in self.state_names)
        if self.config.guard_nonfinite:
            # checked where the cache is written (fused with the update by inductor), so a
            # skipped step pays nothing for the guard
            written += (graph.call_function(_all_finite, (written,)),)
        graph.output(self._outputs(graph, env) + written)
        return fx.GraphModule(root, graph, "recompute")

    def predict(self) -> fx.GraphModule:
        graph, env, state, (k, seen, _) = self._start()
        root = self._root()
        first = {r.nodes[0]: (j, r) for j, r in enumerate(self.plan.regions)}
        in_region = {n for r in self.plan.regions for n in r.nodes}
        for node in self.span:
            if node in first:
                j, region = first[node]
                names = _region_state_names(region, self.config)
                args = [env[n] for n in region.feature_inputs] + [state[n] for n in names] + [k, seen]
                outs = self._call(graph, root, f"predict_{j}",
                                  RegionPredict(region, self.config, self._region_groups(region)), args,
                                  len(region.outputs))
                env.update(zip(region.outputs, outs))
            elif node not in in_region and node not in env:
                env[node] = graph.node_copy(node, lambda n: env[n])
        kept = tuple(graph.call_function(torch.clone, (state[n],)) for n in self.state_names)
        if self.config.guard_nonfinite:  # an unchanged cache is as healthy as when it was written
            kept += (graph.call_function(torch.ones_like, (k,), {"dtype": torch.bool}),)
        graph.output(self._outputs(graph, env) + kept)
        return fx.GraphModule(root, graph, "predict")


class CachedStep(torch.nn.Module):
    """Runs the captured graph as one cached denoising step (see module docstring)."""

    def __init__(self, captured: CapturedGraph, plan: RegionPlan | None, config: RFCConfig):
        super().__init__()
        self.gm = captured.graph_module  # shares the model's parameters
        self.captured = captured
        self.plan = plan
        self.config = config
        self.samples = captured.samples
        self.state_spec = build_state_spec(plan, config, self.samples)
        self._nodes = [n for n in self.gm.graph.nodes if n.op != "output"]
        self._output = next(n for n in self.gm.graph.nodes if n.op == "output")
        if config.mode == "full" or plan is None:
            return
        nodes = self._nodes
        self._prefix = nodes[: plan.span_start]
        span = nodes[plan.span_start : plan.span_end + 1]
        self._suffix = nodes[plan.span_end + 1 :]
        hoisted = _hoist_views(span, set(self._prefix), plan.regions)
        if hoisted:
            logger.debug("rewrite: %d view nodes of pre-span values run before the cond", len(hoisted))
            self._prefix += hoisted
            moved = set(hoisted)
            span = [n for n in span if n not in moved]
        before = set(self._prefix)
        pulled = _pull_symbolic(span, before, {n: i for i, n in enumerate(nodes)})
        outputs_of = set(span)  # the pulled sizes stay computed before the cond too
        span = pulled + span
        span_set = set(span)
        self._span_inputs: list[fx.Node] = []
        for node in span:
            for arg in node.all_input_nodes:
                if arg in before and arg not in span_set and arg not in self._span_inputs:
                    self._span_inputs.append(arg)
        for node in self._span_inputs:
            if not isinstance(node.meta.get("val"), Tensor) and node.op != "get_attr":
                raise UnsupportedModelError(f"value {node.name} enters the cached span but is not a tensor")
        self._span_outputs = [n for n in span if n in outputs_of and any(u not in span_set for u in n.users)]
        for n in self._span_outputs:
            _meta(n)  # must be a tensor: it leaves the cond
        self._copied_inputs = _copied_operands([n for n in self._span_inputs if n.op != "get_attr"])
        self._region_state = [e.name for e in self.state_spec.entries
                              if e.name not in _COUNTERS and e.name not in _SCHEDULE]
        self._groups = _row_groups(plan, self.samples)
        builder = _BranchBuilder(self.gm, span, self._span_inputs, self._span_outputs, plan, config,
                                 self._region_state, self._groups)
        self._weights = builder.weights
        self.recompute_branch = builder.recompute()
        self.predict_branch = builder.predict()

    # --- graph interpretation (prefix and suffix run as they are) ---------------------

    def _run(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        if node.op == "get_attr":
            return operator.attrgetter(node.target)(self.gm)
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise RuntimeError(f"unexpected node op {node.op}")

    def _bind_inputs(self, kwargs: dict[str, Any]) -> dict[fx.Node, Any]:
        flat = self.captured.flatten_inputs(kwargs)
        placeholders = [n for n in self._nodes if n.op == "placeholder"]
        return dict(zip(placeholders, flat))

    def _finish(self, env: dict[fx.Node, Any]) -> Any:
        flat = fx.node.map_arg(self._output.args[0], lambda n: env[n])
        return pytree.tree_unflatten(list(flat), self.captured.out_spec)

    # --- the step ----------------------------------------------------------------------

    def forward(self, kwargs: dict[str, Any], state: dict[str, Tensor],
                dims: dict[str, Tensor] | None = None) -> tuple[Any, dict[str, Tensor]]:
        """``dims``: where the graph is traced with inputs sized ``scale * dim + offset``
        (CapturedGraph.derived_dims), one tensor per such dim whose length is the dim (any values).
        torch.export traces such an input's size as a symbol of its own and only relates it to the
        dim at the end; sized by the dim here, the model's ``height // patch`` is the dim itself, and
        every size that follows it is a product of dims, which torch.cond merges (with the input's own
        symbol it is ``Max(1, (h//2)*(w//2))`` in a stride, which torch 2.13's cond rejects)."""
        for derived in self.captured.derived_dims if dims is not None else ():
            torch._check(input_leaf(kwargs, derived.input).size(derived.index)
                         == derived.scale * dims[derived.root].size(0) + derived.offset)
        folded = {e.name: e.folded for e in self.state_spec.entries if e.folded}
        for entry in self.state_spec.entries if dims is not None else ():  # as the inputs' sizes above
            for axis, count in entry.folded:
                for index in range(axis, axis + count):
                    root = self.captured.dim_symbols[entry.traced[index]].__name__
                    torch._check(state[entry.name].size(index) == dims[root].size(0))
        stored, state = state, {n: _fold(x, folded[n]) if n in folded else x for n, x in state.items()}
        step, last_full, seen = (state[n] for n in _COUNTERS)
        env = self._bind_inputs(kwargs)
        if self.config.mode == "full" or self.plan is None:
            for node in self._nodes:
                if node.op != "placeholder":
                    env[node] = self._run(node, env)
            return self._finish(env), {"step": step + 1, "last_full": step.clone(), "full_steps_seen": seen + 1}

        cfg = self.config
        for node in self._prefix:
            if node.op != "placeholder":
                env[node] = self._run(node, env)

        since_full = step - last_full
        new_state: dict[str, Tensor] = {}
        if cfg.uses_rcs:
            x0 = [_group(env[n], self._groups.get(n, 1)) for n in self.plan.watched.feature_inputs]
            x_hat = [rfc.taylor_predict(state[f"rcs_ladder.{i}"], since_full, seen) for i in range(len(x0))]
            acc = rfc.rcs_accumulate(state["rcs_acc"], rfc.rcs_error(x0, x_hat, cfg.eps))
            pred = rfc.forced_full(step, seen, since_full, cfg.warmup_steps, cfg.max_interval)
            pred = pred | rfc.rcs_wants_full(acc, cfg.threshold)
            if cfg.guard_nonfinite:  # a NaN input makes acc NaN, and NaN > tau is False: never skip on it
                pred = pred | ~acc.isfinite().all()
            new_state["rcs_acc"] = torch.where(pred, torch.zeros_like(acc), acc)
        else:
            pred = rfc.fixed_interval_full(step, seen, since_full, cfg.warmup_steps, cfg.interval)
            if cfg.max_interval is not None:
                pred = pred | (since_full > cfg.max_interval)
        if cfg.final_full_steps:
            pred = pred | rfc.final_full(step, cfg.num_steps, cfg.final_full_steps)
        operands = (
            tuple(env[n].clone(memory_format=torch.contiguous_format) if n in self._copied_inputs else env[n]
                  for n in self._span_inputs if n.op != "get_attr")
            + tuple(state[n] for n in self._region_state)
            + (since_full, seen, seen + 1)
            + tuple(operator.attrgetter(target)(self.gm) for target in self._weights)
        )
        results = torch.ops.higher_order.cond(pred, self.recompute_branch, self.predict_branch, operands)
        n_out, n_state = len(self._span_outputs), len(self._region_state)
        env.update(zip(self._span_outputs, results[:n_out]))
        new_state.update(zip(self._region_state, results[n_out : n_out + n_state]))
        for node in self._suffix:
            env[node] = self._run(node, env)
        new_state["step"] = step + 1
        new_state["last_full"] = torch.where(pred, step, last_full)
        seen_after = seen + pred.to(seen.dtype)
        if cfg.guard_nonfinite:
            # A full step that wrote NaN/Inf into the cache (e.g. fp16 overflow) sets the count
            # of full steps seen to 0: the next step is forced full and restarts every ladder.
            seen_after = torch.where(results[-1], seen_after, torch.zeros_like(seen_after))
        new_state["full_steps_seen"] = seen_after
        return self._finish(env), {name: _unfold(new_state[name], stored[name], folded[name]) if name in folded
                                   else new_state[name] for name in self.state_spec.names()}


def dim_carriers(sizes: dict[str, int], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """CachedStep's ``dims``: a tensor of each named dim's length (its values are never read)."""
    return {root: torch.zeros(size, device=device) for root, size in sizes.items()}


def state_dynamic_shape(entry: StateEntry, captured: CapturedGraph) -> dict[int, Any] | None:
    """torch.export ``dynamic_shapes`` entry of a state tensor in a graph with dynamic input dims: each
    size as the capture traced it (capture.dim_spec: a named dim, a derived one, or Dim.AUTO)."""
    if not entry.traced:  # the counters
        return None
    spec = {i: dim_spec(size, captured.dim_symbols) for i, size in enumerate(entry.traced)}
    return {i: d for i, d in spec.items() if d is not None} or None


def rewrite(captured: CapturedGraph, plan: RegionPlan | None, config: RFCConfig,
            example_kwargs: dict[str, Any]) -> tuple[fx.GraphModule, CachedStep]:
    """Trace :class:`CachedStep` into one flat GraphModule ``(kwargs, state) -> (out, state')``."""
    step = CachedStep(captured, plan, config)
    state = step.state_spec.init(_device_of(example_kwargs))
    dynamic_shapes = None
    if captured.dynamic_shapes is not None:  # the state's sizes follow the inputs' dynamic dims
        dynamic_shapes = {"kwargs": captured.dynamic_shapes,
                          "state": {e.name: state_dynamic_shape(e, captured) for e in step.state_spec.entries}}
    start = time.perf_counter()
    with torch.no_grad():
        # one tensor in two arguments stays two graph inputs here too (capture.distinct_tensor_arguments)
        call = {"kwargs": distinct_tensor_arguments(example_kwargs), "state": state}
        if captured.derived_dims:  # see CachedStep.forward
            call["dims"] = dim_carriers(captured.root_sizes, _device_of(example_kwargs))
            dynamic_shapes["dims"] = {root: {0: named_dim(root, captured.dim_ranges)} for root in captured.root_sizes}
        exported = torch.export.export(step, (), call, dynamic_shapes=dynamic_shapes, strict=False)
    gm = exported.module()
    conds = sum(1 for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond)
    logger.info("rewrote %d regions behind %d cond(s) in %.1fs; state %.1f MB",
                len(plan.regions) if plan else 0, conds, time.perf_counter() - start,
                step.state_spec.nbytes() / 2**20)
    return gm, step


def _device_of(kwargs: dict[str, Any]) -> torch.device:
    for leaf in pytree.tree_leaves(kwargs):
        if isinstance(leaf, Tensor):
            return leaf.device
    return torch.device("cpu")


