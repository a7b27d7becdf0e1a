"""The rewritten cached step as a module with flat, named tensor inputs and outputs.

``rewrite()`` gives a GraphModule ``(kwargs: dict, state: dict) -> (output, state')``. Exporters
want positional tensors with names, so :func:`build_functional` wraps it:

    inputs : the model's tensor kwargs (in forward-signature order; nested dicts such as
             PixArt's ``added_cond_kwargs`` flattened as ``added_cond_kwargs.resolution``),
             then every state tensor as ``state.<name>`` (state.py's names)
    outputs: the model's output tensors (``sample`` when there is one, else ``output.<i>``),
             then every new state tensor as ``state_out.<name>``

Non-tensor kwargs (``return_dict``, ``None`` entries, flags) are baked into the graph; the
sidecar lists them as constants. ``return_dict`` is always exported as False (the runners
build the output object themselves).

Two fix-ups are applied to the rewritten graph before export, both for one check of
``run_decompositions`` (which the ONNX exporter runs): a ``cond`` branch must not alias its
inputs or outputs ("cond_true might be aliasing the input or the output!"), which torch.export's
pre-dispatch graph allows.

* :func:`clone_aliased_cond_operands`: operands of the ``cond`` that are views of one another
  (adaLN ``chunk`` outputs) are passed as contiguous copies (a few (B, D) vectors per step).
* :func:`clone_aliasing_branch_outputs`: a branch output that is one of its inputs, or a view of
  one, is returned as a copy. HunyuanDiT casts its timestep embedding with ``.to(float32)`` in
  every block and again after the last: on a float32 model each cast is a no-op that aliases its
  input, so the value the model reads after the blocks is, inside the branch, a chain of views of
  a branch input.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import operator
from typing import Any

import sympy
from sympy.parsing.sympy_parser import parse_expr
from sympy.printing.str import StrPrinter
import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

from ..config import RFCConfig
from ..dims import linear_dim, root_size
from ..passes import capture, find_regions, rewrite
from ..passes.capture import (CapturedGraph, DerivedDim, DimRanges, DynamicDims, dim_spec, distinct_tensor_arguments,
                              named_dim)
from ..passes.patterns import ignored_arguments
from ..passes.rewrite import dim_carriers
from ..state import StateSpec
from .complex_as_real import complex_as_real
from .errors import ExportError
from .sidecar import check_shapes

logger = logging.getLogger(__name__)

STATE_IN_PREFIX = "state."
DIM_INPUT_PREFIX = "dims."  # FunctionalProgram.carried_dims; to_onnx replaces them inside the graph
STATE_OUT_PREFIX = "state_out."
#: The state output a runner reads after each step: last_full == step index <=> full step.
DECISION_STATE = "last_full"


# --- kwargs <-> flat named leaves ---------------------------------------------------------

def flatten_kwargs(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """[(dotted path, leaf)] over dicts / lists / tuples, in insertion order."""
    if isinstance(obj, dict):
        out = []
        for key, value in obj.items():
            out += flatten_kwargs(value, f"{prefix}{key}.")
        return out
    if isinstance(obj, (list, tuple)):
        out = []
        for i, value in enumerate(obj):
            out += flatten_kwargs(value, f"{prefix}{i}.")
        return out
    return [(prefix[:-1], obj)]


def rebuild_kwargs(template: Any, values: dict[str, Any], prefix: str = "") -> Any:
    """Inverse of :func:`flatten_kwargs`: ``template`` with the leaves named in ``values`` replaced."""
    if isinstance(template, dict):
        return {k: rebuild_kwargs(v, values, f"{prefix}{k}.") for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        items = [rebuild_kwargs(v, values, f"{prefix}{i}.") for i, v in enumerate(template)]
        return type(template)(items)
    name = prefix[:-1]
    return values[name] if name in values else template


def normalize_kwargs(model: torch.nn.Module, example_inputs: dict[str, Any]) -> dict[str, Any]:
    """Forward kwargs in signature order, defaults filled in, ``return_dict=False``."""
    if not isinstance(example_inputs, dict):
        raise TypeError(f"example_inputs must be a dict of forward kwargs, got {type(example_inputs).__name__}")
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(**example_inputs)
    except TypeError as exc:
        raise TypeError(f"example_inputs do not fit {type(model).__name__}.forward: {exc}") from None
    call: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = signature.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(model).__name__}.forward takes *{name}; pass keyword arguments")
        else:
            call[name] = value
    if "return_dict" in signature.parameters:
        call["return_dict"] = False
    return call


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _nested_jsonable(value: Any) -> Any:
    """``value`` with its tuples as lists and its leaves JSON-able (a per-sample entry, ``[(1, 4, 4)]``)."""
    if isinstance(value, (list, tuple)):
        return [_nested_jsonable(item) for item in value]
    return _jsonable(value)


# --- graph fix-up -------------------------------------------------------------------------

def _is_view(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:  # an element of split/chunk/unbind
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def clone_aliased_cond_operands(gm: fx.GraphModule) -> int:
    """Pass each view-valued ``cond`` operand as a contiguous copy (see module docstring)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.higher_order.cond:
            continue
        operands = list(node.args[3])
        with gm.graph.inserting_before(node):
            for i, operand in enumerate(operands):
                if isinstance(operand, fx.Node) and _is_view(operand):
                    copy = gm.graph.call_function(torch.ops.aten.clone.default, (operand,),
                                                  {"memory_format": torch.contiguous_format})
                    copy.meta = dict(operand.meta)
                    operands[i] = copy
                    count += 1
        node.args = (*node.args[:3], tuple(operands), *node.args[4:])
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _aliases_input(node: Any) -> bool:
    """Whether ``node`` is a placeholder of its graph or a chain of views of one."""
    while isinstance(node, fx.Node) and _is_view(node) and node.args:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "placeholder"


