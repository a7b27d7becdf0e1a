"""Where a cached ONNX graph's time goes: onnxruntime's profiler, kernel time per op type (a benchmark).

Exports the DiT-S-sized model of ``speed_onnx.py`` (full, and the cached modes asked for), runs
one generation of each with ``SessionOptions.enable_profiling``, and prints, per graph, the median
kernel time of a full and of a skipped step grouped by op type, nodes inside the ``If`` branches
included (the ``If`` row is only what it takes beyond them). Comparing a cached graph's full step with the full model's says what the RFC bookkeeping
costs; its skipped step says what a prediction costs.

    python benchmarks/profile_onnx.py --modes taylorseer,rfe --steps 20 --top 12

Prints only (profiles are noisy on a shared machine; speed_onnx.py writes the numbers that count).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rfc_compile import RFCConfig  # noqa: E402
from rfc_compile.export import OnnxCachedModel  # noqa: E402
from rfc_compile.export.models import dit_s  # noqa: E402
from speed_onnx import export_dit_s, generation, session_options  # noqa: E402  (benchmarks/speed_onnx.py)


IF_OWN = "If (beyond its nodes)"


def kernel_ms_per_run(profile: Path) -> list[collections.Counter]:
    """Kernel time (ms) per op type for each ``InferenceSession.run`` recorded in an ORT profile.

    An ``If`` node's event spans the kernels of the branch it ran, which are recorded as well:
    the branch's nodes count under their own op types, and only what the ``If`` takes beyond
    them (running a subgraph, its outputs) counts as ``IF_OWN``."""
    events = json.loads(profile.read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    kernels = sorted((e for e in events
                      if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                     key=lambda e: e["ts"])
    per_run = [collections.Counter() for _ in runs]
    starts = [r["ts"] for r in runs]
    for event in kernels:
        index = bisect.bisect_right(starts, event["ts"]) - 1  # the last run that started before it
        if index < 0:
            continue
        op = event.get("args", {}).get("op_name", "?")
        if op == "If":
            end = event["ts"] + event["dur"]
            inner = sum(e["dur"] for e in kernels if e is not event and event["ts"] <= e["ts"] < end)
            per_run[index][IF_OWN] += (event["dur"] - inner) / 1e3
        else:
            per_run[index][op] += event["dur"] / 1e3
    return per_run


def summarise(per_run: list[collections.Counter], runs: list[int]) -> tuple[float, dict[str, float]]:
    """Median total kernel ms over ``runs`` and the median ms per op type."""
    if not runs:
        return 0.0, {}
    totals = statistics.median(sum(per_run[i].values()) for i in runs)
    ops = {op for i in runs for op in per_run[i]}
    return totals, {op: statistics.median(per_run[i].get(op, 0.0) for i in runs) for op in ops}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="taylorseer,rfe")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--order", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="op types to list per step kind")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="ONNX files (reused when the same sources exported them)")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    torch.set_num_threads(max(1, args.threads))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rfc_profile_onnx_"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = dit_s()
    variants = {"full": RFCConfig(mode="full")}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        variants[mode] = RFCConfig(mode=mode, interval=args.interval, order=args.order)
    reference: dict[str, float] = {}
    for label, config in variants.items():
        path = export_dit_s(model, config, workdir)
        options = session_options(args.threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(workdir / f"profile_{label}")
        runner = OnnxCachedModel(path, providers=["CPUExecutionProvider"], session_options=options)
        generation(runner, args.steps)
        full_steps = set(runner.stats.full_steps)
        profile = Path(runner.session.end_profiling())
        per_run = kernel_ms_per_run(profile)
        for kind, steps in (("full", [n for n in range(2, args.steps) if n in full_steps]),
                            ("skipped", [n for n in range(2, args.steps) if n not in full_steps])):
            total, ops = summarise(per_run, steps)
            if not steps:
                continue
            print(f"\n{label}, {kind} step (median of {len(steps)}): {total:.1f} ms kernel time")
            for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
                delta = "" if label == "full" or kind != "full" else f"  ({ms - reference.get(op, 0.0):+.1f} vs full model)"
                print(f"  {op:24s} {ms:8.2f}{delta}")
            if label == "full":
                reference = ops
    return 0


if __name__ == "__main__":
    sys.exit(main())
