"""A model zoo of small *trained* diffusion transformers, for tests and benchmarks on CPU.

All models are trained on scikit-learn's bundled 8x8 digits upsampled to 16x16 (see
:mod:`rfc_compile.zoo.data`); checkpoints (safetensors + json) ship in ``zoo/checkpoints/``.

    >>> import rfc_compile.zoo as zoo
    >>> zoo.available()
    ['dit-digits', 'flux-digits']
    >>> bundle = zoo.load("dit-digits")
    >>> images = bundle.sample([0, 1, 2, 3], num_inference_steps=50, seed=0)  # (4, 1, 16, 16) in [0, 1]
    >>> zoo.load_classifier().classify(images)                                 # tensor([0, 1, 2, 3])

Models:

* ``"dit-digits"``: ``diffusers.DiTTransformer2DModel``, class-conditional, pixel space
  (in/out channels 1, sample 16, patch 2 -> 64 tokens, 6 layers, 4 heads x 32), v-prediction on the
  cosine schedule; sampled with ``DDIMScheduler`` (trailing spacing) and classifier-free guidance.
  Forward: ``transformer(hidden_states (B,1,16,16), timestep=(B,) long, class_labels=(B,) long,
  return_dict=False)``; label 10 is the null (unconditional) label.
* ``"flux-digits"``: ``diffusers.FluxTransformer2DModel`` (2 double-stream + 2 single-stream
  blocks, 4 heads x 32, rope axes (8, 12, 12)) on 2x2-packed pixels (64 tokens x 4 channels), trained
  with rectified flow; sampled with ``FlowMatchEulerDiscreteScheduler`` and CFG. The class is given
  as 4 learned "text" tokens (``encoder_hidden_states`` (B, 4, 64)) and a learned pooled vector
  (``pooled_projections`` (B, 64)), from ``bundle.conditioner`` (index 10 = null). Forward:
  ``transformer(hidden_states=(B,64,4), encoder_hidden_states=, pooled_projections=,
  timestep=(B,) sigma in [0, 1], img_ids=(64, 3), txt_ids=(4, 3), return_dict=False)``.
* :func:`load_classifier`: a tiny CNN used to score samples (``classify``) and to give features for
  a Frechet distance (``features``, 128-d).

Measured with the shipped checkpoints (``python -m rfc_compile.zoo.evaluate <name> --cfg ...``;
64 samples, classes cycling 0..9, seeds 0..6 in batches of 10, 50 steps; scored by the classifier
below; the "eval" entry of each checkpoint json holds the same numbers):

    ============  =====================================  =====================  ===============
    model         sample accuracy at CFG 1 / 1.5 / 2 / 3  s / 50-step batch of 10  training
    ============  =====================================  =====================  ===============
    dit-digits    92 % / 100 % / 100 % / 100 %           2.9 (5-9 under load)   1500 steps, 654 s
    flux-digits   100 % / 100 % / 100 % / 100 %          2.2 (4-6 under load)   2000 steps, ~10 min
    ============  =====================================  =====================  ===============

Default CFG (``bundle.guidance_scale``) is 2.0 for both. Timings are one CPU thread of a shared
2-core AMD EPYC box, batch of 10 with CFG (so 20 per transformer call); training as well (FLUX's
json records 1518 s because that run shared the CPU with other jobs; alone it runs ~3.3 steps/s).
Classifier (:func:`load_classifier`): 100 % on the 360-image held-out split (``classifier.json``).

Retrain: ``python -m rfc_compile.zoo.train {classifier,dit-digits,flux-digits}`` (see
:mod:`rfc_compile.zoo.train`).

Sampling contract: :meth:`DiTBundle.sample` / :meth:`FluxBundle.sample` take ``class_labels`` (list
or tensor of ints), ``num_inference_steps``, ``seed`` (a CPU ``torch.Generator`` draws the initial
noise, so a seed fixes the result), ``transformer`` (a drop-in replacement module used instead of
``bundle.transformer``; if it has ``reset()``, that is called once at the start of every call),
``guidance_scale`` (CFG; when > 1 each step makes ONE transformer call on the batch
``cat([cond, uncond])``, like diffusers' ``DiTPipeline``; when <= 1, one call on the cond batch
only) and ``progress`` (tqdm). They return float32 (B, 1, 16, 16) in [0, 1] on the CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import models

__all__ = ["MODELS", "digit_classes", "available", "load", "load_classifier", "DiTBundle", "FluxBundle",
           "DigitsClassifier", "CHECKPOINT_DIR"]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
MODELS = ("dit-digits", "flux-digits")  # the models the zoo trains / loads


def digit_classes(text: str) -> list[int]:
    """``"0,3,7"`` -> [0, 3, 7]: the classes to sample (an ``argparse`` type for the CLIs)."""
    import argparse

    try:
        labels = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of digits 0..9") from None
    if not labels or any(not 0 <= c <= 9 for c in labels):
        raise argparse.ArgumentTypeError(f"{text!r}: the zoo models know the digits 0..9")
    return labels


def available(checkpoint_dir: str | Path | None = None) -> list[str]:
    """Names accepted by :func:`load` whose checkpoint is present."""
    d = Path(checkpoint_dir) if checkpoint_dir else CHECKPOINT_DIR
    return [n for n in MODELS if (d / f"{n}.safetensors").exists() and (d / f"{n}.json").exists()]


def _read(name: str, checkpoint_dir: str | Path | None):
    from safetensors.torch import load_file

    d = Path(checkpoint_dir) if checkpoint_dir else CHECKPOINT_DIR
    wpath, cpath = d / f"{name}.safetensors", d / f"{name}.json"
    if not wpath.exists() or not cpath.exists():
        raise FileNotFoundError(
            f"no checkpoint for {name!r} in {d} (train it: python -m rfc_compile.zoo.train {name})"
        )
    with open(cpath) as f:
        meta = json.load(f)
    return load_file(str(wpath)), meta


def _labels(class_labels) -> torch.Tensor:
    y = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if y.numel() == 0:
        raise ValueError("class_labels is empty")
    return y


def _first_tensor(out) -> torch.Tensor:
    """The prediction from whatever a (drop-in) transformer returns."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot read a prediction from {type(out).__name__}")


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        return p.device, (p.dtype if p.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False)


