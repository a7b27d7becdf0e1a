"""``complex_as_real``: carry complex tensors as real pairs, for exporters with no complex type.

Qwen-Image and Z-Image (like Lumina and other Llama-style rotary models) rotate queries and keys
by multiplying them, as complex numbers, with complex64 tables (``torch.polar``,
``view_as_complex``). ONNX has no complex tensor type: torch.onnx converts a handful of complex
ops (with its own "real pair" form) but not ``unsqueeze``, ``index``, ``polar``, ``expand``, ...,
and TensorRT none. This pass rewrites the captured ATen graph (and its higher-order ops'
subgraphs: the ``cond`` branches, autocast regions) so that every complex tensor of shape ``S``
is carried as its ``view_as_real`` form, a real tensor of shape ``S + (2,)``:

- ``view_as_complex`` and ``view_as_real`` become no-ops (the same tensor);
- layout ops (slice, cat, split, unsqueeze, index, view, expand, ...) act on the leading dims as
  before; negative dims are re-based on the complex rank, and sizes get the trailing 2;
- ``mul`` of two complex tensors is ``(ac - bd, ad + bc)``, ``polar(r, t)`` is
  ``(r cos t, r sin t)``; complex constants are stored as their real pairs.

The results equal torch's complex kernels up to float rounding. An op on complex values the pass
does not know fails the export naming it, rather than deep in the ONNX exporter.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch import Tensor, fx

from .errors import ExportError

logger = logging.getLogger(__name__)

aten = torch.ops.aten

REAL_OF = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}

#: Ops whose real-pair form is the same call (they act on leading dims, or element by element on
#: both parts alike).
_SAME_CALL = {
    aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.index.Tensor, aten.pad_sequence.default, aten.neg.default,
    aten.repeat_interleave.self_int, operator.getitem,
}
#: Ops with dim arguments: {op: positions of the dim args}. The dim is re-based on the complex
#: rank so a negative one does not land on the trailing pair.
_DIM_ARGS = {
    aten.slice.Tensor: (1,), aten.select.int: (1,), aten.cat.default: (1,), aten.stack.default: (1,),
    aten.split_with_sizes.default: (2,), aten.split.Tensor: (2,), aten.unsqueeze.default: (1,),
    aten.squeeze.dim: (1,), aten.transpose.int: (1, 2), aten.unbind.int: (1,), aten.narrow.default: (1,),
    aten.chunk.default: (2,), aten.flatten.using_ints: (1, 2), aten.index_select.default: (1,),
}
#: Ops with a size argument (args[1]): the real pair's size is the size + (2,).
_SIZE_ARG = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
_TO_OPS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device}


def _value(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else None


def _complex(arg: Any) -> bool:
    value = _value(arg)
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, Tensor) and v.is_complex() for v in value)
    return isinstance(value, Tensor) and value.is_complex()


def _touches_complex(node: fx.Node) -> bool:
    return _complex(node) or any(_complex(a) for a in node.all_input_nodes)


def _rank(node: fx.Node) -> int:
    """The complex rank of the tensor ``node`` is about: its output's, or its first complex input's."""
    value = _value(node)
    if node.target in (aten.unsqueeze.default, aten.stack.default) and isinstance(value, Tensor):
        return value.dim()
    first = next(a for a in node.all_input_nodes if _complex(a))
    value = _value(first)
    if isinstance(value, (list, tuple)):
        value = value[0]
    return value.dim()


class _Lowering:
    """Rewrites one graph module; ``count`` nodes changed (subgraphs included)."""

    def __init__(self):
        self.count = 0
        self.done: set[int] = set()

    def run(self, gm: fx.GraphModule) -> None:
        if id(gm) in self.done:
            return
        self.done.add(id(gm))
        graph = gm.graph
        changed = False
        views = []  # view_as_complex / view_as_real: no-ops, removed last (their users read their meta)
        for node in list(graph.nodes):
            for arg in node.args:  # higher-order ops: their subgraphs first (cond, autocast, wrap)
                sub = operator.attrgetter(arg.target)(gm) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None
                if isinstance(sub, fx.GraphModule):
                    self.run(sub)
            if node.op in ("placeholder", "output") or not _touches_complex(node):
                continue
            if node.target in (aten.view_as_complex.default, aten.view_as_real.default):
                views.append(node)
                continue
            with graph.inserting_before(node):
                if self._lower(gm, node):
                    changed = True
                    self.count += 1
        for node in views:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed = True
            self.count += 1
        if changed:
            graph.eliminate_dead_code()
            graph.lint()
            gm.recompile()

    def _lower(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        graph = gm.graph
        target = node.target
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(gm)
            if isinstance(value, fx.GraphModule):
                return False
            name = "_real_" + node.target.replace(".", "_")
            if not hasattr(gm, name):
                gm.register_buffer(name, torch.view_as_real(value).clone())
            node.target = name
            return True
        if node.op != "call_function":
            raise ExportError(f"complex-valued {node.op} {node.target} is not carried as real pairs (complex_as_real.py)")
        if target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
            return True
        if target in _SAME_CALL or _is_higher_order(target):
            return False  # the same call on the real pairs
        if target in (aten.add.Tensor, aten.sub.Tensor) and all(_complex(a) for a in node.args[:2]):
            return False  # complex + complex: part by part
        if target in _DIM_ARGS:
            rank = _rank(node)
            args = list(node.args)
            kwargs = dict(node.kwargs)
            for position in _DIM_ARGS[target]:
                if position < len(args):
                    args[position] = args[position] % rank
                elif "dim" in kwargs and position == _DIM_ARGS[target][0]:
                    kwargs["dim"] = kwargs["dim"] % rank
            node.args, node.kwargs = tuple(args), kwargs
            return True
        if target in _SIZE_ARG:
            node.args = (node.args[0], [*node.args[1], 2], *node.args[2:])
            return True
        if target is aten.permute.default:
            dims = [d % _rank(node) for d in node.args[1]]
            node.args = (node.args[0], [*dims, len(dims)])
            return True
        if target in _TO_OPS:
            return self._lower_to(node)
        if target in (aten.mul.Tensor, aten.mul.Scalar):
            self._replace(node, _multiply(graph, *node.args[:2]))
            return True
        if target is aten.polar.default:
            radius, angle = node.args[:2]
            real = graph.call_function(aten.mul.Tensor, (radius, graph.call_function(aten.cos.default, (angle,))))
            imag = graph.call_function(aten.mul.Tensor, (radius, graph.call_function(aten.sin.default, (angle,))))
            self._replace(node, graph.call_function(aten.stack.default, ([real, imag], -1)))
            return True
        if target is aten.complex.default:
            self._replace(node, graph.call_function(aten.stack.default, (list(node.args[:2]), -1)))
            return True
        raise ExportError(f"complex-valued {target} is not carried as real pairs (complex_as_real.py): "
                          f"{node.format_node()}")

    def _lower_to(self, node: fx.Node) -> bool:
        source = node.args[0]
        dtype = node.kwargs.get("dtype", node.args[1] if node.target is aten.to.dtype and len(node.args) > 1 else None)
        if not _complex(source) or (dtype is not None and dtype not in REAL_OF):
            raise ExportError(f"a conversion between complex and real values is not carried as real pairs "
                              f"(complex_as_real.py): {node.format_node()}")
        if dtype is None:
            return False
        if "dtype" in node.kwargs:
            node.kwargs = {**node.kwargs, "dtype": REAL_OF[dtype]}
        else:
            node.args = (source, REAL_OF[dtype], *node.args[2:])
        return True

    @staticmethod
    def _replace(node: fx.Node, new: fx.Node) -> None:
        new.meta["val"] = node.meta.get("val")  # still the complex value, for the ops that read it
        node.replace_all_uses_with(new)
        node.graph.erase_node(node)


def _multiply(graph: fx.Graph, a: Any, b: Any) -> fx.Node:
    """``a * b`` with complex operands as real pairs (at least one of them complex)."""
    if not _complex(a):
        a, b = b, a
    if not _complex(b):  # a real tensor or a scalar scales both parts
        if isinstance(b, fx.Node):
            b = graph.call_function(aten.unsqueeze.default, (b, -1))
        return graph.call_function(aten.mul.Tensor, (a, b))

    def part(x: fx.Node, index: int) -> fx.Node:
        return graph.call_function(aten.select.int, (x, -1, index))

    ar, ai, br, bi = part(a, 0), part(a, 1), part(b, 0), part(b, 1)

    def mul(x, y):
        return graph.call_function(aten.mul.Tensor, (x, y))

    real = graph.call_function(aten.sub.Tensor, (mul(ar, br), mul(ai, bi)))
    imag = graph.call_function(aten.add.Tensor, (mul(ar, bi), mul(ai, br)))
    return graph.call_function(aten.stack.default, ([real, imag], -1))


def _is_higher_order(target: Any) -> bool:
    return isinstance(target, torch._ops.HigherOrderOperator)


def complex_as_real(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place so no tensor in it is complex; returns the number of nodes changed."""
    lowering = _Lowering()
    lowering.run(gm)
    if lowering.count:
        logger.info("complex_as_real: %d nodes now carry complex values as real pairs", lowering.count)
    return lowering.count
