"""ONNX export of the rewritten cached step: ``to_onnx(model, path, example_inputs, config)``.

The exported graph is the step that CachedModel runs, as a pure function::

    inputs : <model tensor kwargs>            e.g. hidden_states, timestep, class_labels
             state.<name>                     one per cache tensor (rfc_compile/state.py names)
    outputs: sample (or output.<i>)           the model output (return_dict=False order)
             state_out.<name>                 the new cache tensors

The cache decision is computed inside the graph and the regions sit behind one ``If`` node
(``torch.cond``). ``state_out.last_full`` equals the step index (``state.step``) exactly when
the step ran in full, so a runner reports stats without evaluating the predicate on the host.
Every state tensor is zero at the start of a generation. A ``<path>.rfc.json`` sidecar
(sidecar.py) describes inputs, outputs, state, config and model, so a runner needs nothing else.

Shapes are the example inputs' (batch, resolution, text length), except for dynamic dims:
with ``dynamic_batch=True`` capture and rewrite trace with a symbolic batch (capture.py's
``BATCH``; every batched input, the output and every state tensor but the counters have it as
dim 0, named ``"batch"`` in the graph and the sidecar), and ``dynamic_dims`` names more (FLUX's
image and text token counts, ``patterns.TOKEN_DIMS``; a video's latent frames), or makes an input
size a multiple of a named dim (``"2*grid_height"``: the latent height of a model with 2x2 patches,
``patterns.RESOLUTION_DIMS``; the step is traced with the grid as the symbol, CachedStep's ``dims``,
and the ``dims.<name>`` inputs that carry it are rebuilt inside the graph, fix-up
``dims_from_inputs``). The state's sizes are traced as torch.export finds they follow the named dims
(a ladder's token count; a FLUX single block's image + text tokens; Sana's grid_height*grid_width),
and the sidecar records those expressions; the runner sizes the cache for each call. A model whose
code fixes a size asked to be dynamic (Mochi's rotary positions fix the latent height; DiT's latents
must be square) gets a clear error at capture and keeps a static resolution:
export once per serving resolution (the runners raise a clear error for any other shape).

ONNX-level fix-ups (recorded in the sidecar's ``fixups``):
* ``dims_from_inputs``: the ``dims.<name>`` inputs of a graph with inputs sized as multiples of a
  named dim are computed from those inputs' shapes instead (dim_inputs.py).
* ``squeeze_axes``: ``Squeeze`` nodes whose axes input names a dimension that is not 1 in the
  inferred shape (onnxruntime refuses to load it, "Squeeze: dimension ... must be 1") are dropped
  when the axis is provably not squeezable, see :func:`fix_squeeze`. The model's own no-op squeezes
  (PixArt's, LTX-2's) are already gone at capture (passes/noop_squeeze.py); this catches any the
  exporter's lowering adds.
* ``empty_on_skip``: state outputs that the ``If``'s predict branch passes through unchanged
  (``Identity(state.<name>)``: ladders, ratios, last inputs) come back as an empty tensor from a
  skipped step instead of a copy of the cache; the sidecar's ``kept_on_skip`` lists them and the
  runner keeps its buffer (skip_state.py). ``to_onnx(..., empty_on_skip=False)`` keeps the copies.
  Triton and TensorRT get the graph with the copies restored (their state outputs are full-size every step).
* ``reduce_l2_as_sum_of_squares``: a ``ReduceL2`` (from the model's own code; RFC's norms are
  exported as ``Mul`` + ``ReduceSum`` already, see rfc.py's ``sample_sq_norm``) becomes
  ``Sqrt(ReduceSum(Mul(x, x)))``, the same function, because onnxruntime's CUDA provider runs
  ``ReduceL2`` ~100x slower and its CPU provider ~2x slower (reduce_l2.py).
* ``bool_where_as_logic``: a ``Where`` over bool tensors (``masked_fill`` of a bool mask, e.g.
  HunyuanVideo's attention mask) becomes ``Or(And(c, x), And(Not(c), y))``, the same function,
  because onnxruntime's CPU provider has no bool ``Where`` kernel and refuses to load the graph
  (bool_where.py).
* ``einsum_common_type``: an ``Einsum`` over operands of different float types (HiDream-I1's
  float32 positions times its float64 rotary frequencies, in the graph at a dynamic batch) gets
  its operands cast to the type torch computes in, as onnxruntime takes one type (einsum_types.py).
* ``branch_cse``: common-subexpression elimination inside the ``If`` branches, which the
  exporter's optimizer does not enter: every region recomputed the same Taylor coefficients
  (cse.py; DiT-S TaylorSeer predict branch 806 -> 302 nodes, RFE 1376 -> 872).

The exporter's optimizer runs without onnxscript's reshape-around-MatMul rules, which change
results when sizes coincide (safe_rewrites.py: a FLUX graph with 3 text tokens and Taylor
order 2 predicted over the tokens instead of the ladder rows).

The exporter's per-node Python stack traces (node metadata) are dropped: they were ~94 of the
97 MB of a DiT-S RFE graph (:func:`drop_debug_metadata`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import RFCConfig
from ..passes.capture import BATCH_MAX, DIM_MAX, DimRanges, DynamicDims
from ..passes.patterns import model_timestep_rises
from .bool_where import bool_where_as_logic
from .einsum_types import einsum_common_type
from .translations import custom_translations
from .cse import branch_cse
from .errors import ExportError, ModelFileError
from .dim_inputs import dims_from_inputs
from .graph import DECISION_STATE, DIM_INPUT_PREFIX, STATE_IN_PREFIX, STATE_OUT_PREFIX, build_functional
from .proto import all_graphs, infer_shapes, save_model
from .reduce_l2 import reduce_l2_as_sum_of_squares
from .safe_rewrites import without_unsound_rewrites
from .sidecar import BATCH_DIM, FORMAT, VERSION, Sidecar, ort_type_name
from .skip_state import empty_on_skip as rewrite_empty_on_skip

logger = logging.getLogger(__name__)


_FAMILIES = {
    "DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart",
    "FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
}


@dataclasses.dataclass
class OnnxExport:
    """What :func:`to_onnx` wrote."""

    onnx_path: Path
    sidecar_path: Path
    sidecar: Sidecar
    triton_model_dir: Path | None = None
    seconds: float = 0.0


def model_family(model: torch.nn.Module) -> str:
    name = type(model).__name__
    return _FAMILIES.get(name, name.lower())


def _model_config(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    out = {}
    for key, value in dict(config).items():
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out[key] = list(value)
        else:
            out[key] = repr(value)
    return out


def _value_info(value_infos) -> dict[str, tuple[tuple, str]]:
    import onnx

    out = {}
    for vi in value_infos:
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "?"
        out[vi.name] = (dims, "bool" if dtype == "bool" else dtype)
    return out


def count_if_nodes(model_proto) -> int:
    """``If`` nodes in the main graph (the cached regions' branch)."""
    return sum(1 for node in model_proto.graph.node if node.op_type == "If")


#: Node metadata the dynamo exporter writes that is only a debugging aid: the Python stack of
#: every node, repeated for each node a module's code produced (~94 MB of a DiT-S RFC graph's 97).
DROPPED_METADATA = ("pkg.torch.onnx.stack_trace",)


def drop_debug_metadata(model_proto) -> int:
    """Remove :data:`DROPPED_METADATA` from every node, If branches included; returns the bytes
    removed. The other metadata (fx node, name scopes: what a node came from) stays."""
    removed = 0
    for graph in all_graphs(model_proto.graph):
        for node in graph.node:
            kept = [p for p in node.metadata_props if p.key not in DROPPED_METADATA]
            if len(kept) != len(node.metadata_props):
                removed += sum(len(p.value) for p in node.metadata_props if p.key in DROPPED_METADATA)
                del node.metadata_props[:]
                node.metadata_props.extend(kept)
    return removed


def fix_squeeze(model_proto) -> int:
    """Drop ``Squeeze`` axes that shape inference proves are not of size 1, in the graph and in
    the ``If`` branches.

    The dynamo exporter lowers ``aten.squeeze.dim`` to ``Squeeze(x, axes)`` unconditionally,
    whereas PyTorch's squeeze of a dim whose size is not 1 is a no-op; onnxruntime then fails
    to load the model ("Squeeze ... Dimension of input ... must be 1"; PixArt's graph, LTX-2's
    cached step, whose modulation squeezes (B, 1, D) tensors at dim 2). Shape inference gives the
    static sizes (a dynamic export's named dims stay unknown and their axes are kept): axes of a
    known size != 1 are removed, and a Squeeze left with no axis becomes an Identity.
    Returns the number of nodes changed.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    try:
        inferred = infer_shapes(model_proto, strict_mode=False, data_prop=True)
    except Exception as exc:  # shape inference is best effort here
        logger.warning("shape inference failed (%s); Squeeze fix-up skipped", exc)
        return 0

    def subgraphs(node, inferred_node):
        return [(a.g, b.g) for a, b in zip(node.attribute, inferred_node.attribute)
                if a.type == onnx.AttributeProto.GRAPH]

    def squeeze_axes_names(graph) -> set[str]:
        names = {n.input[1] for n in graph.node if n.op_type == "Squeeze" and len(n.input) > 1}
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    names |= squeeze_axes_names(attribute.g)
        return names

    axes_names = squeeze_axes_names(model_proto.graph)
    constants = {init.name: numpy_helper.to_array(init) for init in model_proto.graph.initializer
                 if init.name in axes_names}  # not the weights: a copy of each

    def fix(graph, inferred_graph, outer_shapes: dict, outer_constants: dict) -> int:
        shapes = dict(outer_shapes)  # a symbolic dim (dynamic batch / tokens) is None: never provably != 1
        for vi in list(inferred_graph.value_info) + list(inferred_graph.input) + list(inferred_graph.output):
            if vi.type.tensor_type.HasField("shape"):
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                   for d in vi.type.tensor_type.shape.dim]
        known = dict(outer_constants)
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                known[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        changed = nested = 0  # this graph's Squeezes; the branches' (changed in place)
        new_nodes = []
        for node, inferred_node in zip(graph.node, inferred_graph.node):
            for branch, inferred_branch in subgraphs(node, inferred_node):
                nested += fix(branch, inferred_branch, shapes, known)
            if node.op_type == "Squeeze" and len(node.input) > 1 and node.input[1] in known \
                    and node.input[0] in shapes:
                shape = shapes[node.input[0]]
                axes = [int(a) % len(shape) if shape else int(a) for a in np.atleast_1d(known[node.input[1]])]
                keep = [a for a in axes if not shape or shape[a] in (1, None)]
                if len(keep) != len(axes):
                    changed += 1
                    if not keep:
                        new_nodes.append(onnx.helper.make_node("Identity", [node.input[0]], list(node.output),
                                                               name=node.name + "_identity"))
                        continue
                    axes_name = f"{node.name}_axes_fixed"
                    new_nodes.append(onnx.helper.make_node(
                        "Constant", [], [axes_name], name=axes_name,
                        value=numpy_helper.from_array(np.array(keep, dtype=np.int64))))
                    node.input[1] = axes_name
            new_nodes.append(node)
        if changed:  # the node list rebuilt only for this graph's own changes (an If's copy is a branch's)
            del graph.node[:]
            graph.node.extend(new_nodes)
        return changed + nested

    return fix(model_proto.graph, inferred.graph, {}, constants)


def _cause_chain(exc: BaseException, handled: BaseException | None = None) -> str:
    """The first line of each exception down the cause chain: torch.onnx's own is a generic list of
    next steps, the cause (e.g. "No ONNX function found for aten.split_with_sizes ... complex-valued
    input") is what says why. ``handled``: the exception the caller was handling when it called
    ``to_onnx`` (a fallback export in an ``except`` block): every exception raised inside has it as
    context, and it is not a cause."""
    lines: list[str] = []
    seen: set[int] = {id(handled)} if handled is not None else set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        lines.append(f"{type(current).__name__}: {text.splitlines()[0] if text else ''}")
        current = current.__cause__ or current.__context__
    return " <- ".join(lines)


def to_onnx(model: torch.nn.Module, path: str | os.PathLike, example_inputs: dict[str, Any],
            config: RFCConfig | None = None, *, opset: int | None = None, check: bool = True,
            triton: bool | str | os.PathLike = False, triton_model_name: str | None = None,
            empty_on_skip: bool = True, dynamic_batch: bool = False,
            dynamic_dims: DynamicDims | None = None, dim_ranges: DimRanges | None = None) -> OnnxExport:
    """Export ``model`` with RFC traced in as an ONNX graph with explicit state I/O.

    Args:
        model: a diffusers transformer the passes understand (DiT, PixArt, FLUX, ...), or a
            CachedModel from ``rfc_compile.optimize`` (its model and, by default, its config).
        path: the ``.onnx`` file to write; ``<path>.rfc.json`` is written beside it.
        example_inputs: forward kwargs with the serving shapes (static, but see ``dynamic_batch``).
        config: the RFC configuration baked into the graph (default ``RFCConfig()``).
        opset: ONNX opset (default: the exporter's, 18 with torch 2.13).
        check: load the result in onnxruntime (CPU) and compare its I/O with the sidecar.
        triton: also write a Triton model repository: True for ``<dir of path>/model_repository``
            (Triton's usual name; a directory named ``triton`` would be imported as the triton package,
            which torch probes for, by any script run from there), or a
            directory (see triton.py); the model is named ``triton_model_name`` (default: the
            file's stem).
        empty_on_skip: state the skipped branch leaves unchanged comes back empty instead of
            copied (skip_state.py); the ONNX runner keeps its buffer. False: plain copies.
        dynamic_batch: the graph takes any batch size (the ``"batch"`` dim of the batched
            inputs, the output and the state); other dims stay the example's. Give an example
            batch of 2 or more (torch.export specializes a batch of 1) that no other input's first
            dim equals (capture.py: such a tensor is batched, except patterns.batch_axes_for).
            OnnxCachedModel allocates the cache at each call's batch size.
        dynamic_dims: more dynamic dims, by name: ``{input: {dim index: name}}``, one name per
            size that varies together (e.g. FLUX's token counts, ``patterns.TOKEN_DIMS``; example
            sizes of 2 or more, distinct from each other). The cache's sizes follow them as the
            model computes them (a FLUX single block's: image + text tokens). A size may be a
            multiple of a named dim plus a constant (``"2*grid_height"``, ``patterns.RESOLUTION_DIMS``:
            the latent grid of a model with 2x2 patches), or an expression in dims named elsewhere
            (``"grid_height*grid_width"``); a tuple input takes one dict per element. The Triton model's state is variable-size
            then (triton.py); a TensorRT engine serves the ranges given to ``build_engine(dims=...)``
            (tensorrt.py).
        dim_ranges: a named dim's ``(min, max)`` where the model bounds it (default 1 .. 65536;
            Wan's rotary table bounds its latent grid, ``patterns.resolution_dims_for``); recorded in
            the sidecar, and the runners refuse sizes outside.
    """
    import onnx

    from ..runtime import CachedModel

    handled = sys.exc_info()[1]  # called from an except block: not a cause of what fails here
    if isinstance(model, CachedModel):  # rfc_compile.optimize(...) output: export what it wraps
        config = config if config is not None else model.rfc_config
        model = model.model
    config = config if config is not None else RFCConfig()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal
        program = build_functional(model, example_inputs, config, dynamic_batch=dynamic_batch,
                                   dynamic_dims=dynamic_dims, dim_ranges=dim_ranges)
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..." x4
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        warnings.filterwarnings("ignore", message=".*axis name: .* will not be used")  # one Dim, many inputs
        try:
            with without_unsound_rewrites():  # safe_rewrites.py: a rule that changes results
                onnx_program = torch.onnx.export(
                    program.module, program.example_args, None, dynamo=True, input_names=program.input_names,
                    output_names=program.output_names, opset_version=opset, optimize=True, verbose=False,
                    dynamic_shapes=program.dynamic_shapes(), custom_translation_table=custom_translations())
        except Exception as exc:
            raise ExportError(f"torch.onnx.export of the cached {type(model).__name__} failed: "
                              f"{_cause_chain(exc, handled)[:2000]}") from exc
        finally:
            registration_log.setLevel(level)
    proto = onnx_program.model_proto
    fixups = list(program.fixups)
    n_dims = dims_from_inputs(proto, DIM_INPUT_PREFIX, program.derived_dims)
    if n_dims:
        fixups.append(f"dims_from_inputs({n_dims})")
    n_squeeze = fix_squeeze(proto)
    if n_squeeze:
        fixups.append(f"squeeze_axes({n_squeeze})")
    n_bool_where = bool_where_as_logic(proto)
    if n_bool_where:
        fixups.append(f"bool_where_as_logic({n_bool_where})")
    n_einsum = einsum_common_type(proto)
    if n_einsum:
        fixups.append(f"einsum_common_type({n_einsum})")
    n_l2 = reduce_l2_as_sum_of_squares(proto)
    if n_l2:
        fixups.append(f"reduce_l2_as_sum_of_squares({n_l2})")
    n_dropped = drop_debug_metadata(proto)
    if n_dropped:
        logger.info("dropped %.1f MB of node stack traces from the ONNX graph", n_dropped / 1e6)
    n_if = count_if_nodes(proto)
    if config.mode != "full" and n_if != 1:
        raise ExportError(f"expected one If node (the cached regions' branch) in the exported graph, found {n_if}")
    state_json = [
        {"name": e.name, "input": STATE_IN_PREFIX + e.name, "output": STATE_OUT_PREFIX + e.name,
         "shape": list(shape), "dtype": str(e.dtype).replace("torch.", "")}
        for e, shape in zip(program.state_spec.entries, program.state_shapes)
    ]
    kept_on_skip: list[str] = []
    if empty_on_skip and n_if:
        kept_on_skip = rewrite_empty_on_skip(proto, state_json, DECISION_STATE, STATE_IN_PREFIX, STATE_OUT_PREFIX)
        if kept_on_skip:
            fixups.append(f"empty_on_skip({len(kept_on_skip)})")
    n_cse = branch_cse(proto)  # last: the passes above leave duplicates too (empty-tensor constants)
    if n_cse:
        fixups.append(f"branch_cse({n_cse})")

    external = save_model(proto, path)

    graph_inputs = _value_info(proto.graph.input)
    graph_outputs = _value_info(proto.graph.output)
    state_names = program.state_spec.names()
    unused = [i.name for i in program.inputs if i.name not in graph_inputs]
    raw = {
        "format": FORMAT,
        "version": VERSION,
        "artifact": path.name,
        "external_data": external.name if external else None,  # the weights of a > 2 GB model
        "model": {"class": type(model).__name__, "module": type(model).__module__,
                  "family": model_family(model), "config": _model_config(model),
                  "timestep_rises": model_timestep_rises(model)},
        "rfc_config": config.to_dict(),
        "inputs": [i.to_json() for i in program.inputs if i.name in graph_inputs],
        "unused_inputs": unused,
        "outputs": [o.to_json() for o in program.outputs],
        "output_structure": program.output_structure,
        "output_tree": program.output_tree,
        "constants": program.constants,
        "per_sample_constants": program.per_sample_constants,
        "ignored_arguments": list(program.ignored_arguments),
        "state": state_json,
        "naming": {"state_input_prefix": STATE_IN_PREFIX, "state_output_prefix": STATE_OUT_PREFIX,
                   "decision_output": STATE_OUT_PREFIX + DECISION_STATE,
                   "step_input": STATE_IN_PREFIX + "step"},
        "regions": program.regions,
        "cached_regions": program.regions if config.mode != "full" else [],
        "if_nodes": n_if,
        "kept_on_skip": kept_on_skip,
        "dynamic_axes": {name: dict(zip(("example", "min", "max"), (size, *_dim_range(name, program.dim_ranges))))
                         for name, size in program.dynamic_axes.items()},
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "fixups": fixups,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "rfc_compile": _version()},
    }
    if unused:
        logger.info("inputs %s are not used by the graph and are not ONNX inputs", unused)
    sidecar = Sidecar.from_json(raw)
    sidecar.check_io(graph_inputs, graph_outputs, where=str(path))
    sidecar_file = sidecar.save(path)
    if check and sidecar.names_of_dtype("bfloat16"):
        logger.warning("%s has bfloat16 tensors: not loaded in onnxruntime, whose CPU provider has no bfloat16 "
                       "kernels (serve it with TensorRT, TrtCachedModel; or export in float16)", path)
    elif check:
        check_loads(path)
    result = OnnxExport(path, sidecar_file, sidecar)
    if triton:
        from .triton import write_triton_repository

        repo = Path(triton) if not isinstance(triton, bool) else path.parent / "model_repository"
        result.triton_model_dir = write_triton_repository(path, repo, triton_model_name or path.stem)
    result.seconds = time.perf_counter() - start
    logger.info("exported %s to %s in %.1fs (%d state tensors, %d If node(s))", type(model).__name__, path,
                result.seconds, len(state_names), n_if)
    return result


def _dim_range(name: str, ranges: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """A dynamic dim's (min, max) as torch.export was given it (capture.named_dim)."""
    return (1, BATCH_MAX) if name == BATCH_DIM else ranges.get(name, (1, DIM_MAX))


def _version() -> str:
    from .. import __version__

    return __version__


def check_loads(path: str | os.PathLike) -> None:
    """Load ``path`` in onnxruntime (CPU) and check it against its sidecar; clear errors otherwise."""
    from .ort_runner import open_session

    open_session(Path(path), Sidecar.load(path), ["CPUExecutionProvider"])


def graph_io_from_session(session) -> tuple[dict[str, tuple[tuple, str]], dict[str, tuple[tuple, str]]]:
    def io(args):
        return {a.name: (tuple(d if isinstance(d, (int, str)) else "?" for d in (a.shape or [])), ort_type_name(a.type))
                for a in args}

    return io(session.get_inputs()), io(session.get_outputs())


__all__ = ["to_onnx", "OnnxExport", "fix_squeeze", "count_if_nodes", "check_loads", "ModelFileError"]
