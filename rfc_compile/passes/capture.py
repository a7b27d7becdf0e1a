"""Capture: the model's forward as one FX graph, via torch.export (non-strict).

The graph keeps ``nn_module_stack`` metadata on every node, which is how regions are
found; parameters stay shared with the original module (get_attr on the same tensors),
so weights changed in place after optimizing are seen by the cached model.

With ``dynamic_batch=True`` the batch size is a symbol (``BATCH``) instead of the example's
number: every tensor input whose first dim equals the first input's is marked dynamic there
(DiT's ``hidden_states``/``timestep``/``class_labels``), except the inputs patterns.py's
``UNBATCHED_INPUTS`` lists (FLUX's ``img_ids``/``txt_ids``, even when a token count equals the
batch) and those whose batch is another axis (``BATCH_AXES``: HiDream-I1's stacked Llama states).
The exporters use it for graphs that serve any batch size.

``dynamic_dims`` names further dims of tensor inputs, e.g. FLUX's token counts
(``{"hidden_states": {1: "image_tokens"}, "img_ids": {0: "image_tokens"}, ...}``; patterns.py's
``TOKEN_DIMS`` holds them per model class): one name is one symbol wherever it appears. A size may
be a multiple of a named dim plus a constant (``{"hidden_states": {2: "2*grid_height"}}``,
``DerivedDim``; patterns.py's ``RESOLUTION_DIMS``): torch.export's derived dims. An input that is a
tuple or list of tensors takes one such dict (or None) per element. A size may also be any
expression in dims named elsewhere (``"grid_height*grid_width"``: Hunyuan-DiT's rotary table has one
row per image token): torch.export gets ``Dim.AUTO`` there and the trace relates it to the others
(``fixed_dims.py`` then reads the relation from its guards; the runners check it per call).
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import time
import traceback
from typing import Any, Mapping, Sequence

import sympy
import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils import _pytree as pytree

from ..dims import DIM_MAX, eval_dim, fold_dim, linear_dim, root_size
from ..errors import UnsupportedModelError
from .fixed_dims import guards_fixing_dims, tied_dims
from .early_sizes import read_sizes_early
from .noop_squeeze import drop_noop_squeezes
from .patterns import (PER_SAMPLE_ARGUMENTS, TRACEABLE_FUNCTIONS, TRACEABLE_METHODS, batch_axes_for,
                       folded_batch_input_for)
from .traceable import swapped_functions, swapped_methods

logger = logging.getLogger(__name__)

#: The symbolic batch size of a graph captured with ``dynamic_batch=True`` (shared by the
#: model inputs and the cache state of the rewritten step, so both get one symbol).
BATCH_MAX = 65536
BATCH = torch.export.Dim("batch", min=1, max=BATCH_MAX)

DimNames = Mapping[int, str]  # {dim index: dim name or size expression}
#: input name -> its dims' names; a tuple/list input: one DimNames (or None) per element
DynamicDims = Mapping[str, "DimNames | Sequence[DimNames | None]"]
DimRanges = Mapping[str, tuple[int, int]]  # dim name -> (min, max) it may take (default 1 .. DIM_MAX)


@dataclasses.dataclass
class CapturedGraph:
    """The exported forward: an FX graph over the flattened ``kwargs`` pytree."""

    graph_module: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    input_names: list[str]  # placeholder names, in flat order
    dynamic_shapes: dict[str, Any] | None = None  # torch.export's, for the kwargs (dynamic dims)
    #: the example's batch where the model folds another axis into its blocks' batch dim
    #: (patterns.FOLDED_BATCH_INPUTS): region rows are grouped by it; None: a region's rows are its samples
    samples: int | None = None
    #: each dynamic dim's symbol in the graph's sizes -> its torch.export Dim (``dim_spec``)
    dim_symbols: dict[sympy.Symbol, torch.export.Dim] = dataclasses.field(default_factory=dict)
    #: inputs whose size is a multiple of a named dim plus a constant, and each such dim's example size
    derived_dims: tuple["DerivedDim", ...] = ()
    root_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    dim_ranges: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # as capture was given them
    #: sizes given as expressions in other dims (Dim.AUTO to torch.export): {dotted input: {index: expr}}
    expression_dims: dict[str, dict[int, str]] = dataclasses.field(default_factory=dict)
    #: non-tensor arguments with one entry per sample of which the model reads the first (a dynamic
    #: batch; patterns.PER_SAMPLE_ARGUMENTS): the graph serves any number of copies of that entry
    per_sample_arguments: tuple[str, ...] = ()

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


def batch_dynamic_shapes(kwargs: dict[str, Any], batch_axes: Mapping[str, int | None] | None = None
                         ) -> dict[str, Any]:
    """torch.export ``dynamic_shapes`` marking dim 0 as ``BATCH`` on every batched tensor input
    (``batch_axes``: top-level inputs whose batch is at another axis, or None: no batch dim, whatever
    their first size; patterns.batch_axes_for)."""
    batch = example_batch(kwargs)
    batch_axes = batch_axes or {}
    shapes = {name: pytree.tree_map(lambda leaf: {0: BATCH} if is_batched(leaf, batch) else None, value)
              for name, value in kwargs.items() if name not in batch_axes}
    for name, axis in batch_axes.items():
        if name not in kwargs:
            continue
        value = kwargs[name]
        if axis is None or not isinstance(value, torch.Tensor):
            # an unbatched list input (Kandinsky 5's rotary positions) gets a None per element: torch.export
            # refuses a plain None for a list
            shapes[name] = pytree.tree_map(lambda _: None, value)
        elif value.dim() <= axis or value.shape[axis] != batch:
            raise ValueError(f"dynamic_batch: input {name!r} holds the batch at dim {axis}, but its shape is "
                             f"{tuple(value.shape)} for a batch of {batch}")
        else:
            shapes[name] = {axis: BATCH}
    return {name: shapes[name] for name in kwargs}


def named_dim(name: str, ranges: DimRanges | None = None) -> torch.export.Dim:
    """The torch.export symbol of a named dim (``"batch"`` is ``BATCH``), over its range in ``ranges``
    (default 1 .. DIM_MAX; a model may bound a dim, e.g. Wan's rotary table its latent grid)."""
    if name == BATCH.__name__:
        return BATCH
    low, high = (ranges or {}).get(name, (1, DIM_MAX))
    return torch.export.Dim(name, min=low, max=high)


@dataclasses.dataclass(frozen=True)
class DerivedDim:
    """An input size given to ``dynamic_dims`` as a named dim, or as a multiple of one plus a constant
    (``"2*grid_height"``: the latent height of a model that cuts it into 2x2 patches, so that the
    patch grid, not the height, is the symbol; see CachedStep's ``dims``)."""

    input: str
    index: int
    root: str
    scale: int = 1
    offset: int = 0

    @property
    def plain(self) -> bool:
        return (self.scale, self.offset) == (1, 0)

    def root_size(self, value: torch.Tensor) -> int | None:
        """The named dim's size where ``value`` is the input, or None if its size is not of this form."""
        return root_size(self.scale, self.offset, int(value.shape[self.index]))


def derived_dim(input_name: str, index: int, name: str) -> DerivedDim:
    linear = linear_dim(name)
    if linear is None:
        raise ValueError(f"dynamic_dims: {input_name!r} dim {index} is {name!r}: give a name, or a multiple of one "
                         "plus a constant (\"2*grid_height\")")
    return DerivedDim(input_name, index, *linear)


def input_leaf(kwargs: Mapping[str, Any], name: str) -> Any:
    """The argument at a dotted input name (``"image_rotary_emb.0"``: an element of a tuple input); or,
    given torch.export ``dynamic_shapes``, that argument's entry."""
    value: Any = kwargs
    for part in name.split("."):
        value = value[int(part)] if isinstance(value, (list, tuple)) else value[part]
    return value


def named_leaves(kwargs: Mapping[str, Any], dynamic_dims: DynamicDims | None) -> list[tuple[str, torch.Tensor, DimNames]]:
    """(dotted input name, tensor, its dims' names) for each tensor ``dynamic_dims`` names: a tensor input,
    or an element of a tuple/list input; ValueError where it names something else."""
    leaves = []
    for input_name, named in (dynamic_dims or {}).items():
        value = kwargs.get(input_name)
        if isinstance(value, (list, tuple)) and isinstance(named, (list, tuple)):
            if len(named) != len(value):
                raise ValueError(f"dynamic_dims: {input_name!r} has {len(value)} elements, and {len(named)} are named")
            pairs = [(f"{input_name}.{i}", v, n) for i, (v, n) in enumerate(zip(value, named)) if n is not None]
        else:
            pairs = [(input_name, value, named)]
        for leaf_name, leaf, names in pairs:
            if not isinstance(leaf, torch.Tensor) or not isinstance(names, Mapping):
                raise ValueError(
                    f"dynamic_dims names input {leaf_name!r}, which is not a tensor argument of the call (tensor "
                    f"arguments: {sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))}; a tuple or "
                    "list of tensors takes one {dim: name} per element)")
            for index in names:
                if not -leaf.dim() <= index < leaf.dim():
                    raise ValueError(f"dynamic_dims: {leaf_name!r} has {leaf.dim()} dims, no dim {index}")
            leaves.append((leaf_name, leaf, {index % leaf.dim(): name for index, name in names.items()}))
    return leaves


def named_dims(dynamic_dims: DynamicDims | None) -> set[str]:
    """The dims ``dynamic_dims`` names (``"2*grid_height"`` names grid_height; an expression in several
    dims names none of its own)."""
    per_tensor = [names for named in (dynamic_dims or {}).values()
                  for names in (named if isinstance(named, (list, tuple)) else [named]) if names]
    return {linear[0] for names in per_tensor for name in names.values() if (linear := linear_dim(name))}


def derived_dims(kwargs: dict[str, Any], dynamic_dims: DynamicDims | None) -> tuple[DerivedDim, ...]:
    """The ``dynamic_dims`` given as a multiple of a named dim plus a constant (not plain names)."""
    found = (derived_dim(leaf_name, index, name) for leaf_name, _, named in named_leaves(kwargs, dynamic_dims)
             for index, name in named.items() if linear_dim(name) is not None)
    return tuple(d for d in found if not d.plain)


def expression_dims(kwargs: dict[str, Any], dynamic_dims: DynamicDims | None) -> dict[str, dict[int, str]]:
    """The ``dynamic_dims`` given as an expression in several dims (``"grid_height*grid_width"``)."""
    found: dict[str, dict[int, str]] = {}
    for leaf_name, _, named in named_leaves(kwargs, dynamic_dims):
        for index, name in named.items():
            if linear_dim(name) is None:
                found.setdefault(leaf_name, {})[index] = name
    return found


def dim_spec(size: sympy.Expr | int, dims: Mapping[sympy.Symbol, torch.export.Dim]) -> Any:
    """torch.export ``dynamic_shapes`` entry for a size that follows the dynamic dims as ``size``
    (an expression in their symbols, ``dims``): None where it is a number (static), the dim itself,
    or ``a * dim + b`` (torch.export's derived dims) where it follows one dim linearly (a FLUX single
    block's cache holds ``text_tokens + 16`` tokens when only the prompt length is dynamic: left to
    the trace, torch.export refuses that relation), else ``Dim.AUTO`` and the trace finds how (image +
    text tokens; products)."""
    size = sympy.sympify(size)
    if size.is_number:
        return None
    if len(size.free_symbols) == 1:
        (symbol,) = size.free_symbols
        scale = size.coeff(symbol)
        offset = sympy.expand(size - scale * symbol)
        if symbol in dims and scale.is_Integer and scale > 0 and offset.is_Integer:
            dim = dims[symbol]
            dim = dim if scale == 1 else int(scale) * dim
            return dim if offset == 0 else dim + int(offset)
    return torch.export.Dim.AUTO


def _fixed_by_model(model: torch.nn.Module, why: str, advice: str = "") -> UnsupportedModelError:
    """The refusal of dynamic dims that the model's code fixes (``why``: what fixes them)."""
    return UnsupportedModelError(f"{type(model).__name__} cannot be captured with these dynamic dims: the model's "
                                 f"code fixes them ({why}){advice}")


def _dim_symbols(gm: fx.GraphModule, kwargs: dict[str, Any],
                 dynamic_shapes: dict[str, Any] | None) -> dict[sympy.Symbol, torch.export.Dim]:
    """Each named dynamic dim's symbol in ``gm``'s sizes (its placeholders' traced shapes), read before
    anything compares those sizes (a comparison can make torch specialize a symbol)."""
    if dynamic_shapes is None:
        return {}
    symbols: dict[sympy.Symbol, torch.export.Dim] = {}
    for leaf_name, value in _traced_inputs(gm, kwargs).items():  # {} if not in the flat order: left to the trace
        try:
            spec = input_leaf(dynamic_shapes, leaf_name)
        except (KeyError, IndexError, TypeError):  # an input with no spec of its own (None for a whole tuple)
            continue
        if not isinstance(value, torch.Tensor) or not isinstance(spec, dict):
            continue
        for index, dim in spec.items():
            size = value.shape[index]
            named = isinstance(dim, torch.export.Dim) or hasattr(dim, "root")  # not None, not Dim.AUTO
            if not named or not isinstance(size, torch.SymInt) or len(size.node.expr.free_symbols) != 1:
                continue
            (symbol,) = size.node.expr.free_symbols  # a named dim's, or the root's of a derived one (2 * dim)
            symbols[symbol] = getattr(dim, "root", dim)
    return symbols


def _traced_inputs(gm: fx.GraphModule, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Each input's traced value (its placeholder's ``val``) by dotted input name."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    paths = [path for path, _ in pytree.tree_flatten_with_path(((), kwargs))[0]]
    if len(paths) != len(placeholders):  # not the flat order assumed here
        return {}
    return {".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path[1:]): node.meta.get("val")
            for node, path in zip(placeholders, paths)}


def input_dynamic_shapes(kwargs: dict[str, Any], dynamic_batch: bool = False,
                         dynamic_dims: DynamicDims | None = None,
                         batch_axes: Mapping[str, int | None] | None = None,
                         dim_ranges: DimRanges | None = None) -> dict[str, Any] | None:
    """torch.export ``dynamic_shapes`` for ``kwargs``: the batch rule, then the named dims (None: static)."""
    if not dynamic_batch and not dynamic_dims:
        return None
    if dynamic_batch and example_batch(kwargs) < 2:
        raise ValueError(f"dynamic_batch: the example batch is {example_batch(kwargs)}; give an example batch of 2 or "
                         "more (torch.export specializes sizes 0 and 1)")
    shapes = (batch_dynamic_shapes(kwargs, batch_axes) if dynamic_batch
              else pytree.tree_map(lambda _: None, kwargs))
    dims: dict[str, torch.export.Dim] = {}
    examples: dict[str, int] = {}
    specs: dict[str, dict] = {}
    for leaf_name, value, named in named_leaves(kwargs, dynamic_dims):
        spec = dict(input_leaf(shapes, leaf_name) or {})
        for index, name in named.items():
            if linear_dim(name) is None:  # an expression in several dims: the trace relates it (checked below)
                spec[index] = torch.export.Dim.AUTO
                continue
            derived = derived_dim(leaf_name, index, name)
            root_size = derived.root_size(value)
            if root_size is None:
                raise ValueError(f"dynamic_dims: {leaf_name!r} dim {index} is {value.shape[index]} in the example, "
                                 f"not {name} for any whole {derived.root}")
            if root_size < 2:
                raise ValueError(f"dynamic_dims: {leaf_name!r} dim {index} ({name!r}) is {value.shape[index]} in the "
                                 f"example; give an example size of 2 or more for {derived.root} (torch.export "
                                 "specializes 0 and 1)")
            dim = dims.setdefault(derived.root, named_dim(derived.root, dim_ranges))
            examples.setdefault(derived.root, root_size)
            spec[index] = dim if derived.plain else derived.scale * dim + derived.offset
        specs[leaf_name] = spec
    for leaf_name, named in expression_dims(kwargs, dynamic_dims).items():
        for index, name in named.items():
            where = f"dynamic_dims: {leaf_name!r} dim {index} is {name!r}"
            try:
                used = fold_dim(name, lambda n: {n}, lambda _: set(), lambda _, a, b: a | b)
            except ValueError as exc:
                raise ValueError(f"{where}: give a name, a multiple of one plus a constant (\"2*grid_height\"), or "
                                 f"an expression in dims named elsewhere ({exc})") from None
            if used - examples.keys():
                raise ValueError(f"{where}: an expression may use only dims that an input's size is given as "
                                 f"(unknown: {sorted(used - examples.keys())}; named: {sorted(examples)})")
            size = eval_dim(name, examples)
            actual = int(input_leaf(kwargs, leaf_name).shape[index])
            if size != actual:
                raise ValueError(f"dynamic_dims: {leaf_name!r} dim {index} is {actual} in the example, not {name} "
                                 f"({size} at {examples})")
    for leaf_name, spec in specs.items():
        shapes = _with_spec(shapes, leaf_name, spec)
    return shapes


def _with_spec(shapes: dict[str, Any], leaf_name: str, spec: dict) -> dict[str, Any]:
    """``shapes`` with the entry of a dotted input name (top level, or a tuple/list element) replaced."""
    top, _, element = leaf_name.partition(".")
    if not element:
        return {**shapes, top: spec}
    entries = list(shapes[top])
    entries[int(element)] = spec
    return {**shapes, top: type(shapes[top])(entries)}


def diffusers_hooks(model: torch.nn.Module) -> list[str]:
    """Names of the diffusers hooks (``diffusers.hooks.HookRegistry``) registered on the model's modules."""
    names: dict[str, None] = {}
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        names.update(dict.fromkeys(getattr(registry, "hooks", {})))
    return list(names)


#: What a captured call's arguments may hold besides tensors (baked into the graph as constants).
_PLAIN_VALUES = (torch.Tensor, numbers.Number, str, type(None), torch.dtype, torch.device)

_STATEFUL_CALLS = ("a graph's inputs and outputs are tensors and constants; a model that keeps Python state "
                   "between calls (FLUX.2's kv_cache_mode, which Flux2KleinKVPipeline uses) cannot be cached: "
                   "run such calls with the original model")


def _opaque_arguments(kwargs: dict[str, Any]) -> list[str]:
    """Arguments holding objects that are neither tensors nor plain constants."""
    return [f"{name} ({type(leaf).__name__})" for name, value in kwargs.items()
            for leaf in pytree.tree_leaves(value) if not isinstance(leaf, _PLAIN_VALUES)]


def distinct_tensor_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call with a tensor passed in two arguments given as two tensors (a copy for each repeat).

    torch.export folds arguments that are one tensor object into one graph input (LTX2Pipeline
    passes its timestep as both ``timestep`` and ``sigma``): the graph would then read only one of
    them, and a later call with two different tensors, the same shapes, would silently get the
    other's values."""
    seen: set[int] = set()

    def distinct(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        if id(leaf) in seen:
            return leaf.clone()
        seen.add(id(leaf))
        return leaf

    return pytree.tree_map(distinct, kwargs)


#: torch's words when a traced forward reads a tensor's value (FakeTensors have none)
_VALUE_READS = ("Could not guard on data-dependent", "Could not extract specialized integer from data-dependent",
                ".numpy() is not supported for tensor subclasses", "Cannot access data pointer")


def _reads_tensor_values(exc: BaseException) -> bool:
    return isinstance(exc, GuardOnDataDependentSymNode) or any(words in str(exc) for words in _VALUE_READS)


def _model_code_line(exc: BaseException) -> str:
    """``file:line: code`` of the innermost frame of ``exc``'s traceback outside torch and rfc_compile:
    the model's line that read the value."""
    skipped = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if not os.path.abspath(frame.filename).startswith(skipped):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def accelerate_hooks(model: torch.nn.Module) -> dict[str, Any]:
    """accelerate's hooks on ``model`` (``""``) and its submodules, by module name: offloading and
    device maps move weights around forward, which a captured graph does not run."""
    return {name: module._hf_hook for name, module in model.named_modules()
            if getattr(module, "_hf_hook", None) is not None}


def _per_sample_arguments(model: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[str, ...]:
    """The per-sample arguments (patterns.PER_SAMPLE_ARGUMENTS) a dynamic-batch graph of ``model`` serves
    any batch of: those the model reads the first entry of, given one equal entry per sample. Refuses
    the others (the graph would hold every sample's entry)."""
    given = [arg for arg in PER_SAMPLE_ARGUMENTS.get(type(model).__name__, ()) if kwargs.get(arg.name) is not None]
    every = [arg.name for arg in given if not arg.first_only(model)]
    if every:
        raise _fixed_by_model(model, f"{', '.join(every)}: one entry per sample (a list), each one fixed in the "
                                     "graph; export at the serving batch")
    batch = example_batch(kwargs)
    for arg in given:
        entries = list(kwargs[arg.name])
        if len(entries) != batch or any(entry != entries[0] for entry in entries):
            raise ValueError(f"dynamic_batch: {arg.name}={entries!r} is not one equal entry per sample (batch "
                             f"{batch}); {type(model).__name__} reads the first sample's only, so a graph for any "
                             "batch takes copies of one entry")
    return tuple(arg.name for arg in given)


def capture(model: torch.nn.Module, kwargs: dict[str, Any], dynamic_batch: bool = False,
            dynamic_dims: DynamicDims | None = None, dim_ranges: DimRanges | None = None) -> CapturedGraph:
    """Export ``model(**kwargs)`` and return its graph with module-path metadata."""
    start = time.perf_counter()
    diffusers_cache = getattr(model, "_cache_config", None)  # diffusers' CacheMixin.enable_cache
    if diffusers_cache is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has diffusers' {type(diffusers_cache).__name__} enabled: its hooks decide in "
            "Python and would be traced once, then mix with this cache; call model.disable_cache() first")
    hooked = [name or "itself" for name in accelerate_hooks(model)]
    if hooked:
        raise UnsupportedModelError(
            f"{type(model).__name__} carries accelerate hooks ({', '.join(hooked[:3])}: enable_model_cpu_offload, a "
            "device_map or sequential offload) that move weights inside forward, which a captured graph cannot do: "
            "capture it without them (accelerate.hooks.remove_hook_from_module(model, recurse=True)); "
            "rfc_compile.optimize moves a model CPU offload hook around the cached model itself")
    opaque = _opaque_arguments(kwargs)
    if opaque:
        raise UnsupportedModelError(f"{type(model).__name__} called with {', '.join(opaque)}: {_STATEFUL_CALLS}")
    per_sample = _per_sample_arguments(model, kwargs) if dynamic_batch else ()
    kwargs = distinct_tensor_arguments(kwargs)
    dynamic_shapes = input_dynamic_shapes(kwargs, dynamic_batch, dynamic_dims, batch_axes_for(type(model).__name__),
                                          dim_ranges)
    with torch.no_grad(), swapped_methods(model, TRACEABLE_METHODS), swapped_functions(TRACEABLE_FUNCTIONS):
        try:
            exported = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except torch._dynamo.exc.UserError as exc:  # the model fixes a dim that was asked to be dynamic
            if dynamic_shapes is None:
                raise
            why = "\n".join(str(exc).splitlines()[:4])
            raise _fixed_by_model(model, why) from exc
        except Exception as exc:
            if "in output, which is not a known type" in str(exc):  # torch.export's words
                returned = str(exc).split("Found ", 1)[-1].split(" in output", 1)[0]
                raise UnsupportedModelError(f"{type(model).__name__} returns {returned} beside its tensors: "
                                            f"{_STATEFUL_CALLS}") from exc
            hooks = diffusers_hooks(model)
            if not hooks:
                if _reads_tensor_values(exc):
                    where = _model_code_line(exc)
                    raise UnsupportedModelError(
                        f"{type(model).__name__}'s forward reads a tensor's values in Python ({where}): capture "
                        "traces the forward once with symbolic tensors, and a Python branch on a value, .item(), "
                        ".tolist() or .numpy() cannot be traced (the model's code; a call option may select such "
                        "code, e.g. LTX-2's spatio_temporal_guidance_blocks). Run these calls with the original "
                        "model, or write that branch with torch.where / torch.cond") from exc
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModelError(
                f"{type(model).__name__} carries diffusers hooks ({', '.join(hooks)}) and torch.export could not "
                f"trace it ({type(exc).__name__}: {first[:300]}). Hooks that change modules in forward (layerwise "
                "casting, group offloading, diffusers' own caches) cannot be captured: optimize a model without them"
            ) from exc
    gm = read_sizes_early(drop_noop_squeezes(exported.module()))
    dim_symbols = _dim_symbols(gm, kwargs, dynamic_shapes)
    tied = tied_dims(dynamic_shapes, dim_symbols)
    if tied:
        raise _fixed_by_model(model, f"{', '.join(tied)} traced as the same size as another dynamic dim, e.g. "
                                     "square latents only", ": export with one name for those sizes, or once per size")
    traced, expressions = _traced_inputs(gm, kwargs), expression_dims(kwargs, dynamic_dims)
    for leaf_name, named in expressions.items():
        value = traced.get(leaf_name)
        static = [index for index in named if isinstance(value, torch.Tensor) and (
            not isinstance(value.shape[index], torch.SymInt) or value.shape[index].node.expr.is_number)]
        if static:
            raise _fixed_by_model(model, f"{leaf_name!r} dim {static[0]}, given as {named[static[0]]!r}, traced as the "
                                         f"example's {value.shape[static[0]]}", ": export with that size static")
    fixed = guards_fixing_dims(gm, dim_symbols)
    if fixed:
        guard, sizes = fixed[0]
        raise _fixed_by_model(model, f"torch traced the guard {guard}, false at {sizes}; {len(fixed)} such guard(s)",
                              ": the graph would serve the example's sizes only. Export with fewer dynamic dims, "
                              "or once per size")
    info = gm.graph._codegen.pytree_info
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    logger.info("captured %s: %d nodes in %.1fs", type(model).__name__, len(gm.graph.nodes),
                time.perf_counter() - start)
    folded = folded_batch_input_for(type(model).__name__)
    samples = int(kwargs[folded].shape[0]) if folded is not None and kwargs.get(folded) is not None else None
    derived = derived_dims(kwargs, dynamic_dims)
    return CapturedGraph(gm, info.in_spec, info.out_spec, names, dynamic_shapes, samples,
                         dim_symbols, derived,
                         {d.root: d.root_size(input_leaf(kwargs, d.input)) for d in derived}, dict(dim_ranges or {}),
                         expressions, per_sample)
