"""Model code swapped for a traceable twin while capture traces the forward.

Some diffusers models do what torch.export cannot trace in the middle of their forward:
HiDream-I1's mixture-of-experts layer counts the tokens routed to each expert with
``.cpu().numpy()``; CogVideoX writes a new positional table through ``.data``. Each twin here
computes the same thing with torch ops (HiDream's counts stay tensors; slicing by them gives
data-dependent sizes, which torch.export follows), and
:func:`swapped_methods` puts it on the model's modules only for the duration of a capture, so
the model the user holds is never changed. patterns.py's ``TRACEABLE_METHODS`` says which
method of which module class gets which twin.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Mapping

import torch


def hidream_moe_infer(self, x: torch.Tensor, flat_expert_indices: torch.Tensor,
                      flat_expert_weights: torch.Tensor) -> torch.Tensor:
    """``MOEFeedForwardSwiGLU.moe_infer`` (diffusers' HiDream-I1): each expert runs on the tokens
    routed to it, its output weighted and summed into the token's row. The token counts stay
    on the device (``.item()`` of a cumulative count instead of a numpy array); an expert with no
    token runs on an empty slice, which adds nothing, as the original's ``continue`` does."""
    expert_cache = torch.zeros_like(x)
    order = flat_expert_indices.argsort()
    ends = flat_expert_indices.bincount(minlength=len(self.experts)).cumsum(0)
    token_of = order // self.num_activated_experts
    start = 0
    for i, expert in enumerate(self.experts):
        end = ends[i].item()
        tokens = token_of[start:end]
        expert_out = expert(x[tokens]) * flat_expert_weights[order[start:end]]
        expert_cache = expert_cache.to(expert_out.dtype)
        expert_cache = expert_cache.scatter_reduce(0, tokens.view(-1, 1).repeat(1, x.shape[-1]), expert_out,
                                                   reduce="sum")
        start = end
    return expert_cache


def cogvideox_positional_embeddings(self, sample_height: int, sample_width: int, sample_frames: int,
                                    device: torch.device | None = None) -> torch.Tensor:
    """``CogVideoXPatchEmbed._get_positional_embeddings`` (diffusers' CogVideoX with sin-cos
    positions), called at any size but the config's: the same table (zeros for the text tokens,
    then the 3D sin-cos table of the video patches), concatenated instead of copied into a new
    tensor's ``.data``, which torch.export cannot trace ("found a fake tensor in the exported
    program constant's list")."""
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    frames = (sample_frames - 1) // self.temporal_compression_ratio + 1
    table = get_3d_sincos_pos_embed(self.embed_dim, (sample_width // self.patch_size, sample_height // self.patch_size),
                                    frames, self.spatial_interpolation_scale, self.temporal_interpolation_scale,
                                    device=device, output_type="pt").flatten(0, 1)
    text = table.new_zeros(self.max_text_seq_length, self.embed_dim)
    return torch.cat([text, table]).unsqueeze(0)


@contextlib.contextmanager
def swapped_methods(model: torch.nn.Module,
                    methods: Mapping[str, Mapping[str, Callable]]) -> Iterator[int]:
    """Within the block, every module of ``model`` whose class is named in ``methods`` has those
    methods replaced by their twins (bound to the module); yields how many modules changed."""
    swapped: list[tuple[torch.nn.Module, str]] = []
    try:
        for module in model.modules():
            for name, twin in methods.get(type(module).__name__, {}).items():
                if name in module.__dict__:  # already set on the instance: leave the user's choice
                    continue
                module.__dict__[name] = types.MethodType(twin, module)
                swapped.append((module, name))
        yield len(swapped)
    finally:
        for module, name in swapped:
            del module.__dict__[name]
