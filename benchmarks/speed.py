"""Speed of cached, compiled DiT sampling on CPU (a benchmark, not a test).

Model: DiT-S/2-sized diffusers ``DiTTransformer2DModel`` (hidden 384 = 6 heads x 64, depth 12,
4x32x32 latent, patch 2 -> 256 tokens, 1000 classes), random weights; 50 DDIM steps, batch 2
(one class + classifier-free guidance's null class). Rows, all in one process:

* full compute: eager, and ``torch.compile(fullgraph=True)``;
* rfc_compile with ``backend="inductor"`` at NFC 14 and 8 of 50: FORA and TaylorSeer at their
  fixed interval (warm-up 2, then every N: N = 4 -> NFC 14, N = 8 -> NFC 8); RFC with the
  same fixed schedule (``max_interval`` N-1, threshold infinite: the RFC overhead over
  TaylorSeer at an identical schedule); RFC with its RCS threshold calibrated (bisection,
  eager) to the same NFC;
* diffusers' own caches + ``torch.compile``: ``DiTTransformer2DModel`` has no
  ``enable_cache`` (no ``CacheMixin``), so the hooks are applied the way ``enable_cache``
  does it, with ``apply_taylorseer_cache`` (attn1/ff of every block, order 2, float32
  factors, same NFC) and ``apply_first_block_cache`` (threshold calibrated to the NFC);
  their host-side decisions break the graph, so they compile without ``fullgraph``;
* the cost of a skipped step: RFC at NFC 50 (threshold 0) and NFC 2 (threshold infinite)
  give f = T50 / 50 and s = (T2 - 2 f) / 48.

Every row is built and warmed up (compiled) first, then the rows are timed round-robin,
``--repeats`` times each; tables show medians (per-step medians from per-call timers).

    python benchmarks/speed.py --threads 1            # writes its section of benchmarks/RESULTS.md
    python benchmarks/speed.py --quick --no-write     # small model, 20 steps: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rfc_compile  # noqa: E402
from rfc_compile import RFCConfig  # noqa: E402

BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"
NULL_CLASS = 1000
GUIDANCE = 4.0


# --- model and sampling ---------------------------------------------------------------------

def build_model(quick: bool) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=6 if not quick else 2, attention_head_dim=64 if not quick else 32, in_channels=4,
        out_channels=4, num_layers=12 if not quick else 4, sample_size=32 if not quick else 16, patch_size=2,
        num_embeds_ada_norm=1000)
    with torch.no_grad():  # diffusers zero-inits adaLN-Zero and the output layer: make every weight random
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return model.eval()


def generation(model: Callable, steps: int, size: int, on_step: Callable[[], None] | None = None
               ) -> tuple[torch.Tensor, float, list[float]]:
    """DDIM with CFG (model batch 2); returns final latents, wall seconds, seconds per model call."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([207, NULL_CLASS])
    calls = []
    start = time.perf_counter()
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(hidden_states=x, timestep=t.expand(2), class_labels=labels, return_dict=False)[0]
        calls.append(time.perf_counter() - t0)
        if on_step is not None:
            on_step()
        cond, uncond = out.chunk(2)
        latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents).prev_sample
    return latents, time.perf_counter() - start, calls


# --- rows -----------------------------------------------------------------------------------

class Row:
    """One way to run the model: built once, warmed up, then timed; knows its full steps."""

    def __init__(self, name: str, group: str, build: Callable[[], tuple[Callable, Callable[[], list[int]],
                                                                          Callable[[], None]]]):
        self.name, self.group, self._build = name, group, build
        self.times: list[float] = []
        self.full_calls: list[float] = []
        self.skip_calls: list[float] = []
        self.nfcs: list[int] = []
        self.warmup_s = math.nan

    def warm_up(self, steps: int, size: int) -> None:
        start = time.perf_counter()
        self.model, self.full_steps, self.reset = self._build()
        self.reset()
        generation(self.model, steps, size, self._observe)
        self.warmup_s = time.perf_counter() - start

    def _observe(self) -> None:  # called after every model call (FBC reads its decision here)
        pass

    def run(self, steps: int, size: int) -> None:
        self.reset()
        _, seconds, calls = generation(self.model, steps, size, self._observe)
        full = set(self.full_steps())
        self.times.append(seconds)
        self.nfcs.append(len(full))
        self.full_calls += [c for n, c in enumerate(calls) if n in full and n >= 2]  # past warm-up effects
        self.skip_calls += [c for n, c in enumerate(calls) if n not in full]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def nfc(self) -> str:
        values = sorted(set(self.nfcs))
        return "/".join(str(v) for v in values)


