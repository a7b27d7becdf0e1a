"""Calibration: the RCS threshold that gives a target average NFC.

The paper tunes tau by hand per model; here it is found by bisection over whole
generations. NFC falls as tau grows (a larger tolerance allows longer skips), so the search
brackets the target on a log scale and bisects, keeping the threshold whose average NFC is
closest to the target (ties go to the one with fewer full steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .config import RFCConfig
from .runtime import CachedModel, optimize

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    config: RFCConfig
    nfc: float  # average NFC achieved with config
    trials: list[tuple[float, float]]  # (threshold, average NFC) in the order tried


def measure_nfc(model: torch.nn.Module, sample_fn: Callable[[CachedModel], Any], config: RFCConfig,
                backend: str = "eager") -> float:
    """Average NFC over the generations ``sample_fn(cached)`` runs with ``config`` (each CFG branch
    called separately counts as a generation of its own: its cache decides its full steps)."""
    cached = optimize(model, config, backend=backend)
    sample_fn(cached)
    generations = cached.all_generations
    if not generations:
        raise RuntimeError("sample_fn ran no generation through the cached model it was given")
    return sum(g.nfc for g in generations) / len(generations)


def calibrate_threshold(model: torch.nn.Module, sample_fn: Callable[[CachedModel], Any], target_nfc: float,
                        config: RFCConfig | None = None, *, iterations: int = 10, tolerance: float = 0.5,
                        low: float = 1e-3, high: float = 1.0, backend: str = "eager") -> CalibrationResult:
    """Bisect the RCS threshold for ``target_nfc`` (see :func:`calibrate`)."""
    base = (config or RFCConfig()).replace(mode="rfc")
    if target_nfc < base.warmup_steps:
        raise ValueError(f"target_nfc {target_nfc} is below warmup_steps {base.warmup_steps}")
    trials: list[tuple[float, float]] = []

    def nfc_at(tau: float) -> float:
        nfc = measure_nfc(model, sample_fn, base.replace(threshold=tau), backend)
        trials.append((tau, nfc))
        logger.info("calibrate: threshold %.5g -> NFC %.2f (target %.2f)", tau, nfc, target_nfc)
        return nfc

    # bracket: nfc(low) >= target >= nfc(high)
    while nfc_at(high) > target_nfc and high < 1e6:
        low, high = high, high * 8
    while nfc_at(low) < target_nfc and low > 1e-9:
        high, low = low, low / 8
    for _ in range(iterations):
        best = min(trials, key=lambda tn: (abs(tn[1] - target_nfc), tn[1]))
        if abs(best[1] - target_nfc) <= tolerance:
            break
        mid = math.sqrt(low * high)
        if nfc_at(mid) > target_nfc:
            low = mid
        else:
            high = mid
    tau, nfc = min(trials, key=lambda tn: (abs(tn[1] - target_nfc), tn[1]))
    return CalibrationResult(base.replace(threshold=tau), nfc, trials)


@dataclasses.dataclass(frozen=True)
class OptionsResult:
    config: RFCConfig  # the best candidate, threshold calibrated
    scores: list[tuple[dict, RFCConfig, float, float]]  # (options, calibrated config, NFC, score) per candidate


def calibrate_options(model: torch.nn.Module, sample_fn: Callable[[CachedModel], Any], target_nfc: float,
                      score_fn: Callable[[CachedModel], float], candidates: Sequence[dict],
                      config: RFCConfig | None = None, **kwargs) -> OptionsResult:
    """Calibrate the threshold of each candidate set of RFCConfig options to ``target_nfc``, score
    each with ``score_fn(cached)`` (higher is better, e.g. PSNR to full-compute outputs of a few
    prompts) and keep the best. benchmarks/RESULTS.md ("Options beyond the paper") shows why:
    which option wins depends on the model and the budget."""
    if not candidates:
        raise ValueError("calibrate_options needs at least one candidate (use {} for the paper's RFC)")
    base = config or RFCConfig()
    scores = []
    for options in candidates:
        result = calibrate_threshold(model, sample_fn, target_nfc, base.replace(**options), **kwargs)
        score = float(score_fn(optimize(model, result.config)))
        logger.info("calibrate: options %s threshold %.5g NFC %.2f score %.4g", options, result.config.threshold,
                    result.nfc, score)
        scores.append((dict(options), result.config, result.nfc, score))
    best = max(scores, key=lambda entry: entry[3])
    return OptionsResult(best[1], scores)


def calibrate(model: torch.nn.Module, sample_fn: Callable[[CachedModel], Any], target_nfc: float,
              config: RFCConfig | None = None, *, candidates: Sequence[dict] | None = None,
              score_fn: Callable[[CachedModel], float] | None = None, **kwargs) -> RFCConfig:
    """The RFCConfig (mode "rfc") whose threshold gives ``target_nfc`` full steps on average.

    ``sample_fn(cached)`` runs one or more generations with the cached transformer, e.g.
    ``lambda t: bundle.sample(labels, transformer=t)``; other fields come from ``config``.
    With ``candidates`` (dicts of RFCConfig options, e.g. ``[{}, {"rfe_shrink": True}]``) and
    ``score_fn``, each candidate is calibrated and the best-scoring one returned
    (:func:`calibrate_options`).
    """
    if candidates is not None:
        if score_fn is None:
            raise ValueError("calibrate(candidates=...) needs score_fn to choose between them")
        return calibrate_options(model, sample_fn, target_nfc, score_fn, candidates, config, **kwargs).config
    result = calibrate_threshold(model, sample_fn, target_nfc, config, **kwargs)
    logger.info("calibrated threshold %.5g: average NFC %.2f (target %.2f, %d trials)",
                result.config.threshold, result.nfc, target_nfc, len(result.trials))
    return result.config


# --- `rfc-compile calibrate` ------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .zoo import MODELS, digit_classes

    parser.add_argument("--model", default="dit-digits", choices=MODELS, help="zoo model")
    parser.add_argument("--target-nfc", type=float, required=True, help="average full steps wanted")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--order", type=int, default=None)
    parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", type=digit_classes,
                        help="comma-separated digit classes")
    parser.add_argument("--seeds", type=int, default=2, help="generations per trial (seed 0..n-1)")


def run(args: argparse.Namespace) -> int:
    from . import zoo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        base = RFCConfig(order=args.order) if args.order is not None else RFCConfig()
    except (TypeError, ValueError) as exc:
        print(f"rfc-compile calibrate: error: {exc}")
        return 2
    if not base.warmup_steps <= args.target_nfc <= args.steps:
        print(f"rfc-compile calibrate: error: --target-nfc {args.target_nfc:g} must be between the warm-up steps "
              f"({base.warmup_steps}, always full) and --steps ({args.steps})")
        return 2
    bundle = zoo.load(args.model)
    labels = args.classes

    def sample_fn(cached):
        for seed in range(args.seeds):
            bundle.sample(labels, num_inference_steps=args.steps, seed=seed, transformer=cached)

    result = calibrate_threshold(bundle.transformer, sample_fn, args.target_nfc, base)
    print(f"threshold {result.config.threshold:.6g} gives average NFC {result.nfc:.2f} "
          f"of {args.steps} (target {args.target_nfc}); {len(result.trials)} trials")
    print(f"RFCConfig(mode='rfc', threshold={result.config.threshold:.6g}, order={result.config.order})")
    return 0
