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

One fix-up is applied to the rewritten graph before export (:func:`clone_aliased_cond_operands`):
operands of the ``cond`` that are views of one another (adaLN ``chunk`` outputs) are fine for
torch.export's pre-dispatch graph but rejected by ``run_decompositions`` (which the ONNX
exporter runs) as "cond_true might be aliasing the input"; each such operand is passed as a
contiguous copy instead (a few (B, D) vectors per step).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import operator
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

from ..config import RFCConfig
from ..passes import capture, find_regions, rewrite
from ..passes.capture import BATCH, example_batch, is_batched
from ..state import StateSpec
from .sidecar import BATCH_DIM

logger = logging.getLogger(__name__)

STATE_IN_PREFIX = "state."
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


# --- the functional module ------------------------------------------------------------------

@dataclasses.dataclass
class TensorInfo:
    name: str
    shape: tuple[int | str, ...]  # "batch" (sidecar.BATCH_DIM) for a dynamic batch
    dtype: torch.dtype

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype).replace("torch.", "")}


class FunctionalStep(torch.nn.Module):
    """``(*model tensors, *state) -> (*model outputs, *state')`` around the rewritten graph."""

    def __init__(self, gm: fx.GraphModule, template: dict[str, Any], tensor_names: list[str],
                 state_names: list[str]):
        super().__init__()
        self.gm = gm
        self.template = template
        self.tensor_names = list(tensor_names)
        self.state_names = list(state_names)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        n = len(self.tensor_names)
        kwargs = rebuild_kwargs(self.template, dict(zip(self.tensor_names, args[:n])))
        state = dict(zip(self.state_names, args[n:]))
        out, new_state = self.gm(kwargs=kwargs, state=state)
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]
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
    fixups: list[str]
    dynamic_batch: int | None = None  # the example batch when the graph takes any batch size

    @property
    def state_shapes(self) -> list[tuple[int | str, ...]]:
        """Each state tensor's shape as the sidecar records it (batch first: "batch" if dynamic)."""
        return [_with_batch_dim(e.shape, e.batch_first and self.dynamic_batch is not None)
                for e in self.state_spec.entries]

    def dynamic_shapes(self) -> dict[str, Any] | None:
        """torch.export ``dynamic_shapes`` for ``module``'s positional args, or None (static)."""
        if self.dynamic_batch is None:
            return None
        shapes = [info.shape for info in self.inputs] + self.state_shapes
        return {"args": tuple({0: BATCH} if shape and shape[0] == BATCH_DIM else None for shape in shapes)}

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs] + [STATE_IN_PREFIX + n for n in self.state_spec.names()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs] + [STATE_OUT_PREFIX + n for n in self.state_spec.names()]


def _with_batch_dim(shape, batched: bool) -> tuple[int | str, ...]:
    return (BATCH_DIM, *shape[1:]) if batched else tuple(shape)


def build_functional(model: torch.nn.Module, example_inputs: dict[str, Any],
                     config: RFCConfig, dynamic_batch: bool = False) -> FunctionalProgram:
    """capture -> find_regions -> rewrite (as CachedModel does), then wrap for export.

    ``dynamic_batch``: the batch size is a symbol in the graph (capture.py's rule says which
    inputs are batched); the program's shapes say "batch" there."""
    call = normalize_kwargs(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        captured = capture(model, call, dynamic_batch=dynamic_batch)
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

    leaves = flatten_kwargs(call)
    tensors = [(name, leaf) for name, leaf in leaves if isinstance(leaf, Tensor)]
    constants = {name: _jsonable(leaf) for name, leaf in leaves if not isinstance(leaf, Tensor)}
    tensor_names = [name for name, _ in tensors]
    spec = step.state_spec
    module = FunctionalStep(gm, call, tensor_names, spec.names())
    module.training = False  # the exported graph is already in eval mode; .eval() would recurse into it
    state = spec.init(_device_of(tensors))
    example_args = (*(t for _, t in tensors), *(state[n] for n in spec.names()))
    with torch.no_grad():
        results = module(*example_args)
    n_out = len(results) - len(spec.entries)
    out_tensors = results[:n_out]
    out_names = ["sample"] if n_out == 1 else [f"output.{i}" for i in range(n_out)]
    batch = example_batch(call) if dynamic_batch else None

    def info(name: str, t: Tensor) -> TensorInfo:
        return TensorInfo(name, _with_batch_dim(t.shape, batch is not None and is_batched(t, batch)), t.dtype)

    return FunctionalProgram(
        module=module,
        example_args=example_args,
        inputs=[info(name, t) for name, t in tensors],
        outputs=[info(name, t) for name, t in zip(out_names, out_tensors)],
        state_spec=spec,
        constants=constants,
        regions=regions,
        output_structure="tuple",
        fixups=fixups,
        dynamic_batch=batch,
    )


def _device_of(tensors: list[tuple[str, Tensor]]) -> torch.device:
    return tensors[0][1].device if tensors else torch.device("cpu")
