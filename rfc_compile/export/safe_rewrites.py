"""Keep onnxscript's unsound rewrites out of ``torch.onnx.export(optimize=True)``.

Two kinds (onnxscript 0.7.2), both left out of every export:

1. Reshapes around a MatMul. The exporter's optimizer (onnxscript's default rewrite rules) replaces
``Reshape(MatMul(Reshape(a), Reshape(b)))`` by ``MatMul(a, b)`` whenever the *shapes* agree
(onnxscript 0.7.2, ``rules/common/_broadcast_to_matmul.py``: ``two_reshapes_matmul_reshape_rule``,
``one_reshape_matmul_reshape_rule``). It never checks that the reshapes keep the contracted
dims in place, so a coincidence of sizes changes the result. RFC's Taylor terms are such a
contraction: coefficients ``(m+1,)`` reshaped to ``(1, 1, m+1)`` times a ladder ``(B, m+1, T, C)``
reshaped to ``(B, m+1, T*C)``, reshaped back to ``(B, T, C)``. When ``T == m+1`` (3 text tokens and
order 2 in a FLUX prompt) ``MatMul(coeffs, ladder)`` has the same shape but contracts over the
tokens: the RCS estimate went wrong and the exported FLUX graph took other full steps than the
torch model. The model's own code may have the same pattern, so the rules are left out of every
export rather than the pattern avoided in rfc.py.

2. "No-op" arithmetic (``rules/common/_no_op.py``: ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` -> ``x``).
Its pattern constants match any constant *close to* 0 or 1 (abs_tol 1e-8, rel_tol 1e-5), so a
model's epsilon vanishes: Sana's linear attention ``num / (den + 1e-15)`` became ``num / den``, and
0 / 0 gave NaN wherever a query row is all zero after its ReLU (the tiny Sana in onnxruntime: NaN in
every step at batch 2). onnxruntime's own no-op elimination compares exactly, so an exact ``+ 0``
left in the graph is still removed when the session loads it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

logger = logging.getLogger(__name__)

_UNSOUND_RULE_NAMES = ("two_reshapes_matmul_reshape_rule", "one_reshape_matmul_reshape_rule")


def unsound_rules() -> tuple:
    """The rule objects to leave out (none when this onnxscript does not have them)."""
    try:
        from onnxscript.rewriter.rules import common
    except ImportError:
        return ()
    matmul = tuple(getattr(common, name) for name in _UNSOUND_RULE_NAMES if hasattr(common, name))
    return matmul + _approximate_no_op_rules()


def _approximate_no_op_rules() -> tuple:
    """The no-op rules that match constants near 0 or 1 (all of ``_no_op``'s but the Dropout ones;
    their commuted forms are separate objects, so they are taken from the rule set itself)."""
    try:
        from onnxscript.rewriter.rules.common import _no_op
    except ImportError:
        return ()
    dropout = [getattr(_no_op, name, None) for name in ("dropout_zero_rule", "dropout_inference_rule")]
    return tuple(rule for rule in getattr(getattr(_no_op, "rules", None), "rules", ())
                 if not any(rule is d for d in dropout))


@contextlib.contextmanager
def without_unsound_rewrites() -> Iterator[int]:
    """Within the block, the optimizer's default rules lack :func:`unsound_rules`; yields how many
    were left out. (The optimizer reads ``onnxscript.rewriter._DEFAULT_REWRITE_RULES`` each time it
    runs and has no public way to drop a rule; the tuple is restored on exit.)"""
    try:
        from onnxscript import rewriter
    except ImportError:
        yield 0
        return
    defaults = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    unsound = unsound_rules()
    if defaults is None or not unsound:
        yield 0
        return
    kept = tuple(rule for rule in defaults if not any(rule is bad for bad in unsound))
    rewriter._DEFAULT_REWRITE_RULES = kept
    try:
        yield len(defaults) - len(kept)
    finally:
        rewriter._DEFAULT_REWRITE_RULES = defaults
