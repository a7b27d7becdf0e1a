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
                    guidance: float = 1.5, on_step=None, size: int = 8) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A hand-written DDIM loop (CFG doubles the batch as DiTPipeline does).

    Returns the final latents and the model output of every step. ``on_step(n)`` runs
    before each model call (the reference implementation counts steps with it).
    """
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, size, size, generator=gen)  # DiT takes square latents
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
from typing import Any  # noqa: E402


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Every weight random (diffusers zero-inits gates/projections, which would hide errors)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


class SigmaScaledDiT(torch.nn.Module):
    """A tiny DiT whose output a second, timestep-like argument scales: LTX2Pipeline passes one tensor
    as both ``timestep`` and ``sigma``."""

    def __init__(self):
        super().__init__()
        self.dit = make_tiny_dit()

    def forward(self, hidden_states, timestep, sigma, class_labels, return_dict=True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        out = self.dit(hidden_states, timestep=timestep, class_labels=class_labels, return_dict=False)[0]
        out = out * sigma.float().view(-1, 1, 1, 1) / 1000
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _first_output(output: Any) -> Any:
    return output if isinstance(output, torch.Tensor) else output[0]  # Kandinsky 5 returns its sample bare


def _hidden_states_and_timestep(latents: torch.Tensor, t: torch.Tensor) -> dict:
    return dict(hidden_states=latents, timestep=t)


def _as_is(output: Any) -> torch.Tensor:
    return output


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
    rising_timestep: bool = False  # the pipeline passes 1 - sigma (Z-Image), not sigma x scale
    #: the call's latent and timestep arguments (diffusers' names unless a model has its own)
    call_inputs: Callable[[torch.Tensor, torch.Tensor], dict] = _hidden_states_and_timestep
    #: the model's output ``(return_dict=False)[0]`` as one batched tensor
    batched_output: Callable[[Any], torch.Tensor] = _as_is
    #: what of the ``return_dict=False`` output moves the latents (its first entry; LTX-2: video and audio)
    sample_of: Callable[[Any], Any] = _first_output

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """What the pipeline passes as the timestep at noise level ``sigma`` (1 -> 0)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        return 1.0 - sigma if self.rising_timestep else sigma * self.timestep_scale

    def example(self, batch: int = 2, seed: int = 0) -> dict:
        """One call's kwargs at the first timestep (e.g. the example inputs of a capture or export)."""
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn(batch, *self.latent_shape, generator=gen)
        return dict(self.call_inputs(latents, self.timestep(1.0).repeat(batch)), **self.conditions(batch, gen))


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
        t = family.timestep(sigmas[n]).expand(batch)
        with torch.no_grad():
            output = transformer(**family.call_inputs(latents, t), return_dict=False, **cond)
            out = family.batched_output(family.sample_of(output))
        outputs.append(out.clone())
        latents = latents + (sigmas[n + 1] - sigmas[n]) * out
    return latents, outputs


# --- [models] drop-in pipelines: tiny random transformer, no text encoders / VAE ----------------

PIPELINES = ("flux", "sd3", "pixart_alpha", "pixart_sigma", "wan", "qwenimage", "flux2", "sana", "zimage", "ovis_image",
             "chroma", "krea2", "flux_kontext", "cogview4", "sana_video", "kandinsky5", "hidream", "bria_fibo",
             "motif_video", "cogview3plus", "latte")
#: pipelines that call the transformer for cond and uncond separately *without* cache_context
BRANCHES_WITHOUT_CACHE_CONTEXT = ("chroma", "krea2", "flux_kontext", "kandinsky5")


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


