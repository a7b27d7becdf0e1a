"""Per-architecture knowledge, in one table.

A *block pattern* names a transformer-block class and the cached regions inside it, each
region given as the submodules (relative to the block) whose nodes it covers. Nodes that
sit between a region's submodules on the data path (e.g. FLUX single blocks' concat of
MLP and attention features before ``proj_out``) belong to the region too.

Everything that is per-model lives here; the other passes read only this table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Callable

from ..dims import DIM_MAX
from .traceable import (chroma_timestep_embeddings, cogvideox_positional_embeddings, cogview3plus_patch_embed_forward,
                        dit_forward, hidream_moe_infer, hidream_patchify, hidream_unpatchify,
                        hunyuan_video_framepack_forward, mochi_attention_forward, mochi_rope_centers,
                        patch_embed_forward, qwen_rope_forward, qwen_text_seq_len_from_mask)


@dataclasses.dataclass(frozen=True)
class RegionPattern:
    """One expensive region of a block: its name and the submodules it covers."""

    name: str
    members: tuple[str, ...]
    optional: bool = False  # e.g. attn2 exists only in cross-attention blocks


@dataclasses.dataclass(frozen=True)
class BlockPattern:
    """A transformer-block class and its cached regions, in call order."""

    block_class: str
    regions: tuple[RegionPattern, ...]


#: Model inputs that change from one denoising step to the next. A region input that
#: depends on one of them is a *feature input* (part of X's norm); any other input
#: (encoder states, rotary embeddings, masks) is a constant side input.
DEFAULT_VARYING_INPUTS: tuple[str, ...] = (
    "hidden_states", "timestep", "sample", "x", "t", "timesteps",
    "sigma", "audio_hidden_states", "audio_timestep", "audio_sigma",  # LTX-2: sigma beside each timestep, audio
)

#: Region sets that several block classes share.
#: DiT-style block: self-attention, cross-attention where the block has one, feed-forward.
_DIT = (RegionPattern("attn1", ("attn1",)), RegionPattern("attn2", ("attn2",), optional=True),
        RegionPattern("ff", ("ff",)))
#: FLUX-style double-stream block: joint attention (image + text outputs), then each stream's MLP.
_DOUBLE_STREAM = (RegionPattern("attn", ("attn",)), RegionPattern("ff", ("ff",)),
                  RegionPattern("ff_context", ("ff_context",)))
#: FLUX-style single-stream block: MLP and attention in parallel, fused by proj_out, as ONE region
#: (the concat between them is on the data path); the gate and residual stay outside.
_SINGLE_STREAM = (RegionPattern("mlp_attn", ("proj_mlp", "act_mlp", "attn", "proj_out")),)
#: Attention and feed-forward: one after the other (Krea 2), or in parallel on the same input with
#: their outputs summed before the gate (FLUX.3).
_ATTN_FF = (RegionPattern("attn", ("attn",)), RegionPattern("ff", ("ff",)))
#: Wan-style block: self-attention, cross-attention to text, FFN.
_WAN = (RegionPattern("attn1", ("attn1",)), RegionPattern("attn2", ("attn2",)), RegionPattern("ffn", ("ffn",)))

BLOCK_PATTERNS: dict[str, BlockPattern] = {
    p.block_class: p
    for p in (
        # DiT, PixArt (diffusers.models.attention.BasicTransformerBlock)
        BlockPattern("BasicTransformerBlock", _DIT),
        # FLUX: double- and single-stream blocks
        BlockPattern("FluxTransformerBlock", _DOUBLE_STREAM),
        BlockPattern("FluxSingleTransformerBlock", _SINGLE_STREAM),
        # SD3 / SD3.5 MMDiT block; the last block (context_pre_only) has no ff_context and its
        # attention's text output is unused; SD3.5's dual-attention blocks add attn2.
        BlockPattern(
            "JointTransformerBlock",
            (
                RegionPattern("attn", ("attn",)),
                RegionPattern("attn2", ("attn2",), optional=True),
                RegionPattern("ff", ("ff",)),
                RegionPattern("ff_context", ("ff_context",), optional=True),
            ),
        ),
        # HunyuanVideo (and FramePack, HunyuanVideoFramepackTransformer3DModel): FLUX-like double- and
        # single-stream blocks
        BlockPattern("HunyuanVideoTransformerBlock", _DOUBLE_STREAM),
        BlockPattern("HunyuanVideoSingleTransformerBlock", _SINGLE_STREAM),
        # HunyuanImage 2.1: HunyuanVideo's double and single blocks
        BlockPattern("HunyuanImageTransformerBlock", _DOUBLE_STREAM),
        BlockPattern("HunyuanImageSingleTransformerBlock", _SINGLE_STREAM),
        # Wan 2.1 / 2.2: self-attention, cross-attention to text, FFN
        BlockPattern("WanTransformerBlock", _WAN),
        # Wan VACE's control blocks (the hints added to the Wan blocks they precede): Wan's regions
        BlockPattern("WanVACETransformerBlock", _WAN),
        # CogVideoX: joint attention over text + video tokens, one FF over both
        BlockPattern(
            "CogVideoXBlock",
            (
                RegionPattern("attn1", ("attn1",)),
                RegionPattern("ff", ("ff",)),
            ),
        ),
        # LTX-Video: self-attention, cross-attention, FF
        BlockPattern(
            "LTXVideoTransformerBlock",
            (
                RegionPattern("attn1", ("attn1",)),
                RegionPattern("attn2", ("attn2",)),
                RegionPattern("ff", ("ff",)),
            ),
        ),
        # Chroma: FLUX's double / single blocks with per-block modulation and a text mask
        BlockPattern("ChromaTransformerBlock", _DOUBLE_STREAM),
        BlockPattern("ChromaSingleTransformerBlock", _SINGLE_STREAM),
        # SkyReels-V2: Wan's block
        BlockPattern("SkyReelsV2TransformerBlock", _WAN),
        # Qwen-Image: joint attention over image + text (two outputs), then each stream's MLP
        BlockPattern(
            "QwenImageTransformerBlock",
            (
                RegionPattern("attn", ("attn",)),
                RegionPattern("img_mlp", ("img_mlp",)),
                RegionPattern("txt_mlp", ("txt_mlp",)),
            ),
        ),
        # FLUX.2: FLUX's double block; the single block's parallel MLP + attention + output
        # projection is one module (Flux2ParallelSelfAttention)
        BlockPattern("Flux2TransformerBlock", _DOUBLE_STREAM),
        BlockPattern("Flux2SingleTransformerBlock", (RegionPattern("attn", ("attn",)),)),
        # Sana: linear self-attention, cross-attention (ungated), GLUMBConv feed-forward
        BlockPattern("SanaTransformerBlock", _DIT),
        # FLUX's descendants: LongCat-Image, Ovis-Image (its single blocks' MLP a SwiGLU), Bria
        BlockPattern("LongCatImageTransformerBlock", _DOUBLE_STREAM),
        BlockPattern("LongCatImageSingleTransformerBlock", _SINGLE_STREAM),
        BlockPattern("OvisImageTransformerBlock", _DOUBLE_STREAM),
        BlockPattern("OvisImageSingleTransformerBlock", _SINGLE_STREAM),
        BlockPattern("BriaTransformerBlock", _DOUBLE_STREAM),
        BlockPattern("BriaSingleTransformerBlock", _SINGLE_STREAM),
        BlockPattern("BriaFiboTransformerBlock", _DOUBLE_STREAM),  # Bria FIBO: FLUX's blocks again
        BlockPattern("BriaFiboSingleTransformerBlock", _SINGLE_STREAM),
        # FLUX.3: per-mode blocks (image; text and reference images run at t = 0, so they are
        # constant and stay uncached) and joint single blocks, each attention and feed-forward in
        # parallel on one modulated input, summed before the gate
        BlockPattern("Flux3ModeTransformerBlock", _ATTN_FF),
        BlockPattern("Flux3SingleTransformerBlock", _ATTN_FF),
        # Krea 2: single-stream blocks over text + image tokens (its text fusion blocks, on the
        # prompt alone, are constant and stay uncached)
        BlockPattern("Krea2TransformerBlock", _ATTN_FF),
        # CogView4: joint attention over image + text (two outputs); one feed-forward module called
        # on the image stream, then on the text stream: both calls are one region (two inputs and
        # outputs), the gates and residuals stay outside
        BlockPattern("CogView4TransformerBlock", (RegionPattern("attn1", ("attn1",)), RegionPattern("ff", ("ff",)))),
        # CogView3-Plus: joint attention over text + image (two outputs), then one feed-forward call on
        # the concatenated text + image stream (CogVideoX's layout); the gates and residuals stay outside
        BlockPattern("CogView3PlusTransformerBlock", (RegionPattern("attn1", ("attn1",)), RegionPattern("ff", ("ff",)))),
        # Cosmos 2 / 2.5 (Cosmos-Predict2): self-attention, cross-attention, FF, each adaLN-gated
        BlockPattern("CosmosTransformerBlock", _DIT),
        # Hunyuan-DiT: self-attention, cross-attention, FF, ungated; the long skips of its second
        # half join the residual stream between blocks, outside every region
        BlockPattern("HunyuanDiTBlock", _DIT),
        # Sana-Video: Sana's block over video tokens (linear attention, cross-attention, GLUMBConv FF)
        BlockPattern("SanaVideoTransformerBlock", _DIT),
        # Helios: Wan's layout over history + current tokens (the cross-attention on the current
        # ones; the split and concat stay outside it). ChronoEdit and Wan-Animate name their
        # block WanTransformerBlock, so Wan's entry covers them.
        BlockPattern("HeliosTransformerBlock", _WAN),
        # Kandinsky 5: text encoder blocks (modulated by the timestep, so not constant), then
        # visual decoder blocks whose cross-attention reads the encoded text (two feature inputs)
        BlockPattern("Kandinsky5TransformerEncoderBlock", (RegionPattern("self_attention", ("self_attention",)),
                                                           RegionPattern("feed_forward", ("feed_forward",)))),
        BlockPattern("Kandinsky5TransformerDecoderBlock", (RegionPattern("self_attention", ("self_attention",)),
                                                           RegionPattern("cross_attention", ("cross_attention",)),
                                                           RegionPattern("feed_forward", ("feed_forward",)))),
        # Motif-Video: FLUX-like double blocks with a text cross-attention after the joint one (its
        # query the joint attention's output: two regions in a row), and single blocks whose fused
        # region also holds that cross-attention (not in the last, decoder blocks)
        BlockPattern("MotifVideoTransformerBlock", (
            RegionPattern("attn", ("attn",)), RegionPattern("cross_attn", ("cross_attn",), optional=True),
            RegionPattern("ff", ("ff",)), RegionPattern("ff_context", ("ff_context",)))),
        BlockPattern("MotifVideoSingleTransformerBlock",
                     (RegionPattern("mlp_attn", ("proj_mlp", "act_mlp", "attn", "cross_attn", "proj_out")),)),
        # LTX-2: a video and an audio stream per block, each self-attention and text cross-attention,
        # then audio-to-video and video-to-audio attention (skipped by a modality-isolated call), then
        # each stream's FF
        BlockPattern("LTX2VideoTransformerBlock", tuple(
            RegionPattern(name, (name,), optional=name in ("audio_to_video_attn", "video_to_audio_attn"))
            for name in ("attn1", "audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn",
                         "ff", "audio_ff"))),
        # HiDream-I1: double-stream blocks (joint attention, then an image MoE feed-forward and a text
        # one) and single-stream blocks (attention, MoE feed-forward); each sits in a HiDreamBlock
        # wrapper. Its MoE routing needs a traceable twin (TRACEABLE_METHODS)
        BlockPattern("HiDreamImageTransformerBlock", (RegionPattern("attn", ("attn1",)), RegionPattern("ff_i", ("ff_i",)),
                                                      RegionPattern("ff_t", ("ff_t",)))),
        BlockPattern("HiDreamImageSingleTransformerBlock", (RegionPattern("attn", ("attn1",)),
                                                            RegionPattern("ff_i", ("ff_i",)))),
        # Z-Image: single-stream blocks (noise refiner, context refiner, main layers)
        BlockPattern(
            "ZImageTransformerBlock",
            (
                RegionPattern("attention", ("attention",)),
                RegionPattern("feed_forward", ("feed_forward",)),
            ),
        ),
        # AuraFlow: MMDiT joint blocks, then single blocks (attention, then MLP, each a region)
        BlockPattern("AuraFlowJointTransformerBlock", _DOUBLE_STREAM),
        BlockPattern(
            "AuraFlowSingleTransformerBlock",
            (
                RegionPattern("attn", ("attn",)),
                RegionPattern("ff", ("ff",)),
            ),
        ),
        # Mochi: joint attention, ff, ff_context (not in the last, context_pre_only block)
        BlockPattern(
            "MochiTransformerBlock",
            (
                RegionPattern("attn1", ("attn1",)),
                RegionPattern("ff", ("ff",)),
                RegionPattern("ff_context", ("ff_context",), optional=True),
            ),
        ),
    )
}


def block_pattern_for(class_name: str) -> BlockPattern | None:
    return BLOCK_PATTERNS.get(class_name)


#: Blocks of models whose timestep argument counts *up* over a generation (Z-Image's pipeline
#: passes 1 - sigma). Auto-reset starts a new generation when the timestep moves back the
#: other way; for every other model that is when it goes back up.
RISING_TIMESTEP_BLOCKS: frozenset[str] = frozenset({"ZImageTransformerBlock"})


def timestep_rises(block_classes: Iterable[str]) -> bool:
    """Whether a model holding these block classes takes a rising timestep."""
    return any(c in RISING_TIMESTEP_BLOCKS for c in block_classes)


def model_timestep_rises(model: Any) -> bool:
    """:func:`timestep_rises` for a model (an ``nn.Module``: the classes of its modules)."""
    return timestep_rises(type(m).__name__ for m in model.modules())


#: Token counts that may change between calls of one exported graph (``to_onnx``'s
#: ``dynamic_dims``), per model class: ``{input: {dim index: dim name}}``. Only sizes the model
#: computes with as sizes: FLUX and FLUX.2 take packed latents ``(B, image tokens, C)`` with their
#: position ids, and text states with theirs; SD3 and PixArt take any prompt length (PixArt with its mask);
#: Mochi and HunyuanVideo any latent frame count. Models that take the latents as an image and cut it
#: into patches: their resolution in RESOLUTION_DIMS, where their code allows it.
_FLUX_TOKENS = {
    "hidden_states": {1: "image_tokens"}, "img_ids": {0: "image_tokens"},
    "encoder_hidden_states": {1: "text_tokens"}, "txt_ids": {0: "text_tokens"},
}
#: FLUX and its descendants, whose position ids have no batch dim: ``(tokens, axes)``.
_FLUX_LIKE = ("FluxTransformer2DModel", "LongCatImageTransformer2DModel", "OvisImageTransformer2DModel",
              "BriaTransformer2DModel", "Flux3Transformer2DModel")

TOKEN_DIMS: dict[str, dict[str, dict[int, str]]] = {
    **{name: _FLUX_TOKENS for name in _FLUX_LIKE},
    # Chroma: FLUX's, and its pipeline's attention mask over the text then the image tokens
    "ChromaTransformer2DModel": {**_FLUX_TOKENS, "attention_mask": {1: "text_tokens + image_tokens"}},
    # Krea 2: the text's then the image's position ids in one input
    "Krea2Transformer2DModel": {"hidden_states": {1: "image_tokens"}, "encoder_hidden_states": {1: "text_tokens"},
                                "position_ids": {0: "text_tokens + image_tokens"}},
    # LTX-2 given its rotary coordinates (LTX2Pipeline passes them; ARGUMENTS_REPLACED_BY): video and audio
    # tokens, and each prompt's length
    "LTX2VideoTransformer3DModel": {
        "hidden_states": {1: "video_tokens"}, "video_coords": {2: "video_tokens"},
        "audio_hidden_states": {1: "audio_tokens"}, "audio_coords": {2: "audio_tokens"},
        "encoder_hidden_states": {1: "text_tokens"}, "encoder_attention_mask": {1: "text_tokens"},
        "audio_encoder_hidden_states": {1: "audio_text_tokens"}, "audio_encoder_attention_mask": {1: "audio_text_tokens"},
    },
    # FLUX.2's pipeline passes batched 4-axis position ids: (B, tokens, 4)
    "Flux2Transformer2DModel": {
        "hidden_states": {1: "image_tokens"}, "img_ids": {1: "image_tokens"},
        "encoder_hidden_states": {1: "text_tokens"}, "txt_ids": {1: "text_tokens"},
    },
    "SD3Transformer2DModel": {"encoder_hidden_states": {1: "text_tokens"}},
    "PixArtTransformer2DModel": {"encoder_hidden_states": {1: "text_tokens"}, "encoder_attention_mask": {1: "text_tokens"}},
    # CogView4, CogView3-Plus: the prompt length only (their latents are patchified, see above); CogView3-Plus
    # caches one ff over text + image tokens, ``text_tokens + <image tokens>`` (capture.dim_spec)
    "CogView4Transformer2DModel": {"encoder_hidden_states": {1: "text_tokens"}},
    "CogView3PlusTransformer2DModel": {"encoder_hidden_states": {1: "text_tokens"}},
    # Qwen-Image: its pipeline passes each batch's prompts at the longest one's token count
    "QwenImageTransformer2DModel": {"encoder_hidden_states": {1: "text_tokens"},
                                    "encoder_hidden_states_mask": {1: "text_tokens"}},
    # video DiTs whose code takes any latent frame count (one patch per frame): the video's length
    "MochiTransformer3DModel": {"hidden_states": {2: "frames"}},
    "HunyuanVideoTransformer3DModel": {"hidden_states": {2: "frames"}},
}


def token_dims_for(class_name: str) -> dict[str, dict[int, str]] | None:
    return TOKEN_DIMS.get(class_name)


@dataclasses.dataclass(frozen=True)
class Resolution:
    """How a model's latent grid may change between calls of one exported graph (RESOLUTION_DIMS)."""

    latents: tuple[str, ...] = ("hidden_states",)  # inputs holding latents as an image or video
    axes: tuple[int, int] = (2, 3)  # their height and width axes
    patch_key: str = "patch_size"  # config entry: an int, or a tuple ending in the height and width patches
    bound_key: str | None = None  # config entry bounding the grid per side, in patches (Wan's rotary table)
    #: the bound is given per latent axis, in latents, the last two for height and width (Cosmos' max_size)
    bound_in_latents: bool = False
    min_grid: int = 1  # the smallest grid side the model's code takes
    square: bool = False  # the model takes square latents only: one dim, "grid", for both sides
    #: other inputs sized by the grid, in ``grid_height`` / ``grid_width``: ``{input: {dim: size}}``, or one
    #: such dict per element of a tuple input (Hunyuan-DiT's rotary table, one row per image token)
    grid_sized: dict[str, Any] = dataclasses.field(default_factory=dict)


