"""Backends: how a rewritten cached step is run, and the ``rfc`` dynamo backend.

``make_runner(gm, backend, options)`` turns the flat GraphModule that rewrite.py produces,
``(kwargs, state) -> (output, state')``, into the callable CachedModel calls each step:

* ``"eager"``: the GraphModule itself;
* ``"inductor"``: ``torch.compile(gm, fullgraph=True, **options)`` (options such as ``mode``,
  ``dynamic``, ``options`` are passed through to torch.compile).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BACKENDS = ("eager", "inductor")


def make_runner(gm: torch.fx.GraphModule, backend: str, options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """The callable that runs one cached step for ``backend`` (see module docstring)."""
    if backend == "eager":
        return gm
    if backend == "inductor":
        return torch.compile(gm, fullgraph=True, **dict(options or {}))
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
