"""Shared fixtures: tiny diffusers models built from config (no downloads) and a sampling loop."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

NUM_CLASSES = 10


def make_tiny_dit(seed: int = 0, layers: int = 2) -> DiTTransformer2DModel:
    """A 2-layer class-conditional DiT with every weight random (diffusers zero-inits some)."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dit() -> DiTTransformer2DModel:
    return make_tiny_dit()


def ddim_generation(transformer, steps: int = 20, batch: int = 1, cfg: bool = False, seed: int = 0,
                    guidance: float = 1.5, on_step=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A hand-written DDIM loop (CFG doubles the batch as DiTPipeline does).

    Returns the final latents and the model output of every step. ``on_step(n)`` runs
    before each model call (the reference implementation counts steps with it).
    """
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=gen)
    labels = torch.arange(batch) % NUM_CLASSES
    outputs = []
    for n, t in enumerate(scheduler.timesteps):
        if cfg:
            x = torch.cat([latents, latents])
            y = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])
        else:
            x, y = latents, labels
        if on_step is not None:
            on_step(n)
        with torch.no_grad():
            out = transformer(hidden_states=x, timestep=t.expand(x.shape[0]), class_labels=y,
                              return_dict=False)[0]
        outputs.append(out.clone())
        if cfg:
            cond, uncond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents, outputs


# --- [models] tiny diffusers families (no downloads) and a flow-matching loop ------------------

import dataclasses  # noqa: E402
import functools  # noqa: E402
from collections.abc import Callable  # noqa: E402


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Every weight random (diffusers zero-inits gates/projections, which would hide errors)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


@dataclasses.dataclass(frozen=True)
class Family:
    """One diffusers transformer family, tiny: how to build it and how a pipeline calls it.

    ``conditions(batch, gen)`` gives the constant per-generation kwargs (text states, ids, masks);
    ``timestep_scale`` is what a pipeline multiplies sigma by (FLUX passes sigma = t / 1000).
    """

    name: str
    build: Callable[[], torch.nn.Module]
    latent_shape: tuple[int, ...]  # per sample
    conditions: Callable[[int, torch.Generator], dict]
    threshold: float  # RCS tau giving both full and skipped steps in 10 steps
    timestep_scale: float = 1000.0

    def example(self, batch: int = 2, seed: int = 0) -> dict:
        """One call's kwargs at the first timestep (e.g. the example inputs of a capture or export)."""
        gen = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, *self.latent_shape, generator=gen),
                    timestep=torch.full((batch,), self.timestep_scale), **self.conditions(batch, gen))


def _text(batch, gen, tokens, dim):
    return torch.randn(batch, tokens, dim, generator=gen)


def build_pixart():
    from diffusers import PixArtTransformer2DModel

    return randomize(PixArtTransformer2DModel(
        num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
        cross_attention_dim=24, caption_channels=16, sample_size=8, patch_size=2,
        use_additional_conditions=True, norm_num_groups=1), seed=0)


def pixart_conditions(batch, gen, text=5):
    mask = torch.ones(batch, text)
    mask[:, -1] = 0  # a padded caption token: exercises the encoder attention mask
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), encoder_attention_mask=mask,
                added_cond_kwargs={"resolution": torch.tensor([[64.0, 64.0]] * batch),
                                   "aspect_ratio": torch.tensor([[1.0]] * batch)})


def build_flux():
    from diffusers import FluxTransformer2DModel

    return randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=False,
        axes_dims_rope=(2, 2, 4)), seed=0)


def flux_conditions(batch, gen, height=4, width=4, text=3):
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), pooled_projections=torch.randn(batch, 16, generator=gen),
                img_ids=img_ids.reshape(height * width, 3), txt_ids=torch.zeros(text, 3))


def build_sd3():
    from diffusers import SD3Transformer2DModel

    # block 0 is an SD3.5 dual-attention block (attn2); the last block is context_pre_only
    return randomize(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm"), seed=0)


def sd3_conditions(batch, gen, text=3):
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), pooled_projections=torch.randn(batch, 16, generator=gen))


def build_wan():
    from diffusers import WanTransformer3DModel

    return randomize(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32), seed=0)


def wan_conditions(batch, gen):
    return dict(encoder_hidden_states=_text(batch, gen, 3, 16))


def build_hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel

    return randomize(HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=16, rope_axes_dim=(2, 2, 4)), seed=0)