def clone_aliasing_branch_outputs(gm: fx.GraphModule) -> int:
    """Return each ``cond`` branch output that aliases a branch input as a copy (module docstring)."""
    count = 0
    branches = {getattr(gm, branch.target) for node in gm.graph.nodes if node.target is torch.ops.higher_order.cond
                for branch in node.args[1:3]}
    for branch in branches:
        output = branch.graph.output_node()
        cloned = 0

        def copy_if_aliasing(value: Any) -> Any:
            nonlocal cloned
            if not _aliases_input(value):
                return value
            copy = branch.graph.call_function(torch.ops.aten.clone.default, (value,))
            copy.meta = dict(value.meta)
            cloned += 1
            return copy

        with branch.graph.inserting_before(output):
            output.args = fx.node.map_aggregate(output.args, copy_if_aliasing)
        if cloned:
            branch.graph.lint()
            branch.recompile()
            count += cloned
    return count


# --- the functional module ------------------------------------------------------------------

@dataclasses.dataclass
class TensorInfo:
    name: str
    shape: tuple[int | str, ...]  # a dynamic dim by name ("batch", ...), or an expression in names
    dtype: torch.dtype

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype).replace("torch.", "")}


class FunctionalStep(torch.nn.Module):
    """``(*model tensors, *state) -> (*model outputs, *state')`` around the rewritten graph."""

    def __init__(self, gm: fx.GraphModule, template: dict[str, Any], tensor_names: list[str],
                 state_names: list[str], dim_names: list[str] = ()):
        super().__init__()
        self.gm = gm
        self.template = template
        self.tensor_names = list(tensor_names)
        self.state_names = list(state_names)
        self.dim_names = list(dim_names)  # CachedStep's ``dims`` (last arguments), where it has them

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        n, n_state = len(self.tensor_names), len(self.state_names)
        kwargs = rebuild_kwargs(self.template, dict(zip(self.tensor_names, args[:n])))
        state = dict(zip(self.state_names, args[n : n + n_state]))
        dims = dict(zip(self.dim_names, args[n + n_state :]))
        out, new_state = self.gm(kwargs=kwargs, state=state, **({"dims": dims} if dims else {}))
        outputs, _ = output_tree(out)
        return (*outputs, *(new_state[name] for name in self.state_names))