def _plain_row(name: str, model: torch.nn.Module, steps: int, compiled: bool) -> Row:
    def build():
        run = torch.compile(model, fullgraph=True) if compiled else model
        return run, lambda: list(range(steps)), lambda: None
    return Row(name, "full", build)


def _rfc_row(name: str, model: torch.nn.Module, config: RFCConfig, group: str) -> Row:
    def build():
        cached = rfc_compile.optimize(model, config, backend="inductor")
        return cached, lambda: cached.stats.full_steps, cached.reset
    return Row(name, group, build)


def _diffusers_context(model: torch.nn.Module) -> Callable[[], None]:
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    registry = HookRegistry.check_if_exists_or_initialize(model)

    def reset():
        registry.reset_stateful_hooks()
        _set_cache_context(model, CacheContext("cond"))
    return reset


def _taylorseer_config(interval: int, warmup: int):
    from diffusers import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup, max_order=2,
                                 taylor_factors_dtype=torch.float32,
                                 cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"])


def diffusers_taylorseer_full_steps(steps: int, interval: int, warmup: int) -> list[int]:
    """diffusers' TaylorSeerCacheHook schedule: warm-up, then (n - warmup - 1) % interval == 0."""
    return [n for n in range(steps) if n < warmup or (n - warmup - 1) % interval == 0]


def _diffusers_taylorseer_row(name: str, base: torch.nn.Module, steps: int, interval: int) -> Row:
    from diffusers.hooks import apply_taylorseer_cache

    def build():
        model = copy.deepcopy(base)
        apply_taylorseer_cache(model, _taylorseer_config(interval, 2))
        full = diffusers_taylorseer_full_steps(steps, interval, 2)
        return torch.compile(model), lambda: full, _diffusers_context(model)
    return Row(name, "diffusers", build)


class _FBCRow(Row):
    """diffusers FirstBlockCache: its decision is host state, read after every call."""

    def __init__(self, name: str, base: torch.nn.Module, threshold: float, compiled: bool = True):
        super().__init__(name, "diffusers", self._make)
        self.base, self.threshold, self.compiled = base, threshold, compiled

    def _make(self):
        from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

        model = copy.deepcopy(self.base)
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=self.threshold))
        registry = HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0])
        self._manager = next(m for hook in registry.hooks.values() for m in vars(hook).values()
                             if type(m).__name__ == "StateManager")
        self._decisions: list[bool] = []
        context = _diffusers_context(model)

        def reset():
            context()
            self._decisions = []
        run = torch.compile(model) if self.compiled else model
        return run, lambda: [n for n, full in enumerate(self._decisions) if full], reset

    def _observe(self) -> None:
        self._decisions.append(bool(self._manager.get_state().should_compute))


# --- calibration ----------------------------------------------------------------------------

def bisect_threshold(nfc_at: Callable[[float], int], target: int, low: float, high: float,
                     iterations: int = 16) -> tuple[float, int, list[tuple[float, int]]]:
    """A threshold whose NFC is ``target`` (NFC falls as the threshold grows), log-scale bisection."""
    trials = []

    def trial(tau):
        nfc = nfc_at(tau)
        trials.append((tau, nfc))
        print(f"    threshold {tau:.5g} -> NFC {nfc}", flush=True)
        return nfc
    while trial(high) > target:
        high *= 4
    while trial(low) < target:
        low /= 4
    for _ in range(iterations):
        if any(n == target for _, n in trials):
            break
        mid = math.sqrt(low * high)
        if trial(mid) > target:
            low = mid
        else:
            high = mid
    tau, nfc = min(trials, key=lambda tn: (abs(tn[1] - target), tn[1]))
    return tau, nfc, trials


