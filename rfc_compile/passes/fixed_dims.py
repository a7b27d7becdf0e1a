"""Does a graph captured with dynamic dims really serve other sizes?

torch.export raises when the model's code fixes a dynamic dim in a way it can solve ("must be
specialized to 4"), but not for every guard: DiT reads its patch grid as ``int(tokens ** 0.5)``,
which torch traces as the example's value, guarded by ``Eq(TruncToInt(FloatPow(gh*gw, 0.5)), 4)``,
and export returns a graph fixed at that size with no error; its output is then cut by a reshape
that only fits the example. So after capture every guard the trace recorded is evaluated at a few
other sizes of the dynamic dims (each one size up, all of them one up, all of them doubled, within
their ranges): a guard that fails there means the graph does not serve those sizes, and capture
refuses with the guard written over the dims' names instead of returning a graph that gives wrong
results at the next size. A size given as an expression in the dims (torch.export's ``Dim.AUTO``)
follows them through the guard that equates it to them. Likewise a named dim that the trace merged
into another's symbol (:func:`tied_dims`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import sympy
import torch
from torch.utils import _pytree as pytree

logger = logging.getLogger(__name__)


def _trial_sizes(hints: Mapping[sympy.Symbol, int],
                 ranges: Mapping[sympy.Symbol, tuple[int, int]]) -> Iterator[dict[sympy.Symbol, int]]:
    """Other sizes of the dims: each one up alone, all one up, all doubled (those within range)."""
    def fits(point: dict[sympy.Symbol, int]) -> bool:
        return all(ranges[s][0] <= v <= ranges[s][1] for s, v in point.items())

    points = [{**hints, symbol: hints[symbol] + 1} for symbol in hints]
    points += [{s: v + 1 for s, v in hints.items()}, {s: 2 * v for s, v in hints.items()}]
    seen: list[dict] = []
    for point in points:
        if fits(point) and point not in seen and point != dict(hints):
            seen.append(point)
            yield point


def _related_sizes(guards: list[sympy.Expr], dims: set[sympy.Symbol]) -> dict[sympy.Symbol, sympy.Expr]:
    """Symbols the trace equated to an expression in the dynamic dims (``Eq(s64, gh*gw)``: an input
    whose size was given as ``"grid_height*grid_width"``, Dim.AUTO), each with that expression: such a
    size follows the dims at every trial size rather than staying at the example's."""
    related = {}
    for guard in guards:
        if not isinstance(guard, sympy.Eq):
            continue
        for side, other in ((guard.lhs, guard.rhs), (guard.rhs, guard.lhs)):
            if (isinstance(side, sympy.Symbol) and side not in dims and other.free_symbols
                    and other.free_symbols <= dims):
                related.setdefault(side, other)
    return related


def guards_fixing_dims(gm: torch.fx.GraphModule, dim_symbols: Mapping[sympy.Symbol, torch.export.Dim]
                       ) -> list[tuple[sympy.Expr, dict[str, int]]]:
    """The guards of ``gm``'s trace that fail at another size of its dynamic dims, each with the first
    sizes (by dim name) where it fails; empty when every guard holds at every trial size."""
    shape_env = next((size.node.shape_env for node in gm.graph.nodes if node.op == "placeholder"
                      for size in getattr(node.meta.get("val"), "shape", ()) if isinstance(size, torch.SymInt)), None)
    if shape_env is None or not dim_symbols:
        return []
    hints = {s: int(shape_env.backed_var_to_val[s]) for s in dim_symbols if s in shape_env.backed_var_to_val}
    ranges = {s: (max(int(d.min), 1), int(d.max)) for s, d in dim_symbols.items()}
    names = {s: sympy.Symbol(d.__name__, integer=True, positive=True) for s, d in dim_symbols.items()}
    guards = [shape_env.replace(guard.expr) for guard in shape_env.guards]  # in the root symbols (2 * grid -> grid)
    related = _related_sizes(guards, set(hints))
    others = {s: int(v) for s, v in shape_env.backed_var_to_val.items()
              if s not in hints and s not in related}  # symbols not asked to be dynamic: the example's sizes
    failing = []
    for guard in guards:
        expr = guard.xreplace(related)
        if not expr.free_symbols & hints.keys():
            continue
        for point in _trial_sizes(hints, ranges):
            try:
                value = expr.xreplace({**others, **point})
            except Exception:  # noqa: BLE001 - a guard sympy cannot evaluate is not a verdict
                continue
            if value is sympy.false or value is False:
                failing.append((expr.xreplace(names), {names[s].name: v for s, v in point.items()}))
                break
    if failing:
        logger.info("%d guard(s) fix the dynamic dims, e.g. %s", len(failing), failing[0][0])
    return failing


def tied_dims(dynamic_shapes: Mapping[str, Any] | None, dim_symbols: Mapping[sympy.Symbol, torch.export.Dim]) -> list[str]:
    """Named dims asked for that the trace made one symbol with another (HiDream-I1's latent width and
    height: torch.export relates derived dims only at the end and let ``2*grid_width == 2*grid_height``
    through), so they have no symbol of their own in ``dim_symbols``."""
    if not dim_symbols:  # the placeholders could not be paired with the specs: nothing to compare
        return []
    asked = {getattr(dim, "root", dim).__name__ for dim in pytree.tree_leaves(dynamic_shapes or {})
             if isinstance(dim, torch.export.Dim) or hasattr(dim, "root")}
    found = {dim.__name__ for dim in dim_symbols.values()}
    return sorted(asked - found)