def _tiny_vae():
    """A random 2-level AutoencoderKL with 1 latent channel (the tiny FLUX packs 2x2 of them into its 4)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=1,
                             norm_num_groups=4, layers_per_block=1, shift_factor=0.1, scaling_factor=1.0).eval()


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
    elif name == "flux2":
        pipe = d.Flux2Pipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                               tokenizer=None, transformer=build_flux2())
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), height=64, width=64)
    elif name == "sana":
        pipe = d.SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=build_sana(),
                              scheduler=d.FlowMatchEulerDiscreteScheduler())
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), prompt_attention_mask=torch.ones(1, 3), negative_prompt=None,
                      negative_prompt_embeds=_embeds(1, 3, 16, 2), negative_prompt_attention_mask=torch.ones(1, 3),
                      height=256, width=256, use_resolution_binning=False)
    elif name == "zimage":
        # CFG batched (one call per step); the timestep counts up: (1000 - t) / 1000
        pipe = d.ZImagePipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                tokenizer=None, transformer=build_zimage())
        kwargs = dict(prompt_embeds=[_embeds(1, 5, 16, 1)[0]], negative_prompt_embeds=[_embeds(1, 3, 16, 2)[0]],
                      height=64, width=64, guidance_scale=4.0)
    elif name == "ovis_image":
        # CFG: cond and uncond are two calls per step, each in its own cache_context
        pipe = d.OvisImagePipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                   tokenizer=None, transformer=build_ovis_image())
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), negative_prompt=None, negative_prompt_embeds=_embeds(1, 3, 16, 2),
                      height=64, width=64, guidance_scale=4.0)
    elif name == "flux_kontext":
        # an image to edit (a tiny random VAE encodes it: its tokens follow the latents'), true CFG with
        # cond and uncond as two calls per step, no cache_context
        pipe = d.FluxKontextPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(), text_encoder=None,
                                     tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=build_flux())
        kwargs = dict(image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)),
                      prompt_embeds=_embeds(1, 3, 16, 1), pooled_prompt_embeds=_embeds(1, 1, 16, 3)[:, 0],
                      negative_prompt_embeds=_embeds(1, 3, 16, 2), negative_pooled_prompt_embeds=_embeds(1, 1, 16, 4)[:, 0],
                      true_cfg_scale=4.0, height=32, width=32, max_area=32 * 32, _auto_resize=False)
    elif name == "chroma":
        # CFG: cond and uncond are two calls per step, with no cache_context
        pipe = d.ChromaPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                tokenizer=None, transformer=build_chroma())
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), negative_prompt_embeds=_embeds(1, 3, 16, 2),
                      prompt_attention_mask=torch.ones(1, 3), negative_prompt_attention_mask=torch.ones(1, 3),
                      height=64, width=64, guidance_scale=4.0)
    elif name == "krea2":
        # CFG: cond and uncond are two calls per step, with no cache_context; text states per tapped layer
        pipe = d.Krea2Pipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                               tokenizer=None, transformer=build_krea2(in_channels=16))
        kwargs = dict(prompt_embeds=_embeds(1, 6, 16, 1).view(1, 3, 2, 16),
                      prompt_embeds_mask=torch.ones(1, 3, dtype=torch.bool),
                      negative_prompt_embeds=_embeds(1, 6, 16, 2).view(1, 3, 2, 16),
                      negative_prompt_embeds_mask=torch.ones(1, 3, dtype=torch.bool), height=64, width=64,
                      guidance_scale=4.0)
    elif name == "cogview4":
        # CFG: cond and uncond are two calls per step, each in its own cache_context
        pipe = d.CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=build_cogview4(),
                                  scheduler=d.FlowMatchEulerDiscreteScheduler())
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), negative_prompt_embeds=_embeds(1, 3, 16, 2),
                      height=64, width=64, guidance_scale=4.0)
    elif name == "cogview3plus":
        # CFG batched: one call per step (uncond first); the CogVideoX DDIM scheduler's int64 timesteps, with
        # CogVideoX's released settings (v-prediction, trailing spacing from 999, zero terminal SNR)
        scheduler = d.CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                             rescale_betas_zero_snr=True)
        pipe = d.CogView3PlusPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=build_cogview3plus(),
                                      scheduler=scheduler)
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), negative_prompt_embeds=_embeds(1, 3, 16, 2),
                      height=64, width=64, guidance_scale=5.0)
    elif name == "sana_video":
        # CFG batched: one call per step
        pipe = d.SanaVideoPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=build_sana_video(),
                                   scheduler=d.FlowMatchEulerDiscreteScheduler())
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), prompt_attention_mask=torch.ones(1, 3), negative_prompt=None,
                      negative_prompt_embeds=_embeds(1, 3, 16, 2), negative_prompt_attention_mask=torch.ones(1, 3),
                      height=64, width=64, frames=5, guidance_scale=4.5, use_resolution_binning=False)
    elif name in ("kandinsky5", "kandinsky5_t2i"):
        # CFG: cond and uncond are two calls per step (prompts of other lengths), with no cache_context;
        # the text-to-image pipeline: one latent frame
        video = name == "kandinsky5"
        cls = d.Kandinsky5T2VPipeline if video else d.Kandinsky5T2IPipeline
        pipe = cls(transformer=build_kandinsky5(), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                   tokenizer_2=None, scheduler=d.FlowMatchEulerDiscreteScheduler())
        kwargs = dict(prompt_embeds_qwen=_embeds(1, 3, 16, 1), prompt_embeds_clip=_embeds(1, 1, 16, 2)[:, 0],
                      prompt_cu_seqlens=torch.tensor([0, 3], dtype=torch.int32),
                      negative_prompt_embeds_qwen=_embeds(1, 4, 16, 3), negative_prompt_embeds_clip=_embeds(1, 1, 16, 4)[:, 0],
                      negative_prompt_cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), height=64, width=64,
                      **(dict(num_frames=5, guidance_scale=5.0) if video else dict(guidance_scale=3.5)))
    elif name in ("cogvideox", "cogvideox_rotary"):
        # CFG batched, one call per step; the rotary variant (CogVideoX 1.0 5B's layout, head dim 16 so that
        # its t / h / w split is even) gets the (cos, sin) table the pipeline computes
        transformer = build_cogvideox()
        if name == "cogvideox_rotary":
            transformer = randomize(type(transformer).from_config(
                transformer.config, use_rotary_positional_embeddings=True, attention_head_dim=16), seed=0)
        pipe = d.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                   scheduler=d.CogVideoXDDIMScheduler())
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), negative_prompt_embeds=_embeds(1, 3, 16, 2),
                      height=32, width=32, num_frames=5, guidance_scale=6.0)
    elif name == "hunyuandit":
        # CFG batched; CLIP (BERT) and T5 states with their masks, the 2D rotary table, size conditions, style
        pipe = d.HunyuanDiTPipeline(vae=None, text_encoder=None, tokenizer=None, transformer=build_hunyuandit(),
                                    scheduler=d.DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False, text_encoder_2=None, tokenizer_2=None)
        mask, mask_t5 = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), prompt_attention_mask=mask,
                      negative_prompt_embeds=_embeds(1, 3, 16, 2), negative_prompt_attention_mask=mask,
                      prompt_embeds_2=_embeds(1, 5, 16, 3), prompt_attention_mask_2=mask_t5,
                      negative_prompt_embeds_2=_embeds(1, 5, 16, 4), negative_prompt_attention_mask_2=mask_t5,
                      height=64, width=64, use_resolution_binning=False)
    elif name == "hidream":
        # CFG batched; T5 and Llama states (the Llama ones stacked layers first), pooled CLIP embeds
        pipe = d.HiDreamImagePipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None, transformer=build_hidream(),
                                      **{f"{part}{i}": None for part in ("text_encoder", "tokenizer") for i in ("", "_2", "_3", "_4")})
        pipe.default_sample_size = 8  # it rescales every request to this many latent pixels squared (128 by default)
        gen = torch.Generator().manual_seed(1)
        kwargs = dict(prompt_embeds_t5=_embeds(1, 3, 16, 1), prompt_embeds_llama3=torch.randn(3, 1, 4, 16, generator=gen),
                      pooled_prompt_embeds=_embeds(1, 1, 16, 2)[:, 0], negative_prompt_embeds_t5=_embeds(1, 3, 16, 3),
                      negative_prompt_embeds_llama3=torch.randn(3, 1, 4, 16, generator=gen),
                      negative_pooled_prompt_embeds=_embeds(1, 1, 16, 4)[:, 0], height=64, width=64, guidance_scale=5.0)
    elif name == "ltx2":
        # CFG batched, one call per step (STG and modality isolation off: their calls are other graphs); tiny
        # video/audio VAEs (never run: latents out), whose ratios and audio channels x mel bins the pipeline reads
        # (32 x 8 as LTX-2's, 2 channels x 8 mel bins = the transformer's 16 audio channels); text connectors
        # without learnable registers (3-token prompts)
        from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

        transformer = build_ltx2()
        transformer = randomize(type(transformer).from_config(transformer.config, audio_in_channels=16,
                                                              audio_out_channels=16), seed=0)
        vae = d.AutoencoderKLLTX2Video(latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                       decoder_block_out_channels=(8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                       decoder_layers_per_block=(1, 1, 1, 1), spatial_compression_ratio=32,
                                       temporal_compression_ratio=8)
        audio_vae = d.AutoencoderKLLTX2Audio(base_channels=16, ch_mult=(1,), num_res_blocks=1, latent_channels=2,
                                             mel_bins=32)
        connectors = LTX2TextConnectors(
            caption_channels=16, text_proj_in_factor=2, video_connector_num_attention_heads=2,
            video_connector_attention_head_dim=8, video_connector_num_layers=1,
            video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
            audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=None)
        pipe = d.LTX2Pipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae,
                              text_encoder=None, tokenizer=None, connectors=connectors, transformer=transformer,
                              vocoder=None)
        kwargs = dict(prompt_embeds=_embeds(1, 3, 32, 1), prompt_attention_mask=torch.ones(1, 3),
                      negative_prompt_embeds=_embeds(1, 3, 32, 2), negative_prompt_attention_mask=torch.ones(1, 3),
                      height=64, width=64, num_frames=9, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0,
                      audio_modality_scale=1.0)
    elif name == "helios":
        # one chunk of 2 latent frames per 5 pixel frames; CFG: cond and uncond are two calls per step, each in
        # its own cache_context; a tiny Wan VAE (it decodes every chunk); HeliosScheduler in one stage (the
        # pyramid pipeline's are three)
        vae = d.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        pipe = d.HeliosPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=d.HeliosScheduler(stages=1),
                                transformer=build_helios())
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), negative_prompt_embeds=_embeds(1, 3, 16, 2), height=32,
                      width=32, num_frames=5, num_latent_frames_per_chunk=2, guidance_scale=5.0)
    elif name == "bria_fibo":
        # CFG batched; the pipeline takes no precomputed prompt embeddings: a tiny random SmolLM3 (the
        # pipeline's "" is its begin-of-text id 128000) and a word-level tokenizer; the negative prompt is
        # shorter, so the call carries a key-padding mask
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast, SmolLM3Config, SmolLM3ForCausalLM

        words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "a", "cat", "on", "mat"])},
                                           unk_token="<pad>"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        torch.manual_seed(0)
        text_encoder = SmolLM3ForCausalLM(SmolLM3Config(
            vocab_size=128008, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64)).eval()
        transformer = build_bria_fibo()  # its text states: SmolLM3's last two layers, concatenated
        transformer = randomize(type(transformer).from_config(transformer.config, joint_attention_dim=32), seed=0)
        pipe = d.BriaFiboPipeline(transformer=transformer, scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None,
                                  text_encoder=text_encoder,
                                  tokenizer=PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>"))
        kwargs = dict(prompt="a cat on a mat", height=64, width=64, guidance_scale=5.0)
    elif name == "motif_video":
        # CFG: cond and uncond are two calls per step (the pipeline's guider), each in its own cache_context;
        # a tiny Wan VAE (read for its latent channels only: latents out)
        from diffusers.guiders import ClassifierFreeGuidance

        vae = d.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        pipe = d.MotifVideoPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                    tokenizer=None, transformer=build_motif_video(),
                                    guider=ClassifierFreeGuidance(guidance_scale=5.0))
        mask = torch.ones(1, 4, dtype=torch.bool)
        mask[:, -1] = False  # a padded token
        kwargs = dict(prompt_embeds=_embeds(1, 4, 16, 1), prompt_attention_mask=mask,
                      negative_prompt_embeds=_embeds(1, 4, 16, 2), negative_prompt_attention_mask=torch.ones_like(mask),
                      height=64, width=64, num_frames=5)
    elif name == "latte":
        # CFG batched, one call per step; 2 latent frames (video_length: the tiny model's temporal table);
        # the default DDIM scheduler does not learn the variance: the pipeline keeps the noise half
        pipe = d.LattePipeline(tokenizer=None, text_encoder=None, vae=None, transformer=build_latte(),
                               scheduler=d.DDIMScheduler())
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), negative_prompt=None, negative_prompt_embeds=_embeds(1, 3, 16, 2),
                      height=64, width=64, video_length=2, guidance_scale=7.5)
    else:
        raise KeyError(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


#: RCS threshold giving both full and skipped steps in a 10-step run of each tiny pipeline
PIPELINE_THRESHOLD = 0.3
_PIPELINE_THRESHOLDS = {"zimage": 2.0}  # its tiny model's input moves more per step


def pipeline_threshold(name: str) -> float:
    return _PIPELINE_THRESHOLDS.get(name, PIPELINE_THRESHOLD)


def called_timestep(args: tuple, kwargs: dict) -> float:
    """The timestep of one transformer call (a forward pre-hook's arguments): ZImagePipeline
    passes ``(x, t, cap_feats)`` positionally, HiDreamImagePipeline ``timesteps=``, the others ``timestep=``."""
    t = kwargs["timestep"] if "timestep" in kwargs else kwargs["timesteps"] if "timesteps" in kwargs else args[1]
    return float(t.reshape(-1)[0])


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


def chroma_conditions(batch, gen, height=4, width=4, text=3):
    """FLUX's, less the pooled projections, and ChromaPipeline's mask over text then image tokens."""
    cond = flux_conditions(batch, gen, height=height, width=width, text=text)
    del cond["pooled_projections"]
    mask = torch.ones(batch, text + height * width)
    mask[:, text - 1] = 0  # a padded text token
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


def build_flux2():
    from diffusers import Flux2Transformer2DModel

    return randomize(Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=True),
        seed=0)


def flux2_conditions(batch, gen, height=4, width=4, text=3):
    # Flux2Pipeline passes batched int64 4-axis position ids (T, H, W, L) and the guidance scale
    img_ids = torch.zeros(height * width, 4, dtype=torch.long)
    img_ids[:, 1] = torch.arange(height * width) // width
    img_ids[:, 2] = torch.arange(height * width) % width
    txt_ids = torch.zeros(text, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(text)
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), img_ids=img_ids.expand(batch, -1, -1).clone(),
                txt_ids=txt_ids.expand(batch, -1, -1).clone(), guidance=torch.full((batch,), 4.0))


def build_sana():
    from diffusers import SanaTransformer2DModel

    return randomize(SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=2), seed=0)


def sana_conditions(batch, gen, text=3):
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), encoder_attention_mask=torch.ones(batch, text))


def build_zimage():
    from diffusers import ZImageTransformer2DModel

    return randomize(ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]), seed=0)


def zimage_conditions(batch, gen):
    # ZImagePipeline passes one caption per sample, unpadded: lengths differ (the model pads them)
    return dict(cap_feats=[torch.randn(5 - i % 2 * 2, 16, generator=gen) for i in range(batch)])


def _zimage_inputs(latents: torch.Tensor, t: torch.Tensor) -> dict:
    # ZImagePipeline: one (C, frames, H, W) tensor per sample, timestep 1 - sigma
    return dict(x=list(latents.unbind(0)), t=t)


def _stacked(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(outputs))


def build_wan_vace():
    from diffusers import WanVACETransformer3DModel

    return randomize(WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, vace_layers=[0, 1],
        vace_in_channels=6), seed=0)


def wan_vace_conditions(batch, gen):
    # WanVACEPipeline: the control video's latents (constant over a generation), one scale per VACE layer
    return dict(encoder_hidden_states=_text(batch, gen, 3, 16),
                control_hidden_states=torch.randn(batch, 6, 2, 4, 4, generator=gen),
                control_hidden_states_scale=torch.tensor([1.0, 0.5]))


def build_auraflow():
    from diffusers import AuraFlowTransformer2DModel

    return randomize(AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
        pos_embed_max_size=16), seed=0)


def auraflow_conditions(batch, gen):
    return dict(encoder_hidden_states=_text(batch, gen, 3, 16))


def build_hunyuan_image():
    from diffusers import HunyuanImageTransformer2DModel

    return randomize(HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4)), seed=0)


def hunyuan_image_conditions(batch, gen):
    return dict(encoder_hidden_states=_text(batch, gen, 3, 16), encoder_attention_mask=torch.ones(batch, 3))


FAMILIES.update({f.name: f for f in (
    Family("hunyuan_image", build_hunyuan_image, (4, 4, 4), hunyuan_image_conditions, threshold=0.3),
    # AuraFlowPipeline passes t / 1000
    Family("auraflow", build_auraflow, (4, 8, 8), auraflow_conditions, threshold=0.3, timestep_scale=1.0),
    Family("wan_vace", build_wan_vace, (4, 2, 4, 4), wan_vace_conditions, threshold=0.2),
    Family("flux2", build_flux2, (16, 4), flux2_conditions, threshold=0.3, timestep_scale=1.0),
    Family("sana", build_sana, (4, 8, 8), sana_conditions, threshold=0.3),
    Family("zimage", build_zimage, (4, 1, 8, 8), zimage_conditions, threshold=2.0, rising_timestep=True,
           call_inputs=_zimage_inputs, batched_output=_stacked),
)})


# --- FLUX's descendants: the same double- and single-stream blocks, and FLUX.3's parallel blocks ---

def _flux_position_ids(height=4, width=4, text=3, axes=3, dtype=torch.float32):
    """(image ids, text ids) without a batch dim: (row, column) per image token in axes 1 and 2."""
    img_ids = torch.zeros(height * width, axes, dtype=dtype)
    img_ids[:, 1] = torch.arange(height * width) // width
    img_ids[:, 2] = torch.arange(height * width) % width
    return img_ids, torch.zeros(text, axes, dtype=dtype)


def build_longcat_image():
    from diffusers import LongCatImageTransformer2DModel

    return randomize(LongCatImageTransformer2DModel(
        in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[2, 2, 4]), seed=0)


def build_ovis_image():
    from diffusers import OvisImageTransformer2DModel

    return randomize(OvisImageTransformer2DModel(
        in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4)), seed=0)


def build_bria():
    from diffusers import BriaTransformer2DModel

    return randomize(BriaTransformer2DModel(
        in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=[2, 2, 4]), seed=0)


def flux_descendant_conditions(batch, gen, height=4, width=4, text=3):
    img_ids, txt_ids = _flux_position_ids(height, width, text)
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), img_ids=img_ids, txt_ids=txt_ids)


def build_flux3():
    from diffusers import Flux3Transformer2DModel

    return randomize(Flux3Transformer2DModel(
        in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, timestep_channels=16, axes_dims_rope=(2, 2, 2, 2)), seed=0)


def flux3_conditions(batch, gen, height=4, width=4, text=3):
    # 4-axis int64 position ids (T, H, W, L), no batch dim
    img_ids, txt_ids = _flux_position_ids(height, width, text, axes=4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(text)
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), img_ids=img_ids, txt_ids=txt_ids)


def build_krea2(in_channels: int = 4):
    from diffusers import Krea2Transformer2DModel

    return randomize(Krea2Transformer2DModel(
        in_channels=in_channels, num_layers=1, attention_head_dim=8, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=2, text_num_attention_heads=2,
        text_num_key_value_heads=2, text_intermediate_size=32, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(2, 2, 4)), seed=0)


def krea2_conditions(batch, gen, height=4, width=4, text=3):
    # the text encoder's tapped layers per token (B, L, layers, D); (t, h, w) ids for text (zeros) then image
    img_ids, _ = _flux_position_ids(height, width, text)
    return dict(encoder_hidden_states=torch.randn(batch, text, 2, 16, generator=gen),
                position_ids=torch.cat([torch.zeros(text, 3), img_ids]))


def build_cogview4(in_channels: int = 4):
    from diffusers import CogView4Transformer2DModel

    return randomize(CogView4Transformer2DModel(
        patch_size=2, in_channels=in_channels, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, text_embed_dim=16, time_embed_dim=16, condition_dim=8, sample_size=8,
        rope_axes_dim=(8, 8)), seed=0)


def cogview4_conditions(batch, gen, text=5, size=64.0):
    # SDXL-like micro-conditions: original and target image size, crop corner (B, 2) each
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), original_size=torch.full((batch, 2), size),
                target_size=torch.full((batch, 2), size), crop_coords=torch.zeros(batch, 2))


def build_cogview3plus():
    from diffusers import CogView3PlusTransformer2DModel

    # its sin-cos position table is pos_embed_max_size squared patches: 8 x 8 covers 16 x 16 latents
    return randomize(CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=16, time_embed_dim=16, condition_dim=8, pos_embed_max_size=8, sample_size=8), seed=0)


#: CogView3PlusPipeline passes CogView4's SDXL-like micro-conditions: original and target size in pixels
#: (the VAE's 8x the latent's), crop corner (B, 2) each, in the text states' dtype
cogview3plus_conditions = cogview4_conditions


def build_cosmos():
    # the video-to-world variant (a condition-mask channel); head dim 12: Cosmos' rotary code divides
    # by (head_dim // 6 * 2 - 2). concat_padding_mask off: it needs torchvision, not a dependency here
    from diffusers import CosmosTransformer3DModel

    return randomize(CosmosTransformer3DModel(
        in_channels=4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1, mlp_ratio=2.0,
        text_embed_dim=16, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=False, extra_pos_embed_type=None), seed=0)


def cosmos_frames(latents: torch.Tensor, t: torch.Tensor) -> dict:
    """Cosmos2VideoToWorldPipeline's call: frame 0 is the conditioning frame, its latent fixed (per
    latent size) and its timestep sigma_c / (sigma_c + 1) (sigma_c = 1e-4); the timestep is one per
    frame, (B, 1, T, 1, 1)."""
    batch, channels, frames, height, width = latents.shape
    condition = torch.randn(1, channels, 1, height, width, generator=torch.Generator().manual_seed(7))
    first = torch.zeros(1, 1, frames, 1, 1)
    first[:, :, 0] = 1
    hidden = first * condition.expand(batch, -1, frames, -1, -1) + (1 - first) * latents
    return dict(hidden_states=hidden, timestep=first * (1e-4 / 1.0001) + (1 - first) * t.view(batch, 1, 1, 1, 1))


def cosmos_conditions(batch, gen, frames=2, height=8, width=8):
    condition_mask = torch.zeros(batch, 1, frames, height, width)
    condition_mask[:, :, 0] = 1
    return dict(encoder_hidden_states=_text(batch, gen, 5, 16), condition_mask=condition_mask, fps=16)


def build_hunyuandit():
    # an even number of layers (the second half takes the first half's outputs as long skips)
    from diffusers import HunyuanDiT2DModel

    return randomize(HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, activation_fn="gelu-approximate",
        sample_size=8, hidden_size=16, num_layers=4, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=16,
        cross_attention_dim_t5=16, pooled_projection_dim=16, text_len=3, text_len_t5=5,
        use_style_cond_and_image_meta_size=True), seed=0)


def hunyuandit_conditions(batch, gen, grid=(4, 4)):
    # CLIP and T5 states with their masks (text_len / text_len_t5 tokens), size / crop meta, style, and
    # the 2D rotary table HunyuanDiTPipeline computes (4 x 4 patches of the 8 x 8 latents, base size 32;
    # one row per patch: ``grid`` for latents of another size)
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    mask_t5 = torch.ones(batch, 5, dtype=torch.long)
    mask_t5[:, -1] = 0  # a padded T5 token
    return dict(encoder_hidden_states=_text(batch, gen, 3, 16), text_embedding_mask=torch.ones(batch, 3, dtype=torch.long),
                encoder_hidden_states_t5=_text(batch, gen, 5, 16), text_embedding_mask_t5=mask_t5,
                image_meta_size=torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]] * batch),
                style=torch.zeros(batch, dtype=torch.long),
                image_rotary_emb=get_2d_rotary_pos_embed(8, ((0, 0), (32, 32)), grid, output_type="pt"))


def build_sana_video():
    from diffusers import SanaVideoTransformer3DModel

    return randomize(SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32), seed=0)


def sana_video_conditions(batch, gen, text=3):
    mask = torch.ones(batch, text)
    mask[:, -1] = 0  # a padded token
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), encoder_attention_mask=mask)


def build_chronoedit():
    # Wan's image-to-video layout: the latents concatenated with a mask and the input image's latents
    from diffusers import ChronoEditTransformer3DModel

    return randomize(ChronoEditTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=12, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=1, image_dim=16, rope_max_seq_len=32, rope_temporal_skip_len=8), seed=0)


_CHRONOEDIT_CONDITION = torch.randn(1, 8, 2, 4, 4, generator=torch.Generator().manual_seed(123))


def chronoedit_inputs(latents: torch.Tensor, t: torch.Tensor) -> dict:
    """ChronoEditPipeline's call: ``cat([latents, condition], dim=1)`` (4 mask + 4 image-latent channels)."""
    condition = _CHRONOEDIT_CONDITION
    if condition.shape[-2:] != latents.shape[-2:]:  # another resolution: a condition of that size
        condition = torch.randn(1, 8, 2, *latents.shape[-2:], generator=torch.Generator().manual_seed(123))
    condition = condition.expand(latents.shape[0], -1, -1, -1, -1)
    return dict(hidden_states=torch.cat([latents, condition], dim=1), timestep=t)


