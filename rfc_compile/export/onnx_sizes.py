"""ONNX nodes that compute sizes at run time from the graph's input shapes.

A dynamic dim is read off an input that shows it: an axis whose size is ``scale * dim + offset``
(``"2*grid_height"``), so the dim is ``(Shape(axis) - offset) / scale``. Two fix-ups need that:
``dims_from_inputs`` (dim_inputs.py: the traced step's ``dims.<name>`` inputs rebuilt inside the
graph) and the Triton model (triton.py: zeros of a state's shape at the request's sizes). Both
build their nodes here, so the solve is written once.
"""

from __future__ import annotations

import ast
from collections.abc import Callable

import numpy as np

from ..dims import fold_dim

#: where a dim shows: (input name, axis, scale, offset), that axis's size is scale * dim + offset
DimSource = tuple[str, int, int, int]


class SizeNodes:
    """Appends to ``nodes`` (and ``inits``, for constants) the ONNX nodes computing sizes, one node per
    distinct value, each an int64 (1,) tensor named ``<prefix>size/<n>`` (``<prefix>const/<value>`` for
    a constant)."""

    _OPS = {ast.Add: "Add", ast.Sub: "Sub", ast.Mult: "Mul", ast.FloorDiv: "Div"}  # Div truncates: // for sizes >= 0

    def __init__(self, where: dict[str, DimSource], nodes: list, inits: list, prefix: str):
        self.where, self.nodes, self.inits, self.prefix = where, nodes, inits, prefix
        self.cache: dict[tuple, str] = {}

    def shape(self, shape) -> str:
        """Name of an int64 (rank,) tensor holding ``shape`` (ints and size expressions)."""
        from onnx import helper

        sizes = [self.size(d) for d in shape]
        return self._node(("shape", *sizes), lambda out: helper.make_node("Concat", sizes, [out], axis=0))

    def size(self, dim: int | str) -> str:
        """Name of an int64 (1,) tensor holding one size (dims.fold_dim's grammar); ValueError where a
        dim shows in no input."""
        if isinstance(dim, int):
            return self.constant(dim)
        return fold_dim(dim, self.dim, self.constant, self._binary)

    def dim(self, name: str) -> str:
        """The size of a named dim, read off the input that shows it (``Shape`` of one axis)."""
        from onnx import helper

        if name not in self.where:
            raise ValueError(f"no model input shows the dim {name!r}")
        source, axis, scale, offset = self.where[name]
        size = self._node(("shape", source, axis), lambda out: helper.make_node(
            "Shape", [source], [out], start=axis, end=axis + 1))
        if offset:
            size = self._binary(ast.Sub, size, self.constant(offset))
        return self._binary(ast.FloorDiv, size, self.constant(scale)) if scale != 1 else size

    def constant(self, value: int) -> str:
        from onnx import numpy_helper

        key = ("const", value)
        if key not in self.cache:
            self.cache[key] = f"{self.prefix}const/{value}"
            self.inits.append(numpy_helper.from_array(np.array([value], dtype=np.int64), self.cache[key]))
        return self.cache[key]

    def _binary(self, op: type[ast.operator], left: str, right: str) -> str:
        from onnx import helper

        return self._node((op.__name__, left, right),
                          lambda out: helper.make_node(self._OPS[op], [left, right], [out]))

    def _node(self, key: tuple, make: Callable[[str], object]) -> str:
        """One node per distinct value: ``make(output name)`` the first time ``key`` is asked for."""
        if key not in self.cache:
            self.cache[key] = f"{self.prefix}size/{len(self.cache)}"
            self.nodes.append(make(self.cache[key]))
        return self.cache[key]
