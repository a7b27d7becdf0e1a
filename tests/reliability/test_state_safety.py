"""[reliability] state isolation, serving sessions, changing inputs and weights."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import NUM_CLASSES, ddim_generation, make_tiny_dit

import rfc_compile
from rfc_compile import RFCConfig

CONFIG = RFCConfig(mode="rfc", threshold=0.8)
STEPS = 8


def _call(model, x, t=500, labels=None):
    labels = labels if labels is not None else torch.arange(x.shape[0]) % NUM_CLASSES
    return model(hidden_states=x, timestep=torch.full((x.shape[0],), t), class_labels=labels, return_dict=False)[0]


def test_100_sequential_generations_equal_fresh_runs():
    reused = rfc_compile.optimize(make_tiny_dit(), CONFIG)  # new generations detected from the timestep
    other = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    for seed in range(100):
        latents, _ = ddim_generation(reused, steps=5, cfg=True, seed=seed)
        expected, _ = ddim_generation(other.new_session(), steps=5, cfg=True, seed=seed)
        assert torch.equal(latents, expected), f"generation {seed} differs from a fresh session"
        assert reused.stats.steps == 5
    for seed in (0, 57, 99):  # and from genuinely fresh optimized models
        expected, _ = ddim_generation(rfc_compile.optimize(make_tiny_dit(), CONFIG), steps=5, cfg=True, seed=seed)
        latents, _ = ddim_generation(reused, steps=5, cfg=True, seed=seed)
        assert torch.equal(latents, expected)


def test_interleaved_sessions_equal_sequential_runs():
    cached = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    expected = {seed: ddim_generation(cached.new_session(), steps=STEPS, cfg=True, seed=seed)[0] for seed in (1, 2)}
    # two requests at different denoising steps, interleaved on one model
    sessions = {1: cached.new_session(), 2: cached.new_session()}
    steppers = {seed: _stepwise(sessions[seed], seed) for seed in (1, 2)}
    next(steppers[1]), next(steppers[1]), next(steppers[1])  # request 1 is three steps ahead
    results = {}
    while len(results) < 2:
        for seed, stepper in steppers.items():
            if seed in results:
                continue
            try:
                next(stepper)
            except StopIteration as done:
                results[seed] = done.value
    for seed in (1, 2):
        assert torch.equal(results[seed], expected[seed])
        assert sessions[seed].stats.steps == STEPS


def _stepwise(transformer, seed):
    """ddim_generation, one step per next()."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(1) % NUM_CLASSES
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents])
        y = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])
        out = transformer(hidden_states=x, timestep=t.expand(2), class_labels=y, return_dict=False)[0]
        cond, uncond = out.chunk(2)
        latents = scheduler.step(uncond + 1.5 * (cond - uncond), t, latents).prev_sample
        yield
    return latents


def test_two_models_in_two_threads_never_share_state():
    models = [rfc_compile.optimize(make_tiny_dit(), CONFIG) for _ in range(2)]
    expected = [ddim_generation(m.new_session(), steps=STEPS, cfg=True, seed=s)[0] for m, s in zip(models, (3, 4))]
    results: dict[int, torch.Tensor] = {}

    def work(i):
        for _ in range(3):
            results[i] = ddim_generation(models[i], steps=STEPS, cfg=True, seed=3 + i)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert torch.equal(results[i], expected[i])


def test_deepcopy_has_independent_state_and_weights():
    cached = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    ddim_generation(cached, steps=STEPS, cfg=True, seed=5)
    stats_before = cached.stats
    twin = copy.deepcopy(cached)
    assert twin.stats.steps == 0
    latents, _ = ddim_generation(twin, steps=STEPS, cfg=True, seed=6)
    assert cached.stats == stats_before
    expected, _ = ddim_generation(cached, steps=STEPS, cfg=True, seed=6)
    assert torch.equal(latents, expected)
    with torch.no_grad():
        next(twin.model.parameters()).add_(1.0)
    assert not torch.equal(next(twin.model.parameters()), next(cached.model.parameters()))


