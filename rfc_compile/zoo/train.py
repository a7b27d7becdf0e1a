"""Seeded, reproducible training of the zoo models on the bundled digits (CPU, one thread).

Usage (from the repository root, with the dev/zoo extras installed)::

    python -m rfc_compile.zoo.train classifier    # ~15 s
    python -m rfc_compile.zoo.train dit-digits     # 1500 steps, ~11 min on one CPU thread
    python -m rfc_compile.zoo.train flux-digits    # 2000 steps, ~10 min on one CPU thread

Each writes ``<name>.safetensors`` + ``<name>.json`` into ``rfc_compile/zoo/checkpoints/``
(``--out DIR`` to write elsewhere). Train the classifier first: the generators' json records the
classifier accuracy of their samples, measured right after training (``--no-eval`` skips it).
Runs use a fixed number of optimizer steps (not a time budget), ``torch.manual_seed(seed)`` and
``torch.set_num_threads(1)`` (``--threads``), so a rerun on the same machine/torch build
reproduces the checkpoint.

Recipes (what ships):

* ``classifier``: :class:`~rfc_compile.zoo.models.DigitsCNN`, AdamW 3e-3, 40 epochs of the 1437
  training digits with random +-1 px shifts and light Gaussian noise; 100 % on the 360 held-out.
* ``dit-digits``: ``DiTTransformer2DModel`` (6 layers, 4 heads x 32, patch 2, 64 tokens) in pixel
  space, DDPM training with the cosine (``squaredcos_cap_v2``) schedule and v-prediction, 10 % label
  dropout to the null label 10 (for CFG), AdamW with warmup + cosine decay, EMA of the weights (the
  checkpoint holds the EMA weights). Sampled with ``DDIMScheduler`` (trailing spacing, 50 steps,
  ``clip_sample=False``: diffusers' DDIM clips x0 but keeps the unclipped epsilon, which under CFG
  >= 2 turned the samples grey and noisy, 67 % -> 100 % at CFG 2). ``--min-snr 5`` (Min-SNR-gamma
  weighting) was tried and was no better (95 % vs 92 % at CFG 1); it is off by default.
* ``flux-digits``: ``FluxTransformer2DModel`` (2 double + 2 single blocks, 4 heads x 32) on 2x2-packed
  pixels (8x8 tokens of 4 channels), rectified-flow / flow-matching training (velocity
  ``noise - x0``, logit-normal time sampling), the class given as 4 learned "text" tokens and a
  learned pooled vector (:class:`~rfc_compile.zoo.models.ClassConditioner`, index 10 = null, 10 %
  dropout), EMA. Sampled with ``FlowMatchEulerDiscreteScheduler`` (50 steps).

Reached (64 samples, 50 steps, scored by the classifier; see the package docstring): dit-digits
92 / 100 / 100 / 100 % at CFG 1 / 1.5 / 2 / 3, flux-digits 100 % at all of them. Default CFG 2.0.
The dit run took 654 s (1 thread); the flux run 1518 s because it shared the 2 cores with other
jobs (alone: ~3.3 steps/s, ~10 min).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import data
from . import models

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"

DIT_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    # No x0 clipping: diffusers' DDIM clips x0 but keeps the unclipped epsilon, which under CFG
    # (guided x0 far outside [-1, 1]) gives grey, noisy samples (measured: 67 % at CFG 2 with
    # clipping vs 100 % without).
    clip_sample=False,
)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's floating-point state, with the usual warmup."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            s.lerp_(p.detach(), 1.0 - d)


def lr_at(step: int, total: int, base: float, warmup: int, final_frac: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


def save_checkpoint(out: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / f"{name}.safetensors"), metadata={"name": name})
    with open(out / f"{name}.json", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=False)
        f.write("\n")
    size = os.path.getsize(out / f"{name}.safetensors") / 2**20
    print(f"wrote {out / name}.safetensors ({size:.1f} MiB) and .json")


def batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless shuffled index batches (epoch by epoch, last partial batch dropped)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def _meta_common(args, seconds: float) -> dict:
    return {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": getattr(args, "ema", None),
        "threads": args.threads,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------------------------
# classifier
# ----------------------------------------------------------------------------------------------


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random +-1 px shifts (zero padded) and light Gaussian noise, clamped to [0, 1]."""
    b = x.shape[0]
    xp = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (b,), generator=gen)
    dx = torch.randint(0, 3, (b,), generator=gen)
    out = torch.stack([xp[i, :, dy[i] : dy[i] + 16, dx[i] : dx[i] + 16] for i in range(b)])
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.1
    return (out + sigma * torch.randn(out.shape, generator=gen)).clamp(0, 1)


