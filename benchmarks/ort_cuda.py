"""onnxruntime's CUDA execution provider: the exported RFC step on a GPU (a GPU check, not a test).

Three stages, because the GPU machine this runs on has no internet, an older torch, and no
room for model weights in what can be carried to it:

    python benchmarks/ort_cuda.py prepare DIR   # here (CPU): export graphs, record eager generations
    python benchmarks/ort_cuda.py check DIR OUT # on the GPU machine (onnxruntime-gpu): compare, time
    python benchmarks/ort_cuda.py render OUT/ort_cuda.json   # here: write RESULTS_ONNX.md's section

``prepare`` exports tiny DiT and FLUX graphs (fixed-interval RFE and RCS modes) and records,
for a whole generation of the eager cached model (rfc_compile.optimize), every step's inputs
and output and the steps that ran in full (the tiny models are tests/conftest.py's). It also
exports DiT-S-sized graphs (full, TaylorSeer and RFE at NFC 14/50; batch 2 as in
benchmarks/speed_onnx.py and batch 32, i.e. 16 images with CFG: ``--batches``) with their weights
moved to external data that is *not* written: ``check`` regenerates every parameter as
N(0, 0.02^2), the distribution rfc_compile.export.models.dit_s draws them from (buffers such as
the positional embedding are kept). Timing does not depend on the values.

``check`` runs on the GPU with ``OnnxCachedModel(path, providers=[CUDA])``:
  1. each recorded generation, step by step with the recorded inputs (teacher-forced), inputs
     given as CUDA torch tensors (IOBinding on the device) and again as host tensors; the
     steps that ran in full must equal eager's and every output must match eager's (atol 1e-4,
     TF32 off); the cache state must stay on the GPU (the OrtValues' device);
  2. DiT-S: whole 50-step DDIM generations with CFG, full vs cached graphs, CUDA tensors in and
     out, median of repeats, variants interleaved, per batch.

The GPU machine needs onnxruntime-gpu (CUDA 12/13 build matching its driver), torch with CUDA,
onnx and diffusers; it does not need TensorRT (benchmarks/gpu_check.sh is the TensorRT check).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_onnx import publish  # noqa: E402  (benchmarks/results_onnx.py)

BEGIN, END = "<!-- ort_cuda:begin -->", "<!-- ort_cuda:end -->"
ATOL = 1e-4
STEPS = 30
DIT_S_STEPS = 50
WEIGHT_STD = 0.02  # rfc_compile.export.models.dit_s: every parameter is randn * 0.02


# --- prepare (CPU machine) ------------------------------------------------------------------------

class _Recorder:
    """Calls a cached model and keeps each step's tensor inputs and output."""

    def __init__(self, model):
        self.model = model
        self.steps: list[dict[str, np.ndarray]] = []

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        record = {k: v.detach().cpu().numpy().copy() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        record["__output__"] = out[0].detach().cpu().numpy().copy()
        self.steps.append(record)
        return out


def _prepare_case(name: str, build, config, example: dict, generate, out_dir: Path) -> dict:
    import rfc_compile
    from rfc_compile.export import to_onnx

    path = to_onnx(build(), out_dir / f"{name}.onnx", example, config).onnx_path
    cached = rfc_compile.optimize(build(), config)
    recorder = _Recorder(cached)
    generate(recorder)
    arrays = {f"{n}.{k}": v for n, step in enumerate(recorder.steps) for k, v in step.items()}
    np.savez_compressed(out_dir / f"{name}.steps.npz", **arrays)
    print(f"{name}: {len(recorder.steps)} steps, full steps {cached.stats.full_steps}", flush=True)
    return {"onnx": path.name, "steps": len(recorder.steps), "full_steps": cached.stats.full_steps,
            "mode": config.mode}


def _strip_weights(path: Path, min_bytes: int = 1 << 16) -> dict:
    """Move the weights to an external-data file, then delete that file (it is regenerated on the
    GPU machine). Weights are the float tensors of at least ``min_bytes``: initializers and the
    Constant nodes the exporter writes inside the If branches (onnx's external-data helper walks
    both), except the positional embedding, a buffer, which stays with everything small."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, set_external_data

    proto = onnx.load(str(path))
    data_name = path.name + ".weights"
    offset, moved = 0, 0
    for tensor in _get_all_tensors(proto):
        if (not tensor.HasField("raw_data") or len(tensor.raw_data) < min_bytes or "pos_embed" in tensor.name
                or tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)):
            continue
        length = len(tensor.raw_data)
        set_external_data(tensor, location=data_name, offset=offset, length=length)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        offset += length
        moved += 1
    onnx.save_model(proto, str(path))
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    return {"weights_file": data_name, "weights_bytes": offset, "tensors": moved,
            "graph_bytes": path.stat().st_size}


def prepare(out_dir: Path, batches: list[int]) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import FAMILIES, NUM_CLASSES, ddim_generation, flow_generation, make_tiny_dit

    from rfc_compile import RFCConfig
    from rfc_compile.export import to_onnx
    from rfc_compile.export.models import dit_s

    torch.manual_seed(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"cases": {}, "dit_s": {}}
    dit_example = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.full((2,), 999, dtype=torch.long),
                       class_labels=torch.tensor([1, NUM_CLASSES]))
    flux = FAMILIES["flux"]
    gen = torch.Generator().manual_seed(0)
    flux_example = dict(hidden_states=torch.randn(2, *flux.latent_shape), timestep=torch.ones(2),
                        **flux.conditions(2, gen))
    cases = {
        "dit_rfe": (make_tiny_dit, RFCConfig(mode="rfe", interval=3), dit_example,
                    lambda m: ddim_generation(m, steps=STEPS, cfg=True)),
        "dit_rfc": (make_tiny_dit, RFCConfig(mode="rfc", threshold=0.8), dit_example,
                    lambda m: ddim_generation(m, steps=STEPS, cfg=True)),
        "flux_rfe": (flux.build, RFCConfig(mode="rfe", interval=3, order=1), flux_example,
                     lambda m: flow_generation(m, flux, steps=20)),
        "flux_rfc": (flux.build, RFCConfig(mode="rfc", threshold=flux.threshold, order=1), flux_example,
                     lambda m: flow_generation(m, flux, steps=20)),
    }
    for name, (build, config, example, generate) in cases.items():
        manifest["cases"][name] = _prepare_case(name, build, config, example, generate, out_dir)

    model = dit_s()
    variants = {"full": RFCConfig(mode="full"),
                "taylorseer m=2": RFCConfig(mode="taylorseer", interval=4, warmup_steps=2, order=2),
                "rfe m=2": RFCConfig(mode="rfe", interval=4, warmup_steps=2, order=2)}
    for batch in batches:  # CFG: half class 207, half the null class
        example = dict(hidden_states=torch.randn(batch, 4, 32, 32),
                       timestep=torch.full((batch,), 999, dtype=torch.long),
                       class_labels=torch.tensor([207] * (batch // 2) + [1000] * (batch // 2)))
        manifest["dit_s"][str(batch)] = {}
        for label, config in variants.items():
            slug = f"dit_s_b{batch}_" + label.split()[0]
            path = to_onnx(model, out_dir / f"{slug}.onnx", example, config, check=False).onnx_path
            manifest["dit_s"][str(batch)][label] = {"onnx": path.name, **_strip_weights(path)}
            print(f"batch {batch}, {label}: {manifest['dit_s'][str(batch)][label]}", flush=True)
    manifest["prepared_with"] = {"torch": torch.__version__}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"prepared {out_dir}")


# --- check (GPU machine) --------------------------------------------------------------------------

def _regenerate_weights(path: Path, seed: int = 0) -> Path:
    """Write the weights _strip_weights left out, every one N(0, WEIGHT_STD^2), and save the graph
    with them inline as ``<name>.full.onnx`` (onnxruntime then needs no external data)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    proto = onnx.load(str(path), load_external_data=False)
    rng = np.random.default_rng(seed)
    with open(path.parent / (path.name + ".weights"), "wb") as data:
        for tensor in _get_all_tensors(proto):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            values = (rng.standard_normal(int(np.prod(tensor.dims))) * WEIGHT_STD).astype(dtype)
            assert values.nbytes == int(info["length"]), tensor.name
            data.seek(int(info["offset"]))
            data.write(values.tobytes())
    proto = onnx.load(str(path))  # now with the weights
    for tensor in _get_all_tensors(proto):
        tensor.ClearField("external_data")
        tensor.data_location = onnx.TensorProto.DEFAULT
    full = path.with_name(path.stem + ".full.onnx")
    onnx.save_model(proto, str(full))
    full.with_name(full.name + ".rfc.json").write_bytes(path.with_name(path.name + ".rfc.json").read_bytes())
    return full


def _teacher_forced(runner, steps: int, arrays, as_cuda: bool) -> tuple[float, list[int]]:
    """Feed each recorded step's inputs; the largest |ORT - eager| over all outputs."""
    runner.reset()
    worst = 0.0
    for n in range(steps):
        kwargs = {}
        for key in arrays.files:
            prefix, _, name = key.partition(".")
            if prefix == str(n) and name != "__output__":
                tensor = torch.from_numpy(arrays[key])
                kwargs[name] = tensor.cuda() if as_cuda else tensor
        out = runner(**kwargs, return_dict=False)[0]
        if as_cuda:
            assert out.is_cuda, "CUDA inputs must give a CUDA output"
        expected = torch.from_numpy(arrays[f"{n}.__output__"])
        worst = max(worst, (out.float().cpu() - expected).abs().max().item())
    return worst, runner.stats.full_steps


def _state_devices(runner) -> set[str]:
    return {value.device_name().lower() for buffers in runner._buffers for value in buffers.values()}


def ddim_generation_cuda(runner, steps: int, batch: int, device: str = "cuda") -> tuple[torch.Tensor, float]:
    """DDIM with CFG (``batch // 2`` images: class 207 + the null class), tensors on ``device``
    (a GPU; "cpu" for smoke runs of the scripts that use this); wall seconds."""
    from diffusers import DDIMScheduler

    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    latents = torch.randn(batch // 2, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.tensor([207] * (batch // 2) + [1000] * (batch // 2), device=device)
    sync()
    start = time.perf_counter()
    for t in scheduler.timesteps:  # the scheduler indexes host tables with t: keep it on the host
        x = torch.cat([latents, latents])
        eps = runner(hidden_states=x, timestep=t.expand(batch).to(device), class_labels=labels,
                     return_dict=False)[0][:, :4]
        cond, uncond = eps.chunk(2)
        latents = scheduler.step(uncond + 4.0 * (cond - uncond), t, latents).prev_sample
    sync()
    return latents, time.perf_counter() - start


def _time_dit_s(prepared: Path, entries: dict, batch: int, repeats: int) -> dict:
    """Whole DDIM generations per variant (one untimed warm-up each), variants interleaved."""
    from rfc_compile.export import OnnxCachedModel

    runners = {label: OnnxCachedModel(_regenerate_weights(prepared / entry["onnx"]), providers=["CUDAExecutionProvider"])
               for label, entry in entries.items()}
    finals, times = {}, {label: [] for label in runners}
    for label, runner in runners.items():
        finals[label], _ = ddim_generation_cuda(runner, DIT_S_STEPS, batch)
    for r in range(repeats):
        for label in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            times[label].append(ddim_generation_cuda(runners[label], DIT_S_STEPS, batch)[1])
    rows = {}
    for label, runner in runners.items():
        rel = ((finals[label] - finals["full"]).norm() / finals["full"].norm()).item()
        rows[label] = {"nfc": runner.stats.nfc, "seconds": times[label], "rel_l2_vs_full": rel}
        print(f"batch {batch}", label, json.dumps(rows[label]), flush=True)
    return rows


def check(prepared: Path, out_dir: Path, repeats: int) -> int:
    import onnxruntime as ort

    from rfc_compile.export import OnnxCachedModel

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((prepared / "manifest.json").read_text())
    result: dict = {"environment": {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(), "prepared_with": manifest.get("prepared_with"),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}, "cases": {}, "speed": {}}
    print(json.dumps(result["environment"]), flush=True)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("CUDAExecutionProvider is not available", flush=True)
        return 3
    exact = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    failures = 0
    for name, case in manifest["cases"].items():
        arrays = np.load(prepared / f"{name}.steps.npz")
        runner = OnnxCachedModel(prepared / case["onnx"], providers=exact)
        if runner.providers[0] != "CUDAExecutionProvider":  # onnxruntime falls back to CPU with a warning
            print(f"{name}: the session runs on {runner.providers}, not CUDA", flush=True)
            return 4
        row = {"mode": case["mode"], "steps": case["steps"], "eager_full_steps": case["full_steps"],
               "session_providers": runner.providers}
        for how, as_cuda in (("cuda tensors", True), ("host tensors", False)):
            worst, full_steps = _teacher_forced(runner, case["steps"], arrays, as_cuda)
            ok = full_steps == case["full_steps"] and worst < ATOL
            row[how] = {"max_abs_diff": worst, "full_steps": full_steps, "ok": ok}
            failures += not ok
        row["state_devices"] = sorted(_state_devices(runner))
        failures += row["state_devices"] != ["cuda"]
        result["cases"][name] = row
        print(name, json.dumps(row), flush=True)

    for batch, entries in manifest["dit_s"].items():
        result["speed"][batch] = _time_dit_s(prepared, entries, int(batch), repeats)
    result["failures"] = failures
    (out_dir / "ort_cuda.json").write_text(json.dumps(result, indent=1))
    print(f"failures: {failures}")
    return 1 if failures else 0


# --- render (back on the CPU machine) ---------------------------------------------------------------

def render(result_file: Path, results: Path) -> None:
    result = json.loads(result_file.read_text())
    if "full" in result["speed"]:  # written before the per-batch layout: batch 2 only
        result["speed"] = {"2": result["speed"]}
    env = result["environment"]
    lines = [BEGIN, "## onnxruntime CUDA execution provider (benchmarks/ort_cuda.py)", "",
             f"Measured {env['date']} on {env['gpu']}, onnxruntime-gpu {env['onnxruntime']}, torch {env['torch']} "
             f"(graphs exported with torch {env['prepared_with']['torch']} on the CPU machine).", "",
             "Whole generations, teacher-forced (each step gets the eager run's recorded inputs), "
             "CUDAExecutionProvider with TF32 off, against the eager cached model (rfc_compile.optimize):", "",
             "| graph | mode | steps | eager full steps | input tensors | ORT full steps equal | max abs diff | "
             "state on | ok |",
             "| --- | --- | ---: | --- | --- | --- | ---: | --- | --- |"]
    for name, row in result["cases"].items():
        for how in ("cuda tensors", "host tensors"):
            r = row[how]
            lines.append(f"| {name} | {row['mode']} | {row['steps']} | {row['eager_full_steps']} | {how} | "
                         f"{r['full_steps'] == row['eager_full_steps']} | {r['max_abs_diff']:.2e} | "
                         f"{'/'.join(row['state_devices'])} | {'yes' if r['ok'] else 'NO'} |")
    for batch, speed in result["speed"].items():
        full = statistics.median(speed["full"]["seconds"])
        lines += ["", f"DiT-S-sized model (hidden 384, depth 12, 256 tokens), batch {batch} ({int(batch) // 2} image(s) "
                  f"with CFG), random weights N(0, 0.02^2); {DIT_S_STEPS}-step DDIM, CUDA tensors in and out "
                  f"(IOBinding), default CUDA EP options; {len(speed['full']['seconds'])} generations per variant, "
                  "interleaved:", "",
                  "| run | NFC | s / generation, median (min) | speed-up | ideal |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for label, row in speed.items():
            med = statistics.median(row["seconds"])
            lines.append(f"| ORT CUDA {label}, batch {batch} | {row['nfc']} | {med:.4f} ({min(row['seconds']):.4f}) | "
                         f"{full / med:.2f}x | {DIT_S_STEPS / row['nfc']:.2f}x |")
        lines += ["", "Timing only: the weights are regenerated per graph, in that graph's own tensor order, and "
                  "where the exporter stored a weight twice (a transposed copy, `val_*`) the copies are drawn "
                  "apart, so the full and cached graphs run different random networks; the final-latents error "
                  "against full (in the JSON) means nothing here. The CPU table above has it for identical weights."]
    lines += ["", "Commands: `python benchmarks/ort_cuda.py prepare DIR` (CPU machine), "
              "`python benchmarks/ort_cuda.py check DIR OUT` (GPU machine, onnxruntime-gpu), "
              "`python benchmarks/ort_cuda.py render OUT/ort_cuda.json`", END]
    publish(results, lines, BEGIN, END)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir")
    p.add_argument("--batches", default="2,32", help="DiT-S serving batches to export (CFG doubles the images)")
    c = sub.add_parser("check")
    c.add_argument("dir")
    c.add_argument("out")
    c.add_argument("--repeats", type=int, default=7)
    r = sub.add_parser("render")
    r.add_argument("result")
    r.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS_ONNX.md"))
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.command == "prepare":
        prepare(Path(args.dir), [int(b) for b in args.batches.split(",")])
    elif args.command == "check":
        return check(Path(args.dir), Path(args.out), args.repeats)
    else:
        render(Path(args.result), Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