def test_state_dict_is_the_original_models():
    model = make_tiny_dit()
    cached = rfc_compile.optimize(model, CONFIG)
    ddim_generation(cached, steps=3)
    original, ours = model.state_dict(), cached.state_dict()
    assert list(ours) == list(original)
    assert all(torch.equal(ours[k], original[k]) for k in original)
    cached.load_state_dict(make_tiny_dit(seed=1).state_dict())
    assert torch.equal(next(model.parameters()), next(make_tiny_dit(seed=1).parameters()))


def test_batch_resolution_dtype_changes_start_a_fresh_cache():
    cached = rfc_compile.optimize(make_tiny_dit(), RFCConfig(mode="fora", interval=10), auto_reset=False)
    fresh = rfc_compile.optimize(make_tiny_dit(), RFCConfig(mode="fora", interval=10), auto_reset=False)
    x2 = torch.randn(2, 4, 8, 8)
    for _ in range(4):
        _call(cached, x2)
    x1 = torch.randn(1, 4, 8, 8)
    out = _call(cached, x1)  # batch changed mid-generation: new graph, empty cache, step 0
    assert cached.stats.steps == 1 and cached.stats.full_steps == [0]
    assert torch.equal(out, _call(fresh, x1))
    x_big = torch.randn(1, 4, 16, 16)  # resolution change
    out = _call(cached, x_big)
    assert cached.stats.full_steps == [0] and out.shape[-1] == 16
    assert len(cached._programs) == 3  # one graph per input signature, each with its own cache


def test_timestep_going_back_up_starts_a_new_generation():
    cached = rfc_compile.optimize(make_tiny_dit(), RFCConfig(mode="fora", interval=10))
    x = torch.randn(1, 4, 8, 8)
    for t in (900, 800, 700):
        _call(cached, x, t)
    assert cached.stats.steps == 3 and cached.stats.full_steps == [0, 1]
    _call(cached, x, 999)
    assert cached.stats.steps == 1 and cached.stats.full_steps == [0]
    # a step called after a generation "ended" simply continues it (no reset without a signal)
    for t in (900, 800, 700, 600):
        _call(cached, x, t)
    assert cached.stats.steps == 5


def test_a_rising_timestep_starts_a_new_generation_when_it_goes_back_down():
    """Z-Image's pipeline passes 1 - sigma, counting up (patterns.RISING_TIMESTEP_BLOCKS): its
    generation restarts when the timestep goes back *down*; going up is the next step. (Before,
    every step of it started a new generation: all steps full.) Export runners take the
    direction from the sidecar."""
    from conftest import FAMILIES

    from rfc_compile.export.sidecar import Sidecar

    family = FAMILIES["zimage"]
    cached = rfc_compile.optimize(family.build(), RFCConfig(mode="fora", interval=10))
    assert cached.timestep_rises and not rfc_compile.optimize(make_tiny_dit()).timestep_rises
    call = family.example(batch=1)
    for t in (0.0, 0.1, 0.2):
        cached(**dict(call, t=torch.tensor([t])))
    assert cached.stats.steps == 3 and cached.stats.full_steps == [0, 1]
    cached(**dict(call, t=torch.tensor([0.0])))
    assert cached.stats.steps == 1 and len(cached.generations) == 2
    raw = {"model": {"class": "ZImageTransformer2DModel", "timestep_rises": True}}
    assert Sidecar(raw, [], [], [], {}, "").timestep_rises
    assert not Sidecar({"model": {"class": "DiTTransformer2DModel"}}, [], [], [], {}, "").timestep_rises


def test_weights_changed_in_place_are_seen():
    model = make_tiny_dit()
    cached = rfc_compile.optimize(model, RFCConfig(mode="full"))
    x = torch.randn(1, 4, 8, 8)
    _call(cached, x)
    with torch.no_grad():  # what fuse_lora does: W += scale * B @ A, in place
        model.transformer_blocks[0].attn1.to_q.weight.mul_(1.5)
    expected = _call(model, x)
    assert torch.allclose(_call(cached, x), expected, atol=1e-6)


def test_replaced_modules_are_detected_and_recaptured(caplog):
    model = make_tiny_dit()
    cached = rfc_compile.optimize(model, RFCConfig(mode="full"))
    x = torch.randn(1, 4, 8, 8)
    _call(cached, x)
    new_linear = torch.nn.Linear(16, 16)
    model.transformer_blocks[0].attn1.to_q = new_linear  # e.g. an adapter swapped in
    with caplog.at_level("WARNING"):
        got = _call(cached, x)
    assert "re-capturing" in caplog.text
    assert torch.allclose(got, _call(model, x), atol=1e-6)


