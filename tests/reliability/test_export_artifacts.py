"""[reliability] export artifacts: files from elsewhere give clear errors.

(tests/test_export.py covers truncated/garbage/empty ONNX files, edited sidecars and wrong-shape
state tensors on the runner; this adds a sidecar that belongs to *another model* and engine files.)
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import NUM_CLASSES, make_tiny_dit

pytest.importorskip("onnxruntime")
from rfc_compile import RFCConfig  # noqa: E402
from rfc_compile.export import OnnxCachedModel, SidecarMismatchError, tensorrt_available, to_onnx  # noqa: E402


def _inputs(size: int) -> dict:
    return dict(hidden_states=torch.randn(2, 4, size, size), timestep=torch.tensor([500, 500]),
                class_labels=torch.tensor([1, NUM_CLASSES]), return_dict=False)


def test_sidecar_from_another_model_is_rejected(tmp_path):
    config = RFCConfig(mode="fora", interval=3)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    to_onnx(make_tiny_dit(), a, _inputs(8), config)
    to_onnx(make_tiny_dit(layers=1), b, _inputs(8), config)  # same family, another model
    shutil.copy(str(b) + ".rfc.json", str(a) + ".rfc.json")
    with pytest.raises(SidecarMismatchError, match="does not match"):
        OnnxCachedModel(a)


def test_corrupt_engine_file_gives_clear_error(tmp_path):
    available, why = tensorrt_available()
    if not available:
        pytest.skip(f"TensorRT unavailable: {why}")
    from rfc_compile.export import TrtCachedModel

    engine = tmp_path / "broken.engine"
    engine.write_bytes(b"\x00" * 128)
    with pytest.raises(ValueError):
        TrtCachedModel(engine)
