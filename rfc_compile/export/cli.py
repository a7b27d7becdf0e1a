"""`rfc-compile export`: write an ONNX cached model (+ sidecar, Triton repository, TensorRT engine).

    rfc-compile export tiny-dit -o out/dit.onnx --mode rfc --threshold 0.8
    rfc-compile export path/to/transformer -o out/pixart.onnx --batch 2 --height 64 --width 64
    rfc-compile export path/to/wan-transformer -o out/wan.onnx --frames 21 --height 60 --width 104 --text-len 512
    rfc-compile export path/to/sana -o out/sana.onnx --dynamic-batch --dynamic-resolution --engine-dim grid_height=16:32:64
    rfc-compile export path/to/flux -o out/flux.onnx --dtype float16 --dynamic-batch --dynamic-tokens \
        --engine-dim batch=1:2:4 --engine-dim image_tokens=1024:4096:4096 --engine-dim text_tokens=1:512:512
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import MODES, RFCConfig
from ..passes.capture import named_dims
from ..passes.patterns import RESOLUTION_DIMS, TOKEN_DIMS, merge_dynamic_dims, resolution_dims_for, token_dims_for

DTYPES = ("bfloat16", "float16", "float32")  # torch dtype names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="built-in model ('tiny-dit', 'dit-s': random weights) or a diffusers "
                                      "model directory (its config.json names the class)")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write (sidecar: <output>.rfc.json)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="load the model in this dtype (default: float32); the example inputs follow it")
    group = parser.add_argument_group("caching (RFCConfig)")
    group.add_argument("--mode", choices=MODES, default="rfc")
    group.add_argument("--threshold", type=float, default=RFCConfig.threshold, help="RCS tau (mode rfc)")
    group.add_argument("--interval", type=int, default=RFCConfig.interval, help="fixed interval N (fora/taylorseer/rfe)")
    group.add_argument("--order", type=int, default=RFCConfig.order, help="Taylor order m")
    group.add_argument("--warmup-steps", type=int, default=RFCConfig.warmup_steps)
    group.add_argument("--max-interval", type=int, default=None)
    shapes = parser.add_argument_group("example shapes (baked into the graph)")
    shapes.add_argument("--batch", type=int, default=2, help="batch of one call (2 = one prompt with CFG)")
    shapes.add_argument("--height", type=int, default=None, help="latent height (default: config sample_size)")
    shapes.add_argument("--width", type=int, default=None, help="latent width (default: config sample_size)")
    shapes.add_argument("--frames", type=int, default=None, help="latent frames (video models; default 1)")
    shapes.add_argument("--text-len", type=int, default=8, help="text tokens (models with a text condition)")
    shapes.add_argument("--dynamic-batch", action="store_true", help="one graph for any batch size")
    shapes.add_argument("--dynamic-tokens", action="store_true",
                        help="one graph for any image/text token count, where the model allows it "
                             "(passes/patterns.py TOKEN_DIMS)")
    shapes.add_argument("--dynamic-resolution", action="store_true",
                        help="one graph for any latent height and width (whole patches), where the model allows "
                             "it (passes/patterns.py RESOLUTION_DIMS)")
    out = parser.add_argument_group("outputs")
    out.add_argument("--opset", type=int, default=None)
    out.add_argument("--no-check", action="store_true", help="skip loading the result in onnxruntime")
    out.add_argument("--triton", default=None, metavar="DIR",
                     help="Triton model repository to write (default: <output dir>/model_repository)")
    out.add_argument("--no-triton", action="store_true", help="do not write the Triton model repository")
    out.add_argument("--triton-name", default=None, help="Triton model name (default: output file stem)")
    out.add_argument("--engine", default=None, help="TensorRT engine path (default: <output>.<precision>.engine)")
    out.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    out.add_argument("--no-engine", action="store_true", help="do not build a TensorRT engine even if possible")
    out.add_argument("--engine-dim", action="append", default=[], metavar="NAME=MIN:OPT:MAX", type=_dim_range,
                     help="a dynamic dim's sizes the engine serves, e.g. batch=1:2:8 (repeatable; a dim left out "
                          "serves 1 up to its example size)")
    parser.add_argument("-v", "--verbose", action="store_true")


def _dim_range(text: str) -> tuple[str, tuple[int, int, int]]:
    """``"batch=1:2:8"`` -> ("batch", (1, 2, 8)) (--engine-dim)."""
    name, _, sizes = text.partition("=")
    parts = sizes.split(":")
    if not name or len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=MIN:OPT:MAX (e.g. batch=1:2:8)")
    lo, opt, hi = (int(p) for p in parts)
    return name.strip(), (lo, opt, hi)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    import torch

    from .models import example_inputs, load_model
    from .onnx import to_onnx
    from .sidecar import BATCH_DIM
    from .tensorrt import build_engine, profile_dims, tensorrt_available

    try:
        config = RFCConfig(mode=args.mode, threshold=args.threshold, interval=args.interval, order=args.order,
                           warmup_steps=args.warmup_steps, max_interval=args.max_interval)
        model = load_model(args.model, getattr(torch, args.dtype) if args.dtype else None)
        inputs = example_inputs(model, batch=args.batch, height=args.height, width=args.width,
                                text_len=args.text_len, frames=args.frames)
    except (TypeError, ValueError) as exc:
        print(f"rfc-compile export: error: {exc}")
        return 2
    token_dims = resolution_dims = dim_ranges = None
    if args.dynamic_tokens:
        token_dims = token_dims_for(type(model).__name__)
        if token_dims is None:
            print(f"rfc-compile export: error: --dynamic-tokens: {type(model).__name__}'s token count is static in "
                  f"an export (known dynamic: {sorted(TOKEN_DIMS)})")
            return 2
    if args.dynamic_resolution:
        resolution = resolution_dims_for(model, inputs)
        if resolution is None:
            print(f"rfc-compile export: error: --dynamic-resolution: {type(model).__name__}'s latent resolution is "
                  f"static in an export (known dynamic: {sorted(RESOLUTION_DIMS)}; FLUX-like models: --dynamic-tokens)")
            return 2
        resolution_dims, dim_ranges = resolution
    dynamic_dims = merge_dynamic_dims(token_dims, resolution_dims)
    dynamic = args.dynamic_batch or dynamic_dims is not None
    engine_dims = dict(args.engine_dim)
    named = {BATCH_DIM} if args.dynamic_batch else set()
    named |= named_dims(dynamic_dims)
    if set(engine_dims) - named:  # before the export, which takes a while
        print(f"rfc-compile export: error: --engine-dim {sorted(set(engine_dims) - named)}: not a dynamic dim of this "
              f"export (dynamic: {sorted(named) or 'none; see --dynamic-batch / --dynamic-tokens / --dynamic-resolution'})")
        return 2
    output = Path(args.output)
    triton = False if args.no_triton else (args.triton or True)
    try:
        result = to_onnx(model, output, inputs, config, opset=args.opset, check=not args.no_check, triton=triton,
                         triton_model_name=args.triton_name, dynamic_batch=args.dynamic_batch,
                         dynamic_dims=dynamic_dims, dim_ranges=dim_ranges)
    except ValueError as exc:  # what the user can change: example sizes, dims the model fixes (UnsupportedModelError)
        if args.verbose:
            raise
        print(f"rfc-compile export: error: {exc}")
        return 2
    except Exception as exc:  # the model's code failed to trace or convert: its words, the traceback with -v
        if args.verbose:
            raise
        lines = str(exc).strip().splitlines()
        print(f"rfc-compile export: error: exporting {type(model).__name__} failed: {type(exc).__name__}: "
              f"{lines[0] if lines else ''} (-v for the traceback)")
        return 1
    sidecar = result.sidecar
    print(f"wrote {result.onnx_path} ({type(model).__name__}, mode {config.mode}, "
          f"{len(sidecar.state)} state tensors, {sidecar.raw['if_nodes']} If node(s)) in {result.seconds:.1f}s")
    print(f"wrote {result.sidecar_path}")
    if result.triton_model_dir is not None:
        print(f"wrote Triton model {result.triton_model_dir} (config.pbtxt + 1/model.onnx)")
    if dynamic:
        print(f"dynamic dims {sidecar.example_dims} (example sizes)")
    if args.no_engine:
        return 0
    try:
        profile = profile_dims(sidecar, engine_dims)
    except ValueError as exc:
        print(f"rfc-compile export: error: --engine-dim: {exc}")
        return 2
    ok, why = tensorrt_available()
    if not ok:
        print(f"no TensorRT engine: {why}")
        return 0
    engine = Path(args.engine or f"{output}.{args.precision}.engine")
    build_engine(output, engine, precision=args.precision, dims=engine_dims)
    served = f", serving {', '.join(f'{n} {lo}..{hi}' for n, (lo, _, hi) in profile.items())}" if profile else ""
    print(f"wrote TensorRT engine {engine} ({args.precision}{served})")
    return 0
