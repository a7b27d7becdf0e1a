"""The torch.compile path on a CUDA GPU: compiled full model vs rfc_compile with
``backend="inductor"`` on the DiT-S-sized model (a GPU benchmark, not a test).

    python benchmarks/compile_cuda.py run OUT [--batches 2,32]   # GPU machine: torch with CUDA, diffusers
    python benchmarks/compile_cuda.py render OUT/compile_cuda.json  # here: writes RESULTS.md's section
    python benchmarks/compile_cuda.py run OUT --device cpu --steps 6 --batches 2 --repeats 1  # smoke run

``run``, per batch (CFG: half class 207, half the null class), 50-step DDIM with CUDA tensors:
  1. speed: eager full, ``torch.compile(fullgraph=True)`` full, TaylorSeer and RFE at NFC 14/50
     (fixed interval 4, warm-up 2, order 2) compiled by rfc_compile; each row built and warmed up
     (compiled) first, then timed round-robin; median seconds per generation;
  2. correctness: the compiled RFE row's warm-up generation against the same config on the eager
     backend, on the GPU: same full steps, and the final latents' relative error.

The model is rfc_compile.export.models.dit_s (random weights, the one benchmarks/ort_cuda.py and
speed_onnx.py time), so the rows compare with ort_cuda.py's onnxruntime CUDA rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import rfc_compile  # noqa: E402
from ort_cuda import ddim_generation_cuda  # noqa: E402  (benchmarks/ort_cuda.py)
from rfc_compile import RFCConfig  # noqa: E402
from rfc_compile.export.models import dit_s  # noqa: E402
from results_onnx import publish  # noqa: E402

BEGIN, END = "<!-- compile_cuda:begin -->", "<!-- compile_cuda:end -->"
CACHED = {"taylorseer": RFCConfig(mode="taylorseer", interval=4, warmup_steps=2, order=2),
          "rfe": RFCConfig(mode="rfe", interval=4, warmup_steps=2, order=2)}


def _rows(model: torch.nn.Module, steps: int) -> dict:
    """label -> (callable, full steps of the last generation, reset)."""
    every = lambda: list(range(steps))  # noqa: E731
    rows = {"eager full": (model, every, lambda: None),
            "compiled full": (torch.compile(model, fullgraph=True), every, lambda: None)}
    for label, config in CACHED.items():
        cached = rfc_compile.optimize(model, config, backend="inductor")
        rows[f"{label} compiled"] = (cached, lambda c=cached: c.stats.full_steps, cached.reset)
    return rows


def _eager_rfe(model: torch.nn.Module, batch: int, steps: int, device: str) -> tuple[torch.Tensor, list[int]]:
    """The reference for the compiled RFE row: the same config on the eager backend, same GPU."""
    cached = rfc_compile.optimize(model, CACHED["rfe"], backend="eager")
    latents, _ = ddim_generation_cuda(cached, steps, batch, device)
    return latents, cached.stats.full_steps


def _speed(model: torch.nn.Module, batch: int, steps: int, device: str, repeats: int) -> tuple[dict, dict]:
    """Every row warmed up (compiled) by one generation, then timed round-robin; and the compiled
    RFE row's warm-up generation checked against the eager backend."""
    rows, times, warmup, nfc, finals = _rows(model, steps), {}, {}, {}, {}
    for label, (run, full_steps, reset) in rows.items():
        start = time.perf_counter()
        reset()
        finals[label] = ddim_generation_cuda(run, steps, batch, device)[0], list(full_steps())
        warmup[label] = time.perf_counter() - start
        times[label] = []
        print(f"batch {batch}: {label} warmed up in {warmup[label]:.1f} s", flush=True)
    (compiled, compiled_full), (eager, eager_full) = finals["rfe compiled"], _eager_rfe(model, batch, steps, device)
    check = {"eager_full_steps": eager_full, "compiled_full_steps": compiled_full,
             "same_full_steps": eager_full == compiled_full,
             "rel_l2": ((compiled - eager).norm() / eager.norm()).item()}
    print(f"batch {batch} correctness", json.dumps(check), flush=True)
    for r in range(repeats):
        for label in (list(rows) if r % 2 == 0 else list(rows)[::-1]):
            run, full_steps, reset = rows[label]
            reset()
            times[label].append(ddim_generation_cuda(run, steps, batch, device)[1])
            nfc[label] = len(full_steps())
    speed = {label: {"nfc": nfc[label], "seconds": times[label], "warmup_s": warmup[label]} for label in rows}
    return speed, check