#: Latent grids that may change between calls of one exported graph, per model class. The sizes
#: are given to torch.export as ``patch * grid_height`` (capture.DerivedDim), so the patch grid is
#: the symbol and the model's ``height // patch`` is exact (PixArt, SD3 and CogView3-Plus: with their
#: patch embedding's traceable twin, TRACEABLE_METHODS; Mochi with its rotary positions'; DiT with its
#: forward's, square). Others fix the resolution in their code (HiDream-I1 takes square latents and
#: caches text + grid**2 tokens; capture refuses a graph that would not serve other sizes,
#: fixed_dims.py): export those once per resolution.
_VIDEO = (3, 4)
_IMAGE_TOKENS = {0: "grid_height*grid_width"}
RESOLUTION_DIMS: dict[str, Resolution] = {
    "SanaTransformer2DModel": Resolution(),
    "PixArtTransformer2DModel": Resolution(),
    "DiTTransformer2DModel": Resolution(square=True),  # unpatchifies at int(tokens ** 0.5)
    "SD3Transformer2DModel": Resolution(bound_key="pos_embed_max_size"),  # its table's crop
    "CogView3PlusTransformer2DModel": Resolution(bound_key="pos_embed_max_size"),
    "CogView4Transformer2DModel": Resolution(),
    "HunyuanImageTransformer2DModel": Resolution(),
    "AuraFlowTransformer2DModel": Resolution(),
    "HunyuanDiT2DModel": Resolution(grid_sized={"image_rotary_emb": (_IMAGE_TOKENS, _IMAGE_TOKENS)}),
    # channels-last video latents (B, F, H, W, C); rotary positions: index ranges over frames and the grid
    "Kandinsky5Transformer3DModel": Resolution(grid_sized={
        "visual_rope_pos": [None, {0: "grid_height"}, {0: "grid_width"}]}),
    "WanTransformer3DModel": Resolution(axes=_VIDEO, bound_key="rope_max_seq_len"),
    "WanVACETransformer3DModel": Resolution(("hidden_states", "control_hidden_states"), _VIDEO,
                                            bound_key="rope_max_seq_len"),
    "SkyReelsV2Transformer3DModel": Resolution(axes=_VIDEO, bound_key="rope_max_seq_len"),
    "SanaVideoTransformer3DModel": Resolution(axes=_VIDEO, bound_key="rope_max_seq_len"),
    "HeliosTransformer3DModel": Resolution(axes=_VIDEO),
    # the condition mask (video-to-world) at the latents' size; bounded by its rotary table, 2 patches or more
    "CosmosTransformer3DModel": Resolution(("hidden_states", "condition_mask"), _VIDEO, bound_key="max_size",
                                           bound_in_latents=True, min_grid=2),
    "ChronoEditTransformer3DModel": Resolution(axes=_VIDEO, bound_key="rope_max_seq_len"),
    "HunyuanVideoTransformer3DModel": Resolution(axes=_VIDEO),
    "MochiTransformer3DModel": Resolution(axes=_VIDEO),
}