def chronoedit_conditions(batch, gen):
    return dict(encoder_hidden_states=_text(batch, gen, 3, 16), encoder_hidden_states_image=_text(batch, gen, 2, 16))


def build_helios():
    from diffusers import HeliosTransformer3DModel

    return randomize(HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=1, rope_dim=(4, 2, 2), guidance_cross_attn=True, zero_history_timestep=True,
        has_multi_term_memory_patch=True, is_amplify_history=False), seed=0)


def helios_conditions(batch, gen, history_sizes=(4, 2, 1), chunk=2):
    """HeliosPipeline's call for one chunk of 2 latent frames: the long / mid / short history latents
    (constant within a chunk) and each token group's frame indices (first frame kept)."""
    index = torch.arange(0, 1 + sum(history_sizes) + chunk)
    first, long_, mid, short, current = index.split([1, *history_sizes, chunk])
    history = torch.randn(batch, 4, sum(history_sizes), 4, 4, generator=gen)
    h_long, h_mid, h_short = history.split(list(history_sizes), dim=2)
    return dict(encoder_hidden_states=_text(batch, gen, 3, 16), indices_hidden_states=current[None],
                indices_latents_history_short=torch.cat([first, short])[None], indices_latents_history_mid=mid[None],
                indices_latents_history_long=long_[None],
                latents_history_short=torch.cat([torch.zeros(batch, 4, 1, 4, 4), h_short], dim=2),
                latents_history_mid=h_mid, latents_history_long=h_long)


