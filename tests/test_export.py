"""[export] ONNX export with explicit state, onnxruntime runner, Triton repository, TensorRT (GPU only).

Exports are slow-ish on CPU (torch.export twice + the ONNX exporter, ~10-25 s each), so each
graph is exported once per session and shared between tests.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.machinery
import importlib.util
import inspect
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, ddim_generation, make_tiny_dit

import rfc_compile
from rfc_compile import RFCConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from rfc_compile.export import (  # noqa: E402
    InputMismatchError,
    ModelFileError,
    OnnxCachedModel,
    SidecarMismatchError,
    to_onnx,
)
from rfc_compile.export.sidecar import numpy_dtype  # noqa: E402

STEPS = 30
THRESHOLD = 0.8  # tiny DiT + CFG: both full and skipped steps (see test_core.py)
ATOL = 1e-4
RFC = RFCConfig(mode="rfc", threshold=THRESHOLD)
FIXED = RFCConfig(mode="rfe", interval=3)  # exported through the CLI below


def dit_inputs(batch: int = 2) -> dict:
    """Example inputs with ddim_generation(cfg=True)'s shapes and dtypes."""
    return dict(hidden_states=torch.randn(batch, 4, 8, 8), timestep=torch.full((batch,), 999, dtype=torch.long),
                class_labels=torch.tensor([1, NUM_CLASSES])[:batch])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def rfc_onnx(workdir):
    # an optimize()d model exports what it wraps, with its config
    cached = rfc_compile.optimize(make_tiny_dit(), RFC)
    return to_onnx(cached, workdir / "dit_rfc.onnx", dit_inputs(), triton=True).onnx_path


@pytest.fixture(scope="module")
def full_onnx(workdir):
    return to_onnx(make_tiny_dit(), workdir / "dit_full.onnx", dit_inputs(), RFCConfig(mode="full")).onnx_path


@pytest.fixture(scope="module")
def fixed_onnx(workdir):
    """The fixed-interval model, exported with `rfc-compile export tiny-dit` (same weights as make_tiny_dit)."""
    from rfc_compile.cli import main

    path = workdir / "dit_rfe.onnx"
    code = main(["export", "tiny-dit", "-o", str(path), "--mode", FIXED.mode, "--interval", str(FIXED.interval),
                 "--batch", "2", "--no-triton", "--no-engine"])
    assert code == 0
    return path


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _eager(config: RFCConfig):
    cached = rfc_compile.optimize(make_tiny_dit(), config)
    _, outputs = ddim_generation(cached, steps=STEPS, cfg=True)
    return cached.stats, outputs


# --- the graph ----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Returning NumPy data types:DeprecationWarning")
def test_graph_has_one_if_state_io_and_polygraphy_runs_it(rfc_onnx):
    model = onnx.load(str(rfc_onnx))
    assert [n.op_type for n in model.graph.node].count("If") == 1
    sidecar = json.loads((rfc_onnx.parent / (rfc_onnx.name + ".rfc.json")).read_text())
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs[:3] == ["hidden_states", "timestep", "class_labels"]
    assert outputs[0] == "sample"
    for entry in sidecar["state"]:
        assert entry["input"] == "state." + entry["name"] and entry["input"] in inputs
        assert entry["output"] == "state_out." + entry["name"] and entry["output"] in outputs
    assert sidecar["naming"]["decision_output"] == "state_out.last_full"
    assert sidecar["model"]["class"] == "DiTTransformer2DModel" and sidecar["model"]["family"] == "dit"
    assert sidecar["rfc_config"]["threshold"] == THRESHOLD
    assert {"rcs_acc", "rcs_ladder.0", "transformer_blocks_0_attn1.ladder.0"} <= {e["name"] for e in sidecar["state"]}

    # the exporter's per-node Python stack traces (most of a large graph's bytes) are dropped,
    # the rest of the node metadata stays
    def metadata_keys(graph) -> set[str]:
        keys = {p.key for n in graph.node for p in n.metadata_props}
        for n in graph.node:
            for a in n.attribute:
                if a.HasField("g"):
                    keys |= metadata_keys(a.g)
        return keys

    keys = metadata_keys(model.graph)
    assert "pkg.torch.onnx.stack_trace" not in keys and "pkg.torch.onnx.name_scopes" in keys

    # polygraphy loads, inspects and runs it (one step from a zero state == the runner's first step)
    from polygraphy.backend.onnx import onnx_from_path
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    assert len(onnx_from_path(str(rfc_onnx)).graph.node) > 0
    feeds = {k: v.numpy() for k, v in dit_inputs().items()}
    feeds.update({e["input"]: np.zeros(e["shape"], dtype=e["dtype"]) for e in sidecar["state"]})
    with OnnxrtRunner(SessionFromOnnx(str(rfc_onnx))) as runner:
        meta = runner.get_input_metadata()
        assert "state.last_full" in meta and tuple(meta["hidden_states"].shape) == (2, 4, 8, 8)
        out = runner.infer(feeds)
    assert int(out["state_out.last_full"]) == 0 and int(out["state_out.step"]) == 1
    first = OnnxCachedModel(rfc_onnx)(**{k: torch.from_numpy(v) for k, v in feeds.items()
                                        if not k.startswith("state.")}, return_dict=False)[0]
    np.testing.assert_allclose(out["sample"], first.numpy(), atol=1e-6)


def _else_branch_pass_throughs(model) -> set[str]:
    """Outer-scope graph inputs that the If's else (predict) branch returns through Identity nodes."""
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    branch = next(a.g for a in if_node.attribute if a.name == "else_branch")
    producers = {o: n for n in branch.node for o in n.output}
    graph_inputs = {i.name for i in model.graph.input}
    found = set()
    for out in branch.output:
        name = out.name
        while name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        if name in graph_inputs:
            found.add(name)
    identity_of_inputs = {n.input[0] for n in branch.node if n.op_type == "Identity" and n.input[0] in graph_inputs}
    return found | identity_of_inputs


def test_skip_branch_does_not_copy_the_cache(rfc_onnx):
    """The predict branch returns the unchanged cache as empty tensors (no Identity copy of a state
    input); the sidecar lists them in kept_on_skip; the runner keeps its buffers on skipped steps."""
    model = onnx.load(str(rfc_onnx))
    sidecar = json.loads((rfc_onnx.parent / (rfc_onnx.name + ".rfc.json")).read_text())
    kept = sidecar["kept_on_skip"]
    state = {e["name"]: e for e in sidecar["state"]}
    assert {"rcs_ladder.0", "transformer_blocks_0_attn1.ladder.0", "transformer_blocks_0_attn1.ratio.0",
            "transformer_blocks_0_attn1.x_last.0"} <= set(kept)
    assert "last_full" not in kept and all(state[n]["shape"] for n in kept)
    assert any(f.startswith("empty_on_skip(") for f in sidecar["fixups"])
    copied = _else_branch_pass_throughs(model)
    assert not copied & {state[n]["input"] for n in kept}, f"else branch still copies {copied}"
    outputs = {o.name: o.type.tensor_type.shape.dim for o in model.graph.output}
    for name, entry in state.items():
        dims = outputs[entry["output"]]
        rows_unknown = len(dims) > 0 and not dims[0].HasField("dim_value")
        assert rows_unknown == (name in kept), name
        assert [d.dim_value for d in dims[1:]] == entry["shape"][1:]
    onnx.checker.check_model(model, full_check=True)
    # every prediction reads each ladder in place: one Reshape (free) feeding one MatMul, no
    # Slice/Gather copies of rows; RCS's input prediction X_hat = DX0 + T (main graph) likewise
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    else_branch = next(a.g for a in if_node.attribute if a.name == "else_branch")
    ladders = {e["input"] for e in sidecar["state"] if ".ladder." in e["name"] or e["name"].startswith("rcs_ladder")}
    readers: dict[str, list[str]] = {}
    for node in list(else_branch.node) + list(model.graph.node):
        for name in set(node.input) & ladders:
            readers.setdefault(name, []).append(node.op_type)
    assert readers.keys() == ladders and all(ops == ["Reshape"] for ops in readers.values()), readers
    # the per-sample norms are Mul/Abs + ReduceSum: no ReduceL2 (~100x slower on onnxruntime's
    # CUDA provider), no ReduceL1/ReduceSumSquare (~2x slower on its CPU provider)
    all_ops = {n.op_type for n in list(model.graph.node) + list(else_branch.node)}
    assert not all_ops & {"ReduceL2", "ReduceL1", "ReduceSumSquare"} and "ReduceSum" in all_ops
    # no two nodes of a branch compute the same thing (the regions share one set of Taylor coefficients)
    from rfc_compile.export.cse import branch_cse

    assert any(f.startswith("branch_cse(") for f in sidecar["fixups"])
    assert branch_cse(model) == 0
    depth_masks = [n for n in else_branch.node if n.op_type == "GreaterOrEqual"]
    assert len(depth_masks) == sidecar["rfc_config"]["order"]  # one per Taylor order, not per region

    # the runner: a skipped step keeps the very same buffers, a full step adopts new ones
    runner = OnnxCachedModel(rfc_onnx, providers=["CPUExecutionProvider"])
    name = "transformer_blocks_0_attn1.ladder.0"
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, NUM_CLASSES])
    kinds = set()
    for t in (999, 949, 899, 849, 799, 749, 699, 649):
        before = runner._buffers[runner._current][name].data_ptr()
        step = runner.stats.steps
        out = runner(hidden_states=x, timestep=torch.full((2,), t), class_labels=labels, return_dict=False)[0]
        after = runner._buffers[runner._current][name].data_ptr()
        full = runner.stats.full_steps[-1:] == [step]
        kinds.add(full)
        assert (after != before) if full else (after == before), (step, full)
        assert tuple(runner.state[name].shape) == tuple(state[name]["shape"])
        x = x - 0.1 * out
    assert kinds == {True, False}


# --- whole generations: ORT runner == eager cached model ------------------------------------------

@pytest.mark.parametrize("which", ["fixed", "rfc"])
def test_ort_generation_matches_eager(which, request):
    config = FIXED if which == "fixed" else RFC
    path = request.getfixturevalue(f"{which}_onnx")
    expected_stats, expected = _eager(config)
    runner = OnnxCachedModel(path, providers=["CPUExecutionProvider"])
    _, got = ddim_generation(runner, steps=STEPS, cfg=True)
    assert runner.stats.full_steps == expected_stats.full_steps
    assert runner.stats.nfc == expected_stats.nfc
    assert 2 < runner.stats.nfc < STEPS  # both full and skipped steps happened
    assert _max_diff(got, expected) < ATOL

    # the timestep going back up starts a new generation (same schedule, same outputs)
    _, again = ddim_generation(runner, steps=STEPS, cfg=True)
    assert runner.stats.full_steps == expected_stats.full_steps
    assert _max_diff(again, got) < 1e-6


def test_full_mode_onnx_equals_original_model(full_onnx):
    _, expected = ddim_generation(make_tiny_dit(), steps=20, cfg=True)
    runner = OnnxCachedModel(full_onnx)
    _, got = ddim_generation(runner, steps=20, cfg=True)
    assert runner.stats.full_steps == list(range(20))
    assert _max_diff(got, expected) < ATOL
    assert onnx.load(str(full_onnx)).graph.node  # no If needed in mode "full"


def test_runner_is_drop_in(rfc_onnx):
    runner = OnnxCachedModel(rfc_onnx)
    kwargs = dit_inputs()
    out = runner(**kwargs)  # return_dict defaults to True, like diffusers
    assert out.sample.shape == (2, 4, 8, 8) and out.sample.dtype == torch.float32
    positional = runner(kwargs["hidden_states"] * 0.9, timestep=kwargs["timestep"] - 100,
                        class_labels=kwargs["class_labels"], return_dict=False)  # the next step
    assert isinstance(positional, tuple) and len(positional) == 1
    assert runner.stats.steps == 2 and runner.stats.full_steps == [0, 1]
    runner.reset()
    assert runner.stats.steps == 0 and int(runner.state["step"]) == 0
    assert torch.equal(runner(**kwargs, return_dict=False)[0], out.sample)


def test_runner_gives_each_branch_of_a_step_its_own_cache(rfc_onnx):
    """As the torch cached model (tests/reliability/test_state_safety.py): a step's cond and
    uncond calls at one timestep with the same latents, outside cache_context (ChromaPipeline,
    Krea2Pipeline), get a cache each, with the outputs and full steps of calls in their own
    cache_context; calls at one timestep with other latents (Heun) are two steps of one cache,
    warned about once."""
    import warnings

    runner, split = OnnxCachedModel(rfc_onnx), OnnxCachedModel(rfc_onnx)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.tensor([1, 2]), torch.full((2,), NUM_CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n, t in enumerate(range(900, 0, -100)):
            xs = x * (1 - 0.05 * n)
            step = dict(hidden_states=xs, timestep=torch.full((2,), t), return_dict=False)
            got = [runner(**step, class_labels=cond)[0], runner(**step, class_labels=uncond)[0]]
            for name, labels, out in (("cond", cond, got[0]), ("uncond", uncond, got[1])):
                with split.cache_context(name):
                    assert torch.equal(out, split(**step, class_labels=labels)[0])
    assert runner.stats == split.stats and runner.stats.steps == 9 and 2 < runner.stats.nfc < 9
    with pytest.warns(UserWarning, match="two calls in a row at timestep 500 share one cache") as caught:
        for t, scale in ((900, 1.0), (500, 0.9), (500, 0.8), (300, 0.7)):
            runner(hidden_states=x * scale, timestep=torch.full((2,), t), class_labels=cond, return_dict=False)
    assert len([w for w in caught if "two calls in a row" in str(w.message)]) == 1
    assert runner.stats.steps == 4


@pytest.mark.parametrize("kind", ["eager", "onnx"])
def test_a_step_index_that_does_not_rise_starts_a_new_generation(rfc_onnx, kind):
    """WanPipeline numbers its steps: ``cache_context(name, step_index=i)``. A Wan 2.2 expert that runs
    one step per generation is called at the same timestep and step index in every generation; the
    timestep alone never said a new generation began, so its cache went on across generations and
    the third one, with another prompt, was skipped and predicted from the first two (helper's
    repro: 2.3e-4 off a fresh model). A step index not above the previous one starts a new
    generation, for the torch cached model and the onnxruntime runner alike."""
    def fresh():
        return rfc_compile.optimize(make_tiny_dit(), RFC) if kind == "eager" else OnnxCachedModel(rfc_onnx)

    model, gen = fresh(), torch.Generator().manual_seed(0)
    for generation in range(3):  # the expert's only step: pipeline step 7, at t = 300
        call = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen), timestep=torch.full((2,), 300),
                    class_labels=torch.tensor([1 + generation, 2]), return_dict=False)
        with model.cache_context("cond", step_index=7):
            got = model(**call)[0]
        assert model.stats.steps == 1 and model.stats.full_steps == [0]
        other = fresh()
        with other.cache_context("cond", step_index=7):
            assert torch.equal(got, other(**call)[0])
    for i, t in enumerate(range(900, 400, -100)):  # rising step indices: one generation of five steps
        with model.cache_context("cond", step_index=i):
            model(hidden_states=torch.randn(2, 4, 8, 8, generator=gen), timestep=torch.full((2,), t),
                  class_labels=torch.tensor([1, 2]), return_dict=False)
    assert model.stats.steps == 5


@pytest.mark.parametrize("kind", ["eager", "onnx"])
def test_one_step_generations_each_start_a_new_generation(fixed_onnx, kind):
    """Distilled models sample in one step (SANA-Sprint, FLUX.1-schnell): every generation is one
    call at the schedule's first timestep, and no pipeline but Wan's numbers its steps. Such calls
    looked like a second-order sampler's two evaluations at one timestep: one cache went on and
    the third generation was predicted from the first two (0.13 off the model with TaylorSeer). A
    call at the previous call's timestep while its generation has been at no other starts a new
    one; so does a generation after one interrupted at its first step."""
    import warnings

    def fresh():
        return rfc_compile.optimize(make_tiny_dit(), FIXED) if kind == "eager" else OnnxCachedModel(fixed_onnx)

    model, plain, gen = fresh(), make_tiny_dit(), torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nor "two calls in a row at timestep 999"
        for generation in range(4):
            call = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen), timestep=torch.full((2,), 999),
                        class_labels=torch.tensor([1 + generation, 2]), return_dict=False)
            with torch.no_grad():
                torch.testing.assert_close(model(**call)[0], plain(**call)[0], atol=1e-4, rtol=1e-4)
            assert model.stats.steps == 1

    def interrupt(n):
        if n == 1:
            raise KeyboardInterrupt

    ddim_generation(model, steps=8, cfg=True, seed=2)  # a whole generation, then one interrupted
    with pytest.raises(KeyboardInterrupt):
        ddim_generation(model, steps=8, cfg=True, seed=3, on_step=interrupt)
    latents, _ = ddim_generation(model, steps=8, cfg=True, seed=3)
    other = fresh()
    assert torch.equal(latents, ddim_generation(other, steps=8, cfg=True, seed=3)[0])
    assert model.stats == other.stats and 2 < model.stats.nfc < 8


