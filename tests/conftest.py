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