def test_buffers_moved_by_to_are_kept_without_recapturing(caplog):
    """``module.to(device)`` replaces buffers with new tensors (parameters keep theirs), and an
    offload hook (``pipe.enable_model_cpu_offload()``) moves the model every generation: each one
    re-captured the model (12 s of a tiny SD3's 12.2 s generation). A buffer replaced by one like
    it gets the new contents in place, in the tensor the graphs hold: no re-capture, and new
    values are seen. A dtype round trip replaces buffers as a device round trip does."""
    model = make_tiny_dit()
    cached = rfc_compile.optimize(model, CONFIG)
    expected, _ = ddim_generation(rfc_compile.optimize(make_tiny_dit(), CONFIG), steps=STEPS, cfg=True)
    pos_embed = model.pos_embed.pos_embed
    with caplog.at_level("INFO", logger="rfc_compile"):
        latents, _ = ddim_generation(cached, steps=STEPS, cfg=True)
        caplog.clear()
        for _ in range(2):
            cached.to(torch.float64).to(torch.float32)
            assert model.pos_embed.pos_embed is not pos_embed  # what to() does
            latents, _ = ddim_generation(cached, steps=STEPS, cfg=True)
            assert torch.equal(latents, expected) and 2 < cached.stats.nfc < STEPS
            assert model.pos_embed.pos_embed is pos_embed
    assert "captur" not in caplog.text and len(cached._programs) == 1

    x, full = torch.randn(1, 4, 8, 8), rfc_compile.optimize(model, RFCConfig(mode="full"))
    _call(full, x)
    model.pos_embed.pos_embed = torch.randn_like(pos_embed)  # other values, same shape: seen
    torch.testing.assert_close(_call(full, x), _call(model, x), atol=1e-6, rtol=1e-6)


def test_model_cpu_offload_works_before_or_after_optimize():
    """``pipe.enable_model_cpu_offload()`` puts accelerate's CpuOffload hook on the transformer.
    Enabled before ``optimize()``, capture traced into the hook and failed in its ``module.to``
    ("Couldn't swap Linear.weight"); the hook now moves to the cached model, and both orders give
    the plain cached pipeline's latents (on CPU as the offload device: the hooks run, nothing
    moves). Sequential offload (weights moved inside forward, kept on the meta device) is refused
    naming the hooks."""
    import copy

    from conftest import build_pipeline, pipeline_latents

    config = RFCConfig(mode="taylorseer", interval=3)
    pipe, kwargs = build_pipeline("flux")
    plain = pipe.transformer
    pipe.transformer = rfc_compile.optimize(copy.deepcopy(plain), config)
    expected = pipeline_latents(pipe, kwargs, 8)
    for order in ("offload first", "optimize first"):
        pipe, kwargs = build_pipeline("flux")
        pipe.transformer = copy.deepcopy(plain)
        if order == "offload first":
            pipe.enable_model_cpu_offload(device="cpu")
            assert hasattr(pipe.transformer, "_hf_hook")
        pipe.transformer = rfc_compile.optimize(pipe.transformer, config)
        if order == "optimize first":
            pipe.enable_model_cpu_offload(device="cpu")
        assert not hasattr(pipe.transformer.model, "_hf_hook") and hasattr(pipe.transformer, "_hf_hook")
        for _ in range(2):
            assert torch.equal(pipeline_latents(pipe, kwargs, 8), expected), order
            assert pipe.transformer.stats.full_steps == [0, 1, 4, 7]

    pipe, kwargs = build_pipeline("flux")
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(rfc_compile.UnsupportedModelError, match="accelerate hooks .*AlignDevicesHook"):
        rfc_compile.optimize(pipe.transformer, config)
    from rfc_compile.passes.capture import capture  # what to_onnx captures with

    pipe, kwargs = build_pipeline("flux")
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(rfc_compile.UnsupportedModelError, match="accelerate hooks \\(itself: enable_model_cpu_offload"):
        capture(pipe.transformer, {"hidden_states": torch.zeros(1)})