@pytest.mark.parametrize("kind", ["eager", "onnx"])
def test_a_pipelines_end_of_call_signal_starts_a_new_generation(fixed_onnx, kind):
    """Diffusers pipelines end every call with ``_reset_stateful_cache()`` on their components
    (``maybe_free_model_hooks``): the next call starts a new generation even where its timestep
    does not go back up (an img2img run at a low strength after a run that stopped early), which
    went on with the ended generation's cache. Stats stay the ended generation's until then."""
    def fresh():
        return rfc_compile.optimize(make_tiny_dit(), FIXED) if kind == "eager" else OnnxCachedModel(fixed_onnx)

    def run(model, timesteps, seed):
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return [model(hidden_states=x * (t / 1000), timestep=torch.full((2,), t), class_labels=torch.tensor([1, 2]),
                          return_dict=False)[0] for t in timesteps]

    model = fresh()
    run(model, [900, 800, 700, 600], seed=0)
    model._reset_stateful_cache()
    assert model.stats.steps == 4
    got = run(model, [500, 400, 300, 200, 100], seed=1)
    other = fresh()
    expected = run(other, [500, 400, 300, 200, 100], seed=1)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and model.stats == other.stats
    assert model.stats.full_steps == [0, 1, 4]


def test_runner_sessions_share_the_graph_never_the_cache(rfc_onnx):
    """new_session(): one cache per request over one InferenceSession (weights loaded once). Two
    generations run in two threads in lock-step (a barrier at every step) each equal the same
    generation run alone; the parent runner's cache is untouched."""
    import threading

    runner = OnnxCachedModel(rfc_onnx)
    expected = {seed: ddim_generation(runner, steps=STEPS, cfg=True, seed=seed) for seed in (1, 2)}
    parent_steps = runner.stats.full_steps
    sessions = {seed: runner.new_session() for seed in (1, 2)}
    assert all(s.session is runner.session for s in sessions.values())
    barrier, results = threading.Barrier(2), {}

    def generate(seed):
        results[seed] = ddim_generation(sessions[seed], steps=STEPS, cfg=True, seed=seed,
                                        on_step=lambda n: barrier.wait(timeout=60))

    threads = [threading.Thread(target=generate, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in (1, 2):
        latents, outputs = results[seed]
        assert torch.equal(latents, expected[seed][0])
        assert sessions[seed].stats.steps == STEPS and 2 < sessions[seed].stats.nfc < STEPS
    assert runner.stats.full_steps == parent_steps and runner.stats.steps == STEPS


def test_state_round_trip_resumes_a_generation(rfc_onnx):
    first, second = OnnxCachedModel(rfc_onnx), OnnxCachedModel(rfc_onnx)
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, NUM_CLASSES])
    for t in (999, 949, 899, 849, 799):
        out = first(hidden_states=x, timestep=torch.full((2,), t), class_labels=labels, return_dict=False)[0]
        x = x - 0.1 * out
    second.set_state(first.state)  # e.g. a request moved to another worker
    for t in (749, 699, 649):
        kwargs = dict(hidden_states=x, timestep=torch.full((2,), t), class_labels=labels, return_dict=False)
        a, b = first(**kwargs)[0], second(**kwargs)[0]
        assert torch.equal(a, b)
        x = x - 0.1 * a
    assert int(second.state["step"]) == 8 and torch.equal(second.state["last_full"], first.state["last_full"])


# --- clear errors ---------------------------------------------------------------------------------

def _copy_pair(src, dst_dir, name):
    dst = dst_dir / name
    shutil.copy(src, dst)
    shutil.copy(str(src) + ".rfc.json", str(dst) + ".rfc.json")
    return dst


def test_truncated_or_corrupted_onnx_gives_clear_error(rfc_onnx, tmp_path):
    truncated = _copy_pair(rfc_onnx, tmp_path, "truncated.onnx")
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated, corrupted"):
        OnnxCachedModel(truncated)
    garbage = _copy_pair(rfc_onnx, tmp_path, "garbage.onnx")
    garbage.write_bytes(b"\x00not an onnx model\xff" * 100)
    with pytest.raises(ValueError, match="could not load"):
        OnnxCachedModel(garbage)
    empty = _copy_pair(rfc_onnx, tmp_path, "empty.onnx")
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        OnnxCachedModel(empty)
    with pytest.raises(ModelFileError, match="does not exist|no sidecar"):
        OnnxCachedModel(tmp_path / "missing.onnx")
    # a graph whose weights live in <file>.data (as a > 2 GB export's do), copied without it
    import onnx

    split = _copy_pair(rfc_onnx, tmp_path, "split.onnx")
    onnx.save_model(onnx.load(str(rfc_onnx)), str(split), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="split.onnx.data", size_threshold=0)
    (tmp_path / "split.onnx.data").unlink()
    with pytest.raises(ModelFileError, match=r"external weights file \(split\.onnx\.data"):
        OnnxCachedModel(split)  # an older sidecar, without "external_data": from onnxruntime's error
    sidecar = json.loads(split.with_name("split.onnx.rfc.json").read_text())
    split.with_name("split.onnx.rfc.json").write_text(json.dumps(dict(sidecar, external_data="split.onnx.data")))
    with pytest.raises(ModelFileError, match=r"keeps its weights in split\.onnx\.data, which is not next to it"):
        OnnxCachedModel(split)


def test_sidecar_that_does_not_match_the_graph_gives_clear_error(rfc_onnx, full_onnx, tmp_path):
    # the rfc graph with the full-mode graph's sidecar: state entries differ
    mixed = tmp_path / "mixed.onnx"
    shutil.copy(rfc_onnx, mixed)
    shutil.copy(str(full_onnx) + ".rfc.json", str(mixed) + ".rfc.json")
    with pytest.raises(SidecarMismatchError, match="does not match"):
        OnnxCachedModel(mixed)
    # a sidecar whose shape was edited
    edited = _copy_pair(rfc_onnx, tmp_path, "edited.onnx")
    raw = json.loads(edited.with_name(edited.name + ".rfc.json").read_text())
    raw["state"][-1]["shape"] = [7] + raw["state"][-1]["shape"]
    edited.with_name(edited.name + ".rfc.json").write_text(json.dumps(raw))
    with pytest.raises(SidecarMismatchError, match=raw["state"][-1]["input"].replace(".", r"\.")):
        OnnxCachedModel(edited)
    # an output nesting that does not place the graph's one output exactly once
    nested = _copy_pair(rfc_onnx, tmp_path, "nested.onnx")
    raw = json.loads(nested.with_name(nested.name + ".rfc.json").read_text())
    assert raw["output_tree"] == [0]
    for tree in ([0, 0], [[1]], [], ["sample"]):
        nested.with_name(nested.name + ".rfc.json").write_text(json.dumps(dict(raw, output_tree=tree)))
        with pytest.raises(ModelFileError, match=r"output_tree .* does not place each of its 1 outputs once"):
            OnnxCachedModel(nested)
    # no sidecar / not a sidecar
    lonely = tmp_path / "lonely.onnx"
    shutil.copy(rfc_onnx, lonely)
    with pytest.raises(ModelFileError, match="no sidecar"):
        OnnxCachedModel(lonely)
    lonely.with_name("lonely.onnx.rfc.json").write_text('{"hello": 1}')
    with pytest.raises(ModelFileError, match="not an rfc_compile export sidecar"):
        OnnxCachedModel(lonely)


def test_kept_on_skip_that_does_not_match_the_graph_gives_clear_error(rfc_onnx, tmp_path):
    from rfc_compile.export.skip_state import restore_skip_copies

    pair = _copy_pair(rfc_onnx, tmp_path, "kept.onnx")
    side = pair.with_name(pair.name + ".rfc.json")
    raw = json.loads(side.read_text())
    kept = raw["kept_on_skip"]

    def load_with(edit):
        side.write_text(json.dumps(dict(raw, **edit)))
        return OnnxCachedModel(pair)

    # a sidecar without the field (an older export's) would adopt empty tensors as the cache
    with pytest.raises(SidecarMismatchError, match=rf"may come back empty.*kept_on_skip does not list state "
                                                   rf"'{kept[0]}'"):
        load_with({"kept_on_skip": []})
    with pytest.raises(SidecarMismatchError, match="kept_on_skip"):
        load_with({"kept_on_skip": kept[1:]})
    # a state output the graph always returns full-size would never be updated
    with pytest.raises(SidecarMismatchError, match=r"kept_on_skip lists state 'rcs_acc'.*static shape"):
        load_with({"kept_on_skip": kept + ["rcs_acc"]})
    with pytest.raises(ModelFileError, match="kept_on_skip.*'nonexistent'.*not a state entry"):
        load_with({"kept_on_skip": kept + ["nonexistent"]})
    with pytest.raises(ModelFileError, match="kept_on_skip.*'step'.*0-d"):
        load_with({"kept_on_skip": kept + ["step"]})
    load_with({})  # the sidecar as written works
    # restoring the copies (Triton / TensorRT) checks the field against the graph too
    model = onnx.load(str(rfc_onnx))
    with pytest.raises(SidecarMismatchError, match="kept_on_skip does not list"):
        restore_skip_copies(model, raw["state"], kept[1:])
    with pytest.raises(SidecarMismatchError, match="no empty-on-skip branch output"):
        restore_skip_copies(model, raw["state"], kept + ["rcs_acc"])
    restored = restore_skip_copies(model, raw["state"], kept)
    assert {e["input"] for e in raw["state"] if e["name"] in kept} <= _else_branch_pass_throughs(restored)
    assert all(d.HasField("dim_value") for o in restored.graph.output for d in o.type.tensor_type.shape.dim)


def test_wrong_shape_state_or_input_gives_clear_error(rfc_onnx):
    runner = OnnxCachedModel(rfc_onnx)
    state = runner.state
    name = "transformer_blocks_0_attn1.ladder.0"
    bad = dict(state, **{name: torch.zeros(3, 1, 16, 16)})
    with pytest.raises(InputMismatchError, match=rf"{name}.*shape \[3, 1, 16, 16\]"):
        runner.set_state(bad)
    with pytest.raises(InputMismatchError, match="dtype"):
        runner.set_state(dict(state, step=torch.zeros((), dtype=torch.int32)))
    with pytest.raises(InputMismatchError, match="missing"):
        runner.set_state({k: v for k, v in state.items() if k != "rcs_acc"})
    runner.set_state(state)  # a valid state is accepted
    kwargs = dit_inputs()
    with pytest.raises(InputMismatchError, match="exported for"):
        runner(**dict(kwargs, hidden_states=torch.randn(1, 4, 8, 8)))
    with pytest.raises(InputMismatchError, match="class_labels"):
        runner(hidden_states=kwargs["hidden_states"], timestep=kwargs["timestep"])
    # an int64 timestep input: a flow-matching pipeline's 978.6 would be truncated, silently before
    with pytest.raises(InputMismatchError, match="'timestep' has fractional values"):
        runner(**dict(kwargs, timestep=torch.full((2,), 978.6)))
    runner.reset()
    expected = runner(**kwargs, return_dict=False)[0]
    runner.reset()
    assert torch.equal(runner(**dict(kwargs, timestep=kwargs["timestep"].float()), return_dict=False)[0], expected)


def test_non_tensor_arguments_not_baked_in_are_refused(rfc_onnx, tmp_path):
    """Non-tensor arguments are constants of the graph: one the export never saw (a LoRA scale in
    ``cross_attention_kwargs``, exported without it) is an error, not silently ignored as before;
    None and the forward's defaults are what leaving it out gives; a non-default constant of the
    export must be passed."""
    runner = OnnxCachedModel(rfc_onnx)
    kwargs = dit_inputs()
    with pytest.raises(InputMismatchError, match=r"'cross_attention_kwargs.scale'=0.5 was not given at export"):
        runner(**kwargs, cross_attention_kwargs={"scale": 0.5})
    expected = runner(**kwargs, return_dict=False)[0]
    runner.reset()
    assert torch.equal(runner(**kwargs, cross_attention_kwargs=None, return_dict=False)[0], expected)

    result = to_onnx(make_tiny_dit(), tmp_path / "scaled.onnx", dict(kwargs, cross_attention_kwargs={"scale": 1.0}),
                     FIXED, triton=False)
    scaled = OnnxCachedModel(result.onnx_path)
    with pytest.raises(InputMismatchError, match=r"\['cross_attention_kwargs.scale'\] were \[1.0\] at export"):
        scaled(**kwargs)
    assert scaled(**kwargs, cross_attention_kwargs={"scale": 1.0}, return_dict=False)[0].shape == (2, 4, 8, 8)


# --- Triton ---------------------------------------------------------------------------------------

def _triton_request(session, kwargs: dict, state: dict, start: bool, ready: bool = True) -> tuple[dict, dict]:
    """One request as Triton's sequence batcher makes it (model inputs, implicit state, START and
    READY controls) run in onnxruntime: the outputs by name, and the state the next request gets."""
    feeds = {k: v.numpy() for k, v in kwargs.items()}
    feeds.update(state, START=np.array([int(start)], np.int32), READY=np.array([int(ready)], np.int32))
    result = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    return result, {"state." + k[len("state_out."):]: v for k, v in result.items() if k.startswith("state_out.")}


def test_triton_repository_config_parses_and_sequence_semantics(rfc_onnx):
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] not installed")
    from rfc_compile.export import validate_triton_config

    model_dir = rfc_onnx.parent / "model_repository" / rfc_onnx.stem
    assert (model_dir / "config.pbtxt").is_file() and (model_dir / "1" / "model.onnx").is_file()
    # nothing next to the export imports as ``triton``: a ``triton/`` directory there (the old default)
    # made every script run from that directory crash in torch.compile on a machine without triton
    # (torch took it for the triton package: "module 'triton' has no attribute 'language'")
    assert importlib.machinery.PathFinder.find_spec("triton", [str(rfc_onnx.parent)]) is None
    config = validate_triton_config(model_dir / "config.pbtxt")
    sidecar = json.loads((rfc_onnx.parent / (rfc_onnx.name + ".rfc.json")).read_text())
    seq = config.sequence_batching
    assert config.max_batch_size == 0 and config.backend == "onnxruntime"
    assert [(s.input_name, s.output_name) for s in seq.state] == [(e["input"], e["output"]) for e in sidecar["state"]]
    assert all(s.initial_state[0].zero_data for s in seq.state)
    assert all(list(s.dims) == (e["shape"] or [1]) for s, e in zip(seq.state, sidecar["state"]))
    controls = {c.name: c.control[0].kind for c in seq.control_input}
    assert controls == {"START": config.sequence_batching.Control.CONTROL_SEQUENCE_START,
                        "READY": config.sequence_batching.Control.CONTROL_SEQUENCE_READY}
    assert [o.name for o in config.output] == ["sample", "state_out.last_full"]

    # play Triton: thread state_out -> state, garbage state at START must not matter
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    state = {i.name: np.full(i.shape, 7, dtype=np.int64 if "int64" in i.type else np.float32)
             for i in session.get_inputs() if i.name.startswith("state.")}
    runner = OnnxCachedModel(rfc_onnx)
    x = torch.randn(2, 4, 8, 8)
    for n, t in enumerate([999, 949, 899, 849, 799, 749]):
        kwargs = dict(hidden_states=x, timestep=torch.full((2,), t), class_labels=torch.tensor([1, NUM_CLASSES]))
        result, state = _triton_request(session, kwargs, state, start=n == 0)
        expected = runner(**kwargs, return_dict=False)[0]
        np.testing.assert_allclose(result["sample"], expected.numpy(), atol=1e-6)
        assert result["state_out.last_full"].shape == (1,)
        x = x - 0.1 * expected
    assert runner.stats.steps == 6
    # READY=0 leaves the state untouched
    idle, _ = _triton_request(session, kwargs, state, start=False, ready=False)
    assert all(np.array_equal(idle["state_out." + k[len("state."):]], v) for k, v in state.items())


