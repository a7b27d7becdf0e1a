"""``fold_taylor_ladder``: the Taylor prediction reads the ladder in place (no row copies).

The rewritten step computes a region's Taylor term as one contraction over the ladder rows
``D_1..D_m`` (rfc.py: ``coeffs @ ladder[1:].reshape(m, -1)``) and TaylorSeer's prediction as
``ladder[0] + T``. Exported to ONNX that is::

    D0 = Gather(L, 0)                    # a copy of row 0
    S  = Slice(L, [1], [end], [0])       # a copy of rows 1..m
    T  = Reshape(MatMul(c, Reshape(S, [m, -1])), shape)
    Y  = Add(D0, T)

onnxruntime's CPU Gather/Slice always copy, so a skipped step moved each ladder through
memory about three times (on DiT-S: 24 ladders of 2.4 MB, ~5 ms of a ~19 ms skipped step on one
core). Reshape of the whole ladder is free (onnxruntime aliases it), so the pass rewrites:

* the contraction over all m + 1 rows: ``T = Reshape(MatMul(Concat([0], c), Reshape(L, [m+1, -1])))``
  (no Slice copy); row 0's coefficient is an exact 0 (the cache is finite: the non-finite guard
  checks what a full step writes), and
* when ``T`` and ``D0`` feed nothing but that ``Add``, the Add folded in as row 0's coefficient 1:
  ``Y = Reshape(MatMul(Concat([1], c), Reshape(L, [m+1, -1])))`` (no Gather copy, no Add).

Only this exact pattern is rewritten (constants checked: Slice of rows 1.. of a graph input
along axis 0, Gather of row 0, target shape = the ladder's row shape); anything else is left as
it is. The result equals the original up to float rounding of the sum (tests compare the ONNX
runner with eager PyTorch over whole generations).
"""

from __future__ import annotations

import logging

import numpy as np

from .proto import subgraphs

logger = logging.getLogger(__name__)

_INT64_MAX = np.iinfo(np.int64).max
PREFIX = "rfc_taylor_fold/"