@dataclasses.dataclass
class FunctionalProgram:
    """Everything an exporter needs: the module, example args, names and the sidecar facts."""

    module: FunctionalStep
    example_args: tuple[Tensor, ...]
    inputs: list[TensorInfo]  # model tensor inputs (ONNX names)
    outputs: list[TensorInfo]  # model tensor outputs (ONNX names)
    state_spec: StateSpec
    constants: dict[str, Any]  # baked non-tensor kwargs
    regions: list[str]
    output_structure: str  # "tuple" (return_dict=False output)
    output_tree: list | int  # its nesting, each tensor by its index in outputs (sidecar.py)
    fixups: list[str]
    dynamic_axes: dict[str, int] = dataclasses.field(default_factory=dict)  # dim name -> example size
    state_shapes: list[tuple[int | str, ...]] = dataclasses.field(default_factory=list)  # as inputs' shapes
    #: inputs sized as a multiple of a named dim (capture.DerivedDim; CachedStep's ``dims``)
    derived_dims: tuple[DerivedDim, ...] = ()
    dim_ranges: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # capture's (min, max)
    #: non-tensor arguments with one entry per sample that a dynamic-batch graph serves any number of
    #: copies of (capture's ``per_sample_arguments``): argument -> that entry (tuples as lists)
    per_sample_constants: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: arguments the model does not read, as another input replaces them (patterns.ARGUMENTS_REPLACED_BY)
    ignored_arguments: tuple[str, ...] = ()

    @property
    def carried_dims(self) -> list[str]:
        """The dims that ``derived_dims`` are multiples of: the module's last inputs, ``dims.<name>``,
        tensors of that length, which to_onnx rebuilds inside the graph from the inputs they size."""
        return list(dict.fromkeys(d.root for d in self.derived_dims))

    def dynamic_shapes(self) -> dict[str, Any] | None:
        """torch.export ``dynamic_shapes`` for ``module``'s positional args, or None (static): a named
        dim is its symbol; a size that is an expression in them is a derived dim where it follows one
        linearly (``text_tokens + 16``) and is left to the trace otherwise (capture.dim_spec)."""
        if not self.dynamic_axes:
            return None
        symbols = {name: sympy.Symbol(name, integer=True, positive=True) for name in self.dynamic_axes}
        dims = {symbol: named_dim(name, self.dim_ranges) for name, symbol in symbols.items()}
        shapes = [info.shape for info in self.inputs] + self.state_shapes + [(name,) for name in self.carried_dims]
        return {"args": tuple(
            {i: dim_spec(parse_expr(d, local_dict=symbols), dims) for i, d in enumerate(shape)
             if isinstance(d, str)} or None
            for shape in shapes)}

    @property
    def input_names(self) -> list[str]:
        return ([i.name for i in self.inputs] + [STATE_IN_PREFIX + n for n in self.state_spec.names()]
                + [DIM_INPUT_PREFIX + n for n in self.carried_dims])

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs] + [STATE_OUT_PREFIX + n for n in self.state_spec.names()]


def output_tree(output: Any) -> tuple[list[Tensor], list | int]:
    """The model output's tensors, in the order FunctionalStep returns them, and its nesting with
    each tensor replaced by its index (``(sample,)`` -> ``[0]``; Z-Image's list of per-image
    samples ``([s0, s1],)`` -> ``[[0, 1]]``; a sample returned bare, as Kandinsky 5 does with
    ``return_dict=False``, -> ``0``)."""
    tensors: list[Tensor] = []

    def index(node: Any) -> Any:
        if isinstance(node, Tensor):
            tensors.append(node)
            return len(tensors) - 1
        if isinstance(node, (tuple, list)):
            return [index(child) for child in node]
        raise ExportError(f"the model returns a {type(node).__name__}; an export carries tensors, in tuples and lists")

    return tensors, index(output if isinstance(output, Tensor) else tuple(output))


