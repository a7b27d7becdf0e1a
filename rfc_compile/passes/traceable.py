"""Model code swapped for a traceable twin while capture traces the forward.

Some diffusers models do what torch.export cannot trace in the middle of their forward:
HiDream-I1's mixture-of-experts layer counts the tokens routed to each expert with
``.cpu().numpy()``; CogVideoX writes a new positional table through ``.data``; FramePack's
forward sizes its attention mask and text by tensor values (its whole forward is twinned). Others
trace, but only at the example's size, when that size is symbolic (a dynamic resolution): PixArt's,
SD3's and CogView3-Plus's position tables (compared with the configured size, or sliced with bounds
torch cannot prove in range) and DiT's output (its grid read back as ``int(tokens ** 0.5)``); their
twins take the original's code at a fixed size. Each twin here
computes the same thing with torch ops (HiDream's counts stay tensors; slicing by them gives
data-dependent sizes, which torch.export follows), and
:func:`swapped_methods` puts it on the model's modules only for the duration of a capture, so
the model the user holds is never changed. patterns.py's ``TRACEABLE_METHODS`` says which
method of which module class gets which twin.
"""

from __future__ import annotations

import contextlib
import functools
import sys
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


def hidream_patchify(self, hidden_states: torch.Tensor):
    """``HiDreamImageTransformer2DModel.patchify``, its per-sample sizes tagged with the latents' patch
    grid as sizes of the trace (``img_sizes.patch_grid``) for :func:`hidream_unpatchify`: the original
    stores the grid only as tensor values, which its unpatchify reads back as sizes of their own, so
    at a dynamic batch the output's size would follow no input. The same outputs as the original."""
    grid = tuple(size // self.config.patch_size for size in hidden_states.shape[-2:])
    hidden_states, masks, img_sizes, img_ids = type(self).patchify(self, hidden_states)
    img_sizes.patch_grid = grid
    return hidden_states, masks, img_sizes, img_ids


def hidream_unpatchify(self, x: torch.Tensor, img_sizes: torch.Tensor | list, is_training: bool) -> torch.Tensor:
    """``HiDreamImageTransformer2DModel.unpatchify`` (inference) at a symbolic batch (a dynamic batch):
    every sample unpatchified at once at the latents' patch grid. The original loops over ``img_sizes``'
    rows, one per sample, which torch traces at the example's batch. Patchify gives every sample the
    latents' grid (:func:`hidream_patchify` tags its sizes with it; a caller's own ``img_sizes`` is
    refused with a dynamic batch: patterns.PER_SAMPLE_ARGUMENTS). At a fixed batch, in training, or
    with sizes that patchify did not make, this is the original."""
    grid = getattr(img_sizes, "patch_grid", None)
    if not _symbolic(x.shape[0]) or grid is None or (is_training and not self.config.force_inference_output):
        return type(self).unpatchify(self, x, img_sizes, is_training)
    (patch_h, patch_w), patch, batch = grid, self.config.patch_size, x.shape[0]
    channels = x.shape[-1] // (patch * patch)
    x = x[:, : patch_h * patch_w].reshape(batch, patch_h, patch_w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, patch_h * patch, patch_w * patch)


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


def _symbolic(*sizes) -> bool:
    """Whether a size is a symbol of the trace (a dynamic dim): where the twins below differ from the original."""
    return any(isinstance(size, torch.SymInt) for size in sizes)


def patch_embed_forward(self, latent: torch.Tensor) -> torch.Tensor:
    """``PatchEmbed.forward`` (diffusers' PixArt, SD3) traced at a symbolic latent size (a dynamic
    resolution). PixArt: the sin-cos position table computed for the traced grid, as the original
    does whenever the size differs from its config's; the original first compares the size with the
    config's (``self.height != height``), a guard torch.export cannot decide for every size. SD3: the
    table's centre crop taken with ``index_select`` of ``top + arange(height)`` rows (and columns), the
    rows the original slices (``[top : top + height]``), whose bounds torch cannot prove in range for
    every grid. At a fixed size this is the original."""
    height, width = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
    if self.pos_embed is None or not _symbolic(height, width):
        return type(self).forward(self, latent)
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    latent = self.proj(latent)
    if self.flatten:
        latent = latent.flatten(2).transpose(1, 2)  # BCHW -> BNC
    if self.layer_norm:
        latent = self.norm(latent)
    if self.pos_embed_max_size:  # the grid is bounded by the table (the export's dim range, RESOLUTION_DIMS)
        side = self.pos_embed_max_size
        table = self.pos_embed.reshape(side, side, -1)
        rows, cols = (torch.arange(size, device=latent.device) + (side - size) // 2 for size in (height, width))
        crop = table.index_select(0, rows).index_select(1, cols)
        return (latent + crop.reshape(1, -1, crop.shape[-1])).to(latent.dtype)
    # get_2d_sincos_pos_embed's grid, kept flat: it reshapes the (2, height, width) grid to
    # (2, 1, width, height), the same values in the same order, which at a symbolic size makes
    # torch guard height == width. The table only reads the grid flattened.
    positions = [torch.arange(size, device=latent.device, dtype=torch.float32) / (size / self.base_size)
                 / self.interpolation_scale for size in (height, width)]
    grid = torch.stack(torch.meshgrid(positions[1], positions[0], indexing="xy"), dim=0).reshape(2, 1, -1)
    pos_embed = get_2d_sincos_pos_embed_from_grid(self.pos_embed.shape[-1], grid, output_type="pt")
    return (latent + pos_embed.float().unsqueeze(0)).to(latent.dtype)


def cogview3plus_patch_embed_forward(self, hidden_states: torch.Tensor,
                                     encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """``CogView3PlusPatchEmbed.forward`` traced at a symbolic latent size: the position table's first
    ``height`` rows and ``width`` columns taken with ``index_select`` (contiguous) instead of a slice,
    whose reshape torch guards on the slice being contiguous, i.e. narrower than the table (the
    step's export then refuses the table's full width). At a fixed size this is the original."""
    batch_size, channel, height, width = hidden_states.shape
    if not _symbolic(height, width):
        return type(self).forward(self, hidden_states, encoder_hidden_states)
    height, width, patch = height // self.patch_size, width // self.patch_size, self.patch_size
    hidden_states = hidden_states.view(batch_size, channel, height, patch, width, patch)
    hidden_states = hidden_states.permute(0, 2, 4, 1, 3, 5).contiguous()
    hidden_states = self.proj(hidden_states.view(batch_size, height * width, channel * patch * patch))
    encoder_hidden_states = self.text_proj(encoder_hidden_states)
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    rows, cols = (torch.arange(size, device=hidden_states.device) for size in (height, width))
    image_pos_embed = self.pos_embed.index_select(0, rows).index_select(1, cols).reshape(height * width, -1)
    text_pos_embed = image_pos_embed.new_zeros(encoder_hidden_states.shape[1], self.hidden_size)
    pos_embed = torch.cat([text_pos_embed, image_pos_embed], dim=0)[None, ...]
    return (hidden_states + pos_embed).to(hidden_states.dtype)


def dit_forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None,
                return_dict: bool = True):
    """``DiTTransformer2DModel.forward`` traced at a symbolic latent size: its output unpatchified at
    the input's patch grid. The original reads the grid back as ``int(tokens ** 0.5)``, which torch
    traces as the example's value (the graph would serve that size only, fixed_dims.py); DiT takes
    square latents (the grid is checked square here, as that reshape requires). At a fixed size this
    is the original."""
    height, width = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
    if not _symbolic(height, width):
        return type(self).forward(self, hidden_states, timestep, class_labels, cross_attention_kwargs, return_dict)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    torch._check(height == width, lambda: "DiT takes square latents")
    hidden_states = self.pos_embed(hidden_states)
    for block in self.transformer_blocks:
        hidden_states = block(hidden_states, attention_mask=None, encoder_hidden_states=None,
                              encoder_attention_mask=None, timestep=timestep,
                              cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels)
    conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
    shift, scale = self.proj_out_1(torch.nn.functional.silu(conditioning)).chunk(2, dim=1)
    hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
    hidden_states = self.proj_out_2(hidden_states)
    patch = self.patch_size
    hidden_states = hidden_states.reshape(shape=(-1, height, width, patch, patch, self.out_channels))
    hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
    output = hidden_states.reshape(shape=(-1, self.out_channels, height * patch, width * patch))
    return (output,) if not return_dict else Transformer2DModelOutput(sample=output)


def chroma_timestep_embeddings(self, timestep: torch.Tensor) -> torch.Tensor:
    """``ChromaCombinedTimestepTextProjEmbeddings.forward`` (diffusers' Chroma) at a symbolic batch (a
    dynamic batch): the guidance projection of one zero per sample from ``new_zeros(batch)``. The original
    builds the zeros as ``torch.tensor([0] * batch_size)``, a Python list of the batch's length, which
    torch traces at the example's batch. The same values (integer zeros, then the same projections).
    At a fixed batch this is the original."""
    batch_size = timestep.shape[0]
    if not _symbolic(batch_size):
        return type(self).forward(self, timestep)
    mod_index_length = self.mod_proj.shape[0]
    timesteps_proj = self.time_proj(timestep).to(dtype=timestep.dtype)
    guidance_proj = self.guidance_proj(timestep.new_zeros(batch_size, dtype=torch.int64)).to(dtype=timestep.dtype)
    mod_proj = self.mod_proj.to(dtype=timesteps_proj.dtype, device=timesteps_proj.device).repeat(batch_size, 1, 1)
    timestep_guidance = torch.cat([timesteps_proj, guidance_proj], dim=1).unsqueeze(1).repeat(1, mod_index_length, 1)
    return torch.cat([timestep_guidance, mod_proj], dim=-1).to(timestep.dtype)


def mochi_attention_forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                            attention_mask: torch.Tensor | None = None, **kwargs):
    """``MochiAttention.forward`` with diffusers' ``MochiAttnProcessor2_0`` at a symbolic batch (a dynamic
    batch): every sample's attention at once. The original loops over the samples, each attending over
    its image tokens and its valid prompt tokens (``nonzero`` of its mask), which torch traces at the
    example's batch. Here each sample's prompt tokens are put valid ones first, in order (the order in
    which the original concatenates them; a sort on unique keys, as ONNX has no stable sort), the
    padding is masked out of the keys, and the rows past a sample's valid tokens are zero, as the
    original pads them: the same function (up to rounding: a masked key gets weight 0). Other
    processors, or a fixed batch: the original."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    if not _symbolic(hidden_states.shape[0]) or type(self.processor) is not MochiAttnProcessor2_0:
        return type(self).forward(self, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
    image_rotary_emb = kwargs.get("image_rotary_emb")

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(2, (self.heads, -1))

    query, key, value = (heads(project(hidden_states)) for project in (self.to_q, self.to_k, self.to_v))
    query, key = self.norm_q(query), self.norm_k(key)
    encoder_query = self.norm_added_q(heads(self.add_q_proj(encoder_hidden_states)))
    encoder_key = self.norm_added_k(heads(self.add_k_proj(encoder_hidden_states)))
    encoder_value = heads(self.add_v_proj(encoder_hidden_states))
    if image_rotary_emb is not None:
        def rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
            x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
            cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
            sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
            return torch.stack([cos, sin], dim=-1).flatten(-2)

        query, key = rotate(query, *image_rotary_emb), rotate(key, *image_rotary_emb)

    valid = attention_mask != 0  # (B, prompt tokens)
    tokens = torch.arange(valid.shape[1], device=valid.device)
    order = torch.argsort((~valid) * valid.shape[1] + tokens, dim=1)  # valid tokens first, in order (keys unique)
    valid = valid.gather(1, order)

    def prompt_first(x: torch.Tensor) -> torch.Tensor:  # (B, T, heads, dim): the tokens in ``order``
        return x.gather(1, order[:, :, None, None].expand_as(x))

    encoder_query, encoder_key, encoder_value = map(prompt_first, (encoder_query, encoder_key, encoder_value))
    sequence_length, encoder_sequence_length = query.shape[1], encoder_query.shape[1]
    query, key, value = (torch.cat([x, e], dim=1).transpose(1, 2) for x, e in
                         ((query, encoder_query), (key, encoder_key), (value, encoder_value)))
    keys_kept = torch.cat([valid.new_ones(valid.shape[0], sequence_length), valid], dim=1)  # (B, total)
    attn_output = F.scaled_dot_product_attention(query, key, value, attn_mask=keys_kept[:, None, None, :],
                                                 dropout_p=0.0, is_causal=False)
    attn_output = attn_output * keys_kept[:, None, :, None]  # rows past the valid tokens: zero (the original's pad)
    hidden_states = attn_output.transpose(1, 2).flatten(2, 3)
    hidden_states, encoder_hidden_states = hidden_states.split_with_sizes(
        (sequence_length, encoder_sequence_length), dim=1)
    hidden_states = self.to_out[1](self.to_out[0](hidden_states))
    if hasattr(self, "to_add_out"):
        encoder_hidden_states = self.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


def qwen_text_seq_len_from_mask(original: Callable, encoder_hidden_states: torch.Tensor,
                                encoder_hidden_states_mask: torch.Tensor | None):
    """diffusers' Qwen-Image ``compute_text_seq_len_from_mask`` (a module-level function; ``original``)
    at a symbolic prompt length: a sample with no active token gets the prompt length as
    ``position_ids[-1] + 1``. The original makes it ``torch.as_tensor(text_seq_len)``, a tensor of the
    size, which torch traces at the example's. The same values."""
    batch_size, text_seq_len = encoder_hidden_states.shape[:2]
    if encoder_hidden_states_mask is None or not _symbolic(text_seq_len):
        return original(encoder_hidden_states, encoder_hidden_states_mask)
    torch._check(encoder_hidden_states_mask.shape[0] == batch_size)
    torch._check(encoder_hidden_states_mask.shape[1] == text_seq_len)
    mask = encoder_hidden_states_mask.to(torch.bool)
    position_ids = torch.arange(text_seq_len, device=encoder_hidden_states.device, dtype=torch.long)
    active_positions = torch.where(mask, position_ids, position_ids.new_zeros(()))
    per_sample_len = torch.where(mask.any(dim=1), active_positions.max(dim=1).values + 1, position_ids[-1] + 1)
    return text_seq_len, per_sample_len, mask


def qwen_rope_forward(self, video_fhw, device: torch.device | None = None, max_txt_seq_len=None):
    """``QwenEmbedRope.forward`` (diffusers' Qwen-Image) at a symbolic prompt length: the text rows of
    the rotary table taken with ``index_select`` of ``start + arange(length)``. The original reads the
    length with ``int()`` (which fixes it at the example's) and slices the table. The same values; the
    video part is the original's (the first sample's grid). At a fixed length this is the original."""
    if not _symbolic(max_txt_seq_len):
        return type(self).forward(self, video_fhw, device, max_txt_seq_len)
    if isinstance(video_fhw, list):
        video_fhw = video_fhw[0]
    if not isinstance(video_fhw, list):
        video_fhw = [video_fhw]
    vid_freqs, max_vid_index = [], 0
    for idx, (frame, height, width) in enumerate(video_fhw):
        vid_freqs.append(self._compute_video_freqs(frame, height, width, idx, device))
        max_vid_index = max(height // 2, width // 2, max_vid_index) if self.scale_rope else max(height, width,
                                                                                                 max_vid_index)
    pos_freqs, _ = self._get_device_freqs(device)
    rows = max_vid_index + torch.arange(max_txt_seq_len, device=pos_freqs.device)
    return torch.cat(vid_freqs, dim=0), pos_freqs.index_select(0, rows)


def mochi_rope_centers(self, start, stop, num, device, dtype) -> torch.Tensor:
    """``MochiRoPE._centers`` at a symbolic count (a dynamic resolution): the centres of ``num`` equal
    cells between ``start`` and ``stop``, ``start + (i + 1/2) * (stop - start) / num``, from ``arange``.
    The original takes the midpoints of ``torch.linspace(start, stop, num + 1)``, whose count torch
    traces as the example's. The same values up to rounding (linspace computes its points from both
    ends). At a fixed count this is the original."""
    if not _symbolic(num):
        return type(self)._centers(self, start, stop, num, device, dtype)
    cells = torch.arange(num, device=device, dtype=torch.float32) + 0.5
    return (start + cells * ((stop - start) / num)).to(dtype or torch.float32)


def hunyuan_video_framepack_forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                                    encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                                    pooled_projections: torch.Tensor, image_embeds: torch.Tensor,
                                    indices_latents: torch.Tensor, guidance: torch.Tensor | None = None,
                                    latents_clean: torch.Tensor | None = None,
                                    indices_latents_clean: torch.Tensor | None = None,
                                    latents_history_2x: torch.Tensor | None = None,
                                    indices_latents_history_2x: torch.Tensor | None = None,
                                    latents_history_4x: torch.Tensor | None = None,
                                    indices_latents_history_4x: torch.Tensor | None = None,
                                    attention_kwargs: dict | None = None, return_dict: bool = True):
    """``HunyuanVideoFramepackTransformer3DModel.forward`` (diffusers' FramePack), its attention mask
    built as HunyuanVideo's own forward builds it: ``arange(N) < effective length`` per sample. The
    original writes ``mask[i, :length[i]] = True`` in a Python loop over the samples (a tensor value
    as a slice bound), and at batch 1 instead cuts the text states to ``mask.sum()`` tokens (a
    data-dependent size) with no mask; here every batch keeps all text tokens and masks the padded
    ones, which gives the same latent output (a masked key gets weight 0). Everything else is the
    original's code, in its order. A LoRA ``scale`` in ``attention_kwargs`` is applied as the
    original's ``apply_lora_scale`` does."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

    lora_scale = 1.0
    if attention_kwargs is not None:
        attention_kwargs = dict(attention_kwargs)
        lora_scale = attention_kwargs.pop("scale", 1.0)
    if USE_PEFT_BACKEND:
        scale_lora_layers(self, lora_scale)
    try:
        batch_size, num_channels, num_frames, height, width = hidden_states.shape
        p, p_t = self.config.patch_size, self.config.patch_size_t
        post_patch_num_frames = num_frames // p_t
        post_patch_height = height // p
        post_patch_width = width // p
        original_context_length = post_patch_num_frames * post_patch_height * post_patch_width

        if indices_latents is None:
            indices_latents = torch.arange(0, num_frames).unsqueeze(0).expand(batch_size, -1)

        hidden_states = self.x_embedder(hidden_states)
        device = hidden_states.device
        image_rotary_emb = self.rope(frame_indices=indices_latents, height=height, width=width, device=device)
        latents_clean, latents_history_2x, latents_history_4x = self.clean_x_embedder(
            latents_clean, latents_history_2x, latents_history_4x)
        # the original reads these three names unconditionally: it needs all of them, as here
        image_rotary_emb_clean = image_rotary_emb_history_2x = image_rotary_emb_history_4x = None
        if latents_clean is not None and indices_latents_clean is not None:
            image_rotary_emb_clean = self.rope(frame_indices=indices_latents_clean, height=height, width=width,
                                               device=device)
        if latents_history_2x is not None and indices_latents_history_2x is not None:
            image_rotary_emb_history_2x = self.rope(frame_indices=indices_latents_history_2x, height=height,
                                                    width=width, device=device)
        if latents_history_4x is not None and indices_latents_history_4x is not None:
            image_rotary_emb_history_4x = self.rope(frame_indices=indices_latents_history_4x, height=height,
                                                    width=width, device=device)
        hidden_states, image_rotary_emb = self._pack_history_states(
            hidden_states, latents_clean, latents_history_2x, latents_history_4x, image_rotary_emb,
            image_rotary_emb_clean, image_rotary_emb_history_2x, image_rotary_emb_history_4x, post_patch_height,
            post_patch_width)

        temb, _ = self.time_text_embed(timestep, pooled_projections, guidance)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
        encoder_hidden_states_image = self.image_projection(image_embeds)
        attention_mask_image = encoder_attention_mask.new_ones((batch_size, encoder_hidden_states_image.shape[1]))
        # must cat before (not after) encoder_hidden_states, due to attn masking
        encoder_hidden_states = torch.cat([encoder_hidden_states_image, encoder_hidden_states], dim=1)
        encoder_attention_mask = torch.cat([attention_mask_image, encoder_attention_mask], dim=1)

        latent_sequence_length = hidden_states.shape[1]
        sequence_length = latent_sequence_length + encoder_hidden_states.shape[1]
        effective_sequence_length = latent_sequence_length + encoder_attention_mask.sum(dim=1, dtype=torch.int)
        indices = torch.arange(sequence_length, device=device).unsqueeze(0)  # [1, N]
        attention_mask = indices < effective_sequence_length.unsqueeze(1)  # [B, N]
        attention_mask = attention_mask.unsqueeze(1).unsqueeze(1)  # [B, 1, 1, N]

        for block in self.transformer_blocks:
            hidden_states, encoder_hidden_states = block(
                hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb)
        for block in self.single_transformer_blocks:
            hidden_states, encoder_hidden_states = block(
                hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb)

        hidden_states = hidden_states[:, -original_context_length:]
        hidden_states = self.norm_out(hidden_states, temb)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(
            batch_size, post_patch_num_frames, post_patch_height, post_patch_width, -1, p_t, p, p)
        hidden_states = hidden_states.permute(0, 4, 1, 5, 2, 6, 3, 7)
        hidden_states = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
    finally:
        if USE_PEFT_BACKEND:
            unscale_lora_layers(self, lora_scale)
    if not return_dict:
        return (hidden_states,)
    return Transformer2DModelOutput(sample=hidden_states)


@contextlib.contextmanager
def swapped_functions(functions: Mapping[tuple[str, str], Callable]) -> Iterator[int]:
    """Within the block, each module-level function ``(module path, name)`` of an imported module is
    replaced by its twin, called with the original first; yields how many changed. A module not
    imported yet is left alone (no model of it can be in use)."""
    swapped: list[tuple[types.ModuleType, str, Callable]] = []
    try:
        for (module_name, name), twin in functions.items():
            module = sys.modules.get(module_name)
            original = getattr(module, name, None)
            if original is None:
                continue
            setattr(module, name, functools.partial(twin, original))
            swapped.append((module, name, original))
        yield len(swapped)
    finally:
        for module, name, original in swapped:
            setattr(module, name, original)


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
