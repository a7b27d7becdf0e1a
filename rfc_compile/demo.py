"""`rfc-compile demo`: full compute vs RFC on the embedded digits DiT, one picture, real numbers.

The printed wall times, NFC, speedup and PSNR come from the same run that writes the PNG
(top row: full compute; bottom row: RFC).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from .config import MODES, RFCConfig
from .runtime import BACKENDS, optimize


#: RCS thresholds that give NFC 14 of 50 on the zoo models (10 classes, seed 0), found with
#: `rfc-compile calibrate --model <name> --target-nfc 14 --seeds 1`.
DEFAULT_THRESHOLDS = {"dit-digits": 0.274}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .zoo import MODELS, digit_classes

    parser.add_argument("--model", default="dit-digits", choices=MODELS, help="zoo model")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--mode", default="rfc", choices=MODES)
    parser.add_argument("--threshold", type=float, default=None, help="RCS threshold (default: calibrated for NFC 14 on the zoo model)")
    parser.add_argument("--interval", type=int, default=4, help="fixed interval N for fora/taylorseer/rfe")
    parser.add_argument("--order", type=int, default=None, help="Taylor order (default: RFCConfig's)")
    parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", type=digit_classes,
                        help="comma-separated digit classes")
    parser.add_argument("--seed", type=int, default=0)
    # inductor: on the tiny digits model eager op dispatch makes a skipped step cost about what a full
    # one costs (0.93x on a Xeon); both compiled, caching gives ~1.7x at NFC 14
    parser.add_argument("--backend", default="inductor", choices=BACKENDS,
                        help="how the rewritten steps run, cached and full alike (default: inductor)")
    parser.add_argument("--output", default="out/demo.png", help="where to write the PNG grid")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (inf when identical)."""
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def save_grid(rows: list[torch.Tensor], labels: list[str], path: Path, scale: int = 6) -> Path:
    """Rows of (B, 1, H, W) images in [0, 1] as one PNG, a label left of each row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), rows[0].shape[0]
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * 0.9 + 0.8, n_rows * 1.0), squeeze=False)
    for r, (row, label) in enumerate(zip(rows, labels)):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.imshow(row[c, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    from . import zoo

    labels = args.classes
    threshold = args.threshold if args.threshold is not None else DEFAULT_THRESHOLDS.get(args.model)
    overrides = {k: v for k, v in (("threshold", threshold), ("order", args.order)) if v is not None}
    try:
        config = RFCConfig(mode=args.mode, interval=args.interval, **overrides)
    except (TypeError, ValueError) as exc:
        print(f"rfc-compile demo: error: {exc}")
        return 2
    bundle = zoo.load(args.model)
    cached = optimize(bundle.transformer, config, backend=args.backend)
    # the baseline runs the same way with caching off, so the speed-up is the cache's, not the backend's
    uncached = optimize(bundle.transformer, RFCConfig(mode="full"), backend=args.backend)

    def sample(transformer=None, desc=""):
        start = time.perf_counter()
        images = bundle.sample(labels, num_inference_steps=args.steps, seed=args.seed,
                               transformer=transformer, progress=True)
        return images, time.perf_counter() - start

    print(f"model {args.model}, {args.steps} steps, classes {labels}, config {config}")
    start = time.perf_counter()
    sample(cached)  # capture + rewrite (+ compile) happen on the first call
    print(f"capture + rewrite ({args.backend}): {time.perf_counter() - start:.1f}s (once per input shape)")
    sample(uncached)  # warm the full model too, so both timings are steady-state
    full, t_full = sample(uncached)
    fast, t_rfc = sample(cached)
    stats = cached.stats
    quality = psnr(fast, full)
    path = save_grid([full, fast], ["full", f"RFC\nNFC {stats.nfc}"], Path(args.output))
    print(f"full compute : {t_full:.2f}s  (NFC {args.steps}, mode full, backend {args.backend})")
    print(f"{config.mode:<13}: {t_rfc:.2f}s  (NFC {stats.nfc}, full steps {stats.full_steps})")
    print(f"speedup      : {t_full / t_rfc:.2f}x  (ideal {args.steps / stats.nfc:.2f}x)")
    print(f"PSNR vs full : {quality:.2f} dB")
    print(f"grid (top: full, bottom: {config.mode}): {path}")
    return 0