def build_functional(model: torch.nn.Module, example_inputs: dict[str, Any], config: RFCConfig,
                     dynamic_batch: bool = False, dynamic_dims: DynamicDims | None = None,
                     dim_ranges: DimRanges | None = None) -> FunctionalProgram:
    """capture -> find_regions -> rewrite (as CachedModel does), then wrap for export.

    ``dynamic_batch``: the batch size is a symbol in the graph (capture.py's rule says which
    inputs are batched); ``dynamic_dims`` names more (capture.py). The program's input shapes
    hold those names ("batch", ...)."""
    # the ONNX graph's inputs too: contiguous, as an ONNX tensor is (a view's strides put guards on its sizes)
    call = pytree.tree_map(lambda leaf: leaf.contiguous() if isinstance(leaf, Tensor) else leaf,
                           normalize_kwargs(model, example_inputs))
    call = distinct_tensor_arguments(call)
    was_training = model.training
    model.eval()
    try:
        captured = capture(model, call, dynamic_batch=dynamic_batch, dynamic_dims=dynamic_dims, dim_ranges=dim_ranges)
    finally:
        model.train(was_training)
    plan = find_regions(captured.graph_module)  # also for "full": only models we understand
    regions = [r.name for r in plan.regions]
    if config.mode == "full":
        plan = None
    gm, step = rewrite(captured, plan, config, call)
    fixups = []
    n_cloned = clone_aliased_cond_operands(gm)
    if n_cloned:
        fixups.append(f"clone_aliased_cond_operands({n_cloned})")
    n_outputs = clone_aliasing_branch_outputs(gm)
    if n_outputs:
        fixups.append(f"clone_aliasing_branch_outputs({n_outputs})")
    n_complex = complex_as_real(gm)
    if n_complex:
        fixups.append(f"complex_as_real({n_complex})")

    leaves = flatten_kwargs(call)
    tensors = [(name, leaf) for name, leaf in leaves if isinstance(leaf, Tensor)]
    per_sample = {name: _nested_jsonable(call[name][0]) for name in captured.per_sample_arguments}
    ignored = ignored_arguments(model, call)
    constants = {name: _jsonable(leaf) for name, leaf in leaves
                 if not isinstance(leaf, Tensor) and name.split(".")[0] not in (*per_sample, *ignored)}
    tensor_names = [name for name, _ in tensors]
    spec = step.state_spec
    carried = dim_carriers(captured.root_sizes, _device_of(tensors))
    module = FunctionalStep(gm, call, tensor_names, spec.names(), list(carried))
    module.training = False  # the exported graph is already in eval mode; .eval() would recurse into it
    state = spec.init(_device_of(tensors))
    example_args = (*(t for _, t in tensors), *(state[n] for n in spec.names()), *carried.values())
    with torch.no_grad():
        output, _ = gm(kwargs=call, state=state, **({"dims": carried} if carried else {}))
    out_tensors, tree = output_tree(output)
    n_out = len(out_tensors)
    out_names = ["sample"] if n_out == 1 else [f"output.{i}" for i in range(n_out)]
    named = _named_input_dims(captured, call)
    inputs = [TensorInfo(name, tuple(named.get(name, {}).get(i, size) for i, size in enumerate(t.shape)), t.dtype)
              for name, t in tensors]
    axes = _axis_examples(tensors, named)
    out_shapes = [tuple(t.shape) for t in out_tensors]
    state_shapes = [tuple(e.shape) for e in spec.entries]
    if axes:
        out_shapes, state_shapes = _symbolic_shapes(gm, [t for _, t in tensors], [named.get(n, {}) for n, _ in tensors],
                                                    len(spec.entries), len(carried))
        check_shapes(out_shapes + state_shapes, [tuple(t.shape) for t in out_tensors]
                     + [tuple(e.shape) for e in spec.entries], axes)

    return FunctionalProgram(
        module=module,
        example_args=example_args,
        inputs=inputs,
        outputs=[TensorInfo(name, shape, t.dtype) for name, shape, t in zip(out_names, out_shapes, out_tensors)],
        state_spec=spec,
        constants=constants,
        regions=regions,
        output_structure="tuple",
        output_tree=tree,
        fixups=fixups,
        dynamic_axes=axes,
        state_shapes=state_shapes,
        derived_dims=captured.derived_dims,
        dim_ranges=captured.dim_ranges,
        per_sample_constants=per_sample,
        ignored_arguments=ignored,
    )