# --- other families -------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [1, 2])
def test_flux_ort_generation_matches_eager(workdir, order):
    """Order 2 with the tiny FLUX's 3 text tokens: a text ladder (B, 3, 3, C) whose row count equals
    its token count, which onnxscript's reshape-MatMul rewrite got wrong (safe_rewrites.py)."""
    from conftest import FAMILIES, flow_generation

    from rfc_compile.export.safe_rewrites import unsound_rules

    family = FAMILIES["flux"]
    config = RFCConfig(mode="rfc", threshold=family.threshold, order=order)
    example = family.example()
    assert example["encoder_hidden_states"].shape[1] == 3 and len(unsound_rules()) >= 2
    path = to_onnx(family.build(), workdir / f"flux_rfc_o{order}.onnx", example, config).onnx_path
    eager = rfc_compile.optimize(family.build(), config)
    _, expected = flow_generation(eager, family, steps=20)
    runner = OnnxCachedModel(path)
    _, got = flow_generation(runner, family, steps=20)
    assert runner.stats.full_steps == eager.stats.full_steps
    assert 2 < runner.stats.nfc < 20
    assert _max_diff(got, expected) < ATOL


@pytest.mark.parametrize("name", ["flux", "wan", "qwenimage", "zimage", "flux_kontext"])
def test_runner_drops_into_a_diffusers_pipeline(workdir, name):
    """``pipe.transformer = OnnxCachedModel(...)``: the pipeline reads its config and dtype and calls
    it like the torch model; latents and full steps equal the eager cached model's in the same
    pipeline, a second run starts a new generation. Wan with CFG and Qwen-Image with true CFG call
    the transformer for the conditional and unconditional branches under ``cache_context``: two
    caches, as eager. FLUX is exported with dynamic token counts: the one graph also serves another
    resolution and prompt. Z-Image takes and returns lists of per-image latents, positionally, its
    timestep counting up; its rotary tables and Qwen-Image's are complex (complex_as_real.py).
    FluxKontextPipeline's true CFG calls cond and uncond with the same latents and no
    cache_context: a cache per branch (runtime.BranchFollower)."""
    pytest.importorskip("transformers", reason="diffusers pipelines need the transformers package")
    from conftest import build_pipeline, pipeline_latents, pipeline_threshold

    from rfc_compile.passes.patterns import TOKEN_DIMS
    from rfc_compile.runtime import branch_cache_name

    pipe, kwargs = build_pipeline(name)
    if name == "wan":
        kwargs = dict(kwargs, guidance_scale=5.0, negative_prompt_embeds=0.5 * kwargs["prompt_embeds"])
    config = RFCConfig(mode="rfc", threshold=pipeline_threshold(name))
    model = pipe.transformer
    calls = []
    bind = inspect.signature(model.forward).bind
    def record(_, args, kw):  # PixArt/Wan/Z-Image pass some arguments positionally, the others by name
        calls.append(dict(bind(*args, **kw).arguments))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    pipeline_latents(pipe, kwargs, 2)
    hook.remove()
    dynamic_dims = TOKEN_DIMS["FluxTransformer2DModel"] if name == "flux" else None
    export = to_onnx(model, workdir / f"{name}_pipeline.onnx", calls[0], config, dynamic_dims=dynamic_dims)
    runner = OnnxCachedModel(export.onnx_path)
    assert runner.config.in_channels == model.config.in_channels and runner.dtype == torch.float32

    eager = rfc_compile.optimize(model, config)
    prompt = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    other = {"height": 96, "width": 64, "prompt_embeds": prompt}
    for shape in [{}] + ([other] if name == "flux" else []):  # FLUX: 24 image tokens, 5 text tokens
        call = dict(kwargs, **shape)
        pipe.transformer = eager
        expected = pipeline_latents(pipe, call, STEPS)
        pipe.transformer = runner
        got = pipeline_latents(pipe, call, STEPS)
        assert runner.stats.full_steps == eager.stats.full_steps and 2 < runner.stats.nfc < STEPS
        assert _max_diff([got], [expected]) < ATOL
        assert torch.equal(pipeline_latents(pipe, call, STEPS), got)  # a new generation, not a continued one
    if name == "flux":  # FluxPipeline calls under cache_context("cond"): that cache took the new sizes
        assert runner._named_caches["cond"]["_dims"] == {"image_tokens": 24, "text_tokens": 5}
    if name in ("wan", "qwenimage"):
        assert sorted(runner._named_caches) == ["cond", "uncond"]
    if name == "flux_kontext":
        assert list(runner._named_caches) == [branch_cache_name(1)] and runner.stats.steps == STEPS


def test_bfloat16_export_runs_like_eager(workdir, caplog):
    """A bfloat16 model (FLUX and SD3 are served so) exports with bfloat16 inputs, output and
    ladders; onnxruntime has no bfloat16 CPU kernels (the export says so instead of loading it,
    OnnxCachedModel refuses it), so onnx's reference evaluator runs the graph: a fixed-interval
    generation with the eager bfloat16 cached model's full steps and outputs (within bfloat16's
    rounding: 2-4 ulps of outputs ~1)."""
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    config = RFCConfig(mode="rfe", interval=3, order=2)
    example = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in dit_inputs().items()}
    with caplog.at_level(logging.WARNING, logger="rfc_compile.export.onnx"):
        export = to_onnx(make_tiny_dit().to(torch.bfloat16), workdir / "dit_bf16.onnx", example, config)
    assert "no bfloat16 kernels" in caplog.text
    sidecar = export.sidecar
    dtypes = {s.name: s.dtype for s in sidecar.state}
    assert dtypes["transformer_blocks_0_attn1.ladder.0"] == "bfloat16" and sidecar.outputs[0].dtype == "bfloat16"
    with pytest.raises(ModelFileError, match="bfloat16"):
        OnnxCachedModel(export.onnx_path)

    def array(value):
        return value.float().numpy().astype(ml_dtypes.bfloat16) if value.dtype == torch.bfloat16 else value.numpy()

    evaluator = ReferenceEvaluator(str(export.onnx_path))
    names = [d.name for d in sidecar.outputs] + [s.output for s in sidecar.state]
    state = {s.input: np.zeros(s.shape, dtype=numpy_dtype(s.dtype)) for s in sidecar.state}
    eager = rfc_compile.optimize(make_tiny_dit().to(torch.bfloat16), config)
    x, full_steps = example["hidden_states"], []
    for n, t in enumerate(torch.linspace(999, 50, 10).long()):
        call = dict(hidden_states=x, timestep=t.expand(2), class_labels=example["class_labels"])
        expected = eager(**call, return_dict=False)[0].float()
        result = dict(zip(names, evaluator.run(None, {**{d.name: array(call[d.name]) for d in sidecar.inputs}, **state})))
        for s in sidecar.state:  # kept_on_skip: an empty output means "unchanged"
            if not (s.name in sidecar.kept_on_skip and result[s.output].shape[0] == 0):
                state[s.input] = result[s.output]
        full_steps += [n] if int(result["state_out.last_full"]) == n else []
        assert (torch.from_numpy(result["sample"].astype(np.float32)) - expected).abs().max() < 3e-2
        x = (x.float() - 0.05 * expected).to(torch.bfloat16)
    assert full_steps == eager.stats.full_steps == [0, 1, 4, 7]


# --- dynamic batch ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dynamic_onnx(workdir):
    return to_onnx(make_tiny_dit(), workdir / "dit_rfc_dynamic.onnx", dit_inputs(), RFC, dynamic_batch=True).onnx_path