def train_classifier(args) -> None:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    xtr, ytr = data.train_split()
    xte, yte = data.test_split()
    model = models.DigitsCNN(**models.CLASSIFIER_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = len(ytr) // args.batch_size
    total = args.steps or args.epochs * steps_per_epoch
    it = batches(len(ytr), args.batch_size, gen)
    t0 = time.time()
    model.train()
    for step in tqdm(range(total), desc="classifier", mininterval=2):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr, warmup=50, final_frac=0.0)
        idx = next(it)
        loss = F.cross_entropy(model(_augment(xtr[idx], gen)), ytr[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    secs = time.time() - t0
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
        train_acc = (model(xtr).argmax(1) == ytr).float().mean().item()
    print(f"classifier: held-out accuracy {acc:.4f} ({len(yte)} images), train {train_acc:.4f}")
    args.steps = total
    meta = {
        "kind": "classifier",
        "config": models.CLASSIFIER_CONFIG,
        "input": "(B, 1, 16, 16) float in [0, 1]",
        "heldout_accuracy": round(acc, 4),
        "heldout_size": len(yte),
        "train_accuracy": round(train_acc, 4),
        "train": _meta_common(args, secs),
    }
    save_checkpoint(Path(args.out), "classifier", model.state_dict(), meta)


# ----------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------


def train_dit(args) -> None:
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    xtr, ytr = data.train_split()
    x0_all = data.to_model_range(xtr)
    cfg = dict(models.DIT_CONFIG)
    model = models.build_dit(cfg)
    models.set_dit_label_dropout(model, 0.0)  # the loop drops labels itself
    null = cfg["num_embeds_ada_norm"]
    sched = DDPMScheduler(**{k: v for k, v in DIT_SCHEDULER.items() if k != "timestep_spacing"})
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)

    def weight_of(t: torch.Tensor) -> torch.Tensor:
        # Min-SNR-gamma loss weighting (Hang et al. 2023), expressed for the prediction target.
        s_t = snr[t]
        clipped = torch.clamp(s_t, max=args.min_snr)
        v_pred = DIT_SCHEDULER["prediction_type"] == "v_prediction"
        return clipped / (s_t + 1) if v_pred else clipped / s_t

    ema = EMA(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    it = batches(len(ytr), args.batch_size, gen)
    model.train()
    t0 = time.time()
    pbar = tqdm(range(args.steps), desc="dit-digits", mininterval=5)
    run = None
    for step in pbar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=args.warmup)
        idx = next(it)
        x0, y = x0_all[idx], ytr[idx].clone()
        b = x0.shape[0]
        y[torch.rand(b, generator=gen) < args.label_dropout] = null
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sched.add_noise(x0, noise, t)
        target = sched.get_velocity(x0, noise, t) if DIT_SCHEDULER["prediction_type"] == "v_prediction" else noise
        pred = model(xt, timestep=t, class_labels=y, return_dict=False)[0]
        if args.min_snr:
            loss = ((pred - target).pow(2).mean(dim=(1, 2, 3)) * weight_of(t)).mean()
        else:
            loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 20 == 0:
            pbar.set_postfix(loss=f"{run:.4f}")
    secs = time.time() - t0
    print(f"dit-digits: {args.steps} steps in {secs:.0f} s, final loss (ema) {run:.4f}")
    meta = {
        "kind": "dit",
        "transformer_config": cfg,
        "scheduler_class": "DDIMScheduler",
        "scheduler_config": DIT_SCHEDULER,
        "guidance_scale": args.guidance,
        "null_class": null,
        "train": {**_meta_common(args, secs), "label_dropout": args.label_dropout,
                  "min_snr_gamma": args.min_snr, "final_loss": round(run, 5)},
    }
    _finish(args, "dit-digits", ema.shadow.state_dict(), meta)


# ----------------------------------------------------------------------------------------------
# FLUX
# ----------------------------------------------------------------------------------------------


class _FluxWithCond(nn.Module):
    def __init__(self, transformer: nn.Module, cond: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.cond = cond


def train_flux(args) -> None:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    xtr, ytr = data.train_split()
    x0_all = models.pack(data.to_model_range(xtr))  # (N, 64, 4)
    cfg = dict(models.FLUX_CONFIG)
    n_tok = models.FLUX_TEXT_TOKENS
    net = _FluxWithCond(
        models.build_flux(cfg),
        models.ClassConditioner(10, n_tok, cfg["joint_attention_dim"], cfg["pooled_projection_dim"]),
    )
    null = 10
    img_ids = models.image_ids(16, 16)
    txt_ids = models.text_ids(n_tok)
    ema = EMA(net, args.ema)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    it = batches(len(ytr), args.batch_size, gen)
    net.train()
    t0 = time.time()
    pbar = tqdm(range(args.steps), desc="flux-digits", mininterval=5)
    run = None
    for step in pbar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=args.warmup)
        idx = next(it)
        x0, y = x0_all[idx], ytr[idx].clone()
        b = x0.shape[0]
        y[torch.rand(b, generator=gen) < args.label_dropout] = null
        # rectified flow: x_s = (1 - s) x0 + s noise, target velocity noise - x0 (FLUX convention);
        # s ~ logit-normal(0, 1) as in SD3 / FLUX training.
        s = torch.sigmoid(torch.randn(b, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        xs = (1 - s)[:, None, None] * x0 + s[:, None, None] * noise
        txt, pooled = net.cond(y)
        pred = net.transformer(
            hidden_states=xs, encoder_hidden_states=txt, pooled_projections=pooled, timestep=s,
            img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net, step)
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 20 == 0:
            pbar.set_postfix(loss=f"{run:.4f}")
    secs = time.time() - t0
    print(f"flux-digits: {args.steps} steps in {secs:.0f} s, final loss (ema) {run:.4f}")
    meta = {
        "kind": "flux",
        "transformer_config": {**cfg, "axes_dims_rope": list(cfg["axes_dims_rope"])},
        "text_tokens": n_tok,
        "scheduler_class": "FlowMatchEulerDiscreteScheduler",
        "scheduler_config": FLUX_SCHEDULER,
        "guidance_scale": args.guidance,
        "null_class": null,
        "train": {**_meta_common(args, secs), "label_dropout": args.label_dropout,
                  "time_sampling": "logit-normal(0, 1)", "final_loss": round(run, 5)},
    }
    _finish(args, "flux-digits", ema.shadow.state_dict(), meta)


def _finish(args, name: str, state: dict, meta: dict) -> None:
    out = Path(args.out)
    save_checkpoint(out, name, state, meta)
    if args.no_eval:
        return
    from .evaluate import evaluate

    res = evaluate(name, checkpoint_dir=out, guidance_scales=[meta["guidance_scale"]])
    meta["eval"] = res
    with open(out / f"{name}.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------------

DEFAULTS = {
    #                steps  batch  lr     ema     warmup guidance
    "classifier": dict(steps=0, batch_size=64, lr=3e-3, epochs=40),
    "dit-digits": dict(steps=1500, batch_size=48, lr=1e-3, ema=0.998, warmup=100, guidance=2.0,
                       min_snr=0.0),
    "flux-digits": dict(steps=2000, batch_size=48, lr=1e-3, ema=0.998, warmup=100, guidance=2.0),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m rfc_compile.zoo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(DEFAULTS))
    p.add_argument("--out", default=str(CHECKPOINT_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--ema", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--guidance", type=float, help="default CFG scale stored with the checkpoint")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--min-snr", type=float, help="dit: Min-SNR-gamma loss weighting (0: off)")
    p.add_argument("--no-eval", action="store_true")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[args.model].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    {"classifier": train_classifier, "dit-digits": train_dit, "flux-digits": train_flux}[args.model](args)


if __name__ == "__main__":
    main()
