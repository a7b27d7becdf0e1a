"""Why rfc.py writes its norms as sum(x * x) and sum(|x|): onnxruntime CPU reductions (a diagnostic).

Single-op graphs on a (2, 98304) float tensor (RFC's per-sample norms on DiT-S: batch 2,
256 tokens x 384), one intra-op thread, microseconds per run (best of 7 x 200 runs):

    python benchmarks/ort_cpu_norms.py

The squared distance ``||x - y||^2`` as ReduceSumSquare / ReduceL2 / Mul + ReduceSum / MatMul of
the difference, and the L1 norm as ReduceL1 / Abs + ReduceSum. The GPU counterpart is
benchmarks/ort_cuda_reduce_l2.py.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

B, F = 2, 98304
N = helper.make_node


def session(nodes, initializers=()):
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [B, F]) for name in ("x", "y")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the shared initializers unused by a variant are not worth a warning
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def microseconds(sess, feeds, runs: int = 200) -> float:
    for _ in range(20):
        sess.run(None, feeds)
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feeds)
        best = min(best, (time.perf_counter() - start) / runs)
    return best * 1e6


def main() -> None:
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    rows = helper.make_tensor("rows", TensorProto.INT64, [3], [B, 1, F])
    cols = helper.make_tensor("cols", TensorProto.INT64, [3], [B, F, 1])
    sub = N("Sub", ["x", "y"], ["d"])
    variants = {
        "Sub (the difference alone)": [N("Sub", ["x", "y"], ["out"])],
        "Sub + ReduceSumSquare": [sub, N("ReduceSumSquare", ["d", "axes"], ["out"], keepdims=0)],
        "Sub + ReduceL2": [sub, N("ReduceL2", ["d", "axes"], ["out"], keepdims=0)],
        "Sub + Mul + ReduceSum": [sub, N("Mul", ["d", "d"], ["q"]), N("ReduceSum", ["q", "axes"], ["out"], keepdims=0)],
        "Sub + MatMul (B,1,F)@(B,F,1)": [sub, N("Reshape", ["d", "rows"], ["a"]), N("Reshape", ["d", "cols"], ["b"]),
                                          N("MatMul", ["a", "b"], ["out"])],
        "ReduceL1": [N("ReduceL1", ["x", "axes"], ["out"], keepdims=0)],
        "Abs + ReduceSum": [N("Abs", ["x"], ["a"]), N("ReduceSum", ["a", "axes"], ["out"], keepdims=0)],
        "ReduceSum": [N("ReduceSum", ["x", "axes"], ["out"], keepdims=0)],
    }
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((B, F), dtype=np.float32), "y": rng.standard_normal((B, F), dtype=np.float32)}
    print(f"onnxruntime {ort.__version__} CPUExecutionProvider, 1 thread, ({B}, {F}) float32")
    for label, nodes in variants.items():
        print(f"{label:32s} {microseconds(session(nodes, [axes, rows, cols]), feeds):7.1f} us", flush=True)


if __name__ == "__main__":
    main()
