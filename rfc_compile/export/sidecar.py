"""The ``<model>.rfc.json`` sidecar: everything a runner needs besides the graph itself.

Written by :func:`rfc_compile.export.to_onnx` next to ``<model>.onnx`` (and copied next to a
TensorRT engine as ``<engine>.rfc.json``). Layout (version 1)::

    {
      "format": "rfc_compile.export", "version": 1,
      "artifact": "model.onnx",                       # the file it describes (basename)
      "external_data": null,                          # or "model.onnx.data": the weights of a > 2 GB model
      "model": {"class": "DiTTransformer2DModel", "module": "diffusers...", "family": "dit",
                "config": {...},                      # the diffusers config (JSON-able values)
                "timestep_rises": false},             # optional: timestep counts up (Z-Image)
      "rfc_config": {"mode": "rfc", "threshold": 0.8, ...},
      "inputs":  [{"name": "hidden_states", "shape": [2, 4, 32, 32], "dtype": "float32"}, ...],
      "outputs": [{"name": "sample", "shape": [...], "dtype": "float32"}],
      "output_structure": "tuple",                    # return_dict=False output, one tensor per entry
      "output_tree": [0],                             # optional: its nesting, outputs by index
      "constants": {"return_dict": false, ...},       # non-tensor kwargs baked into the graph
      "per_sample_constants": {},                     # optional: see below
      "ignored_arguments": [],                        # optional: arguments the graph does not read
      "state": [{"name": "last_full", "input": "state.last_full",
                 "output": "state_out.last_full", "shape": [], "dtype": "int64"}, ...],
      "naming": {"state_input_prefix": "state.", "state_output_prefix": "state_out.",
                 "decision_output": "state_out.last_full"},
      "regions": ["transformer_blocks.0.attn1", ...], "if_nodes": 1,
      "kept_on_skip": ["transformer_blocks_0_attn1.ladder.0", ...],   # see below
      "dynamic_axes": {},                             # static shapes, or the named dynamic dims:
                                                      # {"batch": {"example": 2, "min": 1, "max": 65536}}
      "opset": 18, "fixups": [...], "versions": {"torch": ..., "onnx": ..., "rfc_compile": ...}
    }

State names follow rfc_compile/state.py; every state tensor is zero at the start of a generation.
After each step the runner reads ``state_out.last_full``: the step was computed in full iff
it equals the step index (``state.step`` before the call).

``output_tree`` (optional, default: the outputs as a flat tuple) is the ``return_dict=False``
output's nesting with each tensor replaced by its index in ``outputs``: ``[0]`` for ``(sample,)``,
``[[0, 1]]`` for Z-Image's ``([sample of image 0, sample of image 1],)``, ``0`` for a sample
returned bare (Kandinsky 5). Inner lists come back as lists, the outer one as a tuple.

``kept_on_skip`` (optional, default ``[]``) names the state entries whose ``state_out.*`` comes
back *empty* (zero rows) from a step that left them unchanged (skip_state.py): the runner then
keeps its previous buffer instead of adopting the output. Exactly those state outputs have an
unknown first dimension in the graph; :meth:`Sidecar.check_io` holds the two to each other.

``per_sample_constants`` (optional, default ``{}``): non-tensor arguments with one entry per sample
that a dynamic-batch graph serves any batch of, because the model reads the first sample's entry only
(Qwen-Image's ``img_shapes``, patterns.PER_SAMPLE_ARGUMENTS): each argument's entry, tuples as lists
(``{"img_shapes": [[1, 4, 4]]}``). A call passes one copy of it per sample; the runner refuses any
other value.

``ignored_arguments`` (optional, default ``[]``): arguments the model does not read because another
input of the export replaces them (LTX-2's latent grid and frame rate, given its rotary coordinates;
patterns.ARGUMENTS_REPLACED_BY): a runner takes any value of them.

Dynamic dims: a graph exported with ``dynamic_batch=True`` has the dim ``"batch"`` (``BATCH_DIM``)
where a shape holds the batch size (dim 0 of the batch-first inputs, outputs and state tensors);
``dynamic_dims`` adds named dims such as FLUX's ``"image_tokens"``/``"text_tokens"``. Each one is
listed in ``dynamic_axes``; a shape holds its name, or an expression in the names with ``+ - *
//`` and integers where a size follows several (a FLUX single block's cache holds
``"image_tokens + text_tokens"`` tokens). A runner reads the names' sizes off a call's inputs
(:meth:`Sidecar.with_dims`), allocates the state at those sizes, and starts a new generation when
they change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..dims import Dim, eval_dim
from .errors import InputMismatchError, ModelFileError, SidecarMismatchError

FORMAT = "rfc_compile.export"
BATCH_DIM = "batch"
VERSION = 1
SUFFIX = ".rfc.json"

_NUMPY_DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64,
    "int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool", "tensor(bfloat16)": "bfloat16",
}


def sidecar_path(artifact: str | Path) -> Path:
    return Path(str(artifact) + SUFFIX)


def numpy_dtype(name: str) -> type:
    """The numpy type of a sidecar dtype; ``bfloat16`` is ml_dtypes' (what onnx's numpy_helper
    writes BFLOAT16 constants from; ml_dtypes comes with onnx)."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    try:
        return _NUMPY_DTYPES[name]
    except KeyError:
        raise SidecarMismatchError(f"dtype {name!r} is not supported by the runners "
                                   f"(supported: {sorted(_NUMPY_DTYPES) + ['bfloat16']})") from None