def _symbolic_shapes(gm: fx.GraphModule, inputs: list[Tensor], named: list[dict[int, str]],
                     n_state: int, n_carried: int = 0) -> tuple[list[tuple[int | str, ...]], list[tuple[int | str, ...]]]:
    """(model output shapes, state shapes) of the rewritten graph with each size an int, a dim name,
    or an expression in dim names (``"image_tokens + text_tokens"``): how the output's and the
    cache's sizes follow the inputs' dynamic dims, as torch.export traced them."""
    values = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    values = [v for v in values if isinstance(v, Tensor)]
    if len(values) != len(inputs) + n_state + n_carried:
        raise RuntimeError(f"rewritten graph has {len(values)} tensor inputs, expected {len(inputs)} + {n_state} "
                           f"+ {n_carried}")
    values = values[: len(inputs) + n_state]  # the dim carriers last (CachedStep's ``dims``)
    symbols = {}
    for value, dims in zip(values, named):
        for index, name in dims.items():
            size, linear = value.shape[index], linear_dim(name)
            if linear is None:  # an expression in the dims (Dim.AUTO): no symbol of its own
                continue
            if isinstance(size, torch.SymInt) and len(size.node.expr.free_symbols) == 1:
                (symbol,) = size.node.expr.free_symbols  # the dim's, or its root's (2 * grid_height)
                symbols[symbol] = sympy.Symbol(linear[0])

    def describe(shape) -> tuple[int | str, ...]:
        out: list[int | str] = []
        for size in shape:
            expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)
            if expr.is_number:
                out.append(int(expr))
                continue
            if not expr.free_symbols <= symbols.keys():
                raise RuntimeError(f"a size of the rewritten graph ({expr}) depends on no named input dim")
            out.append(_SizePrinter().doprint(_without_exact_division(expr.xreplace(symbols))))
        return tuple(out)

    output = next(n for n in gm.graph.nodes if n.op == "output")
    results = [n.meta.get("val") for n in pytree.tree_leaves(output.args) if isinstance(n, fx.Node)]
    results = [v for v in results if isinstance(v, Tensor)]
    return ([describe(v.shape) for v in results[: len(results) - n_state]],
            [describe(v.shape) for v in values[len(inputs):]])


def _without_exact_division(expr: sympy.Expr) -> sympy.Expr:
    """``expr`` with floor divisions that divide exactly removed (DiT's output width traces as
    ``2*((grid**2)//grid)``: ``2*grid``), else as it is."""
    from torch.utils._sympy.functions import FloorDiv

    def exact(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
        quotient = sympy.cancel(a / b)
        if not quotient.free_symbols:
            return quotient if quotient.is_integer else FloorDiv(a, b)
        whole = quotient.is_polynomial() and all(  # integer coefficients: whole for every size
            c.is_integer for c in sympy.Poly(quotient, *quotient.free_symbols).coeffs())
        return quotient if whole else FloorDiv(a, b)

    return expr.replace(FloorDiv, exact) if expr.has(FloorDiv) else expr


class _SizePrinter(StrPrinter):
    """A size in the sidecar's grammar (dims.py: ``+ - * //``): a power of a dim as a product
    (``grid**2`` -> ``grid*grid``: DiT's square latents)."""

    def _print_Pow(self, expr: sympy.Pow) -> str:
        base, power = expr.as_base_exp()
        if isinstance(power, sympy.Integer) and power > 1:
            return "(" + "*".join([self.parenthesize(base, 1000)] * int(power)) + ")"
        return super()._print_Pow(expr)


def _axis_examples(tensors: list[tuple[str, Tensor]], named: dict[str, dict[int, str]]) -> dict[str, int]:
    """Each dynamic dim's size in the example, read where an input's size is the dim, or a multiple of
    it plus a constant (``"2*grid_height"``)."""
    axes: dict[str, int] = {}
    for name, t in tensors:
        for index, dim in named.get(name, {}).items():
            linear = linear_dim(dim)
            if linear is None:  # an expression in dims that other sizes show
                continue
            root, scale, offset = linear
            axes[root] = root_size(scale, offset, int(t.shape[index]))  # whole: capture checked the example
    return axes


def _is_input_spec(x: Any) -> bool:
    """A leaf of torch.export's dynamic_shapes: None (static) or {dim index: Dim}."""
    return x is None or (isinstance(x, dict) and bool(x) and all(isinstance(k, int) for k in x))


def _named_input_dims(captured: CapturedGraph, call: dict[str, Any]) -> dict[str, dict[int, str]]:
    """{input name: {dim index: dim name}}, as capture marked them (the batch rule, ``dynamic_dims``)."""
    if captured.dynamic_shapes is None:
        return {}
    specs = pytree.tree_leaves(captured.dynamic_shapes, is_leaf=_is_input_spec)
    expressions = captured.expression_dims  # given to torch.export as Dim.AUTO, which has no name
    return {name: {index: expressions.get(name, {}).get(index) or dim.__name__ for index, dim in spec.items()}
            for (name, _), spec in zip(flatten_kwargs(call), specs, strict=True) if spec}


def _device_of(tensors: list[tuple[str, Tensor]]) -> torch.device:
    return tensors[0][1].device if tensors else torch.device("cpu")