def run(out_dir: Path, batches: list[int], repeats: int, steps: int, device: str) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = dit_s().to(device)
    gpu = torch.cuda.get_device_name(0) if device != "cpu" else "cpu"
    result = {"environment": {"gpu": gpu, "torch": torch.__version__, "steps": steps,
                              "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")},
              "batches": {}}
    print(json.dumps(result["environment"]), flush=True)
    failures = 0
    for batch in batches:
        speed, check = _speed(model, batch, steps, device, repeats)
        failures += not (check["same_full_steps"] and check["rel_l2"] < 1e-3)
        result["batches"][str(batch)] = {"correctness": check, "speed": speed}
        (out_dir / "compile_cuda.json").write_text(json.dumps(result, indent=1))  # partial results survive a timeout
        for label, row in result["batches"][str(batch)]["speed"].items():
            print(f"batch {batch} {label}: NFC {row['nfc']}, median {statistics.median(row['seconds']):.4f} s", flush=True)
    print(f"failures: {failures}")
    return 1 if failures else 0


def render(result_file: Path, results: Path) -> None:
    result = json.loads(result_file.read_text())
    env = result["environment"]
    steps = env["steps"]
    lines = [BEGIN, "## The compiled path on a GPU (benchmarks/compile_cuda.py)", "",
             f"Measured {env['date']} on {env['gpu']}, torch {env['torch']}, TF32 off. DiT-S-sized model "
             "(rfc_compile.export.models.dit_s: hidden 384, depth 12, 256 tokens, random weights), "
             f"{steps}-step DDIM "
             "with CFG, CUDA tensors; cached rows: fixed interval 4, warm-up 2, order 2 (NFC 14/50), "
             "`rfc_compile.optimize(model, config, backend=\"inductor\")`; compiled full: "
             "`torch.compile(model, fullgraph=True)`; default inductor options (no CUDA graphs).", ""]
    for batch, entry in result["batches"].items():
        check, speed = entry["correctness"], entry["speed"]
        base = statistics.median(speed["compiled full"]["seconds"])
        lines += [f"Batch {batch} ({int(batch) // 2} image(s) with CFG). Compiled RFE vs eager-backend RFE on the GPU: "
                  f"same full steps: {check['same_full_steps']} ({len(check['compiled_full_steps'])} full steps), "
                  f"final latents relative L2 {check['rel_l2']:.1e}.", "",
                  "| row | NFC | s / generation, median (min) | vs compiled full | ideal | warm-up s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for label, row in speed.items():
            med = statistics.median(row["seconds"])
            lines.append(f"| {label} | {row['nfc']} | {med:.4f} ({min(row['seconds']):.4f}) | {base / med:.2f}x | "
                         f"{steps / row['nfc']:.2f}x | {row['warmup_s']:.0f} |")
        lines.append("")
    lines += [f"{len(speed['compiled full']['seconds'])} generations per row, rows interleaved. Commands: "
              "`python benchmarks/compile_cuda.py run OUT` (GPU machine), "
              "`python benchmarks/compile_cuda.py render OUT/compile_cuda.json`", END]
    publish(results, lines, BEGIN, END)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("out")
    r.add_argument("--batches", default="2,32")
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--device", default="cuda")
    w = sub.add_parser("render")
    w.add_argument("result")
    w.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.command == "run":
        return run(Path(args.out), [int(b) for b in args.batches.split(",")], args.repeats, args.steps, args.device)
    render(Path(args.result), Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
