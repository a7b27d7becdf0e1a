"""Sizes of dynamic dims: the one grammar of capture, the sidecar, the runners and the Triton model.

A size is an int, a dim's name (``"text_tokens"``), or an expression in names and ints with
``+ - * //`` and a leading minus (``"image_tokens + text_tokens"``, ``"2*grid_height"``).
"""

from __future__ import annotations

import ast
import operator
from typing import Callable, TypeVar

T = TypeVar("T")
Dim = int | str  # a size, or a dynamic dim's name or an expression in the names
#: The largest size a named dynamic dim (``dynamic_dims``) may take.
DIM_MAX = 65536
_Linear = tuple[str | None, int, int]  # scale * name + offset (name None: a constant)

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def fold_dim(dim: str, name: Callable[[str], T], constant: Callable[[int], T],
             binary: Callable[[type[ast.operator], T, T], T]) -> T:
    """Walk a symbolic size (names, ints, ``+ - * //``, a leading minus) bottom-up: the one grammar
    of sidecar sizes, shared by the runner (:func:`eval_dim`) and the Triton model, which builds
    ONNX nodes for it. ``name`` may raise ``KeyError`` for an unknown name."""
    def value(node: ast.AST) -> T:
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return constant(node.value)
        if isinstance(node, ast.Name):
            return name(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return binary(type(node.op), value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return binary(ast.Sub, constant(0), value(node.operand))
        raise ValueError(f"cannot evaluate size {dim!r}: {type(node).__name__} is not part of a size expression")

    try:
        return value(ast.parse(dim, mode="eval").body)
    except SyntaxError:
        raise ValueError(f"size {dim!r} is not an expression in the dynamic dims") from None


def eval_dim(dim: Dim, sizes: dict[str, int]) -> int:
    """The size of ``dim`` given the dynamic dims' sizes (``"image_tokens + text_tokens"`` -> 19)."""
    if isinstance(dim, int):
        return dim

    def name(key: str) -> int:
        if key not in sizes:
            raise ValueError(f"cannot evaluate size {dim!r} (dims known: {sorted(sizes)})")
        return sizes[key]

    return fold_dim(dim, name, lambda n: n, lambda op, a, b: _OPERATORS[op](a, b))


def root_size(scale: int, offset: int, size: int) -> int | None:
    """The dim's size where ``scale * dim + offset`` is ``size`` (``linear_dim``'s form), or None if no
    whole dim gives it."""
    root, rest = divmod(size - offset, scale)
    return None if rest else root


def linear_dim(dim: str) -> tuple[str, int, int] | None:
    """``(name, scale, offset)`` where ``dim`` is ``scale * name + offset`` in one name (``"2*grid_height"``
    -> ``("grid_height", 2, 0)``; a plain name -> ``(name, 1, 0)``), else None (two names, ``//``)."""
    def name(key: str) -> _Linear:
        return key, 1, 0

    def constant(n: int) -> _Linear:
        return None, 0, n

    def binary(op: type[ast.operator], a: _Linear, b: _Linear) -> _Linear:
        if op in (ast.Add, ast.Sub):
            sign = 1 if op is ast.Add else -1
            if a[0] and b[0] and a[0] != b[0]:
                raise ValueError("two names")
            return a[0] or b[0], a[1] + sign * b[1], a[2] + sign * b[2]
        if op is ast.Mult and (a[0] is None or b[0] is None):
            factor, term = (a[2], b) if a[0] is None else (b[2], a)
            return term[0], factor * term[1], factor * term[2]
        raise ValueError("not linear")

    try:
        root, scale, offset = fold_dim(dim, name, constant, binary)
    except ValueError:
        return None
    return (root, scale, offset) if root is not None and scale > 0 else None
