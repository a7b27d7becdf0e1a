"""onnxruntime: full compute vs the RFC-cached ONNX graph on a DiT-S-sized model (a benchmark, not a test).

DiTTransformer2DModel with hidden 384 (6 heads x 64), depth 12, 4x32x32 latent, patch 2
(256 tokens), batch 2 (one class + CFG's null class), random weights; 50 DDIM steps.
The cached graphs use fixed schedules (TaylorSeer ``taylorseer`` and ``rfe``, Taylor order 2,
warm-up 2, interval 4: full steps 0, 1, 5, ..., 49 -> NFC 14 of 50, the paper's DiT setting),
so every repeat does the same work, and RFC itself (``rfc``: RFE + RCS, its threshold calibrated
by bisection over eager generations to the same NFC, or given with ``--threshold``); one more row
turns off the in-graph non-finite guard (``guard_nonfinite=False``) to show its cost. Each variant is timed over whole generations;
the table reports the median (and min) of ``--repeats`` runs, variants interleaved.

    python benchmarks/speed_onnx.py                      # writes its section of RESULTS_ONNX.md
    python benchmarks/speed_onnx.py --threads 0 --repeats 7 --no-write   # ORT's default threads

The script rewrites only its own section of benchmarks/RESULTS_ONNX.md (between the
``speed_onnx`` markers), so other sections of that file are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rfc_compile import RFCConfig  # noqa: E402
from rfc_compile.export import OnnxCachedModel, to_onnx  # noqa: E402
from rfc_compile.export.models import dit_s  # noqa: E402
from results_onnx import publish  # noqa: E402  (benchmarks/results_onnx.py)

BEGIN, END = "<!-- speed_onnx:begin -->", "<!-- speed_onnx:end -->"


def generation(model, steps: int, seed: int = 0, per_call: list[float] | None = None
               ) -> tuple[torch.Tensor, float, float]:
    """A DDIM loop with CFG (batch 2 = class + null); returns final latents, wall and CPU seconds.

    ``per_call``, when given, receives the process CPU time of each model call."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 32, 32, generator=gen)
    labels = torch.tensor([207, 1000])
    start, cpu_start = time.perf_counter(), time.process_time()
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents])
        call_start = time.process_time()
        with torch.no_grad():
            out = model(hidden_states=x, timestep=t.expand(2), class_labels=labels, return_dict=False)[0]
        if per_call is not None:
            per_call.append(time.process_time() - call_start)
        eps = out[:, :4]
        cond, uncond = eps.chunk(2)
        latents = scheduler.step(uncond + 4.0 * (cond - uncond), t, latents).prev_sample
    return latents, time.perf_counter() - start, time.process_time() - cpu_start


