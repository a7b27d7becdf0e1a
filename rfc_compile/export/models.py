"""Models the export CLI knows: built-in random-weight DiTs, diffusers model directories, and
example inputs per family (the serving shapes baked into the exported graph)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

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


def load_model(name_or_path: str) -> torch.nn.Module:
    """A built-in name (``tiny-dit``, ``dit-s``) or a diffusers model directory (config.json names the class)."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]()
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
    return cls.from_pretrained(str(path)).eval()


def example_inputs(model: torch.nn.Module, batch: int = 2, height: int | None = None, width: int | None = None,
                   text_len: int = 8, seed: int = 0) -> dict[str, Any]:
    """Forward kwargs with the serving shapes for a known family (latent height/width)."""
    cfg = dict(model.config)
    gen = torch.Generator().manual_seed(seed)
    name = type(model).__name__
    sample = cfg.get("sample_size") or 32
    h, w = height or sample, width or sample
    t = torch.full((batch,), 999, dtype=torch.long)
    if name == "DiTTransformer2DModel":
        classes = int(cfg.get("num_embeds_ada_norm") or 1000)
        return dict(hidden_states=torch.randn(batch, cfg["in_channels"], h, w, generator=gen), timestep=t,
                    class_labels=torch.arange(batch) % classes)
    if name == "PixArtTransformer2DModel":
        added = None
        if cfg.get("use_additional_conditions") or (cfg.get("use_additional_conditions") is None and sample == 128):
            added = {"resolution": torch.tensor([[h * 8.0, w * 8.0]] * batch),
                     "aspect_ratio": torch.tensor([[h / w]] * batch)}
        else:
            added = {"resolution": None, "aspect_ratio": None}
        return dict(hidden_states=torch.randn(batch, cfg["in_channels"], h, w, generator=gen),
                    encoder_hidden_states=torch.randn(batch, text_len, cfg["caption_channels"], generator=gen),
                    timestep=t, added_cond_kwargs=added, encoder_attention_mask=torch.ones(batch, text_len))
    if name == "FluxTransformer2DModel":
        hp, wp = h // 2, w // 2
        img_ids = torch.zeros(hp, wp, 3)
        img_ids[..., 1] = torch.arange(hp)[:, None]
        img_ids[..., 2] = torch.arange(wp)[None, :]
        kwargs = dict(hidden_states=torch.randn(batch, hp * wp, cfg["in_channels"], generator=gen),
                      encoder_hidden_states=torch.randn(batch, text_len, cfg["joint_attention_dim"], generator=gen),
                      pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=gen),
                      timestep=torch.ones(batch), img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text_len, 3))
        if cfg.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((batch,), 3.5)
        return kwargs
    if name == "SD3Transformer2DModel":
        return dict(hidden_states=torch.randn(batch, cfg["in_channels"], h, w, generator=gen),
                    encoder_hidden_states=torch.randn(batch, text_len, cfg["joint_attention_dim"], generator=gen),
                    pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=gen),
                    timestep=t.float())
    raise ValueError(f"no example inputs known for {name}; call rfc_compile.export.to_onnx with example_inputs")
