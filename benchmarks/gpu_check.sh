#!/usr/bin/env bash
# GPU check of the export path: run on a machine with a CUDA GPU, a CUDA build of torch and
# TensorRT's Python package (pip install tensorrt; it cannot be installed on CPU-only machines).
#
#   1. export a tiny DiT (modes full and rfc) with `rfc-compile export` (the CLI builds an fp32
#      TensorRT engine next to each ONNX file, with a progress bar per build phase)
#   2. polygraphy: TensorRT vs onnxruntime on the same (random) inputs, state included
#   3. the CUDA/TensorRT tests of tests/test_export.py (ORT/TRT runner vs eager, whole generation;
#      one FLUX engine with dynamic batch/image/text tokens at three shapes of its profile)
#   4. DiT-S-sized model (hidden 384, depth 12, 32x32 latent, batch 2): full vs RFC engines
#      (fixed interval 4, warm-up 2 -> NFC 14 of 50), fp16, median seconds per 50-step generation;
#      also onnxruntime's CUDA EP when onnxruntime-gpu is installed
#
#   bash benchmarks/gpu_check.sh            # OUT=/tmp/rfc_gpu_check by default
#
# Without TensorRT (onnxruntime-gpu only), benchmarks/ort_cuda.py checks the CUDA execution
# provider against the eager cached model and times full vs cached DiT-S graphs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-${TMPDIR:-/tmp}/rfc_gpu_check}
mkdir -p "$OUT"
POLYGRAPHY=${POLYGRAPHY:-$(dirname "$PY")/polygraphy}
[ -x "$POLYGRAPHY" ] || POLYGRAPHY=polygraphy

echo "== 0. environment"
"$PY" - <<'EOF'
import sys
import torch
from rfc_compile.export import tensorrt_available
ok, why = tensorrt_available()
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("TensorRT:", why)
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except ImportError:
    pass
sys.exit(0 if ok else 3)
EOF

echo "== 1. export tiny DiT (+ fp32 engines)"
for mode in full rfc; do
  "$PY" -m rfc_compile.cli export tiny-dit -o "$OUT/tiny_$mode.onnx" --mode "$mode" --threshold 0.8 \
      --precision fp32 --engine "$OUT/tiny_$mode.fp32.engine" --no-triton
done

echo "== 2. polygraphy: TensorRT vs onnxruntime"
for mode in full rfc; do
  "$POLYGRAPHY" run "$OUT/tiny_$mode.onnx" --trt --onnxrt --atol 1e-3 --rtol 1e-3 \
      --val-range "[0,1]" --seed 0
done
"$POLYGRAPHY" inspect model "$OUT/tiny_rfc.onnx" --display-as=trt || true

echo "== 3. CUDA/TensorRT tests"
"$PY" -m pytest -q -m "gpu" tests/test_export.py -rs

echo "== 4. DiT-S: full vs RFC engines (fp16)"
"$PY" - "$OUT" <<'EOF'
import statistics, sys, time
from pathlib import Path
import torch
from diffusers import DDIMScheduler
from rfc_compile import RFCConfig
from rfc_compile.export import OnnxCachedModel, TrtCachedModel, build_engine, to_onnx
from rfc_compile.export.models import dit_s

out = Path(sys.argv[1])
steps, repeats = 50, 7
model = dit_s()
example = dict(hidden_states=torch.randn(2, 4, 32, 32), timestep=torch.full((2,), 999, dtype=torch.long),
               class_labels=torch.tensor([207, 1000]))
configs = {"full": RFCConfig(mode="full"), "rfc": RFCConfig(mode="rfe", interval=4, warmup_steps=2)}
runners = {}
for label, config in configs.items():
    onnx_path = to_onnx(model, out / f"dit_s_{label}.onnx", example, config).onnx_path
    engine = build_engine(onnx_path, out / f"dit_s_{label}.fp16.engine", precision="fp16")
    runners[f"trt fp16 {label}"] = TrtCachedModel(engine)
    try:
        import onnxruntime as ort
        if "CUDAExecutionProvider" in ort.get_available_providers():
            runners[f"ort cuda {label}"] = OnnxCachedModel(onnx_path, providers=["CUDAExecutionProvider"])
    except ImportError:
        pass

def generation(runner):
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()
    labels = torch.tensor([207, 1000], device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents])
        eps = runner(hidden_states=x, timestep=t.expand(2).cuda(), class_labels=labels, return_dict=False)[0]
        cond, uncond = eps.chunk(2)
        latents = scheduler.step(uncond + 4.0 * (cond - uncond), t, latents).prev_sample
    torch.cuda.synchronize()
    return latents, time.perf_counter() - start

results = {}
for label, runner in runners.items():
    generation(runner)
    times = [generation(runner)[1] for _ in range(repeats)]
    results[label] = (runner.stats.nfc, statistics.median(times), min(times))
print(f"| run | NFC | s / {steps}-step generation, median (min) |")
print("| --- | ---: | ---: |")
for label, (nfc, med, best) in results.items():
    print(f"| {label} | {nfc} | {med:.4f} ({best:.4f}) |")
for prefix in ("trt fp16", "ort cuda"):
    if f"{prefix} full" in results and f"{prefix} rfc" in results:
        print(f"{prefix}: RFC speed-up {results[f'{prefix} full'][1] / results[f'{prefix} rfc'][1]:.2f}x")
EOF
echo "gpu_check: done (artifacts in $OUT)"