def test_hooks_and_attention_processors_added_later_are_captured():
    """A forward hook or another attention processor set after optimize() changes what the model
    computes: the next call captures it (caching off equals the original), and removing it again
    goes back to the first graph without capturing."""
    from diffusers.models.attention_processor import AttnProcessor

    model = make_tiny_dit()
    cached = rfc_compile.optimize(model, RFCConfig(mode="full"))
    x = torch.randn(1, 4, 8, 8)
    first = _call(cached, x)
    handle = model.transformer_blocks[0].ff.register_forward_hook(lambda module, args, out: out * 2)
    assert torch.equal(_call(cached, x), _call(model, x))
    handle.remove()
    assert torch.equal(_call(cached, x), first) and len(cached._programs) == 2
    model.transformer_blocks[0].attn1.set_processor(AttnProcessor())  # the math-only processor
    assert torch.allclose(_call(cached, x), first, atol=1e-5)
    assert len(cached._programs) == 3


def test_attributes_set_while_capturing_do_not_recapture_every_call(caplog):
    """A hook that sets a plain attribute (a call counter) runs when torch.export traces the model,
    not in the graph: the capture itself changes the model's settings. That is warned about once
    and the graph is kept for the settings after the capture (else every call would capture again)."""
    model = make_tiny_dit()
    model.transformer_blocks[0].ff.register_forward_pre_hook(
        lambda module, args: setattr(module, "calls", getattr(module, "calls", 0) + 1))
    cached = rfc_compile.optimize(model, RFCConfig(mode="full"))
    x = torch.randn(1, 4, 8, 8)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            _call(cached, x)
    assert caplog.text.count("changed plain attributes") == 1
    assert len({id(program) for program in cached._programs.values()}) == 1


def test_lora_changes_after_optimize_are_captured():
    """diffusers' LoRA API on an optimized model (caching off, so each call must equal the
    original): adding an adapter replaces modules (re-captured); ``set_adapters`` weights,
    ``disable_adapters`` and ``fuse_lora`` change PEFT's settings, which a graph bakes in (before,
    all three silently kept the earlier graph: outputs 0.57-0.83 off); settings seen before reuse
    their graph."""
    from conftest import FAMILIES
    from peft import LoraConfig

    family = FAMILIES["flux"]
    model, example = family.build(), family.example()
    cached = rfc_compile.optimize(model, RFCConfig(mode="full"))

    def same_as_original():
        with torch.no_grad():
            return torch.equal(cached(**example, return_dict=False)[0], model(**example, return_dict=False)[0])

    assert same_as_original()
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_out"],
                                 init_lora_weights=False))
    assert same_as_original()
    model.set_adapters(["default"], weights=[0.3])
    assert same_as_original()
    model.disable_adapters()
    assert same_as_original()
    graphs = len(cached._programs)
    model.enable_adapters()
    assert same_as_original() and len(cached._programs) == graphs  # the scale-0.3 graph again
    model.fuse_lora(lora_scale=1.0)
    assert same_as_original()
    model.unfuse_lora()
    model.delete_adapters("default")
    assert same_as_original()


def test_diffusers_caches_and_forward_changing_hooks_are_refused_clearly():
    """diffusers' own cache (enable_cache) decides in Python: traced once it would silently mix with
    ours (before, FirstBlockCache + optimize() ran without a word). Layerwise casting moves weights
    in forward, which torch.export cannot trace (before: "_apply(): Couldn't swap Linear.weight")."""
    from conftest import FAMILIES
    from diffusers import FirstBlockCacheConfig

    family = FAMILIES["flux"]
    model, example = family.build(), family.example()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(rfc_compile.UnsupportedModelError, match=r"FirstBlockCacheConfig.*disable_cache\(\)"):
        rfc_compile.optimize(model, example_inputs=example)
    model.disable_cache()
    cached = rfc_compile.optimize(model, RFCConfig(mode="full"), example_inputs=example)
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    with pytest.raises(rfc_compile.UnsupportedModelError, match="hooks \\(layerwise_casting\\)"):
        cached(**example)


def test_train_mode_is_captured_in_eval_mode_with_a_warning():
    model = make_tiny_dit().train()
    cached = rfc_compile.optimize(model, RFCConfig(mode="full"))
    x = torch.randn(1, 4, 8, 8)
    with pytest.warns(UserWarning, match="train mode"):
        out = _call(cached, x)
    assert model.training  # the user's module is left as it was
    assert torch.allclose(out, _call(make_tiny_dit().eval(), x), atol=1e-6)


