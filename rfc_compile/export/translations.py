"""ATen ops torch.onnx has no ONNX function for, given one here (``custom_translation_table``).

``aten.sym_stride.int``: torch.export binds a dynamic dim inside a ``torch.cond`` branch to the
first value that holds it, and that may be a stride of a branch operand rather than a size (with
a dynamic prompt length, Qwen-Image's branches read the text token count as the stride of its
``(batch, text_tokens)`` mask); torch.onnx then fails ("No ONNX function found for aten.sym_stride").
The rewrite makes every branch operand row-major (passes/rewrite.py), as a graph input is, so a
stride is the product of the sizes after its dim, which is what the ONNX function computes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable


def sym_stride_as_sizes(self, dim: int):
    """A row-major tensor's stride at ``dim``: the product of its sizes after ``dim`` (1 for the last)."""
    from onnxscript import opset18 as op

    return op.ReduceProd(op.Shape(self, start=dim + 1), keepdims=0)


@functools.cache
def custom_translations() -> dict[Callable, Callable]:
    import torch

    return {torch.ops.aten.sym_stride.int: sym_stride_as_sizes}