def build_kandinsky5():
    # head dim = sum(axes_dims) = 8: 2 heads over model_dim 16
    from diffusers import Kandinsky5Transformer3DModel

    return randomize(Kandinsky5Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=16, time_dim=16, patch_size=(1, 2, 2),
        model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=1, axes_dims=(2, 2, 4)), seed=0)


def kandinsky5_conditions(batch, gen, frames=2, height=8, width=8, text=3):
    """Kandinsky5T2VPipeline's call: Qwen text states, the CLIP pooled embedding, rotary positions
    (index ranges over the patch grid and the prompt) and a rotary scale factor (a constant)."""
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), pooled_projections=torch.randn(batch, 16, generator=gen),
                visual_rope_pos=[torch.arange(frames), torch.arange(height // 2), torch.arange(width // 2)],
                text_rope_pos=torch.arange(text), scale_factor=(1, 2.0, 2.0), sparse_params=None)


def build_bria_fibo():
    from diffusers import BriaFiboTransformer2DModel

    return randomize(BriaFiboTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=[2, 2, 4], text_encoder_dim=16), seed=0)


def bria_fibo_conditions(batch, gen, text=3):
    # FLUX's ids, and one text encoder layer per block (double, then single), projected into each block's text
    img_ids, txt_ids = _flux_position_ids(4, 4, text)
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), img_ids=img_ids, txt_ids=txt_ids,
                text_encoder_layers=[_text(batch, gen, text, 16) for _ in range(2)])