def session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def _code_stamp() -> str:
    """A hash of the rfc_compile sources: an export made by other code is not reused."""
    import hashlib

    digest = hashlib.sha1()
    for file in sorted((ROOT / "rfc_compile").rglob("*.py")):
        digest.update(file.relative_to(ROOT).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def example_inputs() -> dict[str, torch.Tensor]:
    """The export's example call: batch 2 (a class and CFG's null class), 4x32x32 latent."""
    return dict(hidden_states=torch.randn(2, 4, 32, 32), timestep=torch.full((2,), 999, dtype=torch.long),
                class_labels=torch.tensor([207, 1000]))


def export_dit_s(model, config: RFCConfig, workdir: Path, dynamic_batch: bool = False) -> Path:
    """Export the DiT-S graph for ``config`` into ``workdir`` (a file name per config), or reuse
    the file there when its sidecar says it holds this exact config and it was written by the
    same rfc_compile sources (reruns)."""
    slug = "full" if config.mode == "full" else \
        f"{config.mode}_m{config.order}_i{config.interval}_g{int(config.guard_nonfinite)}"
    path = workdir / f"dit_s_{slug}{'_dynamic' if dynamic_batch else ''}.onnx"
    sidecar = Path(str(path) + ".rfc.json")
    stamp_file = Path(str(path) + ".code")
    stamp = _code_stamp()
    if path.exists() and sidecar.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        raw = json.loads(sidecar.read_text())
        if (raw.get("rfc_config") == config.to_dict() and bool(raw.get("dynamic_axes")) == dynamic_batch
                and raw.get("model", {}).get("config", {}).get("num_layers") == 12):
            print(f"reusing {path}", flush=True)
            return path
    t0 = time.perf_counter()
    to_onnx(model, path, example_inputs(), config, check=False, dynamic_batch=dynamic_batch)
    stamp_file.write_text(stamp)
    print(f"exported {path.name} in {time.perf_counter() - t0:.1f}s", flush=True)
    return path


def fixed_schedule_nfc(steps: int, warmup: int, interval: int) -> int:
    """NFC of the fixed schedule (RFC_METHOD.md): steps 0..warmup-1, then every interval-th."""
    return warmup + len(range(warmup - 1 + interval, steps, interval))


def calibrated_threshold(model, steps: int, target_nfc: int, config: RFCConfig) -> float:
    """The RCS threshold whose generation (this script's) has ``target_nfc`` full steps in eager."""
    from rfc_compile.calibrate import calibrate_threshold

    t0 = time.perf_counter()
    result = calibrate_threshold(model, lambda cached: generation(cached, steps), target_nfc, config)
    print(f"rfc threshold {result.config.threshold:.5g}: eager NFC {result.nfc:g} (target {target_nfc}), "
          f"{len(result.trials)} trials in {time.perf_counter() - t0:.0f}s", flush=True)
    return result.config.threshold


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="taylorseer,rfe,rfc",
                        help="modes to time (comma-separated): fixed-interval ones and rfc (RCS, calibrated)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="RCS threshold of the rfc row (default: calibrated to the fixed schedule's NFC)")
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--order", type=int, default=2)
    parser.add_argument("--no-guard-row", action="store_true",
                        help="skip the extra row with guard_nonfinite=False (the cost of the in-graph NaN guard)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ORT intra-op threads (default 1: steadier on a shared machine; 0 = ORT default)")
    parser.add_argument("--workdir", default=None,
                        help="where the ONNX files go (default: a temp dir); files with the same config, exported by the "
                             "same rfc_compile sources, are reused")
    parser.add_argument("--eager", action="store_true", help="also time torch eager full (slow on CPU)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="add a row: the last mode's graph exported with dynamic_batch=True (run at batch 2)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS_ONNX.md"))
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rfc_speed_onnx_"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = dit_s()
    variants: dict[str, RFCConfig] = {"full": RFCConfig(mode="full")}
    target_nfc = fixed_schedule_nfc(args.steps, args.warmup_steps, args.interval)
    threshold = args.threshold
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        config = RFCConfig(mode=mode, interval=args.interval, warmup_steps=args.warmup_steps, order=args.order)
        if mode == "rfc":
            if threshold is None:
                threshold = calibrated_threshold(model, args.steps, target_nfc, config)
            config = config.replace(threshold=threshold)
        variants[f"{mode} m={args.order}"] = config
    last_label, last_config = list(variants.items())[-1]  # the last mode, before the extra rows
    if not args.no_guard_row and len(variants) > 1:
        label, config = list(variants.items())[1]
        variants[f"{label}, guard_nonfinite off"] = config.replace(guard_nonfinite=False)
    dynamic: set[str] = set()
    if args.dynamic_batch and last_label != "full":
        dynamic.add(f"{last_label}, dynamic batch")
        variants[f"{last_label}, dynamic batch"] = last_config
    paths = {label: export_dit_s(model, config, workdir, label in dynamic) for label, config in variants.items()}

    runners = {label: OnnxCachedModel(path, providers=["CPUExecutionProvider"],
                                      session_options=session_options(args.threads))
               for label, path in paths.items()}
    times: dict[str, list[float]] = {label: [] for label in runners}
    cpu: dict[str, list[float]] = {label: [] for label in runners}
    # per-call CPU time of full and skipped steps (steps 0..warm-up excluded: first calls)
    step_ms: dict[str, dict[bool, list[float]]] = {label: {True: [], False: []} for label in runners}
    finals: dict[str, torch.Tensor] = {}
    nfc: dict[str, int] = {}
    full_steps: dict[str, set[int]] = {}
    for label, runner in runners.items():  # warm-up generation (not timed)
        finals[label], _, _ = generation(runner, args.steps)
        nfc[label] = runner.stats.nfc
        full_steps[label] = set(runner.stats.full_steps)
    order = list(runners)
    for r in range(args.repeats):
        for label in (order if r % 2 == 0 else order[::-1]):
            per_call: list[float] = []
            _, seconds, cpu_seconds = generation(runners[label], args.steps, per_call=per_call)
            times[label].append(seconds)
            cpu[label].append(cpu_seconds)
            for n, t in enumerate(per_call[args.warmup_steps:], start=args.warmup_steps):
                step_ms[label][n in full_steps[label]].append(t * 1e3)
            print(f"repeat {r}: {label:40s} {seconds:.3f}s wall {cpu_seconds:.3f}s CPU "
                  f"(NFC {runners[label].stats.nfc})", flush=True)

    eager_rows = []
    if args.eager:
        generation(model, args.steps)
        runs = [generation(model, args.steps) for _ in range(max(1, args.repeats // 2))]
        eager_rows.append(("torch eager full (reference)", args.steps, [w for _, w, _ in runs], [c for _, _, c in runs]))

    import onnxruntime as ort

    full_cpu = statistics.median(cpu["full"])
    lines = [
        BEGIN,
        "## onnxruntime: full vs RFC-cached graph (benchmarks/speed_onnx.py)",
        "",
        f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {platform.machine()} "
        f"({os.cpu_count()} logical CPUs, shared with other jobs), onnxruntime {ort.__version__} "
        f"CPUExecutionProvider, torch {torch.__version__}; ORT intra-op threads: {args.threads or 'default'}.",
        f"Model: DiTTransformer2DModel hidden 384 (6x64), depth 12, 4x32x32 latent, patch 2 (256 tokens), "
        f"batch 2 (CFG), random weights; {args.steps} DDIM steps. Cached rows: fixed interval {args.interval}, "
        f"warm-up {args.warmup_steps}, Taylor order {args.order} (full steps 0, 1, 5, 9, ...)"
        + (f"; `rfc`: RCS with threshold {threshold:.4g}, calibrated (bisection over eager generations) to the "
           f"fixed schedule's NFC {target_nfc}. " if threshold is not None else ". ") +
        f"{args.repeats} whole generations per variant, variants interleaved.",
        "",
        "Speed-up (CPU) compares the medians of process CPU time, which with one thread is what the "
        "generation costs, and is far steadier than wall time on a machine shared with other jobs; "
        "speed-up (wall) is the median over repeats of the full/cached wall-time ratio within a repeat. "
        "The per-step columns are medians of the CPU time of each model call (full and skipped steps "
        f"after the first {args.warmup_steps}, over all repeats); speed-up (per step) = "
        f"{args.steps} x full model's step / (NFC x full step + skipped x skipped step), the steadiest of the three "
        "on a shared machine.",
        "",
        "| run | NFC | wall s, median (min) | CPU s, median | speed-up (CPU) | speed-up (wall) "
        "| full step ms | skipped step ms | speed-up (per step) | ideal | final latents vs full, rel. L2 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    full_model_step = statistics.median(step_ms["full"][True])
    for label in runners:
        med = statistics.median(times[label])
        cpu_med = statistics.median(cpu[label])
        paired = statistics.median(f / c for f, c in zip(times["full"], times[label]))
        rel = ((finals[label] - finals["full"]).norm() / finals["full"].norm()).item()
        full_ms = statistics.median(step_ms[label][True])
        skip_ms = statistics.median(step_ms[label][False]) if step_ms[label][False] else 0.0
        per_step = args.steps * full_model_step / (nfc[label] * full_ms + (args.steps - nfc[label]) * skip_ms)
        skip_cell = f"{skip_ms:.1f}" if step_ms[label][False] else "-"
        lines.append(f"| ORT {label} | {nfc[label]} | {med:.2f} ({min(times[label]):.2f}) | {cpu_med:.2f} | "
                     f"{full_cpu / cpu_med:.2f}x | {paired:.2f}x | {full_ms:.1f} | "
                     f"{skip_cell} | {per_step:.2f}x | {args.steps / nfc[label]:.2f}x | {rel:.3g} |")
    for name, n, ts, cs in eager_rows:
        lines.append(f"| {name} | {n} | {statistics.median(ts):.2f} ({min(ts):.2f}) | {statistics.median(cs):.2f} | "
                     f"{full_cpu / statistics.median(cs):.2f}x | | | | | | |")
    notes = []
    for label in runners:
        if label == "full":
            continue
        skipped = args.steps - nfc[label]
        # what a skipped step costs relative to a full step of the full model (RFC bookkeeping on the
        # full steps is lumped in)
        frac = (statistics.median(cpu[label]) / full_cpu * args.steps - nfc[label]) / max(1, skipped)
        notes.append(f"`{label}`: (cached CPU time - {nfc[label]} full-model steps) / {skipped} skipped steps "
                     f"= {max(frac, 0) * 100:.0f}% of a full step")
    lines += [""] + [f"- {n}" for n in notes] + [
        "",
        f"Command: `python benchmarks/speed_onnx.py --steps {args.steps} --repeats {args.repeats} "
        f"--modes {args.modes} --interval {args.interval} --order {args.order} --threads {args.threads}"
        f"{f' --threshold {args.threshold:g}' if args.threshold is not None else ''}"
        f"{' --dynamic-batch' if args.dynamic_batch else ''}`",
        END,
    ]
    publish(None if args.no_write else Path(args.results), lines, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