def test_meta_device_model_is_rejected():
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                      num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with pytest.raises(ValueError, match="meta device"):
        rfc_compile.optimize(model)


def test_sessions_reject_state_of_another_shape():
    cached = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    _call(cached, torch.randn(2, 4, 8, 8))
    bad = {k: v for k, v in cached.state.items()}
    name = next(n for n in bad if ".ladder." in n)
    bad[name] = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        cached.state = bad


def test_cache_context_keeps_cond_and_uncond_calls_apart():
    """Pipelines calling cond and uncond separately (Wan, true-CFG FLUX) use cache_context."""
    cached = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    reference = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    cond_session, uncond_session = reference.new_session(), reference.new_session()
    x = torch.randn(1, 4, 8, 8)
    for n in range(STEPS):
        t = 900 - 100 * n
        xs = x * (1 - 0.05 * n)
        with cached.cache_context("cond"):
            got_c = _call(cached, xs, t, torch.tensor([3]))
        with cached.cache_context("uncond"):
            got_u = _call(cached, xs, t, torch.tensor([NUM_CLASSES]))
        assert torch.equal(got_c, _call(cond_session, xs, t, torch.tensor([3])))
        assert torch.equal(got_u, _call(uncond_session, xs, t, torch.tensor([NUM_CLASSES])))
    with cached.cache_context("cond") as session:
        assert session.stats.steps == STEPS and session.stats.full_steps == cond_session.stats.full_steps
    assert cached.stats == uncond_session.stats  # stats report the cache used last
    assert cached.state is None  # the default cache was never touched


