"""Why reduce_l2.py exists: onnxruntime's CUDA provider and ReduceL2 (a GPU diagnostic, not a test).

Run on the GPU machine after ``benchmarks/ort_cuda.py prepare DIR`` (it reads DIR's DiT-S RFE
graph, ``--batches 2``):

    python benchmarks/ort_cuda_reduce_l2.py DIR

1. single-op graphs on a (2, 98304) tensor, the shape of RFC's per-sample norms on DiT-S:
   ReduceL2 against Sqrt(ReduceSumSquare) and Sqrt(ReduceSum(x * x)), microseconds per run;
2. the DiT-S RFE step as exported before the fix-up (``ReduceL2`` put back) and as exported now,
   milliseconds per step for 12 steps.
The log of the run on an H200 is benchmarks/gpu_runs/reduce_l2_h200_2026-11-30.log (there the
graph was patched the other way round: exported with ReduceL2, rewritten to the sum of squares).
Part 2 needs a graph exported before commit 497a29a: since then rfc.py writes its norms as
``sqrt(sum(x * x))`` (Mul + ReduceSum), so a current graph has no Sqrt(ReduceSumSquare) to put
ReduceL2 back into, and the two timed graphs are the same.
"""

import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ort_cuda  # noqa: E402

from rfc_compile.export import OnnxCachedModel  # noqa: E402

torch.set_grad_enabled(False)

def bench(nodes, inits, shape, label, n=200):
    x = helper.make_tensor_value_info('x', TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info('y', TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, 'g', [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 18)], ir_version=10)
    s = ort.InferenceSession(m.SerializeToString(), providers=['CUDAExecutionProvider'])
    xt = torch.randn(*shape, device='cuda')
    b = s.io_binding(); b.bind_input('x', 'cuda', 0, np.float32, shape, xt.data_ptr()); b.bind_output('y', 'cuda')
    for _ in range(5): s.run_with_iobinding(b)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): s.run_with_iobinding(b)
    torch.cuda.synchronize(); print(f"{label}: {(time.perf_counter() - t0) / n * 1e6:.1f} us/run", flush=True)

ax1 = onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), 'ax')
ax12 = onnx.numpy_helper.from_array(np.array([1, 2], dtype=np.int64), 'ax')
N = helper.make_node
bench([N('ReduceL2', ['x', 'ax'], ['y'], keepdims=0)], [ax1], [2, 98304], 'ReduceL2 [2,98304] axis 1')
bench([N('ReduceSumSquare', ['x', 'ax'], ['s'], keepdims=0), N('Sqrt', ['s'], ['y'])], [ax1], [2, 98304], 'Sqrt(ReduceSumSquare)')
bench([N('Mul', ['x', 'x'], ['q']), N('ReduceSum', ['q', 'ax'], ['s'], keepdims=0), N('Sqrt', ['s'], ['y'])], [ax1], [2, 98304], 'Sqrt(ReduceSum(x*x))')
bench([N('Mul', ['x', 'x'], ['q']), N('ReduceSum', ['q', 'ax'], ['s'], keepdims=0), N('Sqrt', ['s'], ['y'])], [ax12], [2, 256, 384], 'Sqrt(ReduceSum(x*x)) [2,256,384] axes 1,2')
bench([N('ReduceSum', ['x'], ['y'], keepdims=0)], [], [2, 256, 384], 'ReduceSum all [2,256,384]')
bench([N('ReduceSum', ['x'], ['y'], keepdims=0)], [], [3, 2, 256, 384], 'ReduceSum all [3,2,256,384]')

def with_reduce_l2(graph) -> None:
    """Sqrt(ReduceSumSquare(x, axes)) -> ReduceL2(x, axes), in every subgraph: the graph as
    exported before rfc_compile.export.reduce_l2."""
    producers = {n.output[0]: n for n in graph.node if n.op_type == "ReduceSumSquare"}
    new = []
    for n in graph.node:
        for a in n.attribute:
            if a.HasField("g"):
                with_reduce_l2(a.g)
        if n.op_type == "ReduceSumSquare":
            continue
        if n.op_type == "Sqrt" and n.input[0] in producers:
            source = producers[n.input[0]]
            node = N("ReduceL2", list(source.input), list(n.output), name=n.name + "_l2")
            node.attribute.extend(source.attribute)
            new.append(node)
        else:
            new.append(n)
    del graph.node[:]
    graph.node.extend(new)


prepared = Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu/prep")
now = ort_cuda._regenerate_weights(prepared / "dit_s_b2_rfe.onnx")
m = onnx.load(str(now))
with_reduce_l2(m.graph)
before = now.with_name("dit_s_b2_rfe.reduce_l2.onnx")
onnx.save(m, str(before))
before.with_name(before.name + ".rfc.json").write_bytes(now.with_name(now.name + ".rfc.json").read_bytes())
for label, p in (("rfe with ReduceL2 (before)", before), ("rfe with Sqrt(ReduceSumSquare) (now)", now)):
    r = OnnxCachedModel(p, providers=["CUDAExecutionProvider"])
    x = torch.randn(2, 4, 32, 32, device="cuda")
    y = torch.tensor([207, 1000], device="cuda")
    ms = []
    for n in range(12):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r(hidden_states=x, timestep=torch.full((2,), 999 - 20 * n, device="cuda"), class_labels=y, return_dict=False)
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - t0) * 1e3)
    print(label, " ".join(f"{v:.1f}" for v in ms), "ms/step; full steps", r.stats.full_steps, flush=True)
