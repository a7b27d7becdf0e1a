"""Is the model still the one its graphs were captured from? Checked on every call, cheaply.

A captured graph bakes in the module tree: which parameter/buffer tensors and submodules each
module holds, its hooks, and diffusers' attention processors (plain Python objects on the
``Attention`` modules, swapped by ``set_attn_processor`` and for one generation by the PAG
pipelines). In-place weight updates (``fuse_lora``) need no check: the graph reads the shared
tensors. One pass over a cached module list (~0.8 ms for FLUX.1-dev's 1275 modules).
"""

from __future__ import annotations

from typing import Any

import torch

#: plain attribute types of an attention processor that are settings (backend names, scales, flags)
_SETTING_TYPES = (bool, int, float, str, type(None))


class ModelWatch:
    """``check()`` -> (replaced, settings): ``replaced`` when the model holds other tensors or
    modules than at the previous check (graphs must be re-captured, and old ones dropped to free
    old weights); ``settings`` a hashable value of its hooks and attention processors (graphs
    captured under other settings stay valid for those settings)."""

    def __init__(self, model: torch.nn.Module):
        self._model = model
        self._modules = list(model.modules())
        self._identity, _ = _snapshot(self._modules)

    def check(self) -> tuple[bool, tuple]:
        identity, settings = _snapshot(self._modules)
        if identity == self._identity:
            return False, settings
        self._modules = list(self._model.modules())  # submodules may have been added
        self._identity, settings = _snapshot(self._modules)
        return True, settings


def _snapshot(modules: list[torch.nn.Module]) -> tuple[tuple, tuple]:
    identity: list[int] = []
    settings: list[Any] = []
    for module in modules:
        identity.extend(map(id, module._parameters.values()))
        identity.extend(map(id, module._buffers.values()))
        identity.extend(map(id, module._modules.values()))
        attributes = module.__dict__
        if module._forward_pre_hooks or module._forward_hooks or "forward" in attributes:  # diffusers' hooks wrap forward
            settings.append((len(identity), tuple(module._forward_pre_hooks), tuple(module._forward_hooks),
                             "forward" in attributes))
        processor = attributes.get("processor")
        if processor is not None and not isinstance(processor, torch.nn.Module):  # a module one is in _modules
            settings.append((len(identity), type(processor).__qualname__,
                             tuple((k, v) for k, v in vars(processor).items() if isinstance(v, _SETTING_TYPES))))
    return tuple(identity), tuple(settings)