def build_motif_video():
    from diffusers import MotifVideoTransformer3DModel

    return randomize(MotifVideoTransformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=2,
        num_decoder_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16, image_embed_dim=None,
        rope_axes_dim=(2, 2, 4), enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True), seed=0)


def motif_video_inputs(latents: torch.Tensor, t: torch.Tensor) -> dict:
    """MotifVideoPipeline (text to video): the latents, a zero condition latent and a one-channel mask."""
    condition = torch.zeros(latents.shape[0], 5, *latents.shape[2:])
    return dict(hidden_states=torch.cat([latents, condition], dim=1), timestep=t)


def motif_video_conditions(batch, gen, text=4):
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[:, -1] = False  # a padded token
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), encoder_attention_mask=mask)


def build_ltx2(layers: int = 2):
    from diffusers import LTX2VideoTransformer3DModel

    return randomize(LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=layers, caption_channels=16), seed=0)


_LTX2_VIDEO_TOKENS = 32  # 2 frames x 4 x 4


def ltx2_inputs(latents: torch.Tensor, t: torch.Tensor) -> dict:
    """LTX2Pipeline's call: packed video latents (B, 32, 4) and audio latents (B, 8, 4) (one (B, 40, 4)
    tensor here, so that the Euler loop moves both); its timestep, sigma x 1000, passed as ``sigma`` too."""
    return dict(hidden_states=latents[:, :_LTX2_VIDEO_TOKENS], audio_hidden_states=latents[:, _LTX2_VIDEO_TOKENS:],
                timestep=t, sigma=t)