@dataclass
class _Bundle:
    name: str
    transformer: nn.Module
    scheduler: Any
    guidance_scale: float
    meta: dict = field(repr=False)
    null_class: int = 10

    def _prepare(self, transformer: nn.Module | None) -> nn.Module:
        net = self.transformer if transformer is None else transformer
        reset = getattr(net, "reset", None)
        if callable(reset):
            reset()
        return net

    def _fresh_scheduler(self):
        return type(self.scheduler).from_config(self.scheduler.config)

    def _cfg(self, pred: torch.Tensor, b: int, guidance_scale: float) -> torch.Tensor:
        if guidance_scale > 1.0:
            cond, uncond = pred[:b], pred[b:]
            return uncond + guidance_scale * (cond - uncond)
        return pred


@dataclass
class DiTBundle(_Bundle):
    """The trained class-conditional DiT with its DDIM scheduler."""

    @torch.no_grad()
    def sample(self, class_labels, num_inference_steps: int = 50, seed: int = 0,
               transformer: nn.Module | None = None, guidance_scale: float | None = None,
               progress: bool = False) -> torch.Tensor:
        gs = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        net = self._prepare(transformer)
        device, dtype = _device_dtype(net)
        y = _labels(class_labels)
        b = y.shape[0]
        size = self.meta["transformer_config"]["sample_size"]
        chans = self.meta["transformer_config"]["in_channels"]
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        x = torch.randn((b, chans, size, size), generator=gen, dtype=torch.float32)
        sched = self._fresh_scheduler()
        sched.set_timesteps(num_inference_steps)
        x = x * sched.init_noise_sigma
        labels = torch.cat([y, torch.full_like(y, self.null_class)]) if gs > 1.0 else y
        labels = labels.to(device)
        for t in _progress(sched.timesteps, progress, self.name):
            inp = torch.cat([x, x]) if gs > 1.0 else x
            inp = sched.scale_model_input(inp, t)
            tt = torch.full((inp.shape[0],), int(t), dtype=torch.long, device=device)
            out = net(inp.to(device=device, dtype=dtype), timestep=tt, class_labels=labels,
                      return_dict=False)
            pred = self._cfg(_first_tensor(out).to("cpu", torch.float32), b, gs)
            x = sched.step(pred, t, x).prev_sample
        return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