def _constants(graph, outer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    found = dict(outer)
    for init in graph.initializer:
        if init.data_location != 1:  # not external data
            found[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _readers(graph) -> dict[str, list]:
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
        for sub in subgraphs(node):  # outer-scope reads from nested subgraphs count too
            for inner in sub.node:
                for name in inner.input:
                    readers.setdefault(name, []).append(node)
    for out in graph.output:
        readers.setdefault(out.name, []).append(None)
    return readers


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def fold_taylor_ladder(model_proto) -> int:
    """Rewrite the pattern in the module docstring in the main graph (RCS's input prediction)
    and inside every ``If`` branch; returns how many contractions were rewritten (in place)."""
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    input_shapes, input_dtypes = {}, {}
    for vi in graph.input:
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            input_shapes[vi.name] = [d.dim_value for d in dims]
            input_dtypes[vi.name] = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    outer = _constants(graph, {})
    count = _fold_branch(graph, "main", input_shapes, input_dtypes, outer, helper, numpy_helper)  # RCS: X_hat
    for if_node in [n for n in graph.node if n.op_type == "If"]:
        for attr in if_node.attribute:
            if attr.name not in ("then_branch", "else_branch"):
                continue
            count += _fold_branch(attr.g, f"{if_node.name or if_node.output[0]}.{attr.name}", input_shapes,
                                  input_dtypes, _constants(attr.g, outer), helper, numpy_helper)
    return count


def _fold_branch(branch, scope, input_shapes, input_dtypes, constants, helper, numpy_helper) -> int:
    producers = {o: n for n in branch.node for o in n.output}
    readers = _readers(branch)
    remove: list = []
    add: list = []
    count = 0
    for matmul in [n for n in branch.node if n.op_type == "MatMul"]:
        coeffs, view = matmul.input
        v_node = producers.get(view)
        if v_node is None or v_node.op_type != "Reshape" or len(readers.get(view, [])) != 1:
            continue
        s_node = producers.get(v_node.input[0])
        if s_node is None or s_node.op_type != "Slice" or len(readers.get(s_node.output[0], [])) != 1:
            continue
        ladder = s_node.input[0]
        shape = input_shapes.get(ladder)
        if shape is None or ladder in producers or len(shape) < 2:
            continue  # only a ladder that is a graph input (outer-scope state) with a static shape
        rows = shape[0]
        args = [constants.get(name) if name else None for name in list(s_node.input[1:]) + [None] * 4][:4]
        starts, ends, axes, steps = args
        if starts is None or ends is None or list(np.atleast_1d(starts)) != [1]:
            continue
        if int(np.atleast_1d(ends)[0]) < rows:
            continue
        if axes is not None and [int(a) % len(shape) for a in np.atleast_1d(axes)] != [0]:
            continue
        if len(s_node.input) > 3 and s_node.input[3] and axes is None:
            continue  # axes given but not a constant
        if len(s_node.input) > 4 and s_node.input[4] and (steps is None or list(np.atleast_1d(steps)) != [1]):
            continue
        view_shape = constants.get(v_node.input[1])
        if view_shape is None or list(view_shape.shape) != [2] or int(view_shape[0]) != rows - 1:
            continue
        out_readers = readers.get(matmul.output[0], [])
        t_node = out_readers[0] if len(out_readers) == 1 else None
        if t_node is None or t_node.op_type != "Reshape":
            continue
        t_shape = constants.get(t_node.input[1])
        if t_shape is None or [int(d) for d in np.atleast_1d(t_shape)] != shape[1:]:
            continue  # T must have the ladder's row shape (and no 0 / -1 entries)

        # fold the Add(D0, T) in as row 0's coefficient 1 when nothing else reads D0 or T
        add_node, gather = None, None
        t_readers = readers.get(t_node.output[0], [])
        if len(t_readers) == 1 and t_readers[0] is not None and t_readers[0].op_type == "Add":
            candidate = t_readers[0]
            other = candidate.input[1] if candidate.input[0] == t_node.output[0] else candidate.input[0]
            g = producers.get(other)
            if (g is not None and g.op_type == "Gather" and g.input[0] == ladder and int(_attr(g, "axis", 0)) == 0
                    and constants.get(g.input[1]) is not None and constants[g.input[1]].shape == ()
                    and int(constants[g.input[1]]) == 0 and len(readers.get(other, [])) == 1
                    and candidate.input[0] != candidate.input[1]):
                add_node, gather = candidate, g

        tag = f"{PREFIX}{scope}/{matmul.name or matmul.output[0]}"  # names unique across scopes
        dtype = input_dtypes[ladder]
        first = numpy_helper.from_array(np.array([1.0 if add_node is not None else 0.0], dtype=dtype), tag + "/row0")
        add.append(helper.make_node("Constant", [], [tag + "/row0"], name=tag + "/row0_const", value=first))
        flat = numpy_helper.from_array(np.array([-1], dtype=np.int64), tag + "/flat")
        add.append(helper.make_node("Constant", [], [tag + "/flat"], name=tag + "/flat_const", value=flat))
        whole = numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), tag + "/rows")
        add.append(helper.make_node("Constant", [], [tag + "/rows"], name=tag + "/rows_const", value=whole))
        add.append(helper.make_node("Reshape", [coeffs, tag + "/flat"], [tag + "/coeffs_flat"], name=tag + "/coeffs_flat"))
        add.append(helper.make_node("Concat", [tag + "/row0", tag + "/coeffs_flat"], [tag + "/coeffs"], axis=0,
                                    name=tag + "/coeffs"))
        add.append(helper.make_node("Reshape", [ladder, tag + "/rows"], [tag + "/ladder"], name=tag + "/ladder"))
        # the MatMul keeps its output name; its inputs change
        matmul.input[0] = tag + "/coeffs"
        matmul.input[1] = tag + "/ladder"
        remove += [v_node, s_node]
        if add_node is not None:
            t_node.output[0] = add_node.output[0]  # the Reshape now yields the prediction itself
            remove += [add_node, gather]
        count += 1
    if count:
        keep = [n for n in branch.node if not any(n is r for r in remove)]
        del branch.node[:]
        branch.node.extend(add + keep)  # new nodes read only constants and outer-scope/earlier values
        _toposort(branch)
    return count


def _toposort(graph) -> None:
    """Stable topological order of a (sub)graph's nodes; outer-scope names count as available."""
    produced = {o for n in graph.node for o in n.output}

    def reads(node):
        names = list(node.input)
        for sub in subgraphs(node):  # implicit inputs of nested subgraphs
            names += [i for inner in sub.node for i in inner.input]
        return names

    ready = set()
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all((not i) or i not in produced or i in ready for i in reads(node)):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError("fold_taylor_ladder produced a cycle")  # pragma: no cover
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
