"""Models the export CLI knows: built-in random-weight DiTs, diffusers model directories, and
example inputs per family (the serving shapes baked into the exported graph)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

NUM_CLASSES = 10


def _build_random(factory, seed: int, scale: float):
    """Build under ``torch.manual_seed(seed)`` and make every weight random (diffusers zero-inits
    gates and output projections), without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * scale)
    return model.eval()


def tiny_dit(seed: int = 0) -> torch.nn.Module:
    """2 layers, 2 heads x 8, 4x8x8 latent, patch 2, 10 classes: the same weights as the tests'
    ``make_tiny_dit(seed)``."""
    from diffusers import DiTTransformer2DModel

    return _build_random(lambda: DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES), seed, 0.1)


def dit_s(seed: int = 0) -> torch.nn.Module:
    """DiT-S/2-sized: hidden 384 (6 heads x 64), depth 12, 4x32x32 latent, patch 2; random weights."""
    from diffusers import DiTTransformer2DModel

    return _build_random(lambda: DiTTransformer2DModel(
        num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=4, num_layers=12,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000), seed, 0.02)


BUILTIN = {"tiny-dit": tiny_dit, "dit-s": dit_s}


def load_model(name_or_path: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A built-in name (``tiny-dit``, ``dit-s``) or a diffusers model directory (config.json names
    the class), in ``dtype`` when given (diffusers' ``torch_dtype``; else float32 / as it loads)."""
    if name_or_path in BUILTIN:
        model = BUILTIN[name_or_path]()
        return model.to(dtype) if dtype is not None else model
    path = Path(name_or_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{name_or_path!r} is neither a built-in model ({sorted(BUILTIN)}) nor a diffusers "
                         "model directory with a config.json")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    import diffusers

    cls = getattr(diffusers, str(class_name), None)
    if cls is None:
        raise ValueError(f"{config_file} names class {class_name!r}, which diffusers {diffusers.__version__} "
                         "does not have")
    options = {"torch_dtype": dtype} if dtype is not None else {}
    return cls.from_pretrained(str(path), **options).eval()


@dataclasses.dataclass(frozen=True)
class ExampleShape:
    """The serving shapes asked for: batch, latent grid (frames x height x width, before
    patchifying), prompt length, and the generator the random tensors come from."""

    batch: int
    height: int
    width: int
    frames: int
    text_len: int
    generator: torch.Generator

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def text(self, dim: int) -> torch.Tensor:
        return self.randn(self.batch, self.text_len, dim)

    def timestep(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Diffusers' 0..1000 scale. Flow-matching pipelines pass float timesteps (sigma x 1000,
        e.g. 978.6): an integer graph input would refuse them; a float one takes int64 ones exactly."""
        return torch.full((self.batch,), 999, dtype=dtype)


def _dit(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    classes = int(cfg.get("num_embeds_ada_norm") or 1000)
    return dict(hidden_states=s.randn(s.batch, cfg["in_channels"], s.height, s.width), timestep=s.timestep(torch.long),
                class_labels=torch.arange(s.batch) % classes)  # DiTPipeline's DDIM/DPM timesteps are int64


def _pixart(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    sample = cfg.get("sample_size") or 32
    if cfg.get("use_additional_conditions") or (cfg.get("use_additional_conditions") is None and sample == 128):
        added = {"resolution": torch.tensor([[s.height * 8.0, s.width * 8.0]] * s.batch),
                 "aspect_ratio": torch.tensor([[s.height / s.width]] * s.batch)}
    else:
        added = {"resolution": None, "aspect_ratio": None}
    return dict(hidden_states=s.randn(s.batch, cfg["in_channels"], s.height, s.width),
                encoder_hidden_states=s.text(cfg["caption_channels"]), timestep=s.timestep(torch.long),  # DPM: int64
                added_cond_kwargs=added, encoder_attention_mask=torch.ones(s.batch, s.text_len))


def _flux_ids(s: ExampleShape, patch: int = 2) -> dict[str, torch.Tensor]:
    """Packed latents' position ids (``patch`` x ``patch`` latent pixels a token: FluxPipeline's 2x2),
    as FluxPipeline makes them, and the text's (zeros)."""
    hp, wp = s.height // patch, s.width // patch
    img_ids = torch.zeros(hp, wp, 3)
    img_ids[..., 1] = torch.arange(hp)[:, None]
    img_ids[..., 2] = torch.arange(wp)[None, :]
    return dict(img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(s.text_len, 3))


def _flux(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    ids = _flux_ids(s)
    kwargs = dict(hidden_states=s.randn(s.batch, len(ids["img_ids"]), cfg["in_channels"]),
                  encoder_hidden_states=s.text(cfg["joint_attention_dim"]),
                  pooled_projections=s.randn(s.batch, cfg["pooled_projection_dim"]),
                  timestep=torch.ones(s.batch), **ids)  # FLUX pipelines pass t / 1000
    if cfg.get("guidance_embeds"):
        kwargs["guidance"] = torch.full((s.batch,), 3.5)
    return kwargs


def _flux2(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """Flux2Pipeline's call: 2x2-packed latents, batched int64 position ids (T, H, W, L) for the
    image tokens and (0, 0, 0, l) for the text's, ``t / 1000`` and the guidance scale."""
    hp, wp = s.height // 2, s.width // 2
    one = torch.arange(1)
    img_ids = torch.cartesian_prod(one, torch.arange(hp), torch.arange(wp), one)
    txt_ids = torch.cartesian_prod(one, one, one, torch.arange(s.text_len))
    kwargs = dict(hidden_states=s.randn(s.batch, hp * wp, cfg["in_channels"]),
                  encoder_hidden_states=s.text(cfg["joint_attention_dim"]), timestep=torch.ones(s.batch),
                  img_ids=img_ids.expand(s.batch, -1, -1).clone(), txt_ids=txt_ids.expand(s.batch, -1, -1).clone())
    if cfg.get("guidance_embeds"):
        kwargs["guidance"] = torch.full((s.batch,), 4.0)
    return kwargs


def _flux_descendant(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """LongCat-Image, Ovis-Image: FLUX's packed latents and position ids, ``t / 1000``, no pooled
    projection (LongCat-Image's pipeline passes ``guidance=None``)."""
    ids = _flux_ids(s)
    return dict(hidden_states=s.randn(s.batch, len(ids["img_ids"]), cfg["in_channels"]),
                encoder_hidden_states=s.text(cfg["joint_attention_dim"]), timestep=torch.ones(s.batch), **ids)


def _bria(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """BriaPipeline passes the scheduler's timestep itself (0..1000), not ``t / 1000``."""
    return dict(_flux_descendant(cfg, s), timestep=s.timestep())


def _bria_fibo(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """BriaFiboPipeline (its default ``do_patching=False``): one token per latent pixel with FLUX's
    ids over that grid, the scheduler's timestep itself, one text encoder layer per block (double,
    then single), and the key-padding mask it passes whenever a prompt in the batch is padded (with
    CFG nearly always: the negative prompt is shorter). A call without padding passes it all true."""
    ids = _flux_ids(s, patch=1)
    tokens = s.text_len + len(ids["img_ids"])
    layers = [s.text(cfg["text_encoder_dim"]) for _ in range(cfg["num_layers"] + cfg["num_single_layers"])]
    return dict(hidden_states=s.randn(s.batch, len(ids["img_ids"]), cfg["in_channels"]),
                encoder_hidden_states=s.text(cfg["joint_attention_dim"]), text_encoder_layers=layers,
                timestep=s.timestep(), joint_attention_kwargs={"attention_mask": torch.ones(s.batch, 1, 1, tokens,
                                                                                           dtype=torch.bool)}, **ids)


def _flux3(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """FLUX.3: 2x2-packed latents, int64 position ids (T, H, W, L) without a batch dim, ``t / 1000``."""
    hp, wp = s.height // 2, s.width // 2
    one = torch.arange(1)
    return dict(hidden_states=s.randn(s.batch, hp * wp, cfg["in_channels"]),
                encoder_hidden_states=s.text(cfg["joint_attention_dim"]), timestep=torch.ones(s.batch),
                img_ids=torch.cartesian_prod(one, torch.arange(hp), torch.arange(wp), one),
                txt_ids=torch.cartesian_prod(one, one, one, torch.arange(s.text_len)))


def _krea2(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """Krea2Pipeline: 2x2-packed latents, the text encoder's tapped layers per token, one (t, h, w)
    id per token of the joint sequence (text at the origin, then the image grid), ``t / 1000``."""
    ids = _flux_ids(s)
    return dict(hidden_states=s.randn(s.batch, len(ids["img_ids"]), cfg["in_channels"]),
                encoder_hidden_states=s.randn(s.batch, s.text_len, cfg["num_text_layers"], cfg["text_hidden_dim"]),
                timestep=torch.ones(s.batch), position_ids=torch.cat([ids["txt_ids"], ids["img_ids"]]),
                encoder_attention_mask=torch.ones(s.batch, s.text_len, dtype=torch.bool))


def _chroma(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """FLUX's inputs without the pooled projection; the mask covers text then image tokens."""
    ids = _flux_ids(s)
    tokens = len(ids["img_ids"])
    return dict(hidden_states=s.randn(s.batch, tokens, cfg["in_channels"]),
                encoder_hidden_states=s.text(cfg["joint_attention_dim"]), timestep=torch.ones(s.batch),
                attention_mask=torch.ones(s.batch, s.text_len + tokens), **ids)


def _sd3(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    return dict(hidden_states=s.randn(s.batch, cfg["in_channels"], s.height, s.width),
                encoder_hidden_states=s.text(cfg["joint_attention_dim"]),
                pooled_projections=s.randn(s.batch, cfg["pooled_projection_dim"]), timestep=s.timestep())


def _cogview4(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """CogView4Pipeline: NCHW latents, sigma x 1000 (float), and SDXL-like micro-conditions in
    pixels (the VAE's 8x): original and target size, crop corner, one row per sample."""
    pixels = torch.tensor([[8.0 * s.height, 8.0 * s.width]]).repeat(s.batch, 1)
    return dict(hidden_states=s.randn(s.batch, cfg["in_channels"], s.height, s.width),
                encoder_hidden_states=s.text(cfg["text_embed_dim"]), timestep=s.timestep(),
                original_size=pixels, target_size=pixels.clone(), crop_coords=torch.zeros(s.batch, 2))


def _cogview3plus(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """CogView3PlusPipeline: CogView4's inputs (NCHW latents, micro-conditions in pixels), but the
    CogVideoX DDIM / DPM scheduler's int64 timestep."""
    return dict(_cogview4(cfg, s), timestep=s.timestep(torch.long))


def _cosmos(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """Cosmos 2 / 2.5: video latents; text-to-image passes one timestep per sample, video-to-world
    (an input channel for the condition mask) one per frame, ``(B, 1, T, 1, 1)``, the mask and the
    frame rate; a zero padding mask at the pixel size where the model concatenates one."""
    video2world = cfg["in_channels"] > cfg["out_channels"]
    kwargs = dict(hidden_states=s.randn(s.batch, cfg["out_channels"], s.frames, s.height, s.width),
                  encoder_hidden_states=s.text(cfg.get("text_embed_dim") or 1024),
                  timestep=torch.full((s.batch, 1, s.frames, 1, 1) if video2world else (s.batch,), 0.5))
    if video2world:
        mask = torch.zeros(s.batch, 1, s.frames, s.height, s.width)
        mask[:, :, 0] = 1  # the first latent frame is the conditioning one
        kwargs.update(condition_mask=mask, fps=16)
    if cfg.get("concat_padding_mask", True):
        kwargs["padding_mask"] = torch.zeros(1, 1, 8 * s.height, 8 * s.width)
    return kwargs


def _hidream(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """HiDreamImagePipeline: NCHW latents, ``timesteps`` (t, float), T5 states, the Llama hidden
    states stacked layers first (every layer up to the last one the model reads), pooled CLIP embeds."""
    t5_dim, llama_dim = cfg["caption_channels"]
    layers = max(cfg["llama_layers"]) + 1
    return dict(hidden_states=s.randn(s.batch, cfg["in_channels"], s.height, s.width), timesteps=s.timestep(),
                encoder_hidden_states_t5=s.text(t5_dim),
                encoder_hidden_states_llama3=torch.stack([s.text(llama_dim) for _ in range(layers)]),
                pooled_embeds=s.randn(s.batch, cfg["text_emb_dim"]))


def _hunyuan_image(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """HunyuanImagePipeline (2.1): NCHW latents, the Qwen text states with their tokenizer mask,
    ByT5 glyph states where the model projects them (``text_embed_2_dim``), the distilled guidance
    x 1000 for a guidance-distilled model, the next timestep for a MeanFlow one."""
    mask = torch.ones(s.batch, s.text_len, dtype=torch.int64)
    kwargs = dict(hidden_states=s.randn(s.batch, cfg["in_channels"], s.height, s.width), timestep=s.timestep(),
                  encoder_hidden_states=s.text(cfg["text_embed_dim"]), encoder_attention_mask=mask)
    if cfg.get("text_embed_2_dim"):
        kwargs.update(encoder_hidden_states_2=s.text(cfg["text_embed_2_dim"]), encoder_attention_mask_2=mask.clone())
    if cfg.get("guidance_embeds"):
        kwargs["guidance"] = torch.full((s.batch,), 3500.0)
    if cfg.get("use_meanflow"):
        kwargs["timestep_r"] = torch.full((s.batch,), 950.0)
    return kwargs


def _auraflow(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    return dict(hidden_states=s.randn(s.batch, cfg["in_channels"], s.height, s.width),
                encoder_hidden_states=s.text(cfg["joint_attention_dim"]), timestep=torch.ones(s.batch))  # t / 1000


def _sana(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    return dict(hidden_states=s.randn(s.batch, cfg["in_channels"], s.height, s.width),
                encoder_hidden_states=s.text(cfg["caption_channels"]), encoder_attention_mask=torch.ones(s.batch, s.text_len),
                timestep=s.timestep())  # flow-matching sigma x 1000 (x timestep_scale): float


def _sana_video(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """SanaVideoPipeline: Sana's inputs over video latents (B, C, frames, H, W)."""
    return dict(_sana(cfg, s), hidden_states=_video(cfg, s))


def _qwenimage(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """QwenImagePipeline's call: 2x2-packed latents, the token grid per sample for the rotary
    embedding, the prompt's mask (int64, from the tokenizer) and ``t / 1000``."""
    hp, wp = s.height // 2, s.width // 2
    return dict(hidden_states=s.randn(s.batch, hp * wp, cfg["in_channels"]), timestep=torch.ones(s.batch),
                encoder_hidden_states=s.text(cfg["joint_attention_dim"]),
                encoder_hidden_states_mask=torch.ones(s.batch, s.text_len, dtype=torch.long),
                img_shapes=[[(1, hp, wp)]] * s.batch)


def _zimage(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """ZImagePipeline's call: one (C, frames, H, W) latent and one unpadded caption per sample, and
    the timestep counting up, ``(1000 - t) / 1000`` (0 at the first step)."""
    return dict(x=[s.randn(cfg["in_channels"], s.frames, s.height, s.width) for _ in range(s.batch)],
                t=torch.zeros(s.batch), cap_feats=[s.randn(s.text_len, cfg["cap_feat_dim"]) for _ in range(s.batch)])


def _video(cfg: dict, s: ExampleShape) -> torch.Tensor:
    return s.randn(s.batch, cfg["in_channels"], s.frames, s.height, s.width)


def _wan(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    kwargs = dict(hidden_states=_video(cfg, s), timestep=s.timestep(), encoder_hidden_states=s.text(cfg["text_dim"]))
    if cfg.get("image_dim"):  # image-to-video: CLIP image tokens
        kwargs["encoder_hidden_states_image"] = s.randn(s.batch, 257, cfg["image_dim"])
    return kwargs


def _wan_vace(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """Wan's inputs and the control video's latents, one conditioning scale per VACE layer."""
    vace_layers = cfg.get("vace_layers") or [0]
    return dict(_wan(cfg, s), control_hidden_states=s.randn(s.batch, cfg["vace_in_channels"], s.frames, s.height, s.width),
                control_hidden_states_scale=torch.ones(len(vace_layers)))


def _motif_video(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """MotifVideoPipeline (text to video): the latents, a zero condition latent and a one-channel
    mask stacked on channels (``in_channels`` = 2 x latent channels + 1), the scheduler's
    timestep, and the T5Gemma states with their bool padding mask (cond and uncond: two calls)."""
    latent = (cfg["in_channels"] - 1) // 2
    hidden = torch.cat([s.randn(s.batch, latent, s.frames, s.height, s.width),
                        torch.zeros(s.batch, latent + 1, s.frames, s.height, s.width)], dim=1)
    return dict(hidden_states=hidden, timestep=s.timestep(), encoder_hidden_states=s.text(cfg["text_embed_dim"]),
                encoder_attention_mask=torch.ones(s.batch, s.text_len, dtype=torch.bool))


def _latte(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """LattePipeline: video latents (B, C, frames, H, W), the scheduler's int64 timestep (DDIM / DPM),
    the T5 states without a mask, and ``enable_temporal_attentions=True`` (its default). The model adds
    its temporal position table (``video_length`` rows) to the frames as they are: it serves that many
    latent frames, or one (text to image)."""
    if s.frames not in (1, cfg["video_length"]):
        raise ValueError(f"{s.frames} latent frames: Latte adds its temporal position table of video_length "
                         f"{cfg['video_length']} frames to the latents' frames; ask for {cfg['video_length']} or 1")
    return dict(hidden_states=_video(cfg, s), timestep=s.timestep(torch.long),
                encoder_hidden_states=s.text(cfg["caption_channels"]), enable_temporal_attentions=True)


def _hunyuan_video(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    kwargs = dict(hidden_states=_video(cfg, s), timestep=s.timestep(), encoder_hidden_states=s.text(cfg["text_embed_dim"]),
                  encoder_attention_mask=torch.ones(s.batch, s.text_len),
                  pooled_projections=s.randn(s.batch, cfg["pooled_projection_dim"]))
    if cfg.get("guidance_embeds"):
        kwargs["guidance"] = torch.full((s.batch,), 6000.0)  # the pipeline passes guidance_scale * 1000
    return kwargs


def _hunyuan_video_framepack(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """HunyuanVideoFramepackPipeline's call for one section (``frames`` = its ``latent_window_size``)
    at its default sampling (inverted anti-drifting, ``history_sizes=[1, 2, 16]``; the last section:
    no padding frames): HunyuanVideo's inputs and guidance x 1000, the SigLIP image embeddings (27 x 27
    tokens), the clean latents (the first image's, then the 1x history: 2 frames) and the 2x and 4x
    history latents (2 and 16 frames), with their int64 frame indices (``arange(1 + frames + 19)``
    split as the pipeline splits it; they move the rotary positions, not the shapes, from one
    section to the next)."""
    if not (cfg.get("has_image_proj") and cfg.get("has_clean_x_embedder")):
        raise ValueError("FramePack without has_image_proj / has_clean_x_embedder: its forward embeds the image "
                         "embeddings and the history latents the pipeline passes with them")
    history_sizes, channels = [1, 2, 16], cfg["in_channels"]
    prefix, latents, one, two, four = torch.arange(1 + s.frames + sum(history_sizes)).split(
        [1, s.frames, *history_sizes])
    kwargs = _hunyuan_video(cfg, s)
    kwargs.update(image_embeds=s.randn(s.batch, 729, cfg["image_proj_dim"]), indices_latents=latents,
                  latents_clean=s.randn(s.batch, channels, 1 + history_sizes[0], s.height, s.width),
                  indices_latents_clean=torch.cat([prefix, one]),
                  latents_history_2x=s.randn(s.batch, channels, history_sizes[1], s.height, s.width),
                  indices_latents_history_2x=two,
                  latents_history_4x=s.randn(s.batch, channels, history_sizes[2], s.height, s.width),
                  indices_latents_history_4x=four)
    return kwargs


def _ltx_video(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """Packed latents (B, tokens, C); num_frames / height / width are the grid in patches; the
    rotary scale LTXPipeline passes by default (VAE compression 8 / frame_rate 25, 32, 32)."""
    p, pt = cfg.get("patch_size") or 1, cfg.get("patch_size_t") or 1
    frames, height, width = s.frames // pt, s.height // p, s.width // p
    return dict(hidden_states=s.randn(s.batch, frames * height * width, cfg["in_channels"]),
                encoder_hidden_states=s.text(cfg["caption_channels"]), timestep=s.timestep(),
                encoder_attention_mask=torch.ones(s.batch, s.text_len), num_frames=frames, height=height, width=width,
                rope_interpolation_scale=(8 / 25, 32, 32))


def _cogvideox(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """CogVideoXPipeline (and its image-to-video, video-to-video, Fun-control siblings): latents
    frames first, (B, F, C, H, W), with the condition's channels where ``in_channels`` has them;
    the scheduler's int64 timestep; where the config asks for rotary embeddings, the (cos, sin)
    table the pipeline computes with ``get_3d_rotary_pos_embed`` (CogVideoX 1.0: a crop of the
    ``sample_width x sample_height`` grid; 1.5, ``patch_size_t`` set: a slice of it); where it has
    an ``ofs`` embedding (CogVideoX 1.5 I2V), the offset 2.0 the image-to-video pipeline passes."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, p_t = cfg["patch_size"], cfg.get("patch_size_t")
    if p_t and s.frames % p_t:
        raise ValueError(f"{s.frames} latent frames: CogVideoX 1.5's pipeline pads them to a multiple of "
                         f"patch_size_t {p_t}; ask for that many")
    rotary = cfg.get("use_rotary_positional_embeddings")
    if (not rotary or cfg.get("use_learned_positional_embeddings")) and s.text_len != cfg["max_text_seq_length"]:
        raise ValueError(f"text length {s.text_len}: this CogVideoX's positional embedding is laid out for "
                         f"max_text_seq_length {cfg['max_text_seq_length']} text tokens (its pipeline pads the "
                         "prompt to that many)")
    kwargs = dict(hidden_states=s.randn(s.batch, s.frames, cfg["in_channels"], s.height, s.width),
                  encoder_hidden_states=s.text(cfg["text_embed_dim"]), timestep=s.timestep(torch.long))
    if rotary:  # CogVideoXPipeline._prepare_rotary_positional_embeddings, the grid in patches
        grid, base = (s.height // p, s.width // p), (cfg["sample_height"] // p, cfg["sample_width"] // p)
        if p_t is None:
            table = get_3d_rotary_pos_embed(embed_dim=cfg["attention_head_dim"], grid_size=grid, temporal_size=s.frames,
                                            crops_coords=get_resize_crop_region_for_grid(grid, base[1], base[0]))
        elif s.height > cfg["sample_height"] or s.width > cfg["sample_width"]:
            raise ValueError(f"latent {s.height}x{s.width}: CogVideoX 1.5's rotary table slices a sample_height x "
                             f"sample_width grid ({cfg['sample_height']}x{cfg['sample_width']})")
        else:
            table = get_3d_rotary_pos_embed(embed_dim=cfg["attention_head_dim"], crops_coords=None, grid_size=grid,
                                            temporal_size=(s.frames + p_t - 1) // p_t, grid_type="slice", max_size=base)
        kwargs["image_rotary_emb"] = table
    if cfg.get("ofs_embed_dim"):
        kwargs["ofs"] = torch.full((1,), 2.0)
    return kwargs


def _hunyuandit(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """HunyuanDiTPipeline: NCHW latents, the DDPM timestep cast to the latents' dtype, the CLIP
    (BERT) and T5 states padded to the model's ``text_len`` / ``text_len_t5`` (the text length asked
    for does not apply: the model's padding embedding has exactly that many tokens) with their int64
    tokenizer masks, the size conditions (original 1024 x 1024, target = the image's pixels, crop
    (0, 0)), style 0, and the 2D rotary table it computes with ``get_2d_rotary_pos_embed`` over a
    512-pixel base grid."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    p = cfg["patch_size"]
    grid = (s.height // p, s.width // p)
    head_dim = cfg["attention_head_dim"]  # the pipeline's transformer.inner_dim // num_heads
    rotary = get_2d_rotary_pos_embed(head_dim, get_resize_crop_region_for_grid(grid, 512 // 8 // p), grid,
                                     output_type="pt")
    clip_len, t5_len = cfg["text_len"], cfg["text_len_t5"]
    return dict(hidden_states=s.randn(s.batch, cfg["in_channels"], s.height, s.width), timestep=s.timestep(),
                encoder_hidden_states=s.randn(s.batch, clip_len, cfg["cross_attention_dim"]),
                text_embedding_mask=torch.ones(s.batch, clip_len, dtype=torch.long),
                encoder_hidden_states_t5=s.randn(s.batch, t5_len, cfg["cross_attention_dim_t5"]),
                text_embedding_mask_t5=torch.ones(s.batch, t5_len, dtype=torch.long),
                image_meta_size=torch.tensor([[1024.0, 1024.0, 8.0 * s.height, 8.0 * s.width, 0.0, 0.0]] * s.batch),
                style=torch.zeros(s.batch, dtype=torch.long), image_rotary_emb=rotary)


def _kandinsky5(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """Kandinsky 5's pipelines: channels-last latents (B, F, H, W, C), with the condition (an image's
    latents or zeros) and its one-channel mask where the model has ``visual_cond``; the Qwen states
    and the CLIP pooled embedding; rotary positions as index ranges over the latent frames, the
    latent grid halved and the prompt's tokens; the rotary scale: a video's (Kandinsky5T2VPipeline,
    I2V: (1, 2, 2) for 480..854-pixel sides, else (1, 3.16, 3.16)), or, for one latent frame,
    Kandinsky5T2IPipeline's / I2I's [1.0, 1.0, 1.0]. No sparse (``nabla``) attention."""
    if cfg.get("attention_type", "regular") == "nabla":
        raise ValueError("Kandinsky 5 with nabla attention: the pipeline's sparse attention parameters (a flex "
                         "attention block mask) are not made here; export it with example inputs of your own")
    channels = cfg["in_visual_dim"] * 2 + 1 if cfg.get("visual_cond") else cfg["in_visual_dim"]
    if s.frames == 1:
        scale_factor = [1.0, 1.0, 1.0]
    else:
        pixels = (8 * s.height, 8 * s.width)
        scale_factor = (1, 2, 2) if all(480 <= x <= 854 for x in pixels) else (1, 3.16, 3.16)
    return dict(hidden_states=s.randn(s.batch, s.frames, s.height, s.width, channels),
                encoder_hidden_states=s.text(cfg["in_text_dim"]),
                pooled_projections=s.randn(s.batch, cfg["in_text_dim2"]), timestep=s.timestep(),
                visual_rope_pos=[torch.arange(s.frames), torch.arange(s.height // 2), torch.arange(s.width // 2)],
                text_rope_pos=torch.arange(s.text_len), scale_factor=scale_factor, sparse_params=None)


def _mochi(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    return dict(hidden_states=_video(cfg, s), encoder_hidden_states=s.text(cfg["text_embed_dim"]),
                timestep=s.timestep(), encoder_attention_mask=torch.ones(s.batch, s.text_len))


def _ltx2(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """LTX2Pipeline's main call (its CFG batch; the extra STG and modality-isolation calls, with
    ``spatio_temporal_guidance_blocks`` / ``isolate_modalities=True``, are other graphs): packed video
    latents (B, frames x H x W, C) and packed audio latents (B, audio frames, C x mel bins) with
    their text states from the connectors (``caption_channels`` wide for LTX-2.0, whose model
    projects them; ``cross_attention_dim`` / ``audio_cross_attention_dim`` for LTX-2.3's) and the
    connectors' int64 mask (all ones: an unpadded prompt, or learnable registers); the scheduler's
    timestep (sigma x 1000, float) passed as ``timestep`` and as ``sigma``; the latent grid, ``fps``
    24.0 (frame_rate 24 / motion_speed 1), the audio frame count for ``(frames - 1) x 8 + 1`` pixel
    frames at 24 fps (its audio VAE's rate / hop / 4, as the transformer's rope config has them),
    the video and audio rotary coordinates the pipeline makes with the model's own ropes
    (``prepare_video_coords`` / ``prepare_audio_coords``), ``isolate_modalities=False`` and
    ``use_cross_timestep=True`` (the pipeline's default)."""
    from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoRotaryPosEmbed

    if cfg.get("patch_size", 1) != 1 or cfg.get("patch_size_t", 1) != 1:
        raise ValueError(f"LTX-2 with patch size {cfg.get('patch_size')} x {cfg.get('patch_size_t')}: LTX2Pipeline "
                         "packs its latents into in_channels features per token only at patch size 1")
    fps = 24.0
    pixel_frames = (s.frames - 1) * cfg["vae_scale_factors"][0] + 1
    audio_frames = round(pixel_frames / fps * cfg["audio_sampling_rate"] / cfg["audio_hop_length"]
                         / cfg["audio_scale_factor"])
    common = dict(theta=cfg["rope_theta"], causal_offset=cfg["causal_offset"],
                  double_precision=cfg["rope_double_precision"], rope_type=cfg["rope_type"])  # the model's ropes
    rope = LTX2AudioVideoRotaryPosEmbed(
        dim=cfg["num_attention_heads"] * cfg["attention_head_dim"], patch_size=1, patch_size_t=1,
        base_num_frames=cfg["pos_embed_max_pos"], base_height=cfg["base_height"], base_width=cfg["base_width"],
        scale_factors=cfg["vae_scale_factors"], modality="video", num_attention_heads=cfg["num_attention_heads"],
        **common)
    audio_rope = LTX2AudioVideoRotaryPosEmbed(
        dim=cfg["audio_num_attention_heads"] * cfg["audio_attention_head_dim"], patch_size=cfg["audio_patch_size"],
        patch_size_t=cfg["audio_patch_size_t"], base_num_frames=cfg["audio_pos_embed_max_pos"],
        sampling_rate=cfg["audio_sampling_rate"], hop_length=cfg["audio_hop_length"],
        scale_factors=[cfg["audio_scale_factor"]], modality="audio",
        num_attention_heads=cfg["audio_num_attention_heads"], **common)
    video_coords = rope.prepare_video_coords(s.batch, s.frames, s.height, s.width, torch.device("cpu"), fps=fps)
    audio_coords = audio_rope.prepare_audio_coords(s.batch, audio_frames, torch.device("cpu"))
    projected = cfg.get("use_prompt_embeddings", True)
    mask = torch.ones(s.batch, s.text_len, dtype=torch.long)
    return dict(hidden_states=s.randn(s.batch, s.frames * s.height * s.width, cfg["in_channels"]),
                audio_hidden_states=s.randn(s.batch, audio_frames, cfg["audio_in_channels"]),
                encoder_hidden_states=s.text(cfg["caption_channels"] if projected else cfg["cross_attention_dim"]),
                audio_encoder_hidden_states=s.text(cfg["caption_channels"] if projected
                                                   else cfg["audio_cross_attention_dim"]),
                timestep=s.timestep(), sigma=s.timestep(), encoder_attention_mask=mask,
                audio_encoder_attention_mask=mask.clone(), num_frames=s.frames, height=s.height, width=s.width,
                fps=fps, audio_num_frames=audio_frames, video_coords=video_coords, audio_coords=audio_coords,
                isolate_modalities=False, use_cross_timestep=True)


def _helios(cfg: dict, s: ExampleShape) -> dict[str, Any]:
    """HeliosPipeline's call for one chunk (``frames`` = its ``num_latent_frames_per_chunk``) at its
    defaults ``history_sizes=[16, 2, 1]``, ``keep_first_frame=True``: the chunk's latents, the
    timestep in float64 (HeliosScheduler's timesteps are float64: 99.9 has no float32 twin), the T5
    states, and the long / mid / short history latents (16, 2 and 1 + 1 frames: the first frame's
    latents, then the last one) with their int64 frame indices
    (one row: ``arange(1 + 19 + frames)`` split as the pipeline splits it)."""
    if not cfg.get("has_multi_term_memory_patch", True):
        raise ValueError("Helios without has_multi_term_memory_patch: HeliosPipeline passes history latents, which "
                         "this model cannot embed")
    history_sizes, channels = [16, 2, 1], cfg["in_channels"]
    indices = torch.arange(1 + sum(history_sizes) + s.frames)
    prefix, long_, mid, short, current = indices.split([1, *history_sizes, s.frames])
    return dict(hidden_states=_video(cfg, s), timestep=s.timestep(torch.float64),
                encoder_hidden_states=s.text(cfg["text_dim"]), indices_hidden_states=current[None],
                indices_latents_history_short=torch.cat([prefix, short])[None],
                indices_latents_history_mid=mid[None], indices_latents_history_long=long_[None],
                latents_history_short=s.randn(s.batch, channels, 1 + history_sizes[2], s.height, s.width),
                latents_history_mid=s.randn(s.batch, channels, history_sizes[1], s.height, s.width),
                latents_history_long=s.randn(s.batch, channels, history_sizes[0], s.height, s.width))


#: Inputs left in float32 for a low-precision model: pipelines pass float32 timesteps (978.6,
#: which float16 would round to 978.5) and the models' timestep embeddings compute in float32;
#: CogVideoX's and Hunyuan-DiT's pipelines pass their rotary tables as computed, in float32 (the
#: models apply them in float32); LTX2Pipeline passes its timestep as ``sigma`` too, and its rotary
#: coordinates, as computed (float32).
FLOAT32_INPUTS = ("timestep", "timesteps", "guidance", "image_rotary_emb", "sigma", "video_coords", "audio_coords")

#: Models called with the timestep in the latents' dtype, which compute its embedding in that
#: dtype (Hunyuan-DiT: ``hidden_dtype=timestep.dtype``; a float32 one would meet float16 weights).
TIMESTEP_IN_MODEL_DTYPE = ("HunyuanDiT2DModel",)

#: Latent patches a pipeline packs into tokens outside the model (FluxPipeline's 2x2).
PACKED_PATCH = {name: 2 for name in (
    "FluxTransformer2DModel", "ChromaTransformer2DModel", "Flux2Transformer2DModel", "Flux3Transformer2DModel",
    "QwenImageTransformer2DModel", "LongCatImageTransformer2DModel", "OvisImageTransformer2DModel",
    "BriaTransformer2DModel", "Krea2Transformer2DModel")}

#: The forward kwargs of one call, per model class (what its pipeline passes). A family left out
#: exports through ``to_onnx`` with example inputs of your own.
EXAMPLE_INPUTS: dict[str, Callable[[dict, ExampleShape], dict[str, Any]]] = {
    "DiTTransformer2DModel": _dit,
    "PixArtTransformer2DModel": _pixart,
    "FluxTransformer2DModel": _flux,
    "Flux2Transformer2DModel": _flux2,
    "Flux3Transformer2DModel": _flux3,
    "LongCatImageTransformer2DModel": _flux_descendant,
    "OvisImageTransformer2DModel": _flux_descendant,
    "BriaTransformer2DModel": _bria,
    "BriaFiboTransformer2DModel": _bria_fibo,
    "Krea2Transformer2DModel": _krea2,
    "ChromaTransformer2DModel": _chroma,
    "SD3Transformer2DModel": _sd3,
    "SanaTransformer2DModel": _sana,
    "SanaVideoTransformer3DModel": _sana_video,
    "QwenImageTransformer2DModel": _qwenimage,
    "ZImageTransformer2DModel": _zimage,
    "AuraFlowTransformer2DModel": _auraflow,
    "CogView4Transformer2DModel": _cogview4,
    "CogView3PlusTransformer2DModel": _cogview3plus,
    "CosmosTransformer3DModel": _cosmos,
    "WanTransformer3DModel": _wan,
    "ChronoEditTransformer3DModel": _wan,  # Wan's image-to-video inputs
    "SkyReelsV2Transformer3DModel": _wan,
    "WanVACETransformer3DModel": _wan_vace,
    "HunyuanVideoTransformer3DModel": _hunyuan_video,
    "HunyuanVideoFramepackTransformer3DModel": _hunyuan_video_framepack,
    "LatteTransformer3DModel": _latte,
    "LTXVideoTransformer3DModel": _ltx_video,
    "LTX2VideoTransformer3DModel": _ltx2,
    "HeliosTransformer3DModel": _helios,
    "MochiTransformer3DModel": _mochi,
    "MotifVideoTransformer3DModel": _motif_video,
    "CogVideoXTransformer3DModel": _cogvideox,
    "HunyuanDiT2DModel": _hunyuandit,
    "Kandinsky5Transformer3DModel": _kandinsky5,
    "HiDreamImageTransformer2DModel": _hidream,
    "HunyuanImageTransformer2DModel": _hunyuan_image,
}


def example_inputs(model: torch.nn.Module, batch: int = 2, height: int | None = None, width: int | None = None,
                   text_len: int = 8, frames: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Forward kwargs with the serving shapes for a known family: latent ``height`` x ``width``
    (default: the config's ``sample_size`` / ``sample_height`` x ``sample_width``, else 32) and, for
    video models, ``frames`` latent frames (default 1)."""
    name = type(model).__name__
    build = EXAMPLE_INPUTS.get(name)
    if build is None:
        raise ValueError(f"no example inputs known for {name} (known: {sorted(EXAMPLE_INPUTS)}); call "
                         "rfc_compile.export.to_onnx with example_inputs")
    cfg = dict(model.config)
    sample = cfg.get("sample_size") or 32
    height, width = height or cfg.get("sample_height") or sample, width or cfg.get("sample_width") or sample
    shape = ExampleShape(batch=batch, height=height, width=width, frames=frames or 1,
                         text_len=text_len, generator=torch.Generator().manual_seed(seed))
    for what, size in (("batch", shape.batch), ("frames", shape.frames), ("text length", shape.text_len)):
        if size < 1:
            raise ValueError(f"{what} must be >= 1, got {size}")
    patch = PACKED_PATCH.get(name) or cfg.get("patch_size") or cfg.get("all_patch_size") or 1
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch  # Wan's (t, h, w), Z-Image's choices
    if shape.height % patch or shape.width % patch:
        raise ValueError(f"latent {shape.height}x{shape.width} is not a multiple of {name}'s patch size {patch} "
                         "(the model would drop the remainder)")
    # a float16 model is called with float16 latents and text states; diffusers' ``dtype`` skips the
    # modules it keeps in float32 (Wan's scale_shift_table is its first parameter)
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    kwargs = build(cfg, shape)
    float32 = [k for k in FLOAT32_INPUTS if not (k == "timestep" and name in TIMESTEP_IN_MODEL_DTYPE)]
    return {key: value if key in float32 else
            pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, value)
            for key, value in kwargs.items()}