@dataclass
class FluxBundle(_Bundle):
    """The trained small FLUX transformer, its class conditioner and flow-matching scheduler."""

    conditioner: nn.Module | None = None

    def condition(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class labels (10 = null) -> (encoder_hidden_states (B, T, D), pooled_projections (B, P))."""
        with torch.no_grad():
            return self.conditioner(_labels(labels))

    @torch.no_grad()
    def sample(self, class_labels, num_inference_steps: int = 50, seed: int = 0,
               transformer: nn.Module | None = None, guidance_scale: float | None = None,
               progress: bool = False) -> torch.Tensor:
        gs = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        net = self._prepare(transformer)
        device, dtype = _device_dtype(net)
        y = _labels(class_labels)
        b = y.shape[0]
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        x = models.pack(torch.randn((b, 1, 16, 16), generator=gen, dtype=torch.float32))
        labels = torch.cat([y, torch.full_like(y, self.null_class)]) if gs > 1.0 else y
        txt, pooled = self.conditioner(labels)
        txt, pooled = txt.to(device, dtype), pooled.to(device, dtype)
        img_ids = models.image_ids(16, 16).to(device, dtype)
        txt_ids = models.text_ids(txt.shape[1]).to(device, dtype)
        sched = self._fresh_scheduler()
        sched.set_timesteps(num_inference_steps)
        for t in _progress(sched.timesteps, progress, self.name):
            inp = torch.cat([x, x]) if gs > 1.0 else x
            tt = torch.full((inp.shape[0],), float(t) / 1000.0, dtype=dtype, device=device)
            out = net(hidden_states=inp.to(device, dtype), encoder_hidden_states=txt,
                      pooled_projections=pooled, timestep=tt, img_ids=img_ids, txt_ids=txt_ids,
                      return_dict=False)
            pred = self._cfg(_first_tensor(out).to("cpu", torch.float32), b, gs)
            x = sched.step(pred, t, x).prev_sample
        return ((models.unpack(x, 16, 16) + 1.0) * 0.5).clamp(0.0, 1.0)


def _split_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load(name: str, checkpoint_dir: str | Path | None = None):
    """Load a zoo model: a :class:`DiTBundle` or :class:`FluxBundle` (transformer in eval mode, fp32)."""
    import diffusers

    if name not in MODELS:
        raise KeyError(f"unknown zoo model {name!r}; available: {list(MODELS)}")
    state, meta = _read(name, checkpoint_dir)
    sched = getattr(diffusers, meta["scheduler_class"])(**meta["scheduler_config"])
    common = dict(name=name, scheduler=sched, guidance_scale=float(meta["guidance_scale"]),
                  meta=meta, null_class=int(meta.get("null_class", 10)))
    if meta["kind"] == "dit":
        net = models.build_dit(meta["transformer_config"])
        net.load_state_dict(state, strict=True)
        return DiTBundle(transformer=net.eval().float().requires_grad_(False), **common)
    if meta["kind"] == "flux":
        cfg = meta["transformer_config"]
        net = models.build_flux(cfg)
        net.load_state_dict(_split_state(state, "transformer."), strict=True)
        cond = models.ClassConditioner(10, meta["text_tokens"], cfg["joint_attention_dim"],
                                       cfg["pooled_projection_dim"])
        cond.load_state_dict(_split_state(state, "cond."), strict=True)
        return FluxBundle(transformer=net.eval().float().requires_grad_(False),
                          conditioner=cond.eval().requires_grad_(False), **common)
    raise ValueError(f"bad checkpoint kind {meta['kind']!r}")


class DigitsClassifier:
    """The trained digits CNN: ``classify`` and ``features`` on (B, 1, 16, 16) images in [0, 1]."""

    def __init__(self, model: models.DigitsCNN, meta: dict):
        self.model = model.eval().requires_grad_(False)
        self.meta = meta

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self._check(images))

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 16, 16) in [0, 1] -> (B,) int64 labels."""
        return self.logits(images).argmax(1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 16, 16) in [0, 1] -> (B, 128) penultimate features (for a Frechet distance)."""
        return self.model.features(self._check(images))

    __call__ = classify

    @staticmethod
    def _check(images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.ndim == 3:
            images = images[:, None]
        if images.shape[1:] != (1, 16, 16):
            raise ValueError(f"expected (B, 1, 16, 16) images, got {tuple(images.shape)}")
        return images.detach().to("cpu", torch.float32)


def load_classifier(checkpoint_dir: str | Path | None = None) -> DigitsClassifier:
    state, meta = _read("classifier", checkpoint_dir)
    model = models.DigitsCNN(**meta["config"])
    model.load_state_dict(state, strict=True)
    return DigitsClassifier(model, meta)