def ltx2_conditions(batch, gen):
    rope = build_ltx2(layers=1)  # the video and audio coordinates its pipeline prepares with the model's rope
    mask = torch.ones(batch, 3)
    mask[:, -1] = 0  # a padded token
    return dict(encoder_hidden_states=_text(batch, gen, 3, 16), audio_encoder_hidden_states=_text(batch, gen, 3, 16),
                encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=2, height=4, width=4,
                fps=24.0, audio_num_frames=8,
                video_coords=rope.rope.prepare_video_coords(batch, 2, 4, 4, torch.device("cpu"), fps=24.0),
                audio_coords=rope.audio_rope.prepare_audio_coords(batch, 8, torch.device("cpu")),
                isolate_modalities=False, use_cross_timestep=True)


def ltx2_at(frames: int, height: int, width: int, audio: int, text: int) -> Family:
    """The tiny LTX-2 family at another latent grid, audio length and prompt length, with the rotary
    coordinates its pipeline makes for them (and the grid and frame rate, which the model then ignores)."""
    video = frames * height * width

    def inputs(latents: torch.Tensor, t: torch.Tensor) -> dict:
        return dict(hidden_states=latents[:, :video], audio_hidden_states=latents[:, video:], timestep=t, sigma=t)

    def conditions(batch, gen):
        rope = build_ltx2(layers=1)
        mask = torch.ones(batch, text)
        mask[:, -1] = 0  # a padded token
        return dict(encoder_hidden_states=_text(batch, gen, text, 16), audio_encoder_hidden_states=_text(batch, gen, text, 16),
                    encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=frames, height=height,
                    width=width, fps=24.0, audio_num_frames=audio,
                    video_coords=rope.rope.prepare_video_coords(batch, frames, height, width, torch.device("cpu"), fps=24.0),
                    audio_coords=rope.audio_rope.prepare_audio_coords(batch, audio, torch.device("cpu")),
                    isolate_modalities=False, use_cross_timestep=True)

    return dataclasses.replace(FAMILIES["ltx2"], latent_shape=(video + audio, 4), call_inputs=inputs,
                               conditions=conditions)