def hunyuan_video_conditions(batch, gen):
    return dict(encoder_hidden_states=_text(batch, gen, 3, 16), encoder_attention_mask=torch.ones(batch, 3),
                pooled_projections=torch.randn(batch, 16, generator=gen), guidance=torch.full((batch,), 6000.0))


def build_cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    return randomize(CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=1, sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=3), seed=0)


def cogvideox_conditions(batch, gen):
    return dict(encoder_hidden_states=_text(batch, gen, 3, 16))


def build_ltx_video():
    from diffusers import LTXVideoTransformer3DModel

    return randomize(LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=16), seed=0)


def ltx_video_conditions(batch, gen):
    return dict(encoder_hidden_states=_text(batch, gen, 3, 16), encoder_attention_mask=torch.ones(batch, 3),
                num_frames=2, height=4, width=4)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("flux", build_flux, (16, 4), flux_conditions, threshold=0.5, timestep_scale=1.0),
    Family("sd3", build_sd3, (4, 8, 8), sd3_conditions, threshold=0.5),
    Family("pixart", build_pixart, (4, 8, 8), pixart_conditions, threshold=0.5),
    Family("wan", build_wan, (4, 2, 4, 4), wan_conditions, threshold=0.2),
    Family("hunyuan_video", build_hunyuan_video, (4, 1, 4, 4), hunyuan_video_conditions, threshold=0.3),
    Family("cogvideox", build_cogvideox, (2, 4, 4, 4), cogvideox_conditions, threshold=0.1),
    Family("ltx_video", build_ltx_video, (32, 4), ltx_video_conditions, threshold=0.5),
)}


def with_text(family: Family, text: int) -> Family:
    """A family whose conditions take a ``text`` length (flux, sd3, pixart) at prompt length ``text``."""
    return dataclasses.replace(family, conditions=functools.partial(family.conditions, text=text))


def flux_at(height: int, width: int, text: int) -> Family:
    """The tiny FLUX family at another latent grid (height x width image tokens) and prompt length."""
    return dataclasses.replace(FAMILIES["flux"], latent_shape=(height * width, 4),
                               conditions=functools.partial(flux_conditions, height=height, width=width, text=text))


