"""onnxruntime: full compute vs the RFC-cached ONNX graph on a DiT-S-sized model (a benchmark, not a test).

DiTTransformer2DModel with hidden 384 (6 heads x 64), depth 12, 4x32x32 latent, patch 2
(256 tokens), batch 2 (one class + CFG's null class), random weights; 50 DDIM steps.
The cached graph uses a fixed schedule (default TaylorSeer-style ``rfe`` with warm-up 2 and
interval 4: full steps 0, 1, 5, ..., 49 -> NFC 14 of 50, the paper's DiT setting), so both
runs do the same work every repeat. Each configuration is timed over whole generations;
the table reports the median (and min) of ``--repeats`` runs, full and cached interleaved.

    python benchmarks/speed_onnx.py                      # writes its section of RESULTS_ONNX.md
    python benchmarks/speed_onnx.py --threads 1 --repeats 7 --no-write

The script rewrites only its own section of benchmarks/RESULTS_ONNX.md (between the
``speed_onnx`` markers), so other sections of that file are kept.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rfc_compile import RFCConfig  # noqa: E402
from rfc_compile.export import OnnxCachedModel, to_onnx  # noqa: E402
from rfc_compile.export.models import dit_s  # noqa: E402

BEGIN, END = "<!-- speed_onnx:begin -->", "<!-- speed_onnx:end -->"


def generation(model, steps: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """A DDIM loop with CFG (batch 2 = class + null); returns final latents and seconds."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 32, 32, generator=gen)
    labels = torch.tensor([207, 1000])
    start = time.perf_counter()
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents])
        with torch.no_grad():
            out = model(hidden_states=x, timestep=t.expand(2), class_labels=labels, return_dict=False)[0]
        eps = out[:, :4]
        cond, uncond = eps.chunk(2)
        latents = scheduler.step(uncond + 4.0 * (cond - uncond), t, latents).prev_sample
    return latents, time.perf_counter() - start


def session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mode", default="rfe", choices=["fora", "taylorseer", "rfe"])
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT default)")
    parser.add_argument("--workdir", default=None, help="where to write the ONNX files (default: a temp dir)")
    parser.add_argument("--no-eager", action="store_true", help="skip the torch eager reference rows")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS_ONNX.md"))
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rfc_speed_onnx_"))
    model = dit_s()
    example = dict(hidden_states=torch.randn(2, 4, 32, 32), timestep=torch.full((2,), 999, dtype=torch.long),
                   class_labels=torch.tensor([207, 1000]))
    cached_config = RFCConfig(mode=args.mode, interval=args.interval, warmup_steps=args.warmup_steps)
    exports = {}
    for label, config in (("full", RFCConfig(mode="full")), ("cached", cached_config)):
        t0 = time.perf_counter()
        exports[label] = to_onnx(model, workdir / f"dit_s_{label}.onnx", example, config)
        print(f"exported {label} in {time.perf_counter() - t0:.1f}s -> {exports[label].onnx_path}", flush=True)

    runners = {label: OnnxCachedModel(e.onnx_path, providers=["CPUExecutionProvider"],
                                      session_options=session_options(args.threads))
               for label, e in exports.items()}
    times: dict[str, list[float]] = {label: [] for label in runners}
    finals: dict[str, torch.Tensor] = {}
    nfc: dict[str, int] = {}
    for label, runner in runners.items():  # warm-up generation (not timed)
        finals[label], _ = generation(runner, args.steps)
        nfc[label] = runner.stats.nfc
    for r in range(args.repeats):
        for label in (runners if r % 2 == 0 else reversed(list(runners))):
            _, seconds = generation(runners[label], args.steps)
            times[label].append(seconds)
            print(f"repeat {r}: ort {label:6s} {seconds:.3f}s (NFC {runners[label].stats.nfc})", flush=True)

    eager_rows = []
    if not args.no_eager:
        import rfc_compile

        for label, config in (("full", None), ("cached", cached_config)):
            runner = model if config is None else rfc_compile.optimize(model, config)
            generation(runner, args.steps)
            eager_times = [generation(runner, args.steps)[1] for _ in range(max(1, args.repeats // 2))]
            eager_nfc = args.steps if config is None else runner.stats.nfc
            eager_rows.append((f"torch eager {label}", eager_nfc, eager_times))
            print(f"torch eager {label}: median {statistics.median(eager_times):.3f}s", flush=True)

    full_med = statistics.median(times["full"])
    cached_med = statistics.median(times["cached"])
    diff = (finals["cached"] - finals["full"]).abs().max().item()
    rel = ((finals["cached"] - finals["full"]).norm() / finals["full"].norm()).item()
    import onnxruntime as ort

    lines = [
        BEGIN,
        "## onnxruntime: full vs RFC-cached graph (benchmarks/speed_onnx.py)",
        "",
        f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {platform.machine()} "
        f"({os.cpu_count()} logical CPUs, shared with other jobs), onnxruntime {ort.__version__} "
        f"CPUExecutionProvider, torch {torch.__version__}; intra-op threads: {args.threads or 'ORT default'}.",
        f"Model: DiTTransformer2DModel hidden 384 (6x64), depth 12, 4x32x32 latent, patch 2, batch 2 (CFG), "
        f"random weights; {args.steps} DDIM steps; cached = mode `{args.mode}`, warm-up {args.warmup_steps}, "
        f"interval {args.interval}. Median (min) of {args.repeats} generations, full/cached interleaved.",
        "",
        "| run | NFC | s / generation, median (min) | speed-up vs ORT full |",
        "| --- | ---: | ---: | ---: |",
        f"| ORT full | {nfc['full']} | {full_med:.3f} ({min(times['full']):.3f}) | 1.00x |",
        f"| ORT RFC-cached | {nfc['cached']} | {cached_med:.3f} ({min(times['cached']):.3f}) | "
        f"{full_med / cached_med:.2f}x |",
    ]
    for name, n, ts in eager_rows:
        med = statistics.median(ts)
        lines.append(f"| {name} | {n} | {med:.3f} ({min(ts):.3f}) | {full_med / med:.2f}x |")
    ideal = args.steps / nfc["cached"]
    lines += [
        "",
        f"Ideal speed-up at NFC {nfc['cached']}/{args.steps}: {ideal:.2f}x (skipped steps free). "
        f"Achieved {full_med / cached_med:.2f}x, i.e. a skipped step costs about "
        f"{max(0.0, (cached_med / full_med * args.steps - nfc['cached']) / max(1, args.steps - nfc['cached'])) * 100:.0f}% "
        "of a full step (cheap ops, predictions, state I/O).",
        f"Cached vs full final latents (random weights, so only a sanity check): max |diff| {diff:.3g}, "
        f"relative L2 {rel:.3g}.",
        "",
        f"Command: `python benchmarks/speed_onnx.py --steps {args.steps} --repeats {args.repeats} --mode {args.mode} "
        f"--interval {args.interval} --threads {args.threads}`",
        END,
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        path = Path(args.results)
        text = path.read_text() if path.exists() else "# ONNX / TensorRT results\n\n"
        if BEGIN in text and END in text:
            text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