def resolution_dims_for(model: Any, inputs: Iterable[str] | None = None
                        ) -> tuple[dict[str, Any], dict[str, tuple[int, int]]] | None:
    """``(dynamic_dims, dim_ranges)`` for a model whose latent resolution may be dynamic (RESOLUTION_DIMS),
    else None: ``{"hidden_states": {2: "2*grid_height", 3: "2*grid_width"}}`` for 2x2 patches, and the
    grid's range where the model bounds it (``{"grid_height": (1, 1024), ...}``). ``inputs``: the call's
    argument names, where only some of the table's inputs are passed (Cosmos' condition mask)."""
    entry = RESOLUTION_DIMS.get(type(model).__name__)
    if entry is None:
        return None
    patch = getattr(model.config, entry.patch_key)
    patches = tuple(patch[-2:]) if isinstance(patch, (tuple, list)) else (patch, patch)
    sides = ("grid", "grid") if entry.square else ("grid_height", "grid_width")
    grid = {axis: f"{p}*{side}" if p != 1 else side for axis, p, side in zip(entry.axes, patches, sides)}
    dims: dict[str, Any] = {name: dict(grid) for name in entry.latents}
    dims.update(entry.grid_sized)
    if inputs is not None:
        dims = {name: spec for name, spec in dims.items() if name in set(inputs)}
    if entry.bound_key is None and entry.min_grid == 1:  # the default range
        return dims, {}
    if entry.bound_key is None:
        bounds = (DIM_MAX, DIM_MAX)
    elif entry.bound_in_latents:
        bounds = tuple(size // p for size, p in zip(getattr(model.config, entry.bound_key)[-2:], patches))
    else:
        bounds = (int(getattr(model.config, entry.bound_key)),) * 2
    return dims, {side: (entry.min_grid, bound) for side, bound in zip(sides, bounds)}


def merge_dynamic_dims(*dims: dict[str, Any] | None) -> dict[str, Any] | None:
    """One ``dynamic_dims`` from several (token and resolution dims of one model), None if all are; a
    tuple input's per-element dicts are merged element by element."""
    merged: dict[str, Any] = {}
    for each in dims:
        for name, by_index in (each or {}).items():
            if isinstance(by_index, (list, tuple)):
                before = merged.get(name) or [None] * len(by_index)
                merged[name] = type(by_index)({**(a or {}), **(b or {})} or None for a, b in zip(before, by_index))
            else:
                merged.setdefault(name, {}).update(by_index)
    return merged or None


#: Tensor inputs with no batch dim, per model class: ``dynamic_batch``'s rule (a tensor whose
#: first dim equals the batch is batched) would otherwise take FLUX's position ids for batched
#: whenever the token count equals the batch (e.g. a 2-token prompt at batch 2).
UNBATCHED_INPUTS: dict[str, tuple[str, ...]] = {
    **{name: ("img_ids", "txt_ids") for name in _FLUX_LIKE},
    "Krea2Transformer2DModel": ("position_ids",),  # (text + image tokens, 3)
    # Bria FIBO: FLUX's ids. Not in TOKEN_DIMS: its prompt length is also in text_encoder_layers, a list
    "BriaFiboTransformer2DModel": ("img_ids", "txt_ids"),
    "WanVACETransformer3DModel": ("control_hidden_states_scale",),  # one scale per VACE layer
    # rotary positions: [frames, height / 2, width / 2] index ranges, and the prompt's
    "Kandinsky5Transformer3DModel": ("visual_rope_pos", "text_rope_pos"),
    # FramePack: the frame indices of the latents and of the clean / 2x / 4x history latents
    "HunyuanVideoFramepackTransformer3DModel": ("indices_latents", "indices_latents_clean",
                                                "indices_latents_history_2x", "indices_latents_history_4x"),
}


#: Tensor inputs whose batch is not their first dim, per model class: input -> the batch's axis.
#: HiDream-I1 takes its Llama hidden states stacked layers first, (layers, batch, tokens, channels).
BATCH_AXES: dict[str, dict[str, int]] = {
    "HiDreamImageTransformer2DModel": {"encoder_hidden_states_llama3": 1},
}


def batch_axes_for(class_name: str) -> dict[str, int | None]:
    """Where ``dynamic_batch`` finds the batch in a model's inputs, beyond its rule (first dim, when it
    equals the batch): input -> the batch's axis, or None for an input with no batch dim."""
    return {**{name: None for name in UNBATCHED_INPUTS.get(class_name, ())}, **BATCH_AXES.get(class_name, {})}


#: Methods that compute on the host (torch.export cannot trace them), per module class: the
#: traceable twin capture puts in their place while it traces (traceable.py).
TRACEABLE_METHODS: dict[str, dict[str, Callable]] = {
    "MOEFeedForwardSwiGLU": {"moe_infer": hidream_moe_infer},  # HiDream-I1: .cpu().numpy() of token counts
    # HiDream-I1 at a dynamic batch: its output unpatchified in a Python loop over the samples
    "HiDreamImageTransformer2DModel": {"patchify": hidream_patchify, "unpatchify": hidream_unpatchify},
    # CogVideoX (sin-cos positions) away from its config's size: a new table written through .data
    "CogVideoXPatchEmbed": {"_get_positional_embeddings": cogvideox_positional_embeddings},
    # FramePack: its attention mask written per sample with tensor values as slice bounds (batch > 1),
    # or the text cut to the mask's sum (batch 1): the mask built with tensor ops instead
    "HunyuanVideoFramepackTransformer3DModel": {"forward": hunyuan_video_framepack_forward},
    # PixArt, SD3 at a dynamic resolution: their position table for the traced grid, with no size guard
    "PatchEmbed": {"forward": patch_embed_forward},
    "CogView3PlusPatchEmbed": {"forward": cogview3plus_patch_embed_forward},  # likewise
    "DiTTransformer2DModel": {"forward": dit_forward},  # its output at the input's grid, not int(tokens ** 0.5)
    "MochiRoPE": {"_centers": mochi_rope_centers},  # its positions from arange, not linspace's traced count
    # Mochi at a dynamic batch: its attention loops over the samples (each one's valid prompt tokens)
    "MochiAttention": {"forward": mochi_attention_forward},
    # Chroma at a dynamic batch: its guidance input built from a Python list of the batch's length
    "ChromaCombinedTimestepTextProjEmbeddings": {"forward": chroma_timestep_embeddings},
    "QwenEmbedRope": {"forward": qwen_rope_forward},  # Qwen-Image at a dynamic prompt length: int() of it
}


#: Module-level functions a model's forward calls, by (module, name), with the same need: their twin
#: takes the original as its first argument (traceable.swapped_functions).
TRACEABLE_FUNCTIONS: dict[tuple[str, str], Callable] = {
    # Qwen-Image at a dynamic prompt length: the length made a tensor with torch.as_tensor
    ("diffusers.models.transformers.transformer_qwenimage", "compute_text_seq_len_from_mask"):
        qwen_text_seq_len_from_mask,
}


#: Models that fold another axis into their blocks' batch dim, per model class: the input whose first
#: dim is the batch. Latte runs its spatial blocks on (batch x frames) rows and its temporal blocks on
#: (batch x patch positions) rows, each sample's rows in a row. RFC_METHOD.md's norms are per sample:
#: the rewrite groups each region's rows by sample (B, rows per sample, ...), so a sample keeps one
#: ratio, one Gram matrix and one RCS error per region, not one per frame or per position.
FOLDED_BATCH_INPUTS: dict[str, str] = {
    "LatteTransformer3DModel": "hidden_states",
}


def folded_batch_input_for(class_name: str) -> str | None:
    return FOLDED_BATCH_INPUTS.get(class_name)


@dataclasses.dataclass(frozen=True)
class PerSampleArgument:
    """An argument holding one entry per sample, a Python list: a graph holds a fixed number of entries
    (tensors as that many inputs, other values as constants)."""

    name: str
    #: whether the model reads the first sample's entry only (a function of the model: its config may
    #: decide): then a dynamic-batch graph serves any batch whose entries all equal the export's one,
    #: which the runner checks; otherwise ``dynamic_batch`` is refused
    first_only: Callable[[Any], bool] = lambda model: False


#: Arguments a model does not read when a tensor input is given instead, per model class: tensor input ->
#: those arguments. LTX-2 computes its rotary coordinates from the latent grid and frame rate unless its
#: pipeline passes them (it does): an export given the coordinates serves any grid, and its runner takes
#: any value of those arguments (the sidecar's ``ignored_arguments``).
ARGUMENTS_REPLACED_BY: dict[str, dict[str, tuple[str, ...]]] = {
    "LTX2VideoTransformer3DModel": {"video_coords": ("num_frames", "height", "width", "fps"),
                                    "audio_coords": ("audio_num_frames",)},
}


def ignored_arguments(model: Any, call: dict[str, Any]) -> tuple[str, ...]:
    """The arguments of ``call`` that ``model`` does not read, as another input of the call replaces them."""
    replaced = ARGUMENTS_REPLACED_BY.get(type(model).__name__, {})
    return tuple(arg for tensor, args in replaced.items() if call.get(tensor) is not None for arg in args
                 if arg in call)


#: Per model class. Qwen-Image's latent grid per image, ``img_shapes``: its rotary code reads the first
#: image's (a batch shares one size), and an edit model's ``zero_cond_t`` modulation index every
#: image's. HiDream-I1's patch grid per sample, ``img_sizes`` (its forward makes them unless given).
#: Z-Image takes its latents and prompts as lists of per-sample tensors.
PER_SAMPLE_ARGUMENTS: dict[str, tuple[PerSampleArgument, ...]] = {
    "QwenImageTransformer2DModel": (PerSampleArgument("img_shapes", lambda model: not model.zero_cond_t),),
    "HiDreamImageTransformer2DModel": (PerSampleArgument("img_sizes"),),
    "ZImageTransformer2DModel": (PerSampleArgument("x"), PerSampleArgument("cap_feats")),
}