def test_dynamic_batch_graph_runs_each_batch_like_eager(dynamic_onnx):
    """One graph, exported at batch 2, serves generations at batch 2, 4 and 1: each equals the eager
    cached model at that batch; a new batch size starts a new generation with its own cache."""
    graph = onnx.load(str(dynamic_onnx)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["hidden_states"] == ["batch", 4, 8, 8] and dims["class_labels"] == ["batch"]
    assert dims["state.rcs_acc"] == ["batch"] and dims["state.step"] == []
    runner = OnnxCachedModel(dynamic_onnx)
    assert runner.batch_size == 2
    for images, cfg in ((1, True), (2, True), (1, False)):  # model batch 2, 4, 1
        eager = rfc_compile.optimize(make_tiny_dit(), RFC)
        _, expected = ddim_generation(eager, steps=STEPS, batch=images, cfg=cfg)
        _, got = ddim_generation(runner, steps=STEPS, batch=images, cfg=cfg)
        assert runner.batch_size == images * (2 if cfg else 1)
        assert runner.state["rcs_acc"].shape == (runner.batch_size,)
        assert runner.stats.full_steps == eager.stats.full_steps
        assert 2 < runner.stats.nfc < STEPS
        assert _max_diff(got, expected) < ATOL
    with pytest.raises(InputMismatchError, match="exported for"):  # only the batch is dynamic
        runner(hidden_states=torch.randn(2, 4, 16, 16), timestep=torch.ones(2), class_labels=torch.ones(2).long())


def test_dynamic_batch_flux_matches_eager(workdir):
    """FLUX: the text states are batched, the position ids (no batch dim) stay static, also when
    the prompt length equals the batch (patterns.UNBATCHED_INPUTS; torch.export refused it before)."""
    from conftest import FAMILIES, flow_generation, flux_at

    family = flux_at(4, 4, 2)  # 2 text tokens at batch 2
    config = RFCConfig(mode="rfe", interval=3, order=1)
    gen = torch.Generator().manual_seed(0)
    example = dict(hidden_states=torch.randn(2, *family.latent_shape), timestep=torch.ones(2),
                   **family.conditions(2, gen))
    export = to_onnx(FAMILIES["flux"].build(), workdir / "flux_rfe_dynamic.onnx", example, config, dynamic_batch=True)
    shapes = {d.name: d.shape for d in export.sidecar.inputs}
    assert shapes["encoder_hidden_states"] == ("batch", 2, 16)
    assert shapes["img_ids"] == (16, 3) and shapes["txt_ids"] == (2, 3)
    runner = OnnxCachedModel(export.onnx_path)
    for batch in (3, 2):
        eager = rfc_compile.optimize(family.build(), config)
        _, expected = flow_generation(eager, family, steps=12, batch=batch)
        _, got = flow_generation(runner, family, steps=12, batch=batch)
        assert runner.stats.full_steps == eager.stats.full_steps
        assert _max_diff(got, expected) < ATOL


FLUX_SINGLE = "single_transformer_blocks_0_mlp_attn.ladder.0"  # a single block's cache: image + text tokens


@pytest.fixture(scope="module")
def flux_tokens_export(workdir):
    """FLUX (mode rfc) exported at 4x4 latents, 3 text tokens, batch 2, with those three dims dynamic."""
    from conftest import FAMILIES, flux_at

    from rfc_compile.passes.patterns import TOKEN_DIMS

    config = RFCConfig(mode="rfc", threshold=FAMILIES["flux"].threshold, order=1)
    gen = torch.Generator().manual_seed(0)
    example = dict(hidden_states=torch.randn(2, 16, 4), timestep=torch.ones(2), **flux_at(4, 4, 3).conditions(2, gen))
    return to_onnx(FAMILIES["flux"].build(), workdir / "flux_rfc_tokens.onnx", example, config, dynamic_batch=True,
                   dynamic_dims=TOKEN_DIMS["FluxTransformer2DModel"])


def test_dynamic_tokens_flux_serves_other_resolutions_and_prompt_lengths(flux_tokens_export):
    """FLUX exported once with dynamic image and text token counts (and batch) runs generations at
    other latent grids, prompt lengths and batches, each equal to the eager cached model at that
    shape; the single block's cache follows image + text tokens, as the model concatenates them."""
    from conftest import flow_generation, flux_at

    export, single = flux_tokens_export, FLUX_SINGLE
    config = RFCConfig(**export.sidecar.rfc_config)
    gen = torch.Generator().manual_seed(0)
    shapes = {d.name: d.shape for d in [*export.sidecar.inputs, *export.sidecar.outputs, *export.sidecar.state]}
    assert shapes["img_ids"] == ("image_tokens", 3) and shapes["encoder_hidden_states"] == ("batch", "text_tokens", 16)
    assert shapes["sample"] == ("batch", "image_tokens", 4)
    assert shapes[single] == ("batch", 2, "image_tokens + text_tokens", 16)
    runner = OnnxCachedModel(export.onnx_path)
    for height, width, text, batch in ((4, 4, 3, 2), (6, 5, 7, 2), (3, 4, 2, 3), (1, 1, 1, 1)):  # sizes of 1 too
        family = flux_at(height, width, text)
        eager = rfc_compile.optimize(family.build(), config)
        _, expected = flow_generation(eager, family, steps=12, batch=batch)
        _, got = flow_generation(runner, family, steps=12, batch=batch)
        assert runner.dims == {"batch": batch, "image_tokens": height * width, "text_tokens": text}
        assert runner.state[single].shape == (batch, 2, height * width + text, 16)
        assert runner.stats.full_steps == eager.stats.full_steps
        assert 2 < runner.stats.nfc < 12
        assert _max_diff(got, expected) < ATOL
    call = dict(hidden_states=torch.randn(2, 20, 4), timestep=torch.ones(2), **flux_at(4, 4, 3).conditions(2, gen))
    with pytest.raises(InputMismatchError, match="disagree on the size of 'image_tokens'"):
        runner(**call)


@pytest.mark.parametrize("name, joint", [
    ("flux2", "single_transformer_blocks_0_attn"), ("flux3", "single_transformer_blocks_0_attn"),
    ("ovis_image", "single_transformer_blocks_0_mlp_attn"), ("chroma", "single_transformer_blocks_0_mlp_attn"),
    ("krea2", "transformer_blocks_0_attn"),
    pytest.param("longcat_image", "single_transformer_blocks_0_mlp_attn", marks=pytest.mark.slow),
    pytest.param("bria", "single_transformer_blocks_0_mlp_attn", marks=pytest.mark.slow)])
def test_dynamic_tokens_serve_other_resolutions_and_prompt_lengths(workdir, name, joint):
    """FLUX.2 (TOKEN_DIMS: its position ids are batched, tokens in dim 1), FLUX.3 and FLUX's other
    descendants (ids without a batch dim, as FLUX's; Chroma's attention mask has text + image tokens,
    an expression in both dims; Krea 2's position ids likewise) exported once run generations at another
    latent grid, prompt length and batch, equal to the eager cached model; a joint block's cache (a
    single block's; Krea 2's every block's) holds image and text tokens."""
    import dataclasses
    import functools

    from conftest import FAMILIES, flow_generation

    from rfc_compile.passes.patterns import TOKEN_DIMS

    family = FAMILIES[name]
    model = family.build()
    config = RFCConfig(mode="rfc", threshold=family.threshold, order=1)
    export = to_onnx(model, workdir / f"{name}_rfc_tokens.onnx", family.example(), config, dynamic_batch=True,
                     dynamic_dims=TOKEN_DIMS[type(model).__name__])
    shapes = {d.name: d.shape for d in [*export.sidecar.inputs, *export.sidecar.state]}
    if name != "krea2":  # its text and image ids are one input, position_ids
        assert shapes["img_ids"] == (("batch", "image_tokens", 4) if name == "flux2"
                                     else ("image_tokens", family.example()["img_ids"].shape[1]))
    assert shapes[f"{joint}.ladder.0"] == ("batch", 2, "image_tokens + text_tokens", 16)
    runner = OnnxCachedModel(export.onnx_path)
    for height, width, text, batch in ((4, 4, 3, 2), (4, 5, 7, 3)):
        at = dataclasses.replace(family, latent_shape=(height * width, 4),
                                 conditions=functools.partial(family.conditions, height=height, width=width, text=text))
        eager = rfc_compile.optimize(family.build(), config)
        _, expected = flow_generation(eager, at, steps=10, batch=batch)
        _, got = flow_generation(runner, at, steps=10, batch=batch)
        assert runner.dims == {"batch": batch, "image_tokens": height * width, "text_tokens": text}
        assert runner.stats.full_steps == eager.stats.full_steps and 2 < runner.stats.nfc < 10
        assert _max_diff(got, expected) < ATOL


@pytest.mark.parametrize("name", ["sd3", "pixart", "cogview4", "cogview3plus", "qwenimage"])
def test_dynamic_text_tokens_serve_other_prompt_lengths(workdir, name):
    """SD3, PixArt, CogView4, CogView3-Plus and Qwen-Image (TOKEN_DIMS: prompt length only) exported once
    at one prompt length and batch run generations at another of each, equal to the eager cached model;
    SD3's context ladders follow the prompt length, CogView3-Plus's ff ladder text + 16 image tokens
    (torch.export refused that as Dim.AUTO; capture.dim_spec gives it as a derived dim). (PixArt with a
    dynamic batch failed to load before: a Squeeze of a batched tensor that fix_squeeze left alone
    because the shape was not fully static.) Qwen-Image's code fixed the length twice (its rotary code
    reads it with int(), its mask code makes it a tensor: traceable.py's twins), and its branches read
    it off a stride, which torch.onnx has no function for (export/translations.py)."""
    from conftest import FAMILIES, flow_generation, with_text

    from rfc_compile.passes.patterns import TOKEN_DIMS

    family = FAMILIES[name]
    config = RFCConfig(mode="rfc", threshold=family.threshold, order=1)
    gen = torch.Generator().manual_seed(0)
    example = dict(hidden_states=torch.randn(2, *family.latent_shape), timestep=torch.ones(2),
                   **family.conditions(2, gen))
    model = family.build()
    export = to_onnx(model, workdir / f"{name}_rfc_text.onnx", example, config, dynamic_batch=True,
                     dynamic_dims=TOKEN_DIMS[type(model).__name__])
    state = {s.name: s.shape for s in export.sidecar.state}
    if name == "sd3":  # joint blocks cache the context stream too
        assert state["transformer_blocks_0_ff_context.ladder.0"] == ("batch", 2, "text_tokens", 16)
    if name == "cogview4":  # one ff region over both streams: image ladder, then text ladder
        assert state["transformer_blocks_0_ff.ladder.1"] == ("batch", 2, "text_tokens", 16)
    if name == "cogview3plus":  # one ff call on the concatenated text + image tokens
        assert state["transformer_blocks_0_ff.ladder.0"] == ("batch", 2, "text_tokens + 16", 16)
    runner = OnnxCachedModel(export.onnx_path)
    for text, batch in ((example["encoder_hidden_states"].shape[1], 2), (9, 3)):
        eager = rfc_compile.optimize(family.build(), config)
        _, expected = flow_generation(eager, with_text(family, text), steps=10, batch=batch)
        _, got = flow_generation(runner, with_text(family, text), steps=10, batch=batch)
        assert runner.dims == {"text_tokens": text, "batch": batch}
        assert runner.stats.full_steps == eager.stats.full_steps
        assert 2 < runner.stats.nfc < 10
        assert _max_diff(got, expected) < ATOL


def test_dynamic_tokens_ltx2_given_its_rotary_coordinates(workdir):
    """LTX-2 given its rotary coordinates (as LTX2Pipeline passes them) reads neither its latent grid nor
    its frame rate: one export (TOKEN_DIMS: video, audio and prompt tokens) runs another grid, audio
    length, prompt length and batch, equal to the eager cached model; the sidecar lists the grid and
    frame rate as ignored arguments, which the runner takes at any value. (The example's video and audio
    latents are views of one tensor: traced as views, their strides put size guards on the trace.)"""
    from conftest import FAMILIES, flow_generation, ltx2_at

    from rfc_compile.passes.patterns import TOKEN_DIMS

    family = FAMILIES["ltx2"]
    config = RFCConfig(mode="rfc", threshold=family.threshold, order=2)
    export = to_onnx(family.build(), workdir / "ltx2_rfc_tokens.onnx", family.example(), config, dynamic_batch=True,
                     dynamic_dims=TOKEN_DIMS["LTX2VideoTransformer3DModel"])
    assert export.sidecar.ignored_arguments == ("num_frames", "height", "width", "fps", "audio_num_frames")
    assert not {"num_frames", "height", "width"} & set(export.sidecar.constants)
    runner = OnnxCachedModel(export.onnx_path)
    for (frames, height, width, audio, text), batch in (((2, 4, 4, 8, 3), 2), ((3, 2, 4, 5, 5), 3)):
        at = ltx2_at(frames, height, width, audio, text)
        eager = rfc_compile.optimize(family.build(), config)
        _, expected = flow_generation(eager, at, steps=10, batch=batch)
        _, got = flow_generation(runner, at, steps=10, batch=batch)
        assert runner.dims == {"batch": batch, "video_tokens": frames * height * width, "audio_tokens": audio,
                               "text_tokens": text, "audio_text_tokens": text}
        assert runner.stats.full_steps == eager.stats.full_steps and 2 < runner.stats.nfc < 10
        assert _max_diff(got, expected) < ATOL


def test_dynamic_prompt_length_alone_flux(workdir):
    """FLUX exported with only the prompt length dynamic (a fixed resolution, as most services run it):
    its single blocks cache text + 16 image tokens, a size torch.export refused as Dim.AUTO ("must
    always be related to text_tokens by text_tokens + 16"); it is a derived dim now
    (capture.dim_spec). The graph serves other prompt lengths like the eager cached model."""
    from conftest import FAMILIES, flow_generation, flux_at

    config = RFCConfig(mode="rfc", threshold=FAMILIES["flux"].threshold, order=1)
    gen = torch.Generator().manual_seed(0)
    example = dict(hidden_states=torch.randn(2, 16, 4), timestep=torch.ones(2), **flux_at(4, 4, 3).conditions(2, gen))
    export = to_onnx(FAMILIES["flux"].build(), workdir / "flux_rfc_text_only.onnx", example, config,
                     dynamic_dims={"encoder_hidden_states": {1: "text_tokens"}, "txt_ids": {0: "text_tokens"}})
    shapes = {d.name: d.shape for d in [*export.sidecar.inputs, *export.sidecar.state]}
    assert shapes[FLUX_SINGLE] == (2, 2, "text_tokens + 16", 16)
    assert shapes["hidden_states"] == (2, 16, 4)
    runner = OnnxCachedModel(export.onnx_path)
    for text in (3, 7):
        family = flux_at(4, 4, text)
        eager = rfc_compile.optimize(family.build(), config)
        _, expected = flow_generation(eager, family, steps=10, batch=2)
        _, got = flow_generation(runner, family, steps=10, batch=2)
        assert runner.dims == {"text_tokens": text}
        assert runner.state[FLUX_SINGLE].shape == (2, 2, text + 16, 16)
        assert runner.stats.full_steps == eager.stats.full_steps
        assert 2 < runner.stats.nfc < 10
        assert _max_diff(got, expected) < ATOL


@pytest.mark.parametrize("name", ["sana", "pixart", "sd3", "cogview4", "wan", *(pytest.param(name, marks=pytest.mark.slow) for name in (
    "hunyuan_image", "auraflow", "skyreels_v2", "sana_video", "helios", "wan_vace", "hunyuan_video", "cogview3plus", "mochi", "chronoedit",
    "hunyuandit", "kandinsky5", "cosmos"))])
def test_dynamic_resolution_serves_other_latent_sizes(workdir, name):
    """Models that cut the latents into patches (patterns.RESOLUTION_DIMS) exported once, with the
    latent height and width as ``patch * grid_height`` / ``patch * grid_width`` (and Sana with a dynamic
    batch too), run generations at other latent sizes, square or not, equal to the eager cached model
    with its full steps; the cache follows the grid (``grid_height*grid_width`` tokens). torch.cond failed
    on such graphs (a stride ``Max(1, (h//2)*(w//2))``): the trace sizes the latents by the grid now
    (CachedStep's ``dims``, rebuilt inside the ONNX graph: no extra input). A size that is not whole
    patches is a clear error. Inputs that the pipeline sizes by the grid follow it (Hunyuan-DiT's
    rotary table, ``grid_height*grid_width`` rows; Kandinsky 5's rotary positions, index ranges over the
    grid, in a list input), and a call whose inputs disagree on the grid is refused."""
    import onnx
    from conftest import FAMILIES, flow_generation

    from rfc_compile.passes.patterns import resolution_dims_for

    family = FAMILIES[name]
    config = RFCConfig(mode="rfc", threshold=family.threshold, order=1)
    model = family.build()
    dims, ranges = resolution_dims_for(model, family.example())
    patch = 2 if name != "hunyuan_image" else 1
    grid = "grid_height" if patch == 1 else f"{patch}*grid_height"
    channels_last = name == "kandinsky5"  # (B, frames, height, width, C)
    axes = (3, 4) if len(family.latent_shape) == 4 and not channels_last else (2, 3)  # videos: (B, C, F, H, W)
    inputs = {"wan_vace": ("hidden_states", "control_hidden_states"),
              "cosmos": ("hidden_states", "condition_mask")}.get(name, ("hidden_states",))
    grid_sized = {"hunyuandit": {"image_rotary_emb": ({0: "grid_height*grid_width"},) * 2},
                  "kandinsky5": {"visual_rope_pos": [None, {0: "grid_height"}, {0: "grid_width"}]}}.get(name, {})
    assert dims == {**{i: dict(zip(axes, (grid, grid.replace("height", "width")))) for i in inputs}, **grid_sized}
    # bounded by their rotary table (rope_max_seq_len 32 here; Cosmos' max_size 16 latents, 8 patches, from
    # 2), SD3 and CogView3-Plus by their position table (pos_embed_max_size 8)
    bound = {"wan": 32, "skyreels_v2": 32, "sana_video": 32, "wan_vace": 32, "chronoedit": 32, "sd3": 8,
             "cogview3plus": 8, "cosmos": 8}.get(name)
    bounded = bound is not None
    low = 2 if name == "cosmos" else 1
    assert ranges == ({"grid_height": (low, bound), "grid_width": (low, bound)} if bounded else {})
    export = to_onnx(model, workdir / f"{name}_rfc_resolution.onnx", family.example(), config,
                     dynamic_batch=name == "sana", dynamic_dims=dims, dim_ranges=ranges)
    shapes = {d.name: d.shape for d in [*export.sidecar.inputs, *export.sidecar.state]}
    assert tuple(shapes["hidden_states"][a] for a in axes) == (grid, grid.replace("height", "width"))
    assert export.sidecar.dim_ranges["grid_height"] == ranges.get("grid_height", (1, 65536))
    assert any("grid_height*grid_width" in str(shape) for shape in shapes.values())  # a ladder over the grid
    graph_inputs = [i.name for i in onnx.load(str(export.onnx_path), load_external_data=False).graph.input]
    assert not [i for i in graph_inputs if i.startswith("dims.")]
    runner = OnnxCachedModel(export.onnx_path)
    *lead, height, width = family.latent_shape[:3] if channels_last else family.latent_shape
    trail = family.latent_shape[3:] if channels_last else ()
    # other grids, not square (AuraFlow's position table, 4 x 4 patches in its tiny config, bounds its grid)
    larger = [(height // patch + 2, width // patch - 1, 2)] if name != "auraflow" else []
    for grid_h, grid_w, batch in [(height // patch, width // patch, 2), *larger,
                                  (max(height // patch - 1, 1), max(width // patch - 2, 1), 3 if name == "sana" else 2)]:
        sized = dataclasses.replace(family, latent_shape=(*lead, grid_h * patch, grid_w * patch, *trail))
        if name == "wan_vace":  # its control video's latents are sized by the same grid
            sized = dataclasses.replace(sized, conditions=functools.partial(
                _vace_conditions_at, family.conditions, (grid_h * patch, grid_w * patch)))
        if name == "hunyuandit":  # its rotary table has one row per patch
            sized = dataclasses.replace(sized, conditions=functools.partial(family.conditions, grid=(grid_h, grid_w)))
        if name in ("kandinsky5", "cosmos"):  # rotary positions over the grid; a condition mask of the latents' size
            sized = dataclasses.replace(sized, conditions=functools.partial(
                family.conditions, height=grid_h * patch, width=grid_w * patch))
        eager = rfc_compile.optimize(family.build(), config)
        _, expected = flow_generation(eager, sized, steps=10, batch=batch)
        _, got = flow_generation(runner, sized, steps=10, batch=batch)
        assert runner.dims == {"grid_height": grid_h, "grid_width": grid_w, **({"batch": batch} if name == "sana" else {})}
        assert runner.stats.full_steps == eager.stats.full_steps
        assert 2 < runner.stats.nfc < 10
        assert _max_diff(got, expected) < ATOL
    if patch > 1:
        odd = family.example()
        odd["hidden_states"] = torch.randn(2, *lead, height + 1, width, *trail)
        with pytest.raises(InputMismatchError, match="whole grid_height"):
            runner(**odd)
    if name == "hunyuandit":  # a rotary table for another grid than the latents': refused with the sizes
        mismatched = family.example()
        mismatched["image_rotary_emb"] = family.conditions(2, torch.Generator(), grid=(3, 3))["image_rotary_emb"]
        with pytest.raises(InputMismatchError, match=r"image_rotary_emb.0.*\[9, 8\].*grid_height\*grid_width"):
            runner(**mismatched)
    if name == "kandinsky5":  # positions for another grid than the latents'
        mismatched = family.example()
        mismatched["visual_rope_pos"] = family.conditions(2, torch.Generator(), height=6)["visual_rope_pos"]
        with pytest.raises(InputMismatchError, match="disagree on the size of 'grid_height'"):
            runner(**mismatched)
    if bounded:  # beyond its rotary table: refused by the runner, as the sidecar records the bound
        big = family.example()
        big["hidden_states"] = torch.randn(2, *lead, 66, width, *trail)
        with pytest.raises(InputMismatchError, match="grid_height"):
            runner(**big)
    if name == "sana" and importlib.util.find_spec("tritonclient") is not None:
        _check_triton_sequence(export, dataclasses.replace(family, latent_shape=(*lead, height + 4, width - 2)))


def _vace_conditions_at(conditions, size: tuple[int, int], batch: int, gen: torch.Generator) -> dict:
    """Wan VACE's conditions with the control video's latents at another latent size."""
    call = conditions(batch, gen)
    control = call["control_hidden_states"]
    call["control_hidden_states"] = torch.randn(*control.shape[:-2], *size, generator=gen)
    return call


def _check_triton_sequence(export, family) -> None:
    """The Triton model of ``export`` played like Triton does (state_out -> state, the first request's
    state at the export's example shape, garbage) over one generation of ``family``: the ONNX
    runner's outputs and full steps (its state sizes computed from the request's input shapes)."""
    from rfc_compile.export import validate_triton_config
    from rfc_compile.export.triton import write_triton_repository

    model_dir = write_triton_repository(export.onnx_path, export.onnx_path.parent / "triton_check")
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    dtypes = {i.name: np.int64 if "int64" in i.type else np.float32 for i in session.get_inputs()}
    state = {s.input_name: np.full(list(s.initial_state[0].dims), 7, dtype=dtypes[s.input_name])
             for s in validate_triton_config(model_dir / "config.pbtxt").sequence_batching.state}
    runner = OnnxCachedModel(export.onnx_path)
    gen = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, *family.latent_shape, generator=gen), family.conditions(2, gen)
    _triton_generation(session, runner, state, x,
                       lambda x, sigma: dict(family.call_inputs(x, family.timestep(sigma).expand(2)), **cond))


def _triton_generation(session, runner, state: dict, x: torch.Tensor, call) -> dict:
    """One 10-step generation played through the Triton model (state_out -> state, START on the first
    request) beside the ONNX runner (``call(x, sigma)``: a step's kwargs): each step's sample is the
    runner's and so are the full steps (read off ``state_out.last_full``); returns the final state."""
    last_full = []
    for n, sigma in enumerate(torch.linspace(1.0, 0.1, 10)):
        kwargs = call(x, sigma)
        result, state = _triton_request(session, kwargs, state, start=n == 0)
        expected = runner(**kwargs, return_dict=False)[0]
        np.testing.assert_allclose(result["sample"], expected.numpy(), atol=1e-5)
        last_full.append(int(result["state_out.last_full"][0]))
        x = x - 0.1 * expected
    assert [n for n, lf in enumerate(last_full) if lf == n] == runner.stats.full_steps
    return state


@pytest.mark.parametrize("name", ["mochi", pytest.param("hunyuan_video", marks=pytest.mark.slow)])
def test_dynamic_frames_serve_other_video_lengths(workdir, name):
    """Mochi and HunyuanVideo (TOKEN_DIMS: the latent frame count) exported once at 2 frames run
    generations of 3 and 4 frames equal to the eager cached model. With torch.cond's own tracing this
    failed: its wrapper gave every operand fresh sizes, and a ladder of frames x 16 tokens could not be
    matched to its state (the cond operator is called directly now, rewrite.py)."""
    from conftest import FAMILIES, flow_generation

    from rfc_compile.passes.patterns import TOKEN_DIMS

    channels, _, height, width = FAMILIES[name].latent_shape
    family = dataclasses.replace(FAMILIES[name], latent_shape=(channels, 2, height, width))
    config = RFCConfig(mode="rfc", threshold=family.threshold, order=1)
    model = family.build()
    export = to_onnx(model, workdir / f"{name}_rfc_frames.onnx", family.example(), config,
                     dynamic_dims=TOKEN_DIMS[type(model).__name__])
    assert export.sidecar.raw["dynamic_axes"]["frames"]["example"] == 2
    runner = OnnxCachedModel(export.onnx_path)
    for frames in (3, 4):
        sized = dataclasses.replace(family, latent_shape=(channels, frames, height, width))
        eager = rfc_compile.optimize(family.build(), config)
        _, expected = flow_generation(eager, sized, steps=10, batch=2)
        _, got = flow_generation(runner, sized, steps=10, batch=2)
        assert runner.dims == {"frames": frames}
        assert runner.stats.full_steps == eager.stats.full_steps
        assert 2 < runner.stats.nfc < 10
        assert _max_diff(got, expected) < ATOL


def test_dit_square_dynamic_resolution(workdir):
    """DiT takes square latents: exported with one grid for both sides (``2*grid``), one graph serves
    other square sizes like the eager cached model (the original forward at each size). The cache
    holds ``grid**2`` tokens, which torch.export takes as no input size: it is stored as
    ``grid x grid`` (StateEntry.folded) and read as one axis by the step. DiT's own forward reads the
    grid as ``int(tokens ** 0.5)`` (traced as a constant); its traceable twin unpatchifies at the
    input's grid."""
    from rfc_compile.passes.patterns import resolution_dims_for

    config = RFCConfig(mode="rfc", threshold=0.3, order=2)
    model = make_tiny_dit()
    assert resolution_dims_for(model) == ({"hidden_states": {2: "2*grid", 3: "2*grid"}}, {})
    export = to_onnx(model, workdir / "dit_rfc_resolution.onnx", dit_inputs(), config,
                     dynamic_dims=resolution_dims_for(model)[0])
    shapes = {d.name: d.shape for d in export.sidecar.state}
    assert shapes["transformer_blocks_0_attn1.ladder.0"] == (2, 3, "grid", "grid", 16)
    assert export.sidecar.outputs[0].shape == (2, 4, "2*grid", "2*grid")
    runner = OnnxCachedModel(export.onnx_path)
    for size in (8, 12, 6):
        eager = rfc_compile.optimize(make_tiny_dit(), config)
        _, expected = ddim_generation(eager, steps=STEPS, cfg=True, size=size)
        _, got = ddim_generation(runner, steps=STEPS, cfg=True, size=size)
        assert runner.dims == {"grid": size // 2}
        assert runner.state["transformer_blocks_0_attn1.ladder.0"].shape == (2, 3, size // 2, size // 2, 16)
        assert runner.stats.full_steps == eager.stats.full_steps
        assert 2 < runner.stats.nfc < STEPS
        assert _max_diff(got, expected) < ATOL
    with pytest.raises(InputMismatchError, match="grid"):  # not square: two sizes for one dim
        runner(hidden_states=torch.randn(2, 4, 8, 12), timestep=torch.full((2,), 999),
               class_labels=torch.tensor([1, NUM_CLASSES]))
    from rfc_compile.export.tensorrt import profile_shapes  # a TensorRT profile: every folded axis follows the grid

    assert profile_shapes(export.sidecar, {"grid": (2, 4, 8)})["state.transformer_blocks_0_attn1.ladder.0"] == (
        (2, 3, 2, 2, 16), (2, 3, 4, 4, 16), (2, 3, 8, 8, 16))


def test_sidecar_sizes_are_in_the_size_grammar():
    """graph.py writes traced sizes in dims.py's grammar: a power as a product, a floor division that
    divides exactly as its quotient (DiT's output width ``2*((grid**2)//grid)`` is ``2*grid``), and
    one that may not (``2*(h//2)`` is not h for an odd h) kept."""
    import sympy
    from torch.utils._sympy.functions import FloorDiv

    from rfc_compile.dims import eval_dim
    from rfc_compile.export.graph import _SizePrinter, _without_exact_division

    grid, h = sympy.symbols("grid h", integer=True, positive=True)
    written = lambda expr: _SizePrinter().doprint(_without_exact_division(expr))  # noqa: E731
    assert written(2 * FloorDiv(grid**2, grid)) == "2*grid"
    assert eval_dim(written(2 * FloorDiv(h, 2)), {"h": 7}) == 6
    assert eval_dim(written(3 * grid**2 + h), {"grid": 5, "h": 2}) == 77


def test_resolution_dims_errors_are_clear():
    """dynamic_dims sizes: a name, a multiple of one plus a constant, or an expression in dims named
    elsewhere; the example must fit it."""
    from rfc_compile.dims import linear_dim
    from rfc_compile.passes.capture import input_dynamic_shapes

    assert linear_dim("grid_height") == ("grid_height", 1, 0)
    assert linear_dim("2*grid_height") == ("grid_height", 2, 0) and linear_dim("2*(g + 1)") == ("g", 2, 2)
    assert linear_dim("a + b") is None and linear_dim("a*b") is None and linear_dim("h//2") is None
    assert linear_dim("3") is None and linear_dim("g - g") is None
    kwargs = dit_inputs()  # hidden_states (2, 4, 8, 8)
    shapes = input_dynamic_shapes(kwargs, dynamic_dims={"hidden_states": {2: "2*grid_height"}})
    assert shapes["hidden_states"][2].__name__ == "2*grid_height"
    with pytest.raises(ValueError, match="not 3\\*grid_height for any whole grid_height"):
        input_dynamic_shapes(kwargs, dynamic_dims={"hidden_states": {2: "3*grid_height"}})
    with pytest.raises(ValueError, match=r"an expression may use only dims .*unknown: \['h', 'w'\]"):
        input_dynamic_shapes(kwargs, dynamic_dims={"hidden_states": {2: "h*w"}})
    with pytest.raises(ValueError, match="a multiple of one plus a constant"):
        input_dynamic_shapes(kwargs, dynamic_dims={"hidden_states": {2: "2 +"}})
    with pytest.raises(ValueError, match="example size of 2 or more for grid_height"):
        input_dynamic_shapes(kwargs, dynamic_dims={"hidden_states": {2: "8*grid_height"}})


def test_dim_spec_gives_named_derived_or_auto_dims():
    """capture.dim_spec: a state size's torch.export spec from how it follows the named dims."""
    import sympy

    from rfc_compile.passes.capture import dim_spec

    text, image = sympy.symbols("text image", integer=True, positive=True)
    dims = {text: torch.export.Dim("text_tokens"), image: torch.export.Dim("image_tokens")}
    assert dim_spec(sympy.Integer(16), dims) is None and dim_spec(7, dims) is None
    assert dim_spec(text, dims) is dims[text]
    derived = dim_spec(text + 16, dims)
    assert derived.__name__ == "text_tokens + 16" and derived.root is dims[text]
    assert dim_spec(2 * text + 1, dims).__name__ == "2*text_tokens + 1"
    for size in (text + image, text * image, -text + 20, sympy.Symbol("other") + 1):  # left to the trace
        assert dim_spec(size, dims) is torch.export.Dim.AUTO


def test_dynamic_dims_errors_are_clear(monkeypatch):
    from rfc_compile.errors import UnsupportedModelError
    from rfc_compile.dims import eval_dim
    from rfc_compile.passes.capture import capture

    assert eval_dim("image_tokens + text_tokens", {"image_tokens": 16, "text_tokens": 3}) == 19
    assert eval_dim("2*(h//2)*(w//2)", {"h": 9, "w": 6}) == 24
    with pytest.raises(ValueError, match="cannot evaluate"):
        eval_dim("__import__('os')", {})
    example = dit_inputs()
    with pytest.raises(ValueError, match="not a tensor argument"):
        capture(make_tiny_dit(), example, dynamic_dims={"encoder_hidden_states": {1: "text_tokens"}})
    with pytest.raises(ValueError, match="example size of 2 or more"):
        capture(make_tiny_dit(), dit_inputs(batch=1), dynamic_dims={"hidden_states": {0: "batch"}})
    with pytest.raises(ValueError, match="example batch of 2 or more"):
        capture(make_tiny_dit(), dit_inputs(batch=1), dynamic_batch=True)
    # DiT reads its grid as int(tokens ** 0.5): torch.export traced the example's 4 with no error, and
    # returned a graph whose output fits the example only; the trace's guards fail at another size
    # (passes/fixed_dims.py), square or not. Its traceable twin (the grid from the input) in place,
    # only a grid that is not square is refused.
    from rfc_compile.passes.patterns import TRACEABLE_METHODS

    with monkeypatch.context() as patched:
        patched.delitem(TRACEABLE_METHODS, "DiTTransformer2DModel")
        for dims in ({2: "2*grid_height", 3: "2*grid_width"}, {2: "2*grid", 3: "2*grid"}):
            with pytest.raises(UnsupportedModelError, match=r"fixes them \(torch traced the guard Eq\(TruncToInt.*, "
                                                              r"false at \{'grid"):
                capture(make_tiny_dit().eval(), example, dynamic_dims={"hidden_states": dims})
    with pytest.raises(UnsupportedModelError, match=r"guard Eq\(grid_height, grid_width\), false at"):
        capture(make_tiny_dit().eval(), example, dynamic_dims={"hidden_states": {2: "2*grid_height", 3: "2*grid_width"}})
    with pytest.raises(UnsupportedModelError, match="fixes them"):  # torch.export's own refusal: odd heights
        capture(make_tiny_dit().eval(), example, dynamic_dims={"hidden_states": {2: "height", 3: "width"}})
    # a tuple input takes one {dim: size} per element; a size may be an expression in dims named elsewhere
    from conftest import FAMILIES

    hunyuandit = FAMILIES["hunyuandit"]
    grid = {"hidden_states": {2: "2*grid_height", 3: "2*grid_width"}}
    for rotary, words in [(({0: "grid_height*grid_width"},), "has 2 elements, and 1 are named"),
                          (({0: "grid_height*grid_w"},) * 2, "an expression may use only dims that an input's size"),
                          (({0: "grid_height*grid_width + 1"},) * 2, "is 16 in the example, not grid_height"),
                          ({0: "grid_height*grid_width"}, "not a tensor argument")]:
        with pytest.raises(ValueError, match=words):
            capture(hunyuandit.build(), hunyuandit.example(), dynamic_dims={**grid, "image_rotary_emb": rotary})
    # a size given as an expression is Dim.AUTO to torch.export, which fixes it silently where the model's
    # code does: refused, naming the input

    class FixedTable(torch.nn.Module):
        def forward(self, hidden_states, table):
            return hidden_states * 2, table * 3 if table.shape[0] == 16 else table  # a branch on the size: fixed

    table_dims = {"hidden_states": {2: "grid_height", 3: "grid_width"}, "table": {0: "grid_height*grid_width"}}
    with pytest.raises(UnsupportedModelError, match=r"'table' dim 0, given as 'grid_height\*grid_width', traced as "
                                                    r"the example's 16"):
        capture(FixedTable(), {"hidden_states": torch.randn(2, 3, 4, 4), "table": torch.randn(16, 8)},
                dynamic_dims=table_dims)
    # HiDream-I1 makes its latents square: torch.export let 2*grid_width == 2*grid_height through

    hidream = FAMILIES["hidream"]
    with pytest.raises(UnsupportedModelError, match="grid_height traced as the same size as another dynamic dim"):
        capture(hidream.build(), hidream.example(),
                dynamic_dims={"hidden_states": {2: "2*grid_height", 3: "2*grid_width"}})


def test_dim_ranges_are_enforced_by_the_runner(flux_tokens_export, tmp_path):
    """A call whose sizes lie outside a dim's range (the export's, or an engine's profile written into
    its sidecar by build_engine) is refused with the range, not passed on to the backend."""
    from conftest import flux_at

    pair = _copy_pair(flux_tokens_export.onnx_path, tmp_path, "ranged.onnx")
    side = pair.with_name(pair.name + ".rfc.json")
    raw = json.loads(side.read_text())
    assert raw["dynamic_axes"]["image_tokens"] == {"example": 16, "min": 1, "max": 65536}
    raw["dynamic_axes"]["image_tokens"]["max"] = 20
    side.write_text(json.dumps(raw))
    runner = OnnxCachedModel(pair)
    gen = torch.Generator().manual_seed(0)
    runner(hidden_states=torch.randn(2, 20, 4), timestep=torch.ones(2), **flux_at(4, 5, 3).conditions(2, gen))
    assert runner.dims["image_tokens"] == 20
    with pytest.raises(InputMismatchError, match=r"'image_tokens' is 30 in this call.*serves 1\.\.20"):
        runner(hidden_states=torch.randn(2, 30, 4), timestep=torch.ones(2), **flux_at(6, 5, 3).conditions(2, gen))
    assert runner.dims["image_tokens"] == 20  # the refused call changed nothing
    raw["dynamic_axes"]["image_tokens"]["max"] = 8  # below the example: the sidecar contradicts itself
    side.write_text(json.dumps(raw))
    with pytest.raises(ModelFileError, match="inconsistent dynamic dims"):
        OnnxCachedModel(pair)


def test_tensorrt_profile_and_graph_of_a_dynamic_export(flux_tokens_export, tmp_path):
    """What build_engine hands TensorRT for a dynamic-dim export, checked without TensorRT: the
    optimisation profile of every input and state input (state sizes following the model inputs'
    ranges, image + text tokens included), and the graph it parses (skip copies restored, so every
    state output is full-size), which onnxruntime runs at another shape like the plain runner."""
    from conftest import flux_at

    from rfc_compile.export.skip_state import restore_skip_copies
    from rfc_compile.export.tensorrt import _engine_dims, build_engine, profile_dims, profile_shapes

    sidecar = flux_tokens_export.sidecar
    assert profile_dims(sidecar) == {"batch": (1, 2, 2), "image_tokens": (1, 16, 16), "text_tokens": (1, 3, 3)}
    dims = {"batch": (1, 2, 4), "image_tokens": (4, 16, 64), "text_tokens": (1, 3, 8)}
    shapes = profile_shapes(sidecar, dims)
    assert shapes["hidden_states"] == ((1, 4, 4), (2, 16, 4), (4, 64, 4))
    assert shapes["img_ids"] == ((4, 3), (16, 3), (64, 3)) and shapes["txt_ids"] == ((1, 3), (3, 3), (8, 3))
    assert shapes["state." + FLUX_SINGLE] == ((1, 2, 5, 16), (2, 2, 19, 16), (4, 2, 72, 16))
    assert "state.step" not in shapes and "timestep" in shapes  # 0-d / static inputs need no profile
    for bad, why in (({"height": (1, 2, 3)}, "not dynamic"), ({"batch": (1, 5, 4)}, "min <= opt <= max"),
                     ({"image_tokens": (1, 16, 10**6)}, "<= 65536")):
        with pytest.raises(ValueError, match=why):
            profile_shapes(sidecar, bad)
        with pytest.raises(ValueError, match=why):  # before TensorRT is needed
            build_engine(flux_tokens_export.onnx_path, tmp_path / "x.engine", dims=bad)
    # an engine's -1 sizes take the sidecar's dim names (they agree); where the sidecar has a size, "?"
    named = ("batch", 2, "image_tokens + text_tokens", 16)
    assert _engine_dims((-1, 2, -1, 16), named) == named and _engine_dims((-1, 3), (2, 3)) == ("?", 3)

    graph = restore_skip_copies(onnx.load(str(flux_tokens_export.onnx_path)), sidecar.raw["state"],
                                sidecar.kept_on_skip)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    runner = OnnxCachedModel(flux_tokens_export.onnx_path)
    batch, height, width, text = 3, 6, 5, 7
    cond = flux_at(height, width, text).conditions(batch, torch.Generator().manual_seed(1))
    sizes = {"batch": batch, "image_tokens": height * width, "text_tokens": text}
    bound = sidecar.with_dims(sizes)
    state = {s.input: np.zeros(s.shape, dtype=np.int64 if s.dtype == "int64" else np.float32) for s in bound.state}
    x = torch.randn(batch, height * width, 4)
    for sigma in torch.linspace(1.0, 0.1, 8):
        kwargs = dict(hidden_states=x, timestep=sigma.expand(batch), **cond)
        expected = runner(**kwargs, return_dict=False)[0]
        feeds = {d.name: kwargs[d.name].numpy() for d in bound.inputs}
        names = [o.name for o in session.get_outputs()]
        result = dict(zip(names, session.run(names, {**feeds, **state})))
        np.testing.assert_allclose(result["sample"], expected.numpy(), atol=1e-5)
        for s in bound.state:  # every state output full-size on every step
            assert result[s.output].shape == s.shape
            state[s.input] = result[s.output]
        x = x - 0.1 * expected
    assert 2 < runner.stats.nfc < 8


def test_triton_model_of_a_dynamic_export_serves_each_shape(flux_tokens_export, tmp_path):
    """The Triton model of a dynamic-dim export (FLUX, any resolution, prompt length and batch):
    variable-size implicit state (dims -1; initial_state at the example shape), and played like
    Triton does (state_out -> state; the first request's state at the example shape, garbage), each
    sequence at another shape gives the plain ONNX runner's outputs and full steps."""
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] not installed")
    from conftest import flux_at

    from rfc_compile.export import validate_triton_config
    from rfc_compile.export.triton import write_triton_repository

    export = flux_tokens_export  # exported at 4x4 latents, 3 text tokens, batch 2
    model_dir = write_triton_repository(export.onnx_path, tmp_path / "triton")
    seq = validate_triton_config(model_dir / "config.pbtxt").sequence_batching
    single = {s.input_name: s for s in seq.state}["state.single_transformer_blocks_0_mlp_attn.ladder.0"]
    assert list(single.dims) == [-1, 2, -1, 16] and list(single.initial_state[0].dims) == [2, 2, 19, 16]

    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    initial = {i.name: np.full([d if isinstance(d, int) else 0 for d in i.shape], 7,
                               dtype=np.int64 if "int64" in i.type else np.float32)
               for i in session.get_inputs() if i.name.startswith("state.")}
    for s in seq.state:  # what Triton hands a sequence's first request (garbage instead of zeros)
        initial[s.input_name] = np.full(list(s.initial_state[0].dims), 7, dtype=initial[s.input_name].dtype)
    runner = OnnxCachedModel(export.onnx_path)
    for height, width, text, batch in ((6, 5, 7, 2), (3, 4, 2, 3)):
        cond = flux_at(height, width, text).conditions(batch, torch.Generator().manual_seed(1))
        runner.reset()
        state = _triton_generation(session, runner, dict(initial), torch.randn(batch, height * width, 4),
                                   lambda x, sigma: dict(hidden_states=x, timestep=sigma.expand(batch), **cond))
        assert 2 < runner.stats.nfc < 10
        assert state["state.single_transformer_blocks_0_mlp_attn.ladder.0"].shape == (batch, 2, height * width + text, 16)


@pytest.mark.slow
def test_pixart_export_loads_in_onnxruntime(workdir):
    """PixArt's plain ONNX export does not load in onnxruntime (Squeeze of a non-1 dim); fixed here:
    capture drops the squeeze that squeezes nothing (passes/noop_squeeze.py), so the ONNX fix-up
    (fix_squeeze) has nothing left to do."""
    from conftest import FAMILIES, flow_generation

    family = FAMILIES["pixart"]
    config = RFCConfig(mode="rfc", threshold=family.threshold)
    gen = torch.Generator().manual_seed(0)
    example = dict(hidden_states=torch.randn(2, *family.latent_shape), timestep=torch.full((2,), 999.0),
                   **family.conditions(2, gen))
    result = to_onnx(family.build(), workdir / "pixart_rfc.onnx", example, config)
    assert not any(f.startswith("squeeze_axes") for f in result.sidecar.raw["fixups"])
    eager = rfc_compile.optimize(family.build(), config)
    _, expected = flow_generation(eager, family, steps=10)
    runner = OnnxCachedModel(result.onnx_path)
    _, got = flow_generation(runner, family, steps=10)
    assert runner.stats.full_steps == eager.stats.full_steps
    assert _max_diff(got, expected) < ATOL


def test_squeeze_fixup_reads_weight_shapes_not_their_data(monkeypatch):
    """fix_squeeze's shape inference gets the model without its large weights (typed inputs in
    their place): onnx's infer_shapes serializes what it is given, and fails past protobuf's 2 GB
    (a float32 PixArt-Sigma's export would not load in onnxruntime, see the slow test below)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from rfc_compile.export.onnx import fix_squeeze

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((512, 1024)).astype(np.float32)  # 2 MB
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
         helper.make_node("Squeeze", ["y", "axes"], ["out"], name="squeeze_not_one")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 512])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 1024])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    with pytest.raises(Exception, match="Squeeze"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    seen = []
    real = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda m, **kw: seen.append(m.ByteSize()) or real(m, **kw))
    assert fix_squeeze(model) == 1
    assert seen and max(seen) < 100_000 < weight.nbytes  # the weight's shape, not its 2 MB
    x = rng.standard_normal((2, 3, 512)).astype(np.float32)
    (out,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.allclose(out, x @ weight, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_export_past_two_gigabytes_loads_and_matches_eager(tmp_path):
    """A 2.4 GB float32 PixArt (PixArt-Sigma is 2.4 GB in float32): external data, and the graph
    loads in onnxruntime (its no-op Squeeze is dropped at capture; before, the ONNX fix-up's shape
    inference failed on the size); its Triton model is written and checked (before, onnx's
    in-memory checker refused it)."""
    from conftest import pixart_conditions
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        num_attention_heads=30, attention_head_dim=128, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=3840, caption_channels=16, sample_size=8, patch_size=2,
        use_additional_conditions=True, norm_num_groups=1).eval()
    assert sum(p.numel() * p.element_size() for p in model.parameters()) > 2**31
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen), **pixart_conditions(2, gen))
    config = RFCConfig(mode="rfe")
    result = to_onnx(model, tmp_path / "pixart.onnx", dict(kwargs, timestep=torch.tensor([999, 999])), config,
                     triton=tmp_path / "triton")
    assert (tmp_path / "pixart.onnx.data").exists() and result.sidecar.raw["external_data"] == "pixart.onnx.data"
    assert (result.triton_model_dir / "1" / "model.onnx.data").stat().st_size > 2**31
    moved = tmp_path / "moved"  # the graph copied without its weights file: said so, not "invalid graph"
    moved.mkdir()
    for name in ("pixart.onnx", "pixart.onnx.rfc.json"):
        shutil.copy(tmp_path / name, moved / name)
    with pytest.raises(ModelFileError, match=r"keeps its weights in pixart\.onnx\.data, which is not next to it"):
        OnnxCachedModel(moved / "pixart.onnx")
    runner, eager = OnnxCachedModel(result.onnx_path), rfc_compile.optimize(model, config)
    for t in range(900, 0, -100):
        call = dict(kwargs, timestep=torch.tensor([t, t]), return_dict=False)
        with torch.no_grad():
            expected = eager(**call)[0]
        assert _max_diff(runner(**call)[0], expected) < ATOL
        kwargs["hidden_states"] = kwargs["hidden_states"] - 0.1 * expected
    assert runner.stats.full_steps == eager.stats.full_steps


# --- TensorRT (GPU machines with TensorRT only) -----------------------------------------------------

def _require_tensorrt():
    from rfc_compile.export import tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(f"TensorRT path not testable here: {why}")


def test_tensorrt_import_is_lazy():
    import rfc_compile.export as export

    assert callable(export.build_engine) and isinstance(export.TrtCachedModel, type)
    ok, why = export.tensorrt_available()
    assert ok or why  # a reason is always given


@pytest.mark.gpu
def test_tensorrt_engine_matches_eager(rfc_onnx, tmp_path):
    _require_tensorrt()
    from rfc_compile.export import TrtCachedModel, build_engine

    engine = build_engine(rfc_onnx, tmp_path / "dit_rfc.engine", precision="fp32", progress=False)
    runner = TrtCachedModel(engine)
    expected_stats, expected = _eager(RFC)
    _, got = ddim_generation(runner, steps=STEPS, cfg=True)
    assert runner.stats.full_steps == expected_stats.full_steps
    assert _max_diff(got, expected) < 1e-3


@pytest.mark.gpu
def test_tensorrt_dynamic_engine_serves_each_shape_in_its_profile(flux_tokens_export, tmp_path):
    """One engine from the dynamic FLUX export serves generations at shapes inside its profile like
    the onnxruntime runner (same full steps), and refuses a shape outside it."""
    _require_tensorrt()
    from conftest import flow_generation, flux_at

    from rfc_compile.export import TrtCachedModel, build_engine

    dims = {"batch": (1, 2, 3), "image_tokens": (4, 16, 30), "text_tokens": (1, 3, 7)}
    engine = build_engine(flux_tokens_export.onnx_path, tmp_path / "flux.engine", precision="fp32", progress=False,
                          dims=dims)
    trt_runner, ort_runner = TrtCachedModel(engine), OnnxCachedModel(flux_tokens_export.onnx_path)
    for height, width, text, batch in ((4, 4, 3, 2), (6, 5, 7, 3), (2, 2, 1, 1)):
        family = flux_at(height, width, text)
        _, expected = flow_generation(ort_runner, family, steps=12, batch=batch)
        _, got = flow_generation(trt_runner, family, steps=12, batch=batch)
        assert trt_runner.state[FLUX_SINGLE].shape == (batch, 2, height * width + text, 16)
        assert trt_runner.stats.full_steps == ort_runner.stats.full_steps
        assert _max_diff(got, expected) < 1e-3
    with pytest.raises(InputMismatchError, match="serves 4..30"):
        flow_generation(trt_runner, flux_at(8, 4, 3), steps=2)


def test_cli_exports_in_the_dtype_asked_for(tmp_path):
    """`rfc-compile export --dtype float16`: the model is loaded in float16 (a directory through
    diffusers' torch_dtype), the example inputs follow it, and the graph runs a generation like
    the eager float16 cached model."""
    from rfc_compile.cli import main
    from rfc_compile.export.models import load_model

    make_tiny_dit().save_pretrained(tmp_path / "tiny")
    assert next(load_model(str(tmp_path / "tiny"), torch.float16).parameters()).dtype == torch.float16
    path = tmp_path / "dit16.onnx"
    assert main(["export", str(tmp_path / "tiny"), "-o", str(path), "--dtype", "float16", "--mode", "rfe",
                 "--no-triton", "--no-engine"]) == 0
    sidecar = json.loads((tmp_path / "dit16.onnx.rfc.json").read_text())
    assert {i["name"]: i["dtype"] for i in sidecar["inputs"]}["hidden_states"] == "float16"
    assert sidecar["outputs"][0]["dtype"] == "float16"
    runner = OnnxCachedModel(path)
    eager = rfc_compile.optimize(make_tiny_dit().half(), RFCConfig(mode="rfe"))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    labels = torch.tensor([1, 2])
    for t in range(950, 0, -100):
        step = dict(hidden_states=x, timestep=torch.tensor([t, t]), class_labels=labels, return_dict=False)
        with torch.no_grad():
            expected = eager(**step)[0]
        got = runner(**step)[0]
        assert got.dtype == torch.float16
        # outputs ~1: float16 rounding (ORT's kernels vs torch's) measured <= 2.3e-3
        assert (got.float() - expected.float()).abs().max() < 1e-2
        x = x - 0.05 * expected[:, :4]
    assert runner.stats.full_steps == eager.stats.full_steps and runner.stats.nfc < 10

    # Wan keeps modules in float32 when loaded in float16 (its first parameter among them): the
    # example's latents still follow the model's dtype (float32 before: "Input type (float) and
    # bias type (c10::Half)"), its timestep stays float32 as the pipelines pass it
    from conftest import FAMILIES
    from diffusers import WanTransformer3DModel

    FAMILIES["wan"].build().save_pretrained(tmp_path / "wan")
    path = tmp_path / "wan16.onnx"
    assert main(["export", str(tmp_path / "wan"), "-o", str(path), "--dtype", "float16", "--mode", "rfe",
                 "--frames", "2", "--height", "8", "--width", "8", "--text-len", "3", "--no-triton", "--no-engine"]) == 0
    inputs = {i["name"]: i["dtype"] for i in json.loads((tmp_path / "wan16.onnx.rfc.json").read_text())["inputs"]}
    assert inputs["hidden_states"] == "float16" and inputs["timestep"] == "float32"
    runner = OnnxCachedModel(path)
    assert runner.dtype == torch.float16  # what a pipeline casts its latents to
    eager = rfc_compile.optimize(WanTransformer3DModel.from_pretrained(tmp_path / "wan", torch_dtype=torch.float16),
                                 RFCConfig(mode="rfe"))
    x = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    text = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1)).half()
    for t in torch.linspace(999.0, 100.0, 8):
        step = dict(hidden_states=x, timestep=torch.full((2,), float(t)), encoder_hidden_states=text, return_dict=False)
        with torch.no_grad():
            expected = eager(**step)[0]
        assert (runner(**step)[0].float() - expected.float()).abs().max() < 1e-2  # outputs ~1; measured 9.8e-4
        x = (x.float() - 0.05 * expected.float()).half()
    assert runner.stats.full_steps == eager.stats.full_steps == [0, 1, 5]


def test_cli_model_loading(tmp_path):
    """`rfc-compile export` takes a built-in name or a diffusers model directory (class from config.json)."""
    from rfc_compile.export.models import example_inputs, load_model

    original = make_tiny_dit()
    original.save_pretrained(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"))
    assert type(loaded).__name__ == "DiTTransformer2DModel"
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), loaded.state_dict().values()))
    builtin = load_model("tiny-dit")
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), builtin.state_dict().values()))
    kwargs = example_inputs(builtin, batch=2)
    assert kwargs["hidden_states"].shape == (2, 4, 8, 8) and kwargs["timestep"].dtype == torch.long
    with pytest.raises(ValueError, match="neither a built-in model"):
        load_model(str(tmp_path / "nowhere"))
    # a model with fp32-kept modules (Wan's _keep_in_fp32_modules): diffusers loads it only with
    # accelerate (declared in the onnx extra); it failed before
    from conftest import FAMILIES

    wan = FAMILIES["wan"].build()
    wan.save_pretrained(tmp_path / "wan")
    loaded = load_model(str(tmp_path / "wan"))
    assert type(loaded).__name__ == "WanTransformer3DModel"
    assert all(torch.equal(a, b) for a, b in zip(wan.state_dict().values(), loaded.state_dict().values()))
    from rfc_compile.cli import main

    # sizes the model cannot take exactly: one-line errors (an odd latent exported a 6x6 model; batch 0 a traceback)
    assert main(["export", "tiny-dit", "-o", str(tmp_path / "x.onnx"), "--height", "7", "--width", "7"]) == 2
    assert main(["export", "tiny-dit", "-o", str(tmp_path / "x.onnx"), "--batch", "0"]) == 2
    assert not (tmp_path / "x.onnx").exists()
    # --dynamic-tokens only where TOKEN_DIMS says the model allows it: DiT's resolution is fixed
    assert main(["export", "tiny-dit", "-o", str(tmp_path / "x.onnx"), "--dynamic-tokens"]) == 2
    # a dynamic batch needs an example batch >= 2 (torch.export specializes 1): a message, not a traceback
    assert main(["export", "tiny-dit", "-o", str(tmp_path / "x.onnx"), "--batch", "1", "--dynamic-batch"]) == 2
    # --engine-dim: a dynamic dim of this export only (checked before exporting), a valid range
    assert main(["export", "tiny-dit", "-o", str(tmp_path / "x.onnx"), "--engine-dim", "batch=1:2:4"]) == 2
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(SystemExit):
        main(["export", "tiny-dit", "-o", str(tmp_path / "x.onnx"), "--dynamic-batch", "--engine-dim", "batch=1:2"])
    assert main(["export", "tiny-dit", "-o", str(tmp_path / "x.onnx"), "--dynamic-batch", "--no-triton",
                 "--engine-dim", "batch=1:8:4"]) == 2
    assert (tmp_path / "x.onnx").exists()  # the export is done; the engine's profile is what was refused


class _BesselScaled(torch.nn.Module):
    """An op torch.onnx has no function for (the modified Bessel function I0), as a model's own
    code might use one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.special.i0(x.clamp(-1, 1))


def test_a_model_torch_onnx_cannot_convert_fails_with_the_cause(tmp_path):
    """The error carries the cause (the op torch.onnx has no function for), not only torch.onnx's
    generic "next steps", and not an exception the caller was handling (a fallback export in an
    ``except`` block: the support table's static export after a refused dynamic batch reported the
    refusal as the cause)."""
    import re

    from rfc_compile.export import ExportError

    model = make_tiny_dit()
    model.transformer_blocks[0].ff.net[1] = _BesselScaled()  # in the feed-forward, where its dropout was
    try:
        raise RuntimeError("an earlier failure the caller is handling")
    except RuntimeError:
        with pytest.raises(ExportError) as info:
            to_onnx(model, tmp_path / "bessel.onnx", dit_inputs(), RFCConfig(mode="rfc"))
    message = str(info.value)
    assert re.search(r"DiTTransformer2DModel failed: .* <- DispatchError: .*i0", message), message
    assert "earlier failure" not in message


def test_cli_dynamic_resolution(tmp_path, capsys):
    """``rfc-compile export --dynamic-resolution``: a Sana model directory exports with its latent grid
    dynamic (patch size from its config) and the engine dims may name the grid; DiT with one grid for
    both sides (square latents); Hunyuan-DiT with its rotary table sized by the grid; FLUX, whose
    latents are tokens, is refused in one line."""
    from conftest import FAMILIES

    from rfc_compile.cli import main

    FAMILIES["sana"].build().save_pretrained(tmp_path / "sana")
    out = tmp_path / "sana.onnx"
    assert main(["export", str(tmp_path / "sana"), "-o", str(out), "--height", "8", "--width", "8",
                 "--dynamic-batch", "--dynamic-resolution", "--no-triton", "--engine-dim", "grid_height=1:4:8"]) == 0
    sidecar = json.loads((tmp_path / "sana.onnx.rfc.json").read_text())
    assert set(sidecar["dynamic_axes"]) == {"batch", "grid_height", "grid_width"}
    assert sidecar["dynamic_axes"]["grid_height"]["example"] == 4
    assert next(i for i in sidecar["inputs"] if i["name"] == "hidden_states")["shape"] == [
        "batch", 4, "2*grid_height", "2*grid_width"]
    capsys.readouterr()
    assert main(["export", "tiny-dit", "-o", str(tmp_path / "dit.onnx"), "--dynamic-resolution", "--no-triton"]) == 0
    sidecar = json.loads((tmp_path / "dit.onnx.rfc.json").read_text())
    assert next(i for i in sidecar["inputs"] if i["name"] == "hidden_states")["shape"][2:] == ["2*grid", "2*grid"]
    # Hunyuan-DiT: its rotary table, a tuple input its pipeline sizes by the grid, follows the latents
    FAMILIES["hunyuandit"].build().save_pretrained(tmp_path / "hunyuandit")
    assert main(["export", str(tmp_path / "hunyuandit"), "-o", str(tmp_path / "hdit.onnx"), "--height", "8",
                 "--width", "8", "--dynamic-resolution", "--no-triton", "--engine-dim", "grid_width=2:4:8"]) == 0
    inputs = {i["name"]: i["shape"] for i in json.loads((tmp_path / "hdit.onnx.rfc.json").read_text())["inputs"]}
    assert inputs["hidden_states"][2:] == ["2*grid_height", "2*grid_width"]
    assert inputs["image_rotary_emb.0"] == inputs["image_rotary_emb.1"] == ["grid_height*grid_width", 8]
    FAMILIES["flux"].build().save_pretrained(tmp_path / "flux")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "flux"), "-o", str(tmp_path / "x.onnx"), "--dynamic-resolution"]) == 2
    assert ("--dynamic-resolution: FluxTransformer2DModel's latent resolution is static in an export (known dynamic: "
            in capsys.readouterr().out)


def test_cli_dynamic_batch_and_prompt_length_qwenimage(tmp_path):
    """``rfc-compile export --dynamic-batch --dynamic-tokens`` of a Qwen-Image model directory: the
    example inputs (export/models.py) pass ``img_shapes`` once per sample, which the sidecar keeps as
    one per-sample entry; the graph serves another batch and prompt length (a first step, computed in
    full, equal to the eager cached model's)."""
    from conftest import FAMILIES

    from rfc_compile.cli import main

    FAMILIES["qwenimage"].build().save_pretrained(tmp_path / "qwen")
    out = tmp_path / "qwen.onnx"
    assert main(["export", str(tmp_path / "qwen"), "-o", str(out), "--height", "8", "--width", "8", "--text-len", "4",
                 "--dynamic-batch", "--dynamic-tokens", "--no-triton"]) == 0
    runner = OnnxCachedModel(out)
    assert runner.sidecar.per_sample_constants == {"img_shapes": [[1, 4, 4]]}
    assert set(runner.sidecar.raw["dynamic_axes"]) == {"batch", "text_tokens"}
    gen = torch.Generator().manual_seed(0)
    call = dict(hidden_states=torch.randn(3, 16, 16, generator=gen), timestep=torch.ones(3),
                encoder_hidden_states=torch.randn(3, 6, 16, generator=gen),
                encoder_hidden_states_mask=torch.ones(3, 6, dtype=torch.long), img_shapes=[[(1, 4, 4)]] * 3)
    eager = rfc_compile.optimize(FAMILIES["qwenimage"].build(), RFCConfig(**runner.sidecar.rfc_config))
    expected = eager(**call, return_dict=False)[0]
    assert _max_diff([runner(**call, return_dict=False)[0]], [expected]) < ATOL
    assert runner.dims == {"batch": 3, "text_tokens": 6}


def test_cli_reports_a_model_that_fails_to_export_in_one_line(tmp_path, monkeypatch, capsys):
    """A model whose code torch.export or torch.onnx cannot follow fails with their exception (not a
    ValueError): the CLI printed a traceback; now one line naming the model and the cause, and exit
    code 1 (-v raises it)."""
    import rfc_compile.export.onnx as onnx_export
    from rfc_compile.cli import main

    def fail(*args, **kwargs):
        raise RuntimeError("We found a fake tensor in the exported program constant's list.\nmore detail")

    monkeypatch.setattr(onnx_export, "to_onnx", fail)  # the CLI imports it when it runs
    assert main(["export", "tiny-dit", "-o", str(tmp_path / "x.onnx")]) == 1
    assert capsys.readouterr().out.strip().endswith(
        "error: exporting DiTTransformer2DModel failed: RuntimeError: We found a fake tensor in the exported program "
        "constant's list. (-v for the traceback)")
    with pytest.raises(RuntimeError, match="fake tensor"):
        main(["export", "tiny-dit", "-o", str(tmp_path / "x.onnx"), "-v"])


@pytest.mark.parametrize("family", ["pixart", "flux", "sd3", "wan", "hunyuan_video", "ltx_video", "chroma",
                                    "skyreels_v2", "mochi", "flux2", "sana", "wan_vace", "auraflow", "qwenimage",
                                    "zimage", "flux3", "longcat_image", "ovis_image", "bria", "krea2", "cogview4",
                                    "cosmos", "sana_video", "chronoedit", "hidream", "hunyuan_image", "cogvideox",
                                    "hunyuandit", "kandinsky5", "ltx2", "helios", "bria_fibo", "motif_video",
                                    "cogview3plus", "hunyuan_video_framepack", "latte"])
def test_cli_example_inputs_fit_each_family(family):
    """The CLI's example inputs (serving shapes) are valid forward kwargs for each family it knows:
    the model's output has the latent's shape at the asked size (2 frames of 8x8 for video models)."""
    from conftest import FAMILIES

    from rfc_compile.export.models import example_inputs

    model = FAMILIES[family].build()
    kwargs = example_inputs(model, batch=2, height=8, width=8, text_len=3, frames=2)
    with torch.no_grad():
        outputs = model(**kwargs, return_dict=False)
    out = outputs if isinstance(outputs, torch.Tensor) else outputs[0]  # Kandinsky 5 returns its sample bare
    if family == "ltx2":  # and the audio latents' tokens: 9 for 9 pixel frames at 24 fps
        assert outputs[1].shape == kwargs["audio_hidden_states"].shape == (2, 9, 4)
    if family == "zimage":  # one (C, F, H, W) latent per sample, in and out
        assert [o.shape for o in out] == [x.shape for x in kwargs["x"]] == [(4, 2, 8, 8)] * 2
        assert all(torch.isfinite(o).all() for o in out)
        return
    hidden = kwargs["hidden_states"]
    if family == "hunyuandit":  # learn_sigma: the noise and the variance, twice the latent's channels
        assert out.shape == (hidden.shape[0], 2 * hidden.shape[1], *hidden.shape[2:]) == (2, 8, 8, 8)
        assert torch.isfinite(out).all()
        return
    if family == "latte":  # learned sigma too, over (B, C, frames, H, W)
        assert out.shape == (hidden.shape[0], 2 * hidden.shape[1], *hidden.shape[2:]) == (2, 8, 2, 8, 8)
        assert torch.isfinite(out).all()
        return
    if family in ("chronoedit", "motif_video"):  # the latents' channels out, latents + condition (+ mask) in
        assert out.shape == (hidden.shape[0], model.config.out_channels, *hidden.shape[2:]) and torch.isfinite(out).all()
        return
    assert out.shape == hidden.shape and torch.isfinite(out).all()
    if family == "cogvideox":  # frames first: (B, F, C, H, W)
        assert out.shape[1:] == (2, 4, 8, 8)
    elif family == "kandinsky5":  # channels last: (B, F, H, W, C)
        assert out.shape[1:] == (2, 8, 8, 4)
    elif out.dim() == 5:  # (B, C, F, H, W)
        assert out.shape[2:] == (2, 8, 8)
    elif family in ("ltx_video", "ltx2"):  # packed: 2 x 8 x 8 tokens at patch 1
        assert out.shape[1] == 2 * 8 * 8
    elif family == "bria_fibo":  # one token per latent pixel
        assert out.shape[1] == 8 * 8
    elif family in ("flux2", "qwenimage", "flux3", "longcat_image", "ovis_image", "bria", "krea2"):  # 2x2-packed: 4 x 4 tokens
        assert out.shape[1] == 4 * 4


@pytest.mark.parametrize("name, shape", [("flux", {}), ("sd3", {}), ("wan", {}), ("pixart_sigma", {}),
                                         ("ltx_video", dict(frames=2, height=2, width=2)),  # 9 frames, 64x64
                                         ("flux2", dict(height=8, width=8)), ("sana", dict(height=8, width=8)),
                                         ("qwenimage", dict(height=8, width=8)), ("krea2", dict(height=8, width=8)),
                                         ("zimage", dict(height=8, width=8, text_len=5)),
                                         ("cogview4", dict(height=8, width=8)), ("hidream", dict(height=8, width=8)),
                                         ("cogview3plus", dict(height=8, width=8, text_len=3)),
                                         ("cogvideox", dict(frames=2, height=4, width=4, text_len=3)),  # 5 frames, 32x32
                                         ("cogvideox_rotary", dict(frames=2, height=4, width=4, text_len=3)),
                                         ("hunyuandit", dict(height=8, width=8)),
                                         ("kandinsky5", dict(frames=2, height=8, width=8, text_len=3)),  # 5 frames, 64x64
                                         # Kandinsky5T2IPipeline resizes 64x64 to 1024x1024
                                         ("kandinsky5_t2i", dict(frames=1, height=128, width=128, text_len=3)),
                                         ("ltx2", dict(frames=2, height=2, width=2, text_len=3)),  # 9 frames, 64x64
                                         ("helios", dict(frames=2, height=4, width=4, text_len=3)),  # a 2-frame chunk
                                         ("bria_fibo", dict(height=4, width=4, text_len=5)),  # 64x64 / 16
                                         ("motif_video", dict(frames=2, height=8, width=8, text_len=4)),
                                         ("latte", dict(frames=2, height=8, width=8, text_len=3))])  # 64x64
def test_cli_example_inputs_are_what_the_pipeline_passes(name, shape):
    """An export bakes in its example's non-tensor arguments and input dtypes, so the CLI's example
    must be what the family's pipeline passes: the same non-tensor values (LTX's default rotary
    scale was missing: its graph ignored the scaling the pipeline asks for) and dtypes the
    pipeline's tensors cast to exactly (LTX's float timesteps, e.g. 978.6, went into an int64
    input, truncated). Rotary tables that pipelines compute outside the model (CogVideoX, Hunyuan-DiT)
    are the pipeline's values exactly, at the pipeline's grid."""
    from conftest import build_pipeline

    from rfc_compile.export.graph import flatten_kwargs
    from rfc_compile.export.models import example_inputs

    pipe, kwargs = build_pipeline(name)
    calls = []
    forward = pipe.transformer.forward
    bind = inspect.signature(forward).bind  # ZImagePipeline passes x, t and cap_feats positionally
    pipe.transformer.forward = lambda *args, **call: calls.append(bind(*args, **call).arguments) or forward(*args, **call)
    # the calls are what counts: pipelines' outputs differ (Kandinsky5T2IPipeline's has ``image``)
    pipe(**kwargs, num_inference_steps=10, output_type="latent", generator=torch.Generator().manual_seed(0))
    example = dict(flatten_kwargs(example_inputs(pipe.transformer, batch=2, **shape)))
    for call in calls:
        for key, value in flatten_kwargs(call):
            if key == "return_dict" or value is None:
                continue
            assert key in example, f"{name}: the pipeline passes {key!r}, the CLI's example does not"
            if isinstance(value, torch.Tensor):
                cast = value.to(example[key].dtype).to(value.dtype)
                assert torch.equal(cast, value), f"{name}: {key} {value.dtype} -> {example[key].dtype}: {value}"
                if key.startswith("image_rotary_emb."):
                    assert torch.equal(example[key], value), f"{name}: {key} is not the pipeline's table"
            else:
                assert example[key] == value, f"{name}: {key}={value!r}, the CLI's example has {example[key]!r}"


def test_a_model_returning_its_sample_bare_gets_it_back_bare(tmp_path):
    """Kandinsky 5 returns its sample itself with ``return_dict=False``, not ``(sample,)``. The
    runner returns it bare too, and the output object with ``return_dict=True`` (before, the
    export took the bare tensor for a tuple of its batch rows: one graph output per sample, and
    ``return_dict=True`` refused the "multi-output" model)."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    class BareDiT(DiTTransformer2DModel):
        def forward(self, *args, return_dict: bool = True, **kwargs):
            sample = super().forward(*args, return_dict=False, **kwargs)[0]
            return Transformer2DModelOutput(sample=sample) if return_dict else sample

    plain = make_tiny_dit()
    model = BareDiT.from_config(plain.config)
    model.load_state_dict(plain.state_dict())
    export = to_onnx(model.eval(), tmp_path / "bare.onnx", dit_inputs(), RFCConfig(mode="full"))
    assert [o.name for o in export.sidecar.outputs] == ["sample"] and export.sidecar.output_tree == 0
    runner = OnnxCachedModel(export.onnx_path)
    call = dit_inputs()
    with torch.no_grad():
        expected = plain(**call, return_dict=False)[0]
    got = runner(**call, return_dict=False)
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape
    assert (got - expected).abs().max() < ATOL
    runner.reset()
    assert torch.equal(runner(**call).sample, got)


def test_exported_contraction_is_right_when_rows_equal_tokens(tmp_path):
    """rfc.contract's Reshape -> MatMul -> Reshape with a ladder whose row count equals its token
    count (3 rows, 3 tokens): exported with the optimizer as to_onnx runs it (safe_rewrites.py),
    onnxruntime gives torch's numbers, not a contraction over the tokens."""
    from rfc_compile.export.safe_rewrites import without_unsound_rewrites
    from rfc_compile.rfc import contract

    class Contract(torch.nn.Module):
        def forward(self, ladder, coeffs):
            return contract(ladder, coeffs)

    ladder, coeffs = torch.randn(2, 3, 3, 5), torch.tensor([1.0, 0.5, 0.25])
    with without_unsound_rewrites() as left_out:
        program = torch.onnx.export(Contract(), (ladder, coeffs), None, dynamo=True, optimize=True,
                                    input_names=["ladder", "coeffs"])
    assert left_out >= 2
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"ladder": ladder.numpy(), "coeffs": coeffs.numpy()})[0]
    np.testing.assert_allclose(got, Contract()(ladder, coeffs).numpy(), atol=1e-6)


def test_exported_epsilons_are_kept():
    """onnxscript's no-op rules match constants *near* 0 or 1, so ``den + 1e-15`` (Sana's linear
    attention) became ``den`` and 0 / 0 gave NaN; exported as to_onnx runs the optimizer
    (safe_rewrites.py), the epsilons stay and onnxruntime gives torch's numbers."""
    from rfc_compile.export.safe_rewrites import without_unsound_rewrites

    class Epsilons(torch.nn.Module):
        def forward(self, num, den):
            return num / (den + 1e-15), (num + 1e-9) * 1.000001 - 1e-12

    num, den = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.0, 0.0, 4.0])
    with without_unsound_rewrites():
        program = torch.onnx.export(Epsilons().eval(), (num, den), None, dynamo=True, optimize=True,
                                    input_names=["num", "den"])
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"num": num.numpy(), "den": den.numpy()})
    for a, b in zip(got, Epsilons()(num, den)):
        np.testing.assert_array_equal(a, b.numpy())  # 0 / 1e-15 = 0 and 1 / 1e-15 = 1e15, not NaN and inf