def test_branches_called_without_cache_context_get_a_cache_each():
    """A pipeline calling its cond and uncond branches separately *without* cache_context
    (ChromaPipeline, FluxKontextPipeline's true CFG, Krea2Pipeline) calls the model twice at one
    timestep with the same latents: each branch gets a cache of its own, exactly as in its own
    cache_context (before, they shared one ladder and each step counted twice, with a warning)."""
    import warnings

    cached = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    reference = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    x = torch.randn(1, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        for generation in range(2):  # the timestep going back up starts a new generation in each cache
            for n in range(STEPS):
                t = 900 - 100 * n
                xs = x * (1 - 0.05 * n)
                got_c = _call(cached, xs, t, torch.tensor([3]))
                got_u = _call(cached, xs.clone(), t, torch.tensor([NUM_CLASSES]))  # equal values, another tensor
                with reference.cache_context("cond"):
                    assert torch.equal(got_c, _call(reference, xs, t, torch.tensor([3])))
                with reference.cache_context("uncond"):
                    assert torch.equal(got_u, _call(reference, xs, t, torch.tensor([NUM_CLASSES])))
    assert cached.stats == reference.stats and cached.stats.steps == STEPS  # the branch used last
    assert 2 < cached.stats.nfc < STEPS
    assert cached._default_session.stats.steps == STEPS and len(cached._default_session.finished) == 1


def test_calls_at_one_timestep_with_other_latents_are_steps_of_one_cache():
    """A second-order sampler (Heun: t0, t1, t1, t2, t2, ...) evaluates the model twice at one
    timestep on other latents: those are two denoising steps of one cache, warned about once (they
    could also be branches with different inputs, which need cache_context). Latents changed in
    place between two calls are other latents too. With cache_context per branch nothing is shared or warned (the rfc
    torch.compile backend, which cannot see cache_context, splits such calls by their order:
    tests/test_compile.py)."""
    import warnings

    from rfc_compile.runtime import BranchFollower

    cached = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    x = torch.randn(2, 4, 8, 8)
    with pytest.warns(UserWarning, match="two calls in a row at timestep 700 share one cache") as caught:
        for t, scale in ((900, 1.0), (700, 0.9), (700, 0.8), (500, 0.7), (500, 0.6)):
            _call(cached, x * scale, t=t)
    assert len([w for w in caught if "two calls in a row" in str(w.message)]) == 1  # once per session
    assert cached.stats.steps == 5 and not cached._named_sessions

    follower = BranchFollower()
    latents = torch.randn(2, 4)
    calls = [(latents, 900), (latents, 900), (latents.clone(), 900), (latents, 800), (latents + 1, 800)]
    assert [follower.branch({"hidden_states": a, "timestep": t}, t) for a, t in calls] == [0, 1, 2, 0, 0]
    follower.branch({"hidden_states": latents, "timestep": 700}, 700)
    latents.mul_(2)  # the same tensor, changed in place: not the same latents any more
    assert follower.branch({"hidden_states": latents, "timestep": 700}, 700) == 0
    assert follower.branch({"x": [latents, latents], "t": 600}, 600) == 0  # Z-Image: a list of latents
    assert follower.branch({"x": [latents, latents.clone()], "t": 600}, 600) == 1

    split = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in (900, 700, 500):
            for name in ("cond", "uncond"):
                with split.cache_context(name):
                    _call(split, x, t=t)
    with split.cache_context("cond"):
        assert split.stats.steps == 3
    assert sorted(split._named_sessions) == ["cond", "uncond"]  # no branch caches inside cache_context


def test_calls_under_inference_mode_are_followed_as_under_no_grad():
    """Tensors made under ``torch.inference_mode()`` (how many users run a pipeline) have no
    version counter: following the branches crashed on the first call ("Inference tensors do not
    track version counter"). Separate cond/uncond calls and a DDIM loop give what they give under
    no_grad, and latents changed in place are still other latents."""
    from rfc_compile.runtime import BranchFollower

    under_no_grad, under_inference = (rfc_compile.optimize(make_tiny_dit(), CONFIG) for _ in range(2))
    x = torch.randn(1, 4, 8, 8)
    for n in range(STEPS):
        t = 900 - 100 * n
        with torch.no_grad():
            xs = x * (1 - 0.05 * n)
            expected = [_call(under_no_grad, xs, t, torch.tensor([c])) for c in (3, NUM_CLASSES)]
        with torch.inference_mode():
            xs = x * (1 - 0.05 * n)
            assert xs.is_inference()
            got = [_call(under_inference, xs, t, torch.tensor([c])) for c in (3, NUM_CLASSES)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"step {n}"
    assert under_inference.stats == under_no_grad.stats and 2 < under_inference.stats.nfc < STEPS
    assert under_inference._default_session.stats == under_no_grad._default_session.stats

    with torch.inference_mode():
        latents, _ = ddim_generation(under_inference, steps=STEPS, cfg=True, seed=4)
        follower = BranchFollower()
        same = torch.randn(2, 4)
        assert [follower.branch({"hidden_states": same, "timestep": 700}, 700) for _ in range(2)] == [0, 1]
        same.mul_(2)  # changed in place: other latents
        assert follower.branch({"hidden_states": same, "timestep": 700}, 700) == 0
    expected, _ = ddim_generation(under_no_grad, steps=STEPS, cfg=True, seed=4)
    assert torch.equal(latents, expected) and under_inference.stats == under_no_grad.stats


def test_autocast_gets_a_graph_and_a_cache_of_its_own():
    """A graph captured under ``torch.autocast`` holds its casts, and its cache the cast outputs:
    the autocast state is part of a call's signature, as a dtype is. The same optimized model
    then runs without autocast (before, it reused the autocast graph and its matmuls failed:
    "mat1 and mat2 must have the same dtype")."""
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    full = rfc_compile.optimize(make_tiny_dit(), RFCConfig(mode="full"))
    with bf16:
        expected, _ = ddim_generation(make_tiny_dit(), steps=4, cfg=True)
        latents, outputs = ddim_generation(full, steps=4, cfg=True)
    assert outputs[0].dtype == torch.bfloat16 and torch.equal(latents, expected)
    latents, outputs = ddim_generation(full, steps=4, cfg=True)
    assert outputs[0].dtype == torch.float32
    assert torch.equal(latents, ddim_generation(make_tiny_dit(), steps=4, cfg=True)[0])

    cached, fresh = (rfc_compile.optimize(make_tiny_dit(), CONFIG) for _ in range(2))
    with bf16:
        latents, _ = ddim_generation(cached, steps=STEPS, cfg=True)
        expected, _ = ddim_generation(fresh, steps=STEPS, cfg=True)
    assert torch.equal(latents, expected) and cached.stats == fresh.stats and 2 < cached.stats.nfc < STEPS
    in_float32, _ = ddim_generation(cached, steps=STEPS, cfg=True)
    assert torch.equal(in_float32, ddim_generation(rfc_compile.optimize(make_tiny_dit(), CONFIG), steps=STEPS,
                                                   cfg=True)[0])


def test_a_pipeline_call_ends_a_generation_wherever_the_next_one_starts():
    """Diffusers pipelines call ``_reset_stateful_cache()`` on their components at the end of every
    call (``maybe_free_model_hooks``). A next run that starts below the last one's final timestep
    (an img2img call at a low strength; here custom ``sigmas``) went on with the ended
    generation's cache: its steps were predicted from the other image's features. The pipeline's
    signal starts a new generation; the stats stay the ended one's until the next call."""
    import copy

    from conftest import build_pipeline, pipeline_latents

    pipe, kwargs = build_pipeline("flux")
    config = RFCConfig(mode="taylorseer", interval=3)
    plain = pipe.transformer
    used, fresh = rfc_compile.optimize(copy.deepcopy(plain), config), rfc_compile.optimize(copy.deepcopy(plain), config)
    low = dict(kwargs, sigmas=[0.1, 0.08, 0.06, 0.04, 0.03, 0.02])  # below an 8-step run's last sigma, 0.125
    pipe.transformer = used
    pipeline_latents(pipe, kwargs, 8, seed=1)
    assert used.stats.steps == 8 and used.stats.full_steps == [0, 1, 4, 7]  # kept after the call
    got = pipeline_latents(pipe, low, 6)
    pipe.transformer = fresh
    expected = pipeline_latents(pipe, low, 6)
    assert torch.equal(got, expected) and used.stats == fresh.stats == rfc_compile.RFCStats(6, [0, 1, 4])
    assert [g.steps for g in used.generations] == [8, 6]


def test_each_signature_keeps_its_cache_while_it_misses_no_step():
    """Two call kinds at the same timesteps (SD3's skip-layer guidance: the CFG batch, then one
    sample) each keep a cache of their own, as two sessions would; a cache that missed a denoising
    step while set aside (two other timesteps called) starts again at step 0."""
    cached = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    reference = rfc_compile.optimize(make_tiny_dit(), CONFIG)
    batch2, batch1 = reference.new_session(), reference.new_session()
    x = torch.randn(2, 4, 8, 8)
    for n in range(STEPS):
        t, xs = 900 - 100 * n, x * (1 - 0.05 * n)
        assert torch.equal(_call(cached, xs, t), _call(batch2, xs, t))
        assert torch.equal(_call(cached, xs[:1], t), _call(batch1, xs[:1], t))
    assert cached.stats == batch1.stats and batch1.stats.steps == STEPS
    assert 1 < batch1.stats.nfc < STEPS
    _call(cached, x, 100)
    assert cached.stats.steps == STEPS + 1  # the batch-2 cache resumed
    _call(cached, x, 50)  # the batch-1 cache has now missed two steps (100 and 50)
    _call(cached, x[:1], 50)
    assert cached.stats.steps == 1 and cached.stats.full_steps == [0]
    assert [g.steps for g in cached.generations] == [STEPS, STEPS + 2, 1]
    _call(cached, x, 999)  # a new generation: every signature's cache starts empty
    assert cached.stats.steps == 1
    _call(cached, x[:1], 999)
    assert cached.stats.steps == 1


def test_one_tensor_in_two_arguments_is_captured_as_two_inputs():
    """LTX2Pipeline passes its timestep as both ``timestep`` and ``sigma``: torch.export folds one
    tensor object passed twice into one graph input, so the graph read only one of them, and a later
    call with two different tensors of the same shapes silently got the other's values (0.34 off on
    LTX-2). Caching off, both calls equal the original model."""
    from conftest import SigmaScaledDiT

    model = SigmaScaledDiT().eval()
    cached = rfc_compile.optimize(model, RFCConfig(mode="full"))
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    t = torch.full((2,), 900)
    for sigma in (t, torch.full((2,), 300)):  # the same tensor, then another
        with torch.no_grad():
            expected = model(x, t, sigma, labels, return_dict=False)[0]
        got = cached(hidden_states=x, timestep=t, sigma=sigma, class_labels=labels, return_dict=False)[0]
        assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