def _video_and_audio(output: tuple) -> torch.Tensor:
    return torch.cat([output[0], output[1]], dim=1)


def _noise_half(output: torch.Tensor) -> torch.Tensor:
    """learn_sigma: the pipeline keeps the first half of the channels (the noise), not the variance."""
    return output.chunk(2, dim=1)[0]


FAMILIES.update({f.name: f for f in (
    # their pipelines pass t / 1000, BriaPipeline t itself, Krea2Pipeline t in [0, 1]
    Family("longcat_image", build_longcat_image, (16, 4), flux_descendant_conditions, threshold=0.3,
           timestep_scale=1.0),
    Family("ovis_image", build_ovis_image, (16, 4), flux_descendant_conditions, threshold=0.3, timestep_scale=1.0),
    Family("bria", build_bria, (16, 4), flux_descendant_conditions, threshold=0.3),
    Family("flux3", build_flux3, (16, 4), flux3_conditions, threshold=0.1, timestep_scale=1.0),
    Family("krea2", build_krea2, (16, 4), krea2_conditions, threshold=0.1, timestep_scale=1.0),
    Family("cogview4", build_cogview4, (4, 8, 8), cogview4_conditions, threshold=0.3),
    Family("cogview3plus", build_cogview3plus, (4, 8, 8), cogview3plus_conditions, threshold=0.3),
    # Cosmos 2 passes sigma / (sigma + 1), in [0, 1)
    Family("cosmos", build_cosmos, (4, 2, 8, 8), cosmos_conditions, threshold=0.03, timestep_scale=1.0,
           call_inputs=cosmos_frames),
    Family("hunyuandit", build_hunyuandit, (4, 8, 8), hunyuandit_conditions, threshold=0.3, batched_output=_noise_half),
    Family("sana_video", build_sana_video, (4, 2, 8, 8), sana_video_conditions, threshold=0.3),
    Family("chronoedit", build_chronoedit, (4, 2, 4, 4), chronoedit_conditions, threshold=0.1,
           call_inputs=chronoedit_inputs),
    Family("helios", build_helios, (4, 2, 4, 4), helios_conditions, threshold=0.1),
    # channels-last latents (T, H, W, C); the model returns its sample bare with return_dict=False
    Family("kandinsky5", build_kandinsky5, (2, 8, 8, 4), kandinsky5_conditions, threshold=0.1),
    Family("bria_fibo", build_bria_fibo, (16, 4), bria_fibo_conditions, threshold=0.3),
    Family("motif_video", build_motif_video, (4, 2, 8, 8), motif_video_conditions, threshold=0.3,
           call_inputs=motif_video_inputs),
    Family("ltx2", build_ltx2, (40, 4), ltx2_conditions, threshold=0.3, call_inputs=ltx2_inputs,
           sample_of=_video_and_audio),
)})