@pytest.mark.parametrize("opset", [17, 18])
def test_reduce_l2_fixup_keeps_the_function(opset):
    """ReduceL2 (main graph and inside an If branch) -> Sqrt(ReduceSum(x * x)): same values in
    onnxruntime, none left; opset 17 carries axes as an attribute, 18 as an input."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from rfc_compile.export.reduce_l2 import reduce_l2_as_sum_of_squares

    def l2(name, x, out, keepdims):
        if opset >= 18:
            return [helper.make_node("Constant", [], [name + "_axes"],
                                     value=helper.make_tensor(name + "_ax", TensorProto.INT64, [1], [1])),
                    helper.make_node("ReduceL2", [x, name + "_axes"], [out], name=name, keepdims=keepdims)]
        return [helper.make_node("ReduceL2", [x], [out], name=name, axes=[1], keepdims=keepdims)]

    def branch(name):
        return helper.make_graph(l2(name, "x", name + "_out", 1), name, [],
                                 [helper.make_tensor_value_info(name + "_out", TensorProto.FLOAT, [2, 1, 3])])

    nodes = l2("top", "x", "norm", 0) + [
        helper.make_node("If", ["c"], ["branch_norm"], then_branch=branch("then"), else_branch=branch("else"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 3]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("norm", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("branch_norm", TensorProto.FLOAT, [2, 1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)

    def run(proto):
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x, "c": np.array(True)})

    before = run(model)
    assert reduce_l2_as_sum_of_squares(model) == 3
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node] + [n.op_type for node in model.graph.node
                                                    for a in node.attribute if a.g.node for n in a.g.node]
    assert "ReduceL2" not in ops and ops.count("ReduceSum") == 3
    after = run(model)
    for a, b in zip(before, after):
        assert a.shape == b.shape and np.allclose(a, b, rtol=1e-6)
    assert np.allclose(before[0], np.linalg.norm(x, axis=1), rtol=1e-6)


def test_bool_where_fixup_keeps_the_function():
    """A bool Where (main graph and inside an If branch; onnxruntime has no kernel for it and
    refuses the graph) -> Or(And(c, x), And(Not(c), y)): loads, equals numpy's where with
    broadcasting; a float Where is left alone."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from rfc_compile.export.bool_where import bool_where_as_logic

    def branch(name):
        return helper.make_graph(
            [helper.make_node("Where", ["c", "x", "y"], [name + "_out"], name=name)], name, [],
            [helper.make_tensor_value_info(name + "_out", TensorProto.BOOL, [2, 3, 4])])

    nodes = [helper.make_node("Where", ["c", "x", "y"], ["picked"], name="top"),
             helper.make_node("Where", ["c", "f", "f"], ["floats"], name="float_where"),
             helper.make_node("If", ["flag"], ["branch_picked"], then_branch=branch("then"), else_branch=branch("else"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [2, 1, 4]),
                                           helper.make_tensor_value_info("x", TensorProto.BOOL, [3, 1]),
                                           helper.make_tensor_value_info("y", TensorProto.BOOL, [2, 3, 4]),
                                           helper.make_tensor_value_info("f", TensorProto.FLOAT, [4]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("picked", TensorProto.BOOL, [2, 3, 4]),
                               helper.make_tensor_value_info("floats", TensorProto.FLOAT, [2, 1, 4]),
                               helper.make_tensor_value_info("branch_picked", TensorProto.BOOL, [2, 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    with pytest.raises(Exception, match="Where"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    assert bool_where_as_logic(model) == 3
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(0)
    feeds = {"c": rng.random((2, 1, 4)) < 0.5, "x": rng.random((3, 1)) < 0.5, "y": rng.random((2, 3, 4)) < 0.5,
             "f": rng.standard_normal(4).astype(np.float32), "flag": np.array(True)}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    picked, floats, branch_picked = session.run(None, feeds)
    expected = np.where(feeds["c"], feeds["x"], feeds["y"])
    assert picked.dtype == bool and np.array_equal(picked, expected) and np.array_equal(branch_picked, expected)
    assert np.array_equal(floats, np.where(feeds["c"], feeds["f"], feeds["f"]))
    assert [n.op_type for n in model.graph.node].count("Where") == 1  # the float one


def test_einsum_fixup_casts_operands_to_torchs_type():
    """An Einsum of float32 and float64 operands (main graph and inside an If branch; onnxruntime
    refuses the graph) gets its float32 operand cast to float64, the type torch.einsum computes in:
    loads, equals torch.einsum of the same operands; a one-type Einsum is left alone."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from rfc_compile.export.einsum_types import common_type, einsum_common_type

    def branch(name):
        return helper.make_graph(
            [helper.make_node("Einsum", ["pos", "omega"], [name + "_out"], name=name, equation="bn,d->bnd")],
            name, [], [helper.make_tensor_value_info(name + "_out", TensorProto.DOUBLE, [2, 3, 4])])

    nodes = [helper.make_node("Einsum", ["pos", "omega"], ["mixed"], name="top", equation="bn,d->bnd"),
             helper.make_node("Einsum", ["pos", "pos"], ["plain"], name="one_type", equation="bn,bn->b"),
             helper.make_node("If", ["flag"], ["branch_mixed"], then_branch=branch("then"), else_branch=branch("else"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pos", TensorProto.FLOAT, [2, 3]),
                                           helper.make_tensor_value_info("omega", TensorProto.DOUBLE, [4]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("mixed", TensorProto.DOUBLE, [2, 3, 4]),
                               helper.make_tensor_value_info("plain", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("branch_mixed", TensorProto.DOUBLE, [2, 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    with pytest.raises(Exception, match="Einsum"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    assert einsum_common_type(model) == 3  # the top one and one per branch
    onnx.checker.check_model(model, full_check=True)
    pos, omega = torch.randn(2, 3), torch.randn(4, dtype=torch.float64)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    mixed, plain, branch_mixed = session.run(None, {"pos": pos.numpy(), "omega": omega.numpy(), "flag": np.array(True)})
    expected = torch.einsum("bn,d->bnd", pos, omega)
    assert mixed.dtype == np.float64 and np.allclose(mixed, expected.numpy(), rtol=1e-12)
    assert np.array_equal(branch_mixed, mixed) and plain.dtype == np.float32
    assert [n.op_type for n in model.graph.node].count("Cast") == 1
    assert common_type([TensorProto.FLOAT16, TensorProto.BFLOAT16]) == TensorProto.FLOAT  # as torch promotes


@pytest.mark.parametrize("name", ["qwenimage", "zimage"])
def test_complex_rotary_families_full_mode_onnx_equals_the_original(workdir, name):
    """Caching off, the ONNX graph of a model with complex rotary tables (carried as real pairs:
    complex_as_real.py) gives the plain model's outputs over a whole generation (ORT's kernels
    round differently from torch's: within ATOL after 10 Euler steps that feed the outputs back)."""
    from conftest import FAMILIES, flow_generation

    family = FAMILIES[name]
    export = to_onnx(family.build(), workdir / f"{name}_full.onnx", family.example(), RFCConfig(mode="full"))
    assert any(f.startswith("complex_as_real") for f in export.sidecar.raw["fixups"])
    _, expected = flow_generation(family.build(), family, steps=10)
    _, got = flow_generation(OnnxCachedModel(export.onnx_path), family, steps=10)
    assert _max_diff(got, expected) < ATOL


@pytest.mark.parametrize("name", ["hunyuan_video", "cogvideox", "ltx_video", "chroma", "skyreels_v2", "mochi",
                                  "flux2", "sana", "qwenimage", "zimage", "flux3", "ovis_image", "krea2", "cogview4",
                                  "cosmos", "hunyuandit", "sana_video", "chronoedit", "helios", "kandinsky5", "bria_fibo",
                                  "motif_video", "ltx2", "hidream", "cogview3plus", "hunyuan_video_framepack", "latte",
                                  pytest.param("longcat_image", marks=pytest.mark.slow), pytest.param("bria", marks=pytest.mark.slow),
                                  pytest.param("wan_vace", marks=pytest.mark.slow),
                                  pytest.param("auraflow", marks=pytest.mark.slow),
                                  pytest.param("hunyuan_image", marks=pytest.mark.slow)])
def test_other_families_ort_generation_matches_eager(workdir, name):
    """The video families, Chroma, FLUX.2 and Sana (DiT, FLUX, SD3, PixArt and Wan have their own
    tests above): one RFC export each, a 10-step generation in onnxruntime with the eager cached
    model's full steps and outputs. HunyuanVideo's graph needed bool_where_as_logic to load at
    all; Hunyuan-DiT's failed to export ("cond_true might be aliasing the input or the output")
    until clone_aliasing_branch_outputs; Sana's gave NaN until its attention's epsilon was kept
    (test_exported_epsilons_are_kept). With a dynamic batch, at batch 2 and 3: Kandinsky 5 (its
    unbatched list of rotary positions needs a None per element in torch.export's dynamic_shapes),
    Chroma (its guidance zeros came from a Python list of the batch's length: traceable.py's twin),
    HiDream-I1 (its Llama states hold the batch at dim 1, patterns.BATCH_AXES; its output was
    unpatchified in a loop over the samples; its rotary einsum mixes float32 and float64 operands,
    which onnxruntime refused until einsum_common_type), Qwen-Image (its ``img_shapes``, one latent grid
    per sample, reads the first: the sidecar holds that entry and the runner takes a copy per sample,
    refusing any other value)."""
    from conftest import FAMILIES, flow_generation

    family = FAMILIES[name]
    config = RFCConfig(mode="rfc", threshold=family.threshold, order=2)
    dynamic_batch = name in ("kandinsky5", "chroma", "hidream", "qwenimage")
    export = to_onnx(family.build(), workdir / f"{name}_rfc.onnx", family.example(), config, dynamic_batch=dynamic_batch)
    runner = OnnxCachedModel(export.onnx_path)
    for batch in (2, 3) if dynamic_batch else (2,):
        eager = rfc_compile.optimize(family.build(), config)
        _, expected = flow_generation(eager, family, steps=10, batch=batch)
        _, got = flow_generation(runner, family, steps=10, batch=batch)
        assert runner.stats.full_steps == eager.stats.full_steps
        assert 2 < runner.stats.nfc < 10
        assert _max_diff(got, expected) < ATOL
    if name == "hunyuan_video":
        assert any(f.startswith("bool_where_as_logic") for f in export.sidecar.raw["fixups"])
    if name == "ltx2":  # its modulation squeezes (B, 1, D) tensors at dim 2, inside the If: dropped at capture
        assert not any(f.startswith("squeeze_axes") for f in export.sidecar.raw["fixups"])
    if name == "hunyuandit":  # its no-op float32 casts of the timestep embedding alias a branch input
        assert any(f.startswith("clone_aliasing_branch_outputs") for f in export.sidecar.raw["fixups"])
    if name == "qwenimage":
        assert export.sidecar.per_sample_constants == {"img_shapes": [[1, 4, 4]]}
        assert not any(k.startswith("img_shapes") for k in export.sidecar.constants)
        call = {**family.call_inputs(torch.randn(3, *family.latent_shape), torch.ones(3)),
                **family.conditions(3, torch.Generator().manual_seed(0))}
        for img_shapes in ([[(1, 4, 4)]] * 2, [[(1, 4, 4)], [(1, 4, 4)], [(1, 2, 8)]]):
            with pytest.raises(InputMismatchError, match=r"'img_shapes' must hold one entry per sample \(3\), each "
                                                         r"\[\[1, 4, 4\]\]"):
                runner(**{**call, "img_shapes": img_shapes})
    if name == "hidream":
        assert any(f.startswith("einsum_common_type") for f in export.sidecar.raw["fixups"])
        assert {d.name: d.shape for d in export.sidecar.inputs}["encoder_hidden_states_llama3"] == (3, "batch", 4, 16)


def test_dynamic_batch_mochi_attends_over_each_samples_valid_prompt_tokens(workdir):
    """Mochi's attention loops over the samples, each attending over its valid prompt tokens
    (``nonzero`` of its mask), which fixes the batch; at a symbolic batch capture uses a batched twin
    (traceable.mochi_attention_forward: valid tokens first, padding masked out of the keys, zero rows
    past them). One graph exported at batch 2 with no padding runs batch 3 with padded prompts, one
    of them padded in the middle (the original moves its valid tokens first), like the eager model."""
    import dataclasses

    from conftest import FAMILIES, flow_generation

    mochi = FAMILIES["mochi"]

    def padded(batch, gen):
        masks = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.float32)
        return {**mochi.conditions(batch, gen), "encoder_attention_mask": masks[:batch]}

    family = dataclasses.replace(mochi, conditions=padded)
    config = RFCConfig(mode="rfc", threshold=mochi.threshold, order=2)
    export = to_onnx(mochi.build(), workdir / "mochi_rfc_dynamic.onnx", mochi.example(), config, dynamic_batch=True)
    runner = OnnxCachedModel(export.onnx_path)
    eager = rfc_compile.optimize(mochi.build(), config)
    _, expected = flow_generation(eager, family, steps=10, batch=3)
    _, got = flow_generation(runner, family, steps=10, batch=3)
    _, unpadded = flow_generation(rfc_compile.optimize(mochi.build(), config), mochi, steps=10, batch=3)
    assert runner.stats.full_steps == eager.stats.full_steps
    assert _max_diff(got, expected) < ATOL
    assert _max_diff(unpadded, expected) > 1e-3  # the padding matters


def test_one_tensor_in_two_arguments_exports_as_two_inputs(tmp_path):
    """An example that passes one tensor in two arguments (LTX2Pipeline's timestep and sigma) exports
    two graph inputs, each read: the runner serves calls where they differ (before, the graph read
    one of them; tests/reliability/test_state_safety.py has the eager case)."""
    from conftest import SigmaScaledDiT

    model = SigmaScaledDiT().eval()
    t = torch.full((2,), 900)
    example = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=t, sigma=t, class_labels=torch.tensor([1, 2]))
    export = to_onnx(model, tmp_path / "scaled.onnx", example, RFCConfig(mode="full"))
    assert {i.name for i in export.sidecar.inputs} >= {"timestep", "sigma"} and not export.sidecar.raw["unused_inputs"]
    runner = OnnxCachedModel(export.onnx_path)
    call = dict(example, sigma=torch.full((2,), 300))
    with torch.no_grad():
        expected = model(**call, return_dict=False)[0]
    assert (runner(**call, return_dict=False)[0] - expected).abs().max() < ATOL