def calibrate_rfc(base: torch.nn.Module, steps: int, size: int, target: int) -> tuple[float, int | None, int]:
    """RCS threshold (and, where NFC jumps over the target, a ``max_interval`` cap) for ``target``
    NFC, on the eager cached graph. The threshold and the cap are the constants of
    ``(acc > tau).any()`` and ``k > max_interval`` in the graph, so trials patch them instead
    of re-tracing the model."""
    start, no_cap = 0.1, 10**6
    cached = rfc_compile.optimize(base, RFCConfig(mode="rfc", threshold=start, max_interval=no_cap))
    cached.prepare(hidden_states=torch.zeros(2, 4, size, size), timestep=torch.tensor([999, 999]),
                   class_labels=torch.tensor([207, NULL_CLASS]), return_dict=False)
    gm = cached.graph_module
    (tau_node,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.gt.Scalar and n.args[1] == start]
    (cap_node,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.gt.Scalar and n.args[1] == no_cap]

    def run(tau: float, cap: int = no_cap) -> list[int]:
        tau_node.args, cap_node.args = (tau_node.args[0], tau), (cap_node.args[0], cap)
        gm.recompile()
        cached.reset()
        generation(cached, steps, size)
        return cached.stats.full_steps

    tau, nfc, trials = bisect_threshold(lambda t: len(run(t)), target, 1e-3, 1.0)
    if nfc == target:
        return tau, None, nfc
    # NFC jumps over the target: the smallest threshold below it, with its longest gaps capped
    tau = min(t for t, n in trials if n < target)
    full = run(tau)
    for cap in range(max(b - a for a, b in zip(full, full[1:] + [steps])) - 1, 0, -1):
        nfc = len(run(tau, cap))
        print(f"    threshold {tau:.5g}, max_interval {cap} -> NFC {nfc}", flush=True)
        if nfc >= target:
            return tau, cap, nfc
    return tau, None, len(run(tau))


def calibrate_fbc(base: torch.nn.Module, steps: int, size: int, target: int) -> tuple[float, int]:
    def nfc_at(threshold: float) -> int:
        row = _FBCRow("calibration", base, threshold, compiled=False)
        model, full_steps, reset = row._make()
        reset()
        generation(model, steps, size, row._observe)
        return len(full_steps())
    tau, nfc, _ = bisect_threshold(nfc_at, target, 1e-3, 0.5)
    return tau, nfc


# --- report ---------------------------------------------------------------------------------

def _ms(values: list[float]) -> str:
    return f"{1e3 * statistics.median(values):.1f}" if values else "-"


