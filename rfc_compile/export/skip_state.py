"""Skipped steps do not copy the cache: ``empty_on_skip`` (the ONNX pass) and its inverse.

Why: in the exported step every cache tensor that a skipped step leaves unchanged (Taylor
ladders, RFE ratios, last inputs, the RCS input ladder) still leaves the graph as a
``state_out.*`` output, and the ``If`` node's predict (else) branch produces it as
``Identity(state.<name>)``. onnxruntime cannot alias an output to an input, so every skipped
step copied the whole unchanged cache (57-75 MB on DiT-S, ~15 ms of a 63-98 ms skipped step
on one CPU core).

:func:`empty_on_skip` rewrites, for each ``If`` output that

* is a pure pass-through to a ``state_out.<name>`` graph output (the If output *is* the graph
  output, or only a chain of ``Identity`` nodes leads there and nothing else reads it), and
* is returned by one branch as ``state.<name>`` itself (directly or through ``Identity``
  nodes; the *same* state entry, an outer-scope graph input),

that branch's output into an empty tensor (a ``Constant`` of the state's dtype and shape
``(0, *shape[1:])``: same rank, zero rows), and relaxes the first dimension of the If output,
of the graph output and of any ``value_info`` on the way to unknown. ONNX allows the branches
of an ``If`` to return different shapes. The sidecar's ``kept_on_skip`` lists those state
entries: a runner that gets an empty tensor back keeps its previous buffer (no copy), and
otherwise adopts the returned tensor as the next step's state. 0-d state (counters) and the
decision output (``state_out.last_full``, read for stats) are never rewritten, nor is an If
output that any other node reads (it would see an empty tensor).

:func:`restore_skip_copies` undoes the rewrite (``Identity(state.<name>)`` and the static
shapes again) for consumers that need every state output full-size on every step: Triton's
implicit state and the TensorRT engine build (its runner binds fixed state buffers).
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from .proto import check_model, subgraphs

logger = logging.getLogger(__name__)

#: Name (node and value) of the empty Constant that replaces a pass-through of ``state.<name>``.
EMPTY_PREFIX = "rfc_empty_on_skip/"


def _all_uses(graph, skip_node=None) -> dict[str, int]:
    """How many times each name is read, over ``graph`` and every nested subgraph (outer-scope reads
    included); graph outputs count as reads."""
    uses: dict[str, int] = {}

    def walk(g, top):
        for node in g.node:
            if node is skip_node:
                continue
            for name in node.input:
                if name:
                    uses[name] = uses.get(name, 0) + 1
            for sub in subgraphs(node):
                walk(sub, False)
                for out in sub.output:  # a subgraph output names a value it reads
                    uses[out.name] = uses.get(out.name, 0) + 1
        if top:
            for out in g.output:
                uses[out.name] = uses.get(out.name, 0) + 1

    walk(graph, True)
    return uses


def _producers(graph) -> dict[str, object]:
    return {out: node for node in graph.node for out in node.output}


def _relax_first_dim(value_info) -> None:
    dims = value_info.type.tensor_type.shape.dim
    if len(dims):
        dims[0].Clear()  # neither dim_value nor dim_param: unknown


def _set_dims(value_info, shape: Iterable[int | str]) -> None:
    """Sizes, or a dynamic dim's name or expression (the sidecar's "batch", "image_tokens", ...)."""
    tt = value_info.type.tensor_type
    tt.ClearField("shape")
    tt.shape.SetInParent()
    for d in shape:
        if isinstance(d, str):
            tt.shape.dim.add().dim_param = d
        else:
            tt.shape.dim.add().dim_value = int(d)


def _branch_graphs(node) -> list:
    return [attr.g for attr in node.attribute if attr.name in ("then_branch", "else_branch")]


def empty_on_skip(model_proto, state: list[dict], decision_state: str,
                  input_prefix: str = "state.", output_prefix: str = "state_out.") -> list[str]:
    """Rewrite pass-through state outputs of ``If`` branches into empty tensors (module docstring).

    ``state`` is the sidecar's state list (``name``, ``shape``, ``dtype``). Changes
    ``model_proto`` in place and returns the state names rewritten, in state order.
    """
    from onnx import helper, numpy_helper

    from .sidecar import numpy_dtype

    graph = model_proto.graph
    by_name = {e["name"]: e for e in state}
    graph_inputs = {i.name for i in graph.input}
    graph_outputs = {o.name: o for o in graph.output}
    uses = _all_uses(graph)
    main_producers = _producers(graph)
    value_infos = {vi.name: vi for vi in graph.value_info}
    rewritten: list[str] = []

    for if_node in [n for n in graph.node if n.op_type == "If"]:
        branches = _branch_graphs(if_node)
        for index, if_out in enumerate(if_node.output):
            # 1. If output -> graph output through nothing but Identity nodes, read by nobody else
            chain, name = [if_out], if_out
            while name not in graph_outputs:
                readers = [n for n in graph.node if name in n.input]
                if len(readers) != 1 or readers[0].op_type != "Identity" or uses.get(name, 0) != 1:
                    name = None
                    break
                name = readers[0].output[0]
                chain.append(name)
            if name is None or uses.get(name, 0) != 1:  # the graph output is read by other nodes too
                continue
            if not name.startswith(output_prefix):
                continue
            state_name = name[len(output_prefix):]
            entry = by_name.get(state_name)
            if entry is None or state_name == decision_state or len(entry["shape"]) == 0:
                continue
            source = input_prefix + state_name
            if source not in graph_inputs or source in main_producers:
                continue
            # 2. a branch that returns state.<name> itself
            for branch in branches:
                out_vi = branch.output[index]
                producers = _producers(branch)
                value, hops = out_vi.name, []
                while value in producers and producers[value].op_type == "Identity":
                    hops.append(producers[value])
                    value = producers[value].input[0]
                if value != source or value in producers:
                    continue
                # zero rows, and zero along any dynamic dim (it has no size in an empty constant)
                empty_shape = (0, *(d if isinstance(d, int) else 0 for d in entry["shape"][1:]))
                empty_name = EMPTY_PREFIX + state_name
                constant = helper.make_node(
                    "Constant", [], [empty_name], name=empty_name,
                    value=numpy_helper.from_array(np.zeros(empty_shape, dtype=numpy_dtype(entry["dtype"])),
                                                  empty_name + "/value"))
                branch.node.append(constant)
                out_vi.name = empty_name
                _set_dims(out_vi, empty_shape)
                _drop_dead_identities(branch, hops)
                for value_name in chain:
                    if value_name in value_infos:
                        _relax_first_dim(value_infos[value_name])
                _relax_first_dim(graph_outputs[name])
                if state_name not in rewritten:
                    rewritten.append(state_name)
    if rewritten:
        _sort_nodes(graph)
        check_model(model_proto)
    order = [e["name"] for e in state]
    return sorted(rewritten, key=order.index)


def _drop_dead_identities(branch, hops) -> None:
    """Remove the Identity nodes we walked through when nothing reads their outputs any more."""
    for node in hops:
        uses = _all_uses(branch)
        if not any(uses.get(o, 0) for o in node.output):
            branch.node.remove(node)


def _sort_nodes(graph) -> None:
    """Constants appended to a branch are fine anywhere (no inputs); keep ONNX's topological order
    anyway by moving them to the front of their branch."""
    for node in graph.node:
        for branch in _branch_graphs(node) if node.op_type == "If" else []:
            constants = [n for n in branch.node if n.op_type == "Constant" and n.name.startswith(EMPTY_PREFIX)]
            others = [n for n in branch.node if not (n.op_type == "Constant" and n.name.startswith(EMPTY_PREFIX))]
            if constants:
                del branch.node[:]
                branch.node.extend(constants + others)


def find_empty_on_skip(model_proto, output_prefix: str = "state_out.") -> list[str]:
    """State names whose pass-through was rewritten (the Constants :func:`empty_on_skip` adds)."""
    found = []
    for node in model_proto.graph.node:
        if node.op_type != "If":
            continue
        for branch in _branch_graphs(node):
            for n in branch.node:
                if n.op_type == "Constant" and n.name.startswith(EMPTY_PREFIX):
                    found.append(n.name[len(EMPTY_PREFIX):])
    return found


def restore_skip_copies(model_proto, state: list[dict], kept_on_skip: Iterable[str],
                        input_prefix: str = "state.", output_prefix: str = "state_out."):
    """The inverse of :func:`empty_on_skip` (a copy of ``model_proto``): every ``kept_on_skip``
    state output is full-size on every step again (``Identity(state.<name>)`` in the branch)."""
    import onnx
    from onnx import helper

    from .errors import SidecarMismatchError

    kept = list(kept_on_skip)
    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    if not kept:
        return model
    graph = model.graph
    by_name = {e["name"]: e for e in state}
    value_infos = {vi.name: vi for vi in list(graph.value_info) + list(graph.output)}
    restored = set()
    for if_node in [n for n in graph.node if n.op_type == "If"]:
        for index, if_out in enumerate(if_node.output):
            for branch in _branch_graphs(if_node):
                out_vi = branch.output[index]
                if not out_vi.name.startswith(EMPTY_PREFIX):
                    continue
                state_name = out_vi.name[len(EMPTY_PREFIX):]
                if state_name not in kept or state_name not in by_name:
                    raise SidecarMismatchError(
                        f"the graph returns an empty {state_name!r} on skipped steps, but the sidecar's "
                        f"kept_on_skip does not list it: the .rfc.json is not the one written with this file")
                shape = by_name[state_name]["shape"]
                for n in list(branch.node):
                    if n.op_type == "Constant" and out_vi.name in n.output:
                        branch.node.remove(n)
                copy_name = f"{EMPTY_PREFIX}{state_name}/copy"
                branch.node.append(helper.make_node("Identity", [input_prefix + state_name], [copy_name],
                                                    name=copy_name))
                out_vi.name = copy_name
                _set_dims(out_vi, shape)
                restored.add(state_name)
                # the If output and the Identity chain to the graph output: static shapes again
                name = if_out
                while True:
                    if name in value_infos:
                        _set_dims(value_infos[name], shape)
                    readers = [n for n in graph.node if name in n.input and n.op_type == "Identity"]
                    if name == output_prefix + state_name or len(readers) != 1:
                        break
                    name = readers[0].output[0]
    missing = [name for name in kept if name not in restored]
    if missing:
        raise SidecarMismatchError(
            f"the sidecar lists {missing[:5]} as kept_on_skip, but the graph has no empty-on-skip branch output "
            "for them: the .rfc.json is not the one written with this file")
    check_model(model)
    return model
