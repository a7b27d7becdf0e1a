"""[compile] inductor backend and the ``rfc`` dynamo backend: same schedule and outputs as eager,
no graph breaks, no recompiles after the first generation, state kept per input shape."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
import torch._dynamo
from conftest import ddim_generation, make_tiny_dit
from torch.fx._pytree import tree_flatten_spec

import rfc_compile
from rfc_compile import RFCConfig
from rfc_compile.backends import RFCHandle, SplitCondRunner, make_runner, split_at_cond

STEPS = 20
CONFIG = RFCConfig(mode="rfc", threshold=0.8)  # tiny random DiT: both full and skipped steps


def _close(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for n, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {n}: {m}")


@pytest.fixture(scope="module")
def eager_runs():
    """Two generations (seeds 0, 1) of the eager cached model: outputs and full steps."""
    cached = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    runs = []
    for seed in (0, 1):
        _, outs = ddim_generation(cached, steps=STEPS, cfg=True, seed=seed)
        runs.append((outs, cached.stats.full_steps))
    assert 2 < len(runs[0][1]) < STEPS, "the setting must give both full and skipped steps"
    return runs


@pytest.fixture(scope="module")
def inductor_model():
    return rfc_compile.optimize(make_tiny_dit(), CONFIG, backend="inductor")


def test_inductor_matches_eager_and_does_not_recompile(eager_runs, inductor_model):
    _, outs = ddim_generation(inductor_model, steps=STEPS, cfg=True, seed=0)
    assert inductor_model.stats.full_steps == eager_runs[0][1]
    _close(outs, eager_runs[0][0])

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        _, outs = ddim_generation(inductor_model, steps=STEPS, cfg=True, seed=1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert inductor_model.stats.full_steps == eager_runs[1][1]
    _close(outs, eager_runs[1][0])


def _example(cached):
    x = torch.randn(2, 4, 8, 8)
    call = dict(hidden_states=x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 10]),
                return_dict=False)
    cached.prepare(**call)
    return call, cached.state_spec.init()


def test_torch_compile_over_an_optimized_model_runs_it_as_is(eager_runs):
    """``torch.compile(optimize(model))``: dynamo traced into the cached model's Python (capture,
    the cache's bookkeeping) and crashed on the first call ("exception table entry start
    instruction has no offset"). Its forward is left to run as is (torch.compiler.disable): the
    generation equals the eager cached model's; with fullgraph=True torch's error says what to do
    instead (optimize's backend="inductor")."""
    torch._dynamo.reset()
    compiled = torch.compile(rfc_compile.optimize(make_tiny_dit(), CONFIG))
    _, outs = ddim_generation(compiled, steps=STEPS, cfg=True, seed=0)
    assert compiled.stats.full_steps == eager_runs[0][1]
    _close(outs, eager_runs[0][0])
    torch._dynamo.reset()  # else the first compile's decision for forward's frame is reused
    strict = torch.compile(rfc_compile.optimize(make_tiny_dit(), CONFIG), fullgraph=True)
    with pytest.raises(Exception, match="backend='inductor'"):
        ddim_generation(strict, steps=1, cfg=True)


def test_rewritten_graph_and_split_pieces_have_no_graph_breaks():
    cached = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    call, state = _example(cached)
    gm = cached.graph_module
    explained = torch._dynamo.explain(gm)(kwargs=call, state=state)
    assert explained.graph_break_count == 0 and explained.graph_count == 1

    pre, posts = split_at_cond(gm)
    flat = tree_flatten_spec(((), {"kwargs": call, "state": state}), gm.graph._codegen.pytree_info.in_spec)
    pred, *live = pre(*flat)
    for piece, args in [(pre, flat), (posts[True], live), (posts[False], live)]:
        explained = torch._dynamo.explain(piece)(*args)
        assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_split_runner_equals_the_cond_graph_and_passes_state_through():
    """pre -> host branch -> post is the cond graph; a skipped step copies no state."""
    cached = rfc_compile.optimize(make_tiny_dit(), RFCConfig(mode="taylorseer", interval=3))
    call, _ = _example(cached)
    gm = cached.graph_module
    runner = SplitCondRunner.__new__(SplitCondRunner)  # the split, run uncompiled
    info = gm.graph._codegen.pytree_info
    runner.in_spec, runner.out_spec = info.in_spec, info.out_spec
    runner.pre, runner.posts = split_at_cond(gm)
    state_a = state_b = cached.state_spec.init()
    for step in range(5):  # full, full, skip, skip, full
        out_a, new_a = gm(kwargs=call, state=state_a)
        out_b, new_b = runner(kwargs=call, state=state_b)
        torch.testing.assert_close(out_b, out_a, atol=0, rtol=0)
        assert new_a.keys() == new_b.keys()
        for name in new_a:
            torch.testing.assert_close(new_b[name], new_a[name], atol=0, rtol=0)
        if step in (2, 3):
            ladders = [n for n in new_b if ".ladder." in n]
            assert ladders and all(new_b[n] is state_b[n] for n in ladders)
        state_a, state_b = new_a, new_b


def test_compile_options_pass_through(monkeypatch):
    cached = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    _example(cached)  # before the patch: export itself calls torch.compile for the cond
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    make_runner(cached.graph_module, "inductor", {"mode": "max-autotune", "dynamic": False})
    make_runner(cached.graph_module, "inductor", {"split_cond": False, "dynamic": False})
    assert seen[:3] == [{"fullgraph": True, "mode": "max-autotune", "dynamic": False}] * 3  # pre, 2 posts
    assert seen[3:] == [{"fullgraph": True, "dynamic": False}]
    with pytest.raises(ValueError, match="backend"):
        make_runner(cached.graph_module, "tensorrt")


def test_rfc_dynamo_backend_matches_eager_and_keeps_state(eager_runs):
    handle = RFCHandle()
    compiled = torch.compile(make_tiny_dit(), backend="rfc", fullgraph=True,
                             options={"config": CONFIG, "handle": handle})
    for seed in (0, 1):
        if seed == 1:
            with torch._dynamo.config.patch(error_on_recompile=True):
                _, outs = ddim_generation(compiled, steps=STEPS, cfg=True, seed=seed)
        else:
            _, outs = ddim_generation(compiled, steps=STEPS, cfg=True, seed=seed)
        assert handle.stats.full_steps == eager_runs[seed][1]
        assert handle.stats.nfc < STEPS
        _close(outs, eager_runs[seed][0])
    assert len(handle.sessions) == 1  # one dynamo compile for both generations


@pytest.fixture(scope="module")
def eager_by_batch():
    reference = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    runs = {}
    for batch in (1, 2):
        _, outs = ddim_generation(reference, steps=12, batch=batch, cfg=True)
        runs[batch] = (outs, reference.stats.full_steps)
    return runs


@pytest.mark.parametrize("dynamic, graphs", [(False, 2), (None, 2), (True, 1)],
                         ids=["static", "automatic-dynamic", "dynamic"])
def test_rfc_backend_new_shape_gets_its_own_state(dynamic, graphs, eager_by_batch):
    """A new batch size recompiles (dynamic=False: one dynamo graph per shape; None: one
    shape-generic graph after the second shape; True: one from the start, its module floats
    such as LayerNorm's eps passed as 0-d tensors, which failed before) and never sees another
    shape's cache."""
    torch._dynamo.reset()  # dynamo remembers sizes that changed per code object, across compiles
    handle = RFCHandle()
    compiled = torch.compile(make_tiny_dit(), backend="rfc", fullgraph=True, dynamic=dynamic,
                             options={"config": CONFIG, "handle": handle, "backend": "eager"})
    for batch in (1, 2, 1):
        _, outs = ddim_generation(compiled, steps=12, batch=batch, cfg=True)
        expected, full_steps = eager_by_batch[batch]
        assert handle.stats.full_steps == full_steps
        _close(outs, expected)
    assert len(handle.sessions) == graphs  # batch 1 again reuses its graph: no third compile


def test_rfc_backend_under_autocast_returns_what_optimize_does():
    """Under ``torch.autocast`` the backend's shape propagation cast real weights in fake mode, and
    autocast's weight cache handed those fake copies to the real run: the model returned
    FakeTensors. It now gives optimize()'s outputs, then runs without autocast as well."""
    reference = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    compiled = torch.compile(make_tiny_dit(), backend="rfc", options={"config": CONFIG, "backend": "eager"})
    for autocast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, expected = ddim_generation(reference, steps=8, cfg=True)
            _, outs = ddim_generation(compiled, steps=8, cfg=True)
        assert all(type(out) is torch.Tensor for out in outs)
        assert outs[0].dtype == (torch.bfloat16 if autocast else torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(outs, expected))


def test_rfc_backend_options_are_checked():
    with pytest.raises(ValueError, match="unknown rfc backend options"):
        rfc_compile.backends.rfc_backend(None, [], options={"threshold": 0.1})
    with pytest.raises(TypeError, match="RFCConfig"):
        rfc_compile.backends.rfc_backend(None, [], options={"config": {"mode": "rfc"}})


def test_rfc_backend_is_registered_through_the_entry_point():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert "rfc" in eps.names
    assert eps["rfc"].value == "rfc_compile.backends:rfc_backend"
    assert "rfc" in torch._dynamo.list_backends(exclude_tags=())


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_rfc_backend_on_diffusers_transformers(family):
    """diffusers wraps FLUX's, Wan's (and most transformers') ``forward`` in a ``(*args, **kwargs)``
    decorator, so dynamo sees ``L['kwargs']['hidden_states']``: the backend still names the inputs
    (it took them for weights before and refused every region: "no input depends on the denoising
    state"). Same full steps and outputs as rfc_compile.optimize."""
    from conftest import FAMILIES, flow_generation

    spec = FAMILIES[family]
    config = RFCConfig(mode="rfc", threshold=spec.threshold)
    eager = rfc_compile.optimize(spec.build(), config)
    _, expected = flow_generation(eager, spec, steps=10)
    handle = RFCHandle()
    compiled = torch.compile(spec.build(), backend="rfc", fullgraph=True,
                             options={"config": config, "handle": handle, "backend": "eager"})
    _, outs = flow_generation(compiled, spec, steps=10)
    assert handle.stats.full_steps == eager.stats.full_steps and 2 < handle.stats.nfc < 10
    _close(outs, expected)


def test_rfc_backend_keeps_cond_and_uncond_calls_apart():
    """WanPipeline with CFG calls the transformer twice per step, under cache_context("cond") /
    ("uncond") on the original module, which the backend cannot see: it gives the k-th call at a
    timestep cache k, so both branches get their own cache, as optimize()'s cache_context gives
    them (before, they shared one: 20 steps counted, latents 0.29 off). Two generations in a row."""
    import warnings

    from conftest import FAMILIES, build_pipeline, pipeline_latents

    config = RFCConfig(mode="rfc", threshold=FAMILIES["wan"].threshold)
    pipe, kwargs = build_pipeline("wan")
    kwargs = dict(kwargs, guidance_scale=5.0, negative_prompt_embeds=kwargs["prompt_embeds"] * 0.5)
    transformer = pipe.transformer
    pipe.transformer = rfc_compile.optimize(transformer, config)
    expected = pipeline_latents(pipe, kwargs, steps=10)
    full_steps = {name: s.stats.full_steps for name, s in pipe.transformer._named_sessions.items()}
    handle = RFCHandle()
    pipe.transformer = torch.compile(transformer, backend="rfc", fullgraph=True,
                                     options={"config": config, "handle": handle, "backend": "eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "two calls in a row at one timestep"
        for _ in range(2):
            _close([pipeline_latents(pipe, kwargs, steps=10)], [expected])
    assert [s.stats.full_steps for s in handle.sessions] == [full_steps["cond"], full_steps["uncond"]]
    assert 2 < handle.stats.nfc < 10


def test_rfc_backend_keeps_a_second_order_samplers_evaluations_in_one_cache():
    """A Heun sampler (diffusers' HeunDiscreteScheduler) evaluates the model at the next timestep
    on the predicted latents, then again there on the corrected ones: two calls at one timestep
    with other latents, which are two steps of one cache, as optimize() has them. (The backend
    split calls at one timestep by order before, and gave every second evaluation a cache of its
    own.)"""
    from conftest import FAMILIES

    spec = FAMILIES["flux"]
    config = RFCConfig(mode="rfc", threshold=spec.threshold)

    def heun(transformer, steps=6):
        gen = torch.Generator().manual_seed(0)
        cond = spec.conditions(2, gen)
        x = torch.randn(2, *spec.latent_shape, generator=gen)
        sigmas, outs = torch.linspace(1.0, 0.0, steps + 1), []

        def velocity(latents, sigma):
            t = spec.timestep(sigma).expand(2)
            with torch.no_grad():
                out = spec.batched_output(spec.sample_of(transformer(**spec.call_inputs(latents, t), return_dict=False,
                                                                     **cond)))
            outs.append(out.clone())
            return out

        for n in range(steps):
            dt = sigmas[n + 1] - sigmas[n]
            v = velocity(x, sigmas[n])
            x = x + dt * (v + velocity(x + dt * v, sigmas[n + 1])) / 2 if n + 1 < steps else x + dt * v
        return outs

    eager = rfc_compile.optimize(spec.build(), config)
    with pytest.warns(UserWarning, match="two calls in a row at timestep"):
        expected = heun(eager)
    handle = RFCHandle()
    compiled = torch.compile(spec.build(), backend="rfc", fullgraph=True,
                             options={"config": config, "handle": handle, "backend": "eager"})
    with pytest.warns(UserWarning, match="two calls in a row at timestep"):
        outs = heun(compiled)
    assert len(handle.sessions) == 1 and handle.stats.steps == len(outs) == 11
    assert handle.stats.full_steps == eager.stats.full_steps and 2 < handle.stats.nfc < 11
    _close(outs, expected)


def test_rfc_backend_refuses_data_dependent_shapes_clearly():
    """Mochi's attention takes nonzero() of its text mask: the backend's shape propagation cannot
    follow it, and says what works instead (optimize(), which captures with torch.export)."""
    from conftest import FAMILIES, flow_generation

    from rfc_compile import UnsupportedModelError

    spec = FAMILIES["mochi"]
    compiled = torch.compile(spec.build(), backend="rfc", fullgraph=True,
                             options={"config": RFCConfig(mode="rfc", threshold=spec.threshold), "backend": "eager"})
    with pytest.raises(UnsupportedModelError, match=r"data-dependent shapes .*rfc_compile\.optimize"):
        flow_generation(compiled, spec, steps=2)


def test_rfc_backend_refuses_a_piece_of_the_model_clearly():
    """Z-Image's forward enters a ``torch.device`` context, where dynamo breaks the graph: the
    blocks reach the backend in a graph whose inputs are intermediate values, not the latents or
    timestep. Refused, naming the graph break and what works instead (it said only "no input of
    any cached region depends on the denoising state" before); optimize() runs it."""
    from conftest import FAMILIES, flow_generation

    from rfc_compile import UnsupportedModelError

    spec = FAMILIES["zimage"]
    compiled = torch.compile(spec.build(), backend="rfc",
                             options={"config": RFCConfig(mode="rfc", threshold=spec.threshold), "backend": "eager"})
    with pytest.raises(UnsupportedModelError, match=r"graph break .*rfc_compile\.optimize"):
        flow_generation(compiled, spec, steps=2)