def flow_generation(transformer, family: Family, steps: int = 10, batch: int = 2, seed: int = 0,
                    on_step=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A hand-written flow-matching Euler loop (x <- x + (sigma' - sigma) v), as FLUX/SD3 pipelines do.

    Each sample of the batch gets its own text condition. Returns the final latents and every
    step's model output; ``on_step(n)`` runs before each model call.
    """
    gen = torch.Generator().manual_seed(seed)
    cond = family.conditions(batch, gen)
    latents = torch.randn(batch, *family.latent_shape, generator=gen)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    outputs = []
    for n in range(steps):
        if on_step is not None:
            on_step(n)
        t = (sigmas[n] * family.timestep_scale).expand(batch)
        with torch.no_grad():
            out = transformer(hidden_states=latents, timestep=t, return_dict=False, **cond)[0]
        outputs.append(out.clone())
        latents = latents + (sigmas[n + 1] - sigmas[n]) * out
    return latents, outputs


# --- [models] drop-in pipelines: tiny random transformer, no text encoders / VAE ----------------

PIPELINES = ("flux", "sd3", "pixart_alpha", "pixart_sigma", "wan", "qwenimage")


def _embeds(batch: int, tokens: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))


def _pixart_transformer(alpha: bool):
    from diffusers import PixArtTransformer2DModel

    # Real configs: out_channels = 2 x latent channels (learned sigma). PixArtAlphaPipeline passes
    # resolution/aspect-ratio conditions exactly when sample_size == 128 (the 1024px alpha model).
    return randomize(PixArtTransformer2DModel(
        num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=24, caption_channels=16, sample_size=128 if alpha else 8, patch_size=2,
        norm_num_groups=1), seed=0)


def build_pipeline(name: str):
    """(pipeline with a tiny random transformer and no text encoders/VAE, call kwargs)."""
    import diffusers as d

    if name in ("pixart_alpha", "pixart_sigma"):
        cls = d.PixArtAlphaPipeline if name == "pixart_alpha" else d.PixArtSigmaPipeline
        pipe = cls(tokenizer=None, text_encoder=None, vae=None, transformer=_pixart_transformer(name == "pixart_alpha"),
                   scheduler=d.DPMSolverMultistepScheduler())
        kwargs = dict(prompt_embeds=_embeds(1, 5, 16, 1), prompt_attention_mask=torch.ones(1, 5),
                      negative_prompt=None, negative_prompt_embeds=_embeds(1, 5, 16, 2),
                      negative_prompt_attention_mask=torch.ones(1, 5), height=64, width=64,
                      use_resolution_binning=False)
    elif name == "flux":
        pipe = d.FluxPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                              tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=build_flux())
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), pooled_prompt_embeds=_embeds(1, 1, 16, 3)[:, 0],
                      height=64, width=64)
    elif name == "sd3":
        pipe = d.StableDiffusion3Pipeline(
            transformer=build_sd3(), scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
            tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), pooled_prompt_embeds=_embeds(1, 1, 16, 3)[:, 0],
                      negative_prompt_embeds=_embeds(1, 3, 16, 2), negative_pooled_prompt_embeds=_embeds(1, 1, 16, 4)[:, 0],
                      height=64, width=64)
    elif name == "wan":
        pipe = d.WanPipeline(tokenizer=None, text_encoder=None, transformer=build_wan(), vae=None,
                             scheduler=d.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                 use_flow_sigmas=True, flow_shift=3.0))
        # guidance_scale 1: WanPipeline runs cond and uncond as two separate transformer calls
        # per step under cache_context("cond"/"uncond"); not one cache (see benchmarks/SUPPORT.md).
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), height=32, width=32, num_frames=5, guidance_scale=1.0)
    elif name == "ltx_video":
        pipe = d.LTXPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=build_ltx_video())
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), prompt_attention_mask=torch.ones(1, 3),
                      negative_prompt_embeds=_embeds(1, 3, 16, 2), negative_prompt_attention_mask=torch.ones(1, 3),
                      height=64, width=64, num_frames=9)
    elif name == "qwenimage":
        pipe = d.QwenImagePipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                   tokenizer=None, transformer=build_qwenimage())
        # true_cfg_scale > 1: cond and uncond are two calls per step, each in its own cache_context
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), prompt_embeds_mask=torch.ones(1, 3, dtype=torch.long),
                      negative_prompt_embeds=_embeds(1, 3, 16, 2),
                      negative_prompt_embeds_mask=torch.ones(1, 3, dtype=torch.long), height=64, width=64,
                      true_cfg_scale=4.0)
    else:
        raise KeyError(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def pipeline_latents(pipe, kwargs, steps: int = 10, seed: int = 0) -> torch.Tensor:
    """Run the pipeline to latents (no VAE) and return them."""
    out = pipe(**kwargs, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(seed))
    return out.frames if hasattr(out, "frames") else out.images


# --- [models] more families that the same block patterns fit -----------------------------------

def build_chroma():
    from diffusers import ChromaTransformer2DModel

    return randomize(ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=16, approximator_hidden_dim=16,
        approximator_layers=1), seed=0)


def chroma_conditions(batch, gen):
    cond = flux_conditions(batch, gen)
    del cond["pooled_projections"]
    mask = torch.ones(batch, 3 + 16)
    mask[:, 2] = 0  # a padded text token
    return dict(cond, attention_mask=mask)


def build_skyreels_v2():
    from diffusers import SkyReelsV2Transformer3DModel

    return randomize(SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32), seed=0)


def build_mochi():
    from diffusers import MochiTransformer3DModel

    return randomize(MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=3), seed=0)


def mochi_conditions(batch, gen):
    return dict(encoder_hidden_states=_text(batch, gen, 3, 16), encoder_attention_mask=torch.ones(batch, 3))


def build_qwenimage():
    from diffusers import QwenImageTransformer2DModel

    # packed latents: 4x4 tokens of 2x2 patches of 4 channels (16), as QwenImagePipeline packs them
    return randomize(QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4)), seed=0)


def qwenimage_conditions(batch, gen, text=3):
    # QwenImagePipeline passes the latent grid per sample ((frames, height, width) in tokens) for RoPE
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), encoder_hidden_states_mask=torch.ones(batch, text),
                img_shapes=[[(1, 4, 4)]] * batch)


FAMILIES.update({f.name: f for f in (
    Family("chroma", build_chroma, (16, 4), chroma_conditions, threshold=0.3, timestep_scale=1.0),
    Family("skyreels_v2", build_skyreels_v2, (4, 2, 4, 4), wan_conditions, threshold=0.2),
    Family("mochi", build_mochi, (4, 2, 4, 4), mochi_conditions, threshold=0.1),
    Family("qwenimage", build_qwenimage, (16, 16), qwenimage_conditions, threshold=0.3, timestep_scale=1.0),
)})