def report(args, rows: list[Row], calibration: dict, solve: dict | None, started: str, load: tuple) -> str:
    by_name = {r.name: r for r in rows}
    full_eager, full_comp = by_name["full, eager"], by_name["full, torch.compile"]
    lines = [
        f"## speed.py: cached + compiled DiT sampling on CPU ({started})",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/speed.py', *sys.argv[1:]])}`",
        "",
        f"- model: DiTTransformer2DModel, {args.model_desc}; {args.steps} DDIM steps, batch 2 (CFG), random weights",
        f"- torch {torch.__version__}, diffusers {__import__('diffusers').__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"load average {load[0]:.1f} at start, {load[1]:.1f} at end (other jobs share the machine)",
        f"- every row: built + warmed up (compile) first, then timed round-robin, {args.repeats} repeats; "
        "medians. Full/skip step = median seconds of one model call at a full / skipped step.",
        "",
        "| row | NFC | ideal S/NFC | median s | vs compiled full | vs eager full | full step ms | skip step ms "
        "| skip/full | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nfc = statistics.median(r.nfcs)
        skip_ratio = (statistics.median(r.skip_calls) / statistics.median(full_comp.full_calls)
                      if r.skip_calls else math.nan)
        lines.append(
            f"| {r.name} | {r.nfc} | {args.steps / nfc:.2f} | {r.median:.2f} | {full_comp.median / r.median:.2f}x "
            f"| {full_eager.median / r.median:.2f}x | {_ms(r.full_calls)} | {_ms(r.skip_calls)} "
            f"| {'-' if math.isnan(skip_ratio) else f'{skip_ratio:.3f}'} | {r.warmup_s:.0f} |")
    lines += ["", "skip/full: a skipped call relative to a full call of the compiled full model.", ""]
    if calibration:
        lines.append("Calibrated thresholds (bisection on eager generations): " + "; ".join(
            f"{k}: {v[0]:.4g}" + (f", max_interval {v[2]}" if v[2] else "") + f" (NFC {v[1]})"
            for k, v in calibration.items()))
        lines.append("")
    if solve:
        lines += [
            f"Skipped-step cost, RFC compiled: T(NFC {solve['n_hi']}) = {solve['t_hi']:.2f} s, "
            f"T(NFC {solve['n_lo']}) = {solve['t_lo']:.2f} s -> full step f = {1e3 * solve['f']:.1f} ms, "
            f"skipped step s = {1e3 * solve['s']:.1f} ms, s/f = {solve['s'] / solve['f']:.3f} "
            f"(compiled full model: {1e3 * full_comp.median / args.steps:.1f} ms per step).", ""]
    if args.quick:
        return "\n".join(lines)  # the targets are for the 50-step DiT-S run
    lines += ["Targets:", ""]
    for nfc_target, goal in ((args.nfc[0], 3.2), (args.nfc[1], 5.0)):
        r = by_name.get(f"RFC (calibrated), NFC {nfc_target}")
        if r:
            speedup = full_comp.median / r.median
            lines.append(f"- RFC compiled at NFC {nfc_target}: {speedup:.2f}x over compiled full "
                         f"(target >= {goal}x): {'met' if speedup >= goal else 'MISSED'}")
    for nfc_target in args.nfc:
        rfc, ts = by_name.get(f"RFC (fixed schedule), NFC {nfc_target}"), by_name.get(f"TaylorSeer, NFC {nfc_target}")
        if rfc and ts:
            overhead = rfc.median / ts.median - 1
            lines.append(f"- RFC over TaylorSeer at the same schedule (NFC {nfc_target}): {100 * overhead:+.1f} % "
                         f"(target <= 2 %): {'met' if overhead <= 0.02 else 'MISSED'}")
    for nfc_target in args.nfc:
        rfc = by_name.get(f"RFC (calibrated), NFC {nfc_target}")
        others = [by_name[n] for n in (f"diffusers TaylorSeer + compile, NFC {nfc_target}",
                                       f"diffusers FirstBlockCache + compile, NFC {nfc_target}") if n in by_name]
        if rfc and others:
            best = min(others, key=lambda r: r.median)
            ratio = best.median / rfc.median
            off = [f"{r.name} ran NFC {r.nfc}" for r in others if statistics.median(r.nfcs) != nfc_target]
            lines.append(f"- RFC over the faster diffusers cache + compile at NFC {nfc_target} ({best.name}): "
                         f"{ratio:.2f}x (target >= 1.2x): {'met' if ratio >= 1.2 else 'MISSED'}"
                         + (f" ({'; '.join(off)}: its threshold cannot hit {nfc_target} exactly)" if off else ""))
    lines.append("")
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# rfc_compile benchmark results\n\n"
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="4 blocks, 16x16 latent, 20 steps, NFC 8/5")
    parser.add_argument("--only", default="", help="';'-separated substrings: run only matching rows")
    parser.add_argument("--no-diffusers", action="store_true", help="skip diffusers' caches")
    parser.add_argument("--no-solve", action="store_true", help="skip the NFC-50 / NFC-2 skipped-step solve")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # diffusers' hooks recompile per block; do not fall back to eager
    torch._dynamo.config.accumulated_recompile_limit = 4096
    args.steps = 20 if args.quick else 50
    args.nfc = (8, 5) if args.quick else (14, 8)
    size = 16 if args.quick else 32
    args.model_desc = ("4 blocks, hidden 64, 16x16 latent (--quick)" if args.quick else
                       "hidden 384 (6 heads x 64), 12 blocks, 4x32x32 latent, patch 2 (256 tokens), 1000 classes")
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_start = os.getloadavg()[0]
    base = build_model(args.quick)
    wanted = [s for s in args.only.split(";") if s]
    keep = lambda name: not wanted or any(s in name for s in wanted)  # noqa: E731

    # fixed interval N with warm-up 2 -> NFC = 2 + floor((S - 2) / N): pick N per target (diffusers'
    # TaylorSeer counts its interval from step 3, so its N is picked on its own schedule)
    intervals = {n: next(i for i in range(1, args.steps) if 2 + (args.steps - 2) // i <= n) for n in args.nfc}
    diffusers_intervals = {n: next(i for i in range(1, args.steps)
                                   if len(diffusers_taylorseer_full_steps(args.steps, i, 2)) <= n) for n in args.nfc}
    rows = [_plain_row("full, eager", base, args.steps, compiled=False),
            _plain_row("full, torch.compile", base, args.steps, compiled=True)]
    calibration: dict = {}
    for n in args.nfc:
        interval = intervals[n]
        rows += [
            _rfc_row(f"FORA, NFC {n}", base, RFCConfig(mode="fora", interval=interval), "fixed"),
            _rfc_row(f"TaylorSeer, NFC {n}", base, RFCConfig(mode="taylorseer", interval=interval), "fixed"),
            _rfc_row(f"RFC (fixed schedule), NFC {n}", base,
                     RFCConfig(mode="rfc", threshold=1e30, max_interval=interval - 1), "fixed"),
        ]
        if keep(f"RFC (calibrated), NFC {n}"):
            print(f"calibrating the RFC threshold for NFC {n}", flush=True)
            tau, cap, nfc = calibrate_rfc(base, args.steps, size, n)
            calibration[f"RFC NFC {n}"] = (tau, nfc, cap)
            rows.append(_rfc_row(f"RFC (calibrated), NFC {n}", base,
                                 RFCConfig(mode="rfc", threshold=tau, max_interval=cap), "rfc"))
            if n == args.nfc[0]:  # what the in-graph non-finite guard (on by default) costs
                rows.append(_rfc_row(f"RFC (calibrated, guard_nonfinite=False), NFC {n}", base,
                                     RFCConfig(mode="rfc", threshold=tau, max_interval=cap, guard_nonfinite=False),
                                     "info"))
        if not args.no_diffusers:
            rows.append(_diffusers_taylorseer_row(f"diffusers TaylorSeer + compile, NFC {n}", base, args.steps,
                                                  diffusers_intervals[n]))
            if keep(f"diffusers FirstBlockCache + compile, NFC {n}"):
                print(f"calibrating the FirstBlockCache threshold for NFC {n}", flush=True)
                calibration[f"FirstBlockCache NFC {n}"] = (*calibrate_fbc(base, args.steps, size, n), None)
                rows.append(_FBCRow(f"diffusers FirstBlockCache + compile, NFC {n}", base,
                                    calibration[f"FirstBlockCache NFC {n}"][0]))
    if not args.no_solve:
        rows += [_rfc_row(f"RFC, NFC {args.steps} (threshold 0)", base, RFCConfig(mode="rfc", threshold=0.0), "solve"),
                 _rfc_row("RFC, NFC 2 (threshold inf)", base, RFCConfig(mode="rfc", threshold=1e30), "solve")]
    rows = [r for r in rows if keep(r.name) or r.name.startswith("full")]

    for r in rows:
        print(f"warm-up: {r.name}", flush=True)
        r.warm_up(args.steps, size)
    for rep in range(args.repeats):
        for r in rows:
            r.run(args.steps, size)
            print(f"repeat {rep}: {r.name}: {r.times[-1]:.2f} s, NFC {r.nfcs[-1]}", flush=True)

    solve = None
    hi, lo = (next((r for r in rows if r.group == "solve" and key in r.name), None)
              for key in ("threshold 0", "threshold inf"))
    if hi and lo:
        n_hi, n_lo = statistics.median(hi.nfcs), statistics.median(lo.nfcs)
        f = hi.median / n_hi
        s = (lo.median - n_lo * f) / (args.steps - n_lo)
        solve = dict(n_hi=n_hi, n_lo=n_lo, t_hi=hi.median, t_lo=lo.median, f=f, s=s)
    section = report(args, rows, calibration, solve, started, (load_start, os.getloadavg()[0]))
    print(section)
    if not args.no_write:
        write_section(Path(args.results), section)
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