def ort_type_name(ort_type: str) -> str:
    return _ORT_TYPES.get(ort_type, ort_type)


def _dims(shape: list) -> tuple[Dim, ...]:
    return tuple(s if isinstance(s, str) else int(s) for s in shape)


def bind_shape(shape: tuple[Dim, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(eval_dim(d, sizes) for d in shape)


def check_shapes(shapes: list[tuple[Dim, ...]], examples: list[tuple[int, ...]], sizes: dict[str, int]) -> None:
    """Each symbolic shape must give its example's sizes at the example's dims (an export self-check)."""
    for shape, example in zip(shapes, examples):
        if bind_shape(shape, sizes) != tuple(example):
            raise ValueError(f"shape {list(shape)} gives {list(bind_shape(shape, sizes))} at {sizes}, "
                             f"the example has {list(example)}")


@dataclasses.dataclass(frozen=True)
class TensorDesc:
    name: str
    shape: tuple[Dim, ...]
    dtype: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorDesc":
        return cls(str(d["name"]), _dims(d["shape"]), str(d["dtype"]))


@dataclasses.dataclass(frozen=True)
class StateDesc:
    name: str
    input: str
    output: str
    shape: tuple[Dim, ...]
    dtype: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StateDesc":
        return cls(str(d["name"]), str(d["input"]), str(d["output"]), _dims(d["shape"]), str(d["dtype"]))


@dataclasses.dataclass
class Sidecar:
    """Parsed sidecar (see module docstring); ``raw`` keeps the whole JSON."""

    raw: dict[str, Any]
    inputs: list[TensorDesc]
    outputs: list[TensorDesc]
    state: list[StateDesc]
    constants: dict[str, Any]
    decision_output: str
    kept_on_skip: list[str] = dataclasses.field(default_factory=list)
    output_tree: list | int | None = None
    per_sample_constants: dict[str, Any] = dataclasses.field(default_factory=dict)
    ignored_arguments: tuple[str, ...] = ()

    def nest(self, outputs: list) -> Any:
        """The graph's outputs (in ``outputs`` order) as the model returns them (``return_dict=False``):
        a tuple, or the one output itself for a model that returns it bare."""
        if self.output_tree is None:
            return tuple(outputs)

        def build(node):
            return outputs[node] if isinstance(node, int) else [build(child) for child in node]

        return build(self.output_tree) if isinstance(self.output_tree, int) else tuple(map(build, self.output_tree))

    @property
    def model_class(self) -> str:
        return str(self.raw.get("model", {}).get("class", "?"))

    @property
    def timestep_rises(self) -> bool:
        """The model's timestep counts up over a generation (Z-Image; absent: it counts down)."""
        return bool(self.raw.get("model", {}).get("timestep_rises", False))

    @property
    def rfc_config(self) -> dict[str, Any]:
        return dict(self.raw.get("rfc_config", {}))

    def state_by_name(self) -> dict[str, StateDesc]:
        return {s.name: s for s in self.state}

    @property
    def example_dims(self) -> dict[str, int]:
        """The dynamic dims' sizes in the export's example ({} for a static graph)."""
        return {name: int(axis["example"]) for name, axis in self.raw.get("dynamic_axes", {}).items()}

    def graph_io(self) -> tuple[dict[str, tuple[tuple[Dim, ...], str]], dict[str, tuple[tuple[Dim, ...], str]]]:
        """The graph's inputs and outputs by name, ``state.*`` / ``state_out.*`` included:
        ``({name: (shape, dtype)}, {name: (shape, dtype)})``."""
        inputs = {d.name: (d.shape, d.dtype) for d in self.inputs} | {s.input: (s.shape, s.dtype) for s in self.state}
        outputs = ({d.name: (d.shape, d.dtype) for d in self.outputs}
                   | {s.output: (s.shape, s.dtype) for s in self.state})
        return inputs, outputs

    def names_of_dtype(self, dtype: str) -> list[str]:
        """Inputs, outputs and state entries of ``dtype`` (e.g. "bfloat16", which onnxruntime cannot run)."""
        return [d.name for d in [*self.inputs, *self.outputs, *self.state] if d.dtype == dtype]

    @property
    def dim_ranges(self) -> dict[str, tuple[int, int]]:
        """Each dynamic dim's allowed sizes (min, max): torch.export's range for an ONNX graph, the
        optimisation profile's for a TensorRT engine."""
        return {name: (int(axis["min"]), int(axis["max"])) for name, axis in self.raw.get("dynamic_axes", {}).items()}

    def check_dims(self, sizes: dict[str, int]) -> None:
        """InputMismatchError unless every dynamic dim's size lies in its range (``dim_ranges``)."""
        for name, (lo, hi) in self.dim_ranges.items():
            if name in sizes and not lo <= sizes[name] <= hi:
                raise InputMismatchError(
                    f"{name!r} is {sizes[name]} in this call; {self.raw.get('artifact', 'the graph')} serves "
                    f"{lo}..{hi} (an engine: its optimisation profile, set by build_engine's dims)")

    @property
    def example_batch(self) -> int | None:
        """The export's batch size if the graph takes any batch size (``dynamic_batch``), else None."""
        return self.example_dims.get(BATCH_DIM)

    def with_dims(self, sizes: dict[str, int]) -> "Sidecar":
        """This description with the dynamic dims bound to ``sizes`` (static shapes throughout)."""
        return dataclasses.replace(
            self,
            inputs=[dataclasses.replace(d, shape=bind_shape(d.shape, sizes)) for d in self.inputs],
            outputs=[dataclasses.replace(d, shape=bind_shape(d.shape, sizes)) for d in self.outputs],
            state=[dataclasses.replace(s, shape=bind_shape(s.shape, sizes)) for s in self.state])

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: str = "sidecar") -> "Sidecar":
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ModelFileError(f"{where} is not an rfc_compile export sidecar (format != {FORMAT!r})")
        if int(raw.get("version", -1)) != VERSION:
            raise ModelFileError(f"{where} has sidecar version {raw.get('version')!r}; this rfc_compile "
                                 f"reads version {VERSION}: re-export the model")
        try:
            naming = raw["naming"]
            sidecar = cls(
                raw=raw,
                inputs=[TensorDesc.from_json(d) for d in raw["inputs"]],
                outputs=[TensorDesc.from_json(d) for d in raw["outputs"]],
                state=[StateDesc.from_json(d) for d in raw["state"]],
                constants=dict(raw.get("constants", {})),
                decision_output=str(naming["decision_output"]),
                kept_on_skip=[str(n) for n in raw.get("kept_on_skip", [])],
                output_tree=raw.get("output_tree"),
                per_sample_constants=dict(raw.get("per_sample_constants", {})),
                ignored_arguments=tuple(str(n) for n in raw.get("ignored_arguments", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{where} is malformed ({type(exc).__name__}: {exc}); re-export the model") from None
        try:  # every symbolic size is an expression in the listed dims, every example in its range
            sidecar.with_dims(sidecar.example_dims)
            sidecar.check_dims(sidecar.example_dims)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{where} has inconsistent dynamic dims ({exc}); re-export the model") from None
        if sidecar.output_tree is not None and sorted(_leaves(sidecar.output_tree)) != list(range(len(sidecar.outputs))):
            raise ModelFileError(f"{where}'s output_tree {sidecar.output_tree} does not place each of its "
                                 f"{len(sidecar.outputs)} outputs once; re-export the model")
        states = sidecar.state_by_name()
        for name in sidecar.kept_on_skip:
            entry = states.get(name)
            if entry is None or not entry.shape or entry.output == sidecar.decision_output:
                why = ("is not a state entry" if entry is None else "is 0-d" if not entry.shape
                       else "is the decision output")
                raise ModelFileError(f"{where} lists {name!r} in kept_on_skip, but it {why}; re-export the model")
        return sidecar

    @classmethod
    def load(cls, artifact: str | Path) -> "Sidecar":
        path = sidecar_path(artifact)
        if not path.is_file():
            raise ModelFileError(f"no sidecar {path} next to {artifact}: export with rfc_compile.export.to_onnx, "
                                 "which writes it (the runner needs its state description)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"sidecar {path} is not valid JSON ({exc})") from None
        return cls.from_json(raw, where=f"sidecar {path}")

    def save(self, artifact: str | Path) -> Path:
        path = sidecar_path(artifact)
        path.write_text(json.dumps(self.raw, indent=2, sort_keys=False) + "\n")
        return path

    # --- checks against a loaded graph -----------------------------------------------------

    def check_io(self, graph_inputs: dict[str, tuple[tuple, str]], graph_outputs: dict[str, tuple[tuple, str]],
                 where: str) -> None:
        """Raise SidecarMismatchError unless the graph's I/O is exactly what the sidecar says.

        ``graph_inputs``/``graph_outputs`` map name -> (shape, dtype name); a non-int dim
        (symbolic) matches anything, a named dim in the sidecar matches only a symbolic one.
        """
        expected_in, expected_out = self.graph_io()
        problems = _diff("input", expected_in, graph_inputs) + _diff("output", expected_out, graph_outputs)
        problems += self._diff_kept_on_skip(graph_outputs)
        if self.decision_output not in graph_outputs:
            problems.append(f"decision output {self.decision_output!r} missing from the graph")
        if problems:
            shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
            raise SidecarMismatchError(
                f"the sidecar does not match {where}: {shown}. The .rfc.json must be the one written "
                "together with this file by the same export")

    def _diff_kept_on_skip(self, graph_outputs: dict[str, tuple[tuple, str]]) -> list[str]:
        """A state output may come back empty (unknown first dim in the graph) iff the sidecar's
        ``kept_on_skip`` lists it: otherwise a runner would adopt an empty tensor as the cache, or
        keep a stale buffer where the graph returned a new one."""
        kept = set(self.kept_on_skip)
        problems = []
        for s in self.state:
            if s.output not in graph_outputs or not s.shape:
                continue
            shape = graph_outputs[s.output][0]
            if shape is None or len(shape) != len(s.shape):
                continue  # reported by _diff
            rows_unknown = not isinstance(shape[0], int) and shape[0] != s.shape[0]  # not a named dim either
            if s.name in kept and not rows_unknown:
                problems.append(f"kept_on_skip lists state {s.name!r}, but the graph's {s.output!r} has the static "
                                f"shape {list(shape)} (it never comes back empty)")
            elif s.name not in kept and rows_unknown:
                problems.append(f"the graph's {s.output!r} may come back empty on skipped steps (shape "
                                f"{list(shape)}), but kept_on_skip does not list state {s.name!r}")
        return problems


def _leaves(tree: Any) -> list:
    """The leaves of a JSON nesting of lists (an ``output_tree``); anything but an int or list is a
    leaf too, so that a malformed tree fails the check that reads them."""
    return [leaf for child in tree for leaf in _leaves(child)] if isinstance(tree, list) else [tree]


def _diff(kind: str, expected: dict[str, tuple[tuple, str]], got: dict[str, tuple[tuple, str]]) -> list[str]:
    problems = []
    for name in expected:
        if name not in got:
            problems.append(f"{kind} {name!r} is in the sidecar but not in the graph")
    for name in got:
        if name not in expected:
            problems.append(f"graph {kind} {name!r} is not in the sidecar")
    for name, (shape, dtype) in expected.items():
        if name not in got:
            continue
        g_shape, g_dtype = got[name]
        if g_dtype != dtype:
            problems.append(f"{kind} {name!r} has dtype {g_dtype} in the graph, {dtype} in the sidecar")
        elif g_shape is not None and (len(g_shape) != len(shape) or any(
                isinstance(a, int) and a != b for a, b in zip(g_shape, shape))):
            problems.append(f"{kind} {name!r} has shape {list(g_shape)} in the graph, {list(shape)} in the sidecar")
    return problems