def build_hidream():
    from diffusers import HiDreamImageTransformer2DModel

    return randomize(HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(2, 2, 4), max_resolution=(8, 8), llama_layers=[0, 1]), seed=0)


def hidream_inputs(latents: torch.Tensor, t: torch.Tensor) -> dict:
    return dict(hidden_states=latents, timesteps=t)  # HiDreamImagePipeline's keyword


def hidream_conditions(batch, gen):
    """T5 states (B, T, C), the Llama hidden states stacked layers first (layers, B, T, C), pooled embeds."""
    return dict(encoder_hidden_states_t5=_text(batch, gen, 3, 16),
                encoder_hidden_states_llama3=torch.randn(3, batch, 4, 16, generator=gen),
                pooled_embeds=torch.randn(batch, 16, generator=gen))


def _negated(output: torch.Tensor) -> torch.Tensor:
    return -output  # HiDreamImagePipeline: noise_pred = -noise_pred


FAMILIES["hidream"] = Family("hidream", build_hidream, (4, 8, 8), hidream_conditions, threshold=0.3,
                             call_inputs=hidream_inputs, batched_output=_negated)


def build_hunyuan_video_framepack():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    # HunyuanVideo's blocks; the image projection (SigLIP features) and the history patch embedder on
    return randomize(HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=16, rope_axes_dim=(2, 2, 4), has_image_proj=True,
        image_proj_dim=12, has_clean_x_embedder=True), seed=0)


#: FramePack's (inverted anti-drifting) history: 1 clean frame, 2 frames at 2x, 16 at 4x downsampling
FRAMEPACK_HISTORY_SIZES = (1, 2, 16)


def framepack_section_indices(window: int, padding_sections: int) -> dict:
    """The frame indices HunyuanVideoFramepackPipeline (inverted anti-drifting) passes for one section:
    the first image's index 0, ``padding_sections`` windows of padding, the section's window, then
    the history (1x, 2x, 4x); the clean latents are the first image and the 1x history."""
    sizes = [1, padding_sections * window, window, *FRAMEPACK_HISTORY_SIZES]
    prefix, _, latents, history_1x, history_2x, history_4x = torch.arange(sum(sizes)).split(sizes)
    return dict(indices_latents=latents, indices_latents_clean=torch.cat([prefix, history_1x]),
                indices_latents_history_2x=history_2x, indices_latents_history_4x=history_4x)


def hunyuan_video_framepack_conditions(batch, gen, window=2, height=4, width=4, padding_sections=1):
    """One section of a FramePack generation (the middle section of three, latent window 2): the text
    (last token padded), the SigLIP image embeddings, guidance x 1000, and the clean latents (first
    image + 1x history) and the 2x and 4x history latents with their frame indices, all constant over
    the section's steps."""
    mask = torch.ones(batch, 3)
    mask[:, -1] = 0  # a padded prompt token: FramePack's forward builds its attention mask from it
    one, two, four = FRAMEPACK_HISTORY_SIZES

    def frames(n):
        return torch.randn(batch, 4, n, height, width, generator=gen)

    return dict(encoder_hidden_states=_text(batch, gen, 3, 16), encoder_attention_mask=mask,
                pooled_projections=torch.randn(batch, 16, generator=gen), image_embeds=_text(batch, gen, 5, 12),
                guidance=torch.full((batch,), 6000.0), latents_clean=frames(1 + one), latents_history_2x=frames(two),
                latents_history_4x=frames(four), **framepack_section_indices(window, padding_sections))


FAMILIES["hunyuan_video_framepack"] = Family("hunyuan_video_framepack", build_hunyuan_video_framepack, (4, 2, 4, 4),
                                             hunyuan_video_framepack_conditions, threshold=0.3)


def build_latte():
    # Latte-1's layout (adaLN-single blocks, learned sigma: twice the latent channels out); a spatial and a
    # temporal BasicTransformerBlock per layer, called in turn. video_length is the frame count: the model
    # adds its temporal position table to the frames as they are (it serves that many frames, or one)
    from diffusers import LatteTransformer3DModel

    return randomize(LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, attention_bias=True, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=16, video_length=2), seed=0)


def latte_conditions(batch, gen, text=3):
    # LattePipeline passes the T5 states (no mask) and enable_temporal_attentions (True by default)
    return dict(encoder_hidden_states=_text(batch, gen, text, 16), enable_temporal_attentions=True)


FAMILIES["latte"] = Family("latte", build_latte, (4, 2, 8, 8), latte_conditions, threshold=0.3,
                           batched_output=_noise_half)
