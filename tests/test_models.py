"""[models] Region discovery and drop-in use for the diffusers DiT families.

For every family in conftest.FAMILIES (tiny random models, no downloads):
* mode "full" equals the original model at every step of a 10-step generation;
* mode "rfc" (a threshold giving both full and skipped steps) matches the independent
  plain-PyTorch reference (tests/reference.py) step by step, with the regions we expect;
* single-stream blocks (FLUX, HunyuanVideo, Chroma): a skipped step never runs proj_out, the gate does.
Drop-in pipelines (PixArt-alpha/-sigma, FLUX, SD3, Wan) run with ``pipe.transformer =
optimize(...)`` and start a new cache per generation on their own (the timestep goes back up).
"""

from __future__ import annotations

import collections
import copy
import re

import pytest
import torch
from conftest import (BRANCHES_WITHOUT_CACHE_CONTEXT, FAMILIES, build_pipeline, called_timestep, flow_generation,
                      make_tiny_dit, pipeline_latents, pipeline_threshold)
from reference import FAMILY_REGIONS, ReferenceRFC

import rfc_compile
from rfc_compile import RFCConfig, UnsupportedModelError
from rfc_compile.runtime import branch_cache_name

STEPS = 10

#: region key -> (feature inputs, outputs) that each family's graph must show. Joint attention
#: takes and returns both streams; cross-attention's text states are constant side inputs; the
#: last SD3 block (context_pre_only) drops the attention's text output and has no ff_context.
_JOINT, _ONE = (2, 2), (1, 1)
EXPECTED_REGIONS = {
    "flux": {"transformer_blocks_0_attn": _JOINT, "transformer_blocks_0_ff": _ONE,
             "transformer_blocks_0_ff_context": _ONE, "single_transformer_blocks_0_mlp_attn": _ONE},
    "sd3": {"transformer_blocks_0_attn": _JOINT, "transformer_blocks_0_attn2": _ONE, "transformer_blocks_0_ff": _ONE,
            "transformer_blocks_0_ff_context": _ONE, "transformer_blocks_1_attn": (2, 1), "transformer_blocks_1_ff": _ONE},
    "pixart": {f"transformer_blocks_0_{r}": _ONE for r in ("attn1", "attn2", "ff")},
    "wan": {f"blocks_0_{r}": _ONE for r in ("attn1", "attn2", "ffn")},
    "hunyuan_video": {"transformer_blocks_0_attn": _JOINT, "transformer_blocks_0_ff": _ONE,
                      "transformer_blocks_0_ff_context": _ONE, "single_transformer_blocks_0_mlp_attn": _ONE},
    # HunyuanVideo's blocks; the image stream holds the history tokens (4x, 2x, clean) before the latents'
    "hunyuan_video_framepack": {"transformer_blocks_0_attn": _JOINT, "transformer_blocks_0_ff": _ONE,
                                "transformer_blocks_0_ff_context": _ONE, "single_transformer_blocks_0_mlp_attn": _ONE},
    "cogvideox": {"transformer_blocks_0_attn1": _JOINT, "transformer_blocks_0_ff": _ONE},
    "ltx_video": {f"transformer_blocks_0_{r}": _ONE for r in ("attn1", "attn2", "ff")},
    "chroma": {"transformer_blocks_0_attn": _JOINT, "transformer_blocks_0_ff": _ONE,
               "transformer_blocks_0_ff_context": _ONE, "single_transformer_blocks_0_mlp_attn": _ONE},
    "skyreels_v2": {f"blocks_0_{r}": _ONE for r in ("attn1", "attn2", "ffn")},
    "mochi": {"transformer_blocks_0_attn1": _JOINT, "transformer_blocks_0_ff": _ONE,
              "transformer_blocks_0_ff_context": _ONE, "transformer_blocks_1_attn1": (2, 1),
              "transformer_blocks_1_ff": _ONE},
    "qwenimage": {"transformer_blocks_0_attn": _JOINT, "transformer_blocks_0_img_mlp": _ONE,
                  "transformer_blocks_0_txt_mlp": _ONE},
    "hunyuan_image": {"transformer_blocks_0_attn": _JOINT, "transformer_blocks_0_ff": _ONE,
                      "transformer_blocks_0_ff_context": _ONE, "single_transformer_blocks_0_mlp_attn": _ONE},
    "auraflow": {"joint_transformer_blocks_0_attn": _JOINT, "joint_transformer_blocks_0_ff": _ONE,
                 "joint_transformer_blocks_0_ff_context": _ONE, "single_transformer_blocks_0_attn": _ONE,
                 "single_transformer_blocks_0_ff": _ONE},
    "wan_vace": {f"{part}_{i}_{r}": _ONE for part in ("vace_blocks", "blocks") for i in (0, 1)
                 for r in ("attn1", "attn2", "ffn")},
    "flux2": {"transformer_blocks_0_attn": _JOINT, "transformer_blocks_0_ff": _ONE,
              "transformer_blocks_0_ff_context": _ONE, "single_transformer_blocks_0_attn": _ONE},
    "sana": {f"transformer_blocks_0_{r}": _ONE for r in ("attn1", "attn2", "ff")},
    # the context refiner's blocks run on the caption alone: not cached
    "zimage": {f"{part}_0_{r}": _ONE for part in ("noise_refiner", "layers") for r in ("attention", "feed_forward")},
    **{name: {"transformer_blocks_0_attn": _JOINT, "transformer_blocks_0_ff": _ONE,
              "transformer_blocks_0_ff_context": _ONE, "single_transformer_blocks_0_mlp_attn": _ONE}
       for name in ("longcat_image", "ovis_image", "bria")},
    # the text mode blocks run at t = 0: not cached
    "flux3": {f"{part}_0_{r}": _ONE for part in ("mode_blocks_image", "single_transformer_blocks") for r in ("attn", "ff")},
    # the text fusion blocks run on the prompt alone: not cached
    "krea2": {"transformer_blocks_0_attn": _ONE, "transformer_blocks_0_ff": _ONE},
    # one ff module called on the image, then the text stream: one region, two inputs and outputs
    "cogview4": {"transformer_blocks_0_attn1": _JOINT, "transformer_blocks_0_ff": _JOINT},
    # one ff call on the concatenated text + image states: one input, one output (sliced outside)
    "cogview3plus": {"transformer_blocks_0_attn1": _JOINT, "transformer_blocks_0_ff": _ONE},
    "cosmos": {f"transformer_blocks_0_{r}": _ONE for r in ("attn1", "attn2", "ff")},
    "hunyuandit": {f"blocks_{i}_{r}": _ONE for i in range(4) for r in ("attn1", "attn2", "ff")},
    "sana_video": {f"transformer_blocks_0_{r}": _ONE for r in ("attn1", "attn2", "ff")},
    **{name: {f"blocks_0_{r}": _ONE for r in ("attn1", "attn2", "ffn")} for name in ("chronoedit", "helios")},
    "bria_fibo": {"transformer_blocks_0_attn": _JOINT, "transformer_blocks_0_ff": _ONE,
                  "transformer_blocks_0_ff_context": _ONE, "single_transformer_blocks_0_mlp_attn": _ONE},
    # cross_attn's query is the joint attention's output (a region output: a feature input too)
    "motif_video": {"transformer_blocks_0_attn": _JOINT, "transformer_blocks_0_cross_attn": (2, 1),
                    "transformer_blocks_0_ff": _ONE, "transformer_blocks_0_ff_context": _ONE,
                    **{f"single_transformer_blocks_{i}_mlp_attn": _ONE for i in (0, 1)}},
    # a video and an audio stream; audio-to-video and video-to-audio attention read both
    "ltx2": {f"transformer_blocks_{i}_{r}": (2, 1) if r.endswith("_attn") and "_to_" in r else _ONE for i in (0, 1)
             for r in ("attn1", "audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn",
                       "ff", "audio_ff")},
    # the text blocks are modulated by the timestep: cached; cross-attention reads the encoded text
    "kandinsky5": {"text_transformer_blocks_0_self_attention": _ONE, "text_transformer_blocks_0_feed_forward": _ONE,
                   "visual_transformer_blocks_0_self_attention": _ONE,
                   "visual_transformer_blocks_0_cross_attention": (2, 1), "visual_transformer_blocks_0_feed_forward": _ONE},
    # a spatial block (cross-attention to the text) and a temporal block (none) per layer, called in turn
    "latte": {f"{part}_{i}_{r}": _ONE for i in (0, 1) for part in ("transformer_blocks", "temporal_transformer_blocks")
              for r in ("attn1", "attn2", "ff") if not (part.startswith("temporal") and r == "attn2")},
    # each block in a HiDreamBlock wrapper; ff_i is the mixture of experts (traceable.py's twin)
    "hidream": {"double_stream_blocks_0_block_attn": _JOINT, "double_stream_blocks_0_block_ff_i": _ONE,
                "double_stream_blocks_0_block_ff_t": _ONE, "single_stream_blocks_0_block_attn": _ONE,
                "single_stream_blocks_0_block_ff_i": _ONE},
}
assert set(EXPECTED_REGIONS) == set(FAMILIES)


def regions_of(cached) -> dict[str, tuple[int, int]]:
    """Region key -> (number of feature inputs, number of outputs), read off the state names."""
    found: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for name in cached.state_spec.names():
        parts = name.split(".")
        if len(parts) == 3 and parts[1] in ("x_last", "ladder"):
            found[parts[0]][parts[1] == "ladder"] += 1
    return {k: tuple(v) for k, v in found.items()}


#: the lowest-priority families run only in `make test-all` (keeps the default run ~1.5 min)
SLOW_FAMILIES = ("cogvideox", "ltx_video", "chroma", "skyreels_v2", "mochi", "wan_vace", "auraflow", "hunyuan_image",
                 "longcat_image", "bria")
FAMILY_PARAMS = [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FAMILIES else f for f in FAMILIES]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_full_mode_equals_original_every_step(family):
    fam = FAMILIES[family]
    _, expected = flow_generation(fam.build(), fam, steps=STEPS)
    cached = rfc_compile.optimize(fam.build(), RFCConfig(mode="full"))
    _, got = flow_generation(cached, fam, steps=STEPS)
    assert cached.stats.full_steps == list(range(STEPS))
    assert max_diff(got, expected) < 1e-5


_RFC_RUNS: dict[str, tuple] = {}


def rfc_run(family: str):
    """(cached model, its outputs, reference, reference outputs) for mode "rfc", computed once."""
    if family not in _RFC_RUNS:
        fam = FAMILIES[family]
        kwargs = dict(mode="rfc", order=2, threshold=fam.threshold, warmup_steps=2)
        reference_model = fam.build()
        reference = ReferenceRFC(FAMILY_REGIONS[family](reference_model), **kwargs)
        _, expected = flow_generation(reference_model, fam, steps=STEPS, on_step=lambda n: reference.begin_step())
        cached = rfc_compile.optimize(fam.build(), RFCConfig(**kwargs))
        _, got = flow_generation(cached, fam, steps=STEPS)
        _RFC_RUNS[family] = (cached, got, reference, expected)
    return _RFC_RUNS[family]


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_rfc_matches_independent_reference(family):
    cached, got, reference, expected = rfc_run(family)
    assert regions_of(cached) == EXPECTED_REGIONS[family]
    conds = [n for n in cached.graph_module.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == 1, "all regions of all blocks sit behind one cond per step"
    assert cached.stats.full_steps == reference.full_steps
    assert 2 < cached.stats.nfc < STEPS, "the threshold must give both full and skipped steps"
    for n, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {n}: {m}")


def _linear_weights_per_branch(cached, model) -> dict[str, set[str]]:
    """Parameter names used as linear weights in each branch of the step's cond."""
    gm = cached.graph_module
    cond = next(n for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond)
    names = {p.data_ptr(): n for n, p in model.named_parameters()}

    def name_of(outer: torch.fx.Node) -> str:
        if outer.op != "get_attr":
            return f"<{outer.op} {outer.name}>"
        value = gm
        for part in outer.target.split("."):
            value = getattr(value, part)
        return names.get(value.data_ptr(), f"<{outer.target}>")

    result = {}
    for label, branch_node in (("recompute", cond.args[1]), ("predict", cond.args[2])):
        branch = getattr(gm, branch_node.target)
        operand = dict(zip([n for n in branch.graph.nodes if n.op == "placeholder"], cond.args[3]))
        result[label] = {name_of(operand[n.args[1]]) for n in branch.graph.nodes
                         if n.target is torch.ops.aten.linear.default and n.args[1] in operand}
    return result


def test_latte_regions_on_folded_rows_keep_one_scalar_per_sample():
    """Latte runs its spatial blocks on (batch x frames) rows and its temporal blocks on (batch x patch
    positions) rows. Norms are per sample (RFC_METHOD.md): the state groups each region's rows by
    sample, one RCS error, ratio and Gram matrix per sample and region, ladders (B, m+1, rows per
    sample, ...). (Before, every scalar was sized by the first region's rows, batch x frames, and the
    temporal regions failed to trace: "Attempting to broadcast a dimension of length 4 ... [32]".)
    Without the model's batch (patterns.FOLDED_BATCH_INPUTS) the rewrite refuses, naming why."""
    import dataclasses

    from rfc_compile.passes import CachedStep, capture, find_regions

    cached, *_ = rfc_run("latte")
    shapes = {e.name: e.shape for e in cached.state_spec.entries}
    assert shapes["rcs_acc"] == (2,) and shapes["rcs_ladder.0"] == (2, 3, 2, 16, 16)  # 2 frames of 4 x 4 patches
    for block, rows in (("transformer_blocks", (2, 16)), ("temporal_transformer_blocks", (16, 2))):
        assert shapes[f"{block}_1_ff.ratio.0"] == (2,) and shapes[f"{block}_1_ff.gram.0"] == (2, 2, 2)
        assert shapes[f"{block}_1_ff.ladder.0"] == (2, 3, *rows, 16)
        assert shapes[f"{block}_1_attn1.x_last.0"] == (2, *rows, 16)
    family = FAMILIES["latte"]
    captured = capture(family.build(), family.example())
    assert captured.samples == 2
    unknown = dataclasses.replace(captured, samples=None)
    with pytest.raises(UnsupportedModelError, match=r"has 32 rows where the first region's input has 4: the model folds"):
        CachedStep(unknown, find_regions(unknown.graph_module), RFCConfig(mode="rfc"))


@pytest.mark.parametrize("family", ["flux", "hunyuan_video", "hunyuan_video_framepack", "ovis_image",
                                    pytest.param("chroma", marks=pytest.mark.slow),
                                    pytest.param("hunyuan_image", marks=pytest.mark.slow)])
def test_single_stream_skipped_step_runs_gate_not_proj_out(family):
    """A skipped step runs the single block's norm (gate, modulation) but not proj_mlp/attn/proj_out."""
    cached, *_ = rfc_run(family)
    assert cached.stats.skipped_steps, "need a skipped step"
    used = _linear_weights_per_branch(cached, cached.model)
    single = "single_transformer_blocks.0."
    assert f"{single}proj_out.weight" in used["recompute"]
    assert f"{single}proj_out.weight" not in used["predict"]
    assert not any(n.startswith(single + p) for n in used["predict"] for p in ("proj_mlp", "attn", "proj_out"))
    if hasattr(cached.model.single_transformer_blocks[0].norm, "linear"):  # Chroma's modulation is precomputed
        assert f"{single}norm.linear.weight" in used["predict"], "the gate still comes from the block's norm"
    # and no region of any block runs a big matmul on a skipped step
    assert not any(".attn." in n or ".ff" in n or ".proj_" in n for n in used["predict"]), used["predict"]


def test_unsupported_models_raise_naming_block_types():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    with pytest.raises(UnsupportedModelError, match="DownBlock2D.*UpBlock2D"):
        rfc_compile.optimize(unet)

    from diffusers import LuminaNextDiT2DModel

    lumina = LuminaNextDiT2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=1,
                                  num_attention_heads=2, num_kv_heads=2, cross_attention_dim=8)
    with pytest.raises(UnsupportedModelError, match="LuminaNextDiTBlock x1"):
        rfc_compile.optimize(lumina)


# --- drop-in pipelines ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flux", "sd3", pytest.param("pixart_alpha", marks=pytest.mark.slow),
                                  "pixart_sigma", "wan", "qwenimage", "flux2", "sana", "zimage", "ovis_image",
                                  "chroma", "krea2", "flux_kontext", "cogview4", "sana_video", "kandinsky5", "hidream",
                                  "bria_fibo", "motif_video", "cogview3plus", "latte"])
def test_pipeline_drop_in_with_automatic_new_generation(name):
    """ZImagePipeline's timestep counts up (1 - sigma): a new generation is the timestep going
    back down (before, every step started a new generation and ran in full). ChromaPipeline,
    Krea2Pipeline and FluxKontextPipeline (true CFG) call cond and uncond separately without
    cache_context: a cache per branch (before, both shared one and each step counted twice)."""
    pytest.importorskip("transformers", reason="diffusers pipelines need the transformers package")
    pipe, kwargs = build_pipeline(name)
    original = pipeline_latents(pipe, kwargs, STEPS)
    pipe.transformer = rfc_compile.optimize(pipe.transformer, RFCConfig(mode="rfc", threshold=pipeline_threshold(name)))
    timesteps = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: timesteps.append(called_timestep(a, kw)),
                                               with_kwargs=True)
    first = pipeline_latents(pipe, kwargs, STEPS)
    stats = pipe.transformer.stats
    second = pipeline_latents(pipe, kwargs, STEPS)  # no reset(): the timestep going back up starts a new generation
    assert pipe.transformer.stats == stats and stats.steps == STEPS
    assert 2 < stats.nfc < STEPS
    assert torch.equal(first, second)
    # cached output stays close to the full-compute one
    assert (first - original).abs().max() <= 0.05 * original.abs().max()
    if name == "flux":  # FluxPipeline passes timestep / 1000: floats in (0, 1]
        assert max(timesteps) <= 1.0
    if name == "zimage":
        assert timesteps[:STEPS] == sorted(timesteps[:STEPS]) and timesteps[0] < timesteps[1]
    if name in BRANCHES_WITHOUT_CACHE_CONTEXT:
        assert len(timesteps) == 4 * STEPS and timesteps[0] == timesteps[1]  # two calls per step, two generations
        assert list(pipe.transformer._named_sessions) == [branch_cache_name(1)]
        assert pipe.transformer._default_session.stats.steps == STEPS


def test_per_frame_timesteps_start_a_new_generation():
    """Cosmos 2's video-to-world pipeline passes one timestep per frame, ``(B, 1, T, 1, 1)``, the
    conditioning frame's fixed near 0. A second generation on the same model without reset()
    equals the first and is seen as a new one (before, the timestep was read off its first element,
    the conditioning frame's: it never moved, so the second generation went on with the first one's
    cache, its outputs 0.012 off, and every step warned of two calls at one timestep)."""
    import warnings

    from rfc_compile.runtime import timestep_value

    family = FAMILIES["cosmos"]
    assert timestep_value(family.call_inputs(torch.zeros(2, 4, 2, 8, 8), torch.full((2,), 0.6))["timestep"]) \
        == pytest.approx((0.6 + 1e-4 / 1.0001) / 2)
    cached = rfc_compile.optimize(family.build(), RFCConfig(mode="rfc", threshold=family.threshold))
    _, first = flow_generation(cached, family, steps=STEPS)
    stats = cached.stats
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "two calls in a row at timestep ..."
        _, second = flow_generation(cached, family, steps=STEPS)
    assert cached.stats == stats and stats.steps == STEPS and 2 < stats.nfc < STEPS
    assert len(cached.generations) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_sd3_skip_layer_guidance_keeps_one_cache_per_call_kind():
    """StableDiffusion3Pipeline's skip-layer guidance calls the transformer a second time per step
    (batch 1, ``skip_layers``) in a window of steps. Each call kind gets a cache of its own, the
    CFG one resumed after each skip-layer call: the same latents as two separate sessions routed
    by hand, and the CFG cache's schedule is the one without skip-layer guidance. (Before, each
    change of input signature started a fresh cache: every step in the window ran in full and
    ``stats`` reported only the steps after it.)"""
    pytest.importorskip("transformers", reason="diffusers pipelines need the transformers package")
    config = RFCConfig(mode="rfe", interval=3)
    pipe, kwargs = build_pipeline("sd3")
    reference = rfc_compile.optimize(copy.deepcopy(pipe.transformer), config)
    main, skip = reference.new_session(), reference.new_session()
    reference.forward = lambda *args, **kw: (skip if kw.get("skip_layers") else main)(*args, **kw)
    kwargs = dict(kwargs, skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.5)
    transformer = pipe.transformer
    pipe.transformer = reference
    expected = pipeline_latents(pipe, kwargs, STEPS)
    assert main.stats.steps == STEPS and 0 < skip.stats.steps < STEPS

    pipe.transformer = cached = rfc_compile.optimize(transformer, config)
    assert torch.equal(pipeline_latents(pipe, kwargs, STEPS), expected)
    assert cached.stats == main.stats  # the last call was a CFG call
    assert [g.steps for g in cached.generations] == [skip.stats.steps, STEPS]
    plain = rfc_compile.optimize(transformer, config)
    pipe.transformer = plain
    pipeline_latents(pipe, {k: v for k, v in kwargs.items() if "skip" not in k}, STEPS)
    assert main.stats.full_steps == plain.stats.full_steps


def test_attention_processors_swapped_by_pag_pipelines_are_captured():
    """diffusers' PAG pipelines swap the attention processors of their ``pag_applied_layers`` for a
    generation and restore them after. A graph captured under one set must not serve another:
    with caching off, two PAG pipelines sharing one optimized transformer each equal the original
    (before, the second silently reused the first's graph: latents 0.05 off), and going back
    to the first captures nothing new."""
    pytest.importorskip("transformers", reason="diffusers pipelines need the transformers package")
    from conftest import _embeds, randomize
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3PAGPipeline

    # diffusers' PAG processors fit neither SD3.5's dual-attention blocks nor the context_pre_only last one
    transformer = randomize(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=8), seed=0)

    def pag_latents(model, layer):
        pipe = StableDiffusion3PAGPipeline(
            transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, pag_applied_layers=[layer])
        pipe.set_progress_bar_config(disable=True)
        kwargs = dict(prompt_embeds=_embeds(1, 3, 16, 1), pooled_prompt_embeds=_embeds(1, 1, 16, 3)[:, 0],
                      negative_prompt_embeds=_embeds(1, 3, 16, 2),
                      negative_pooled_prompt_embeds=_embeds(1, 1, 16, 4)[:, 0], height=64, width=64, pag_scale=3.0)
        return pipeline_latents(pipe, kwargs, 4)

    layers = ("transformer_blocks.0", "transformer_blocks.1")
    expected = {layer: pag_latents(transformer, layer) for layer in layers}
    assert not torch.equal(*expected.values())
    cached = rfc_compile.optimize(transformer, RFCConfig(mode="full"))
    for layer in layers + layers:
        assert torch.equal(pag_latents(cached, layer), expected[layer]), layer
    assert len(cached._programs) == 2


#: families whose own code fixes the batch size (Z-Image: its inputs are Python lists with one tensor
#: per sample, patterns.PER_SAMPLE_ARGUMENTS): capture with dynamic_batch refuses them with
#: UnsupportedModelError. Chroma, Mochi and
#: HiDream-I1 were here until their traceable twins (traceable.py) and HiDream's batch axis
#: (patterns.BATCH_AXES); Qwen-Image until its ``img_shapes`` were known to be read at the first
#: sample only (patterns.PER_SAMPLE_ARGUMENTS).
BATCH_FIXED_BY_MODEL = ("zimage",)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dynamic_batch_capture_finds_the_same_regions(family):
    """With a symbolic batch the model reads ``hidden_states.shape[0]`` to build values that do not
    change across steps (LTX-Video's rotary embeddings, its reshaped text states): those stay side
    inputs, not feature inputs, so X (and RCS's error, ||X||_1 in its denominator) is the same as
    in a static capture. (LTX-Video's regions took 3 and 2 feature inputs before, and its
    dynamic-batch export took other full steps than the eager model.)"""
    from rfc_compile.passes import capture, find_regions

    spec = FAMILIES[family]
    kwargs = spec.example()
    if family in BATCH_FIXED_BY_MODEL:
        with pytest.raises(UnsupportedModelError, match="x, cap_feats: one entry per sample"):
            capture(spec.build(), kwargs, dynamic_batch=True)
        return
    plan = find_regions(capture(spec.build(), kwargs, dynamic_batch=True).graph_module)
    found = {r.name.replace(".", "_"): (len(r.feature_inputs), len(r.outputs)) for r in plan.regions}
    assert found == EXPECTED_REGIONS[family]


def test_dynamic_batch_refuses_per_sample_arguments_and_misplaced_batch_axes():
    """HiDream-I1 with its own ``img_sizes`` (one patch grid per sample, a constant in the graph) and a
    Qwen-Image edit model (``zero_cond_t``: its modulation index reads every sample's ``img_shapes``)
    are refused with a dynamic batch, naming the argument; a plain Qwen-Image (reads the first sample's
    grid only) is refused for ``img_shapes`` that are not one equal entry per sample; an input the model
    table says holds the batch at dim 1 (HiDream's stacked Llama states) whose dim 1 is not the batch
    is refused with its shape."""
    from diffusers import QwenImageTransformer2DModel

    from rfc_compile.passes import capture

    qwen = FAMILIES["qwenimage"]
    config = {k: v for k, v in qwen.build().config.items() if not k.startswith("_")}  # _use_default_values too
    edit = QwenImageTransformer2DModel.from_config({**config, "zero_cond_t": True})
    assert edit.zero_cond_t
    with pytest.raises(UnsupportedModelError, match="img_shapes: one entry per sample"):
        capture(edit, qwen.example(), dynamic_batch=True)
    with pytest.raises(ValueError, match=r"img_shapes=\[\[\(1, 4, 4\)\], \[\(1, 2, 8\)\]\] is not one equal entry"):
        capture(qwen.build(), {**qwen.example(), "img_shapes": [[(1, 4, 4)], [(1, 2, 8)]]}, dynamic_batch=True)

    spec = FAMILIES["hidream"]
    kwargs = spec.example()
    with pytest.raises(UnsupportedModelError, match="img_sizes: one entry per sample"):
        capture(spec.build(), {**kwargs, "img_sizes": [(4, 4)] * 2}, dynamic_batch=True)
    llama = kwargs["encoder_hidden_states_llama3"]
    with pytest.raises(ValueError, match=r"'encoder_hidden_states_llama3' holds the batch at dim 1, but its shape is "
                                         r"\(3, 3, 4, 16\) for a batch of 2"):
        capture(spec.build(), {**kwargs, "encoder_hidden_states_llama3": torch.cat([llama, llama[:, :1]], 1)},
                dynamic_batch=True)


def test_rewrite_is_independent_of_earlier_rewrites():
    """A rewrite does not see an earlier one: when torch.cond traced its branches through dynamo, the
    cache entries of its wrapper outlived each rewrite, and checking an earlier (static, batch 3)
    entry's guards against a dynamic-batch trace added ``batch != 3`` to it, so exporting SkyReels-V2
    with a dynamic batch failed ("Constraints violated (batch)") after a Wan model had run at batch 3.
    (The cond operator is called directly now, rewrite.py; no dynamo cache is involved.)"""
    from rfc_compile.export.graph import build_functional

    config = RFCConfig(mode="rfc", threshold=0.2)
    wan = rfc_compile.optimize(FAMILIES["wan"].build(), config)
    flow_generation(wan, FAMILIES["wan"], steps=2, batch=3)
    program = build_functional(FAMILIES["skyreels_v2"].build(), FAMILIES["skyreels_v2"].example(), config,
                               dynamic_batch=True)
    assert program.dynamic_axes == {"batch": 2}
    shapes = dict(zip(program.state_spec.names(), program.state_shapes))
    assert program.inputs[0].shape[0] == "batch" and shapes["rcs_acc"] == ("batch",)


def test_a_model_whose_latents_go_by_another_name_is_refused_clearly():
    """Feature inputs are the values that depend on the model inputs that change between steps
    (patterns.DEFAULT_VARYING_INPUTS). Regions whose inputs do not (Z-Image's context refiner, on
    the caption alone) are left uncached; if no region has one, the latents went by another name
    and caching would predict nothing right: a clear error naming the expected inputs."""

    class Renamed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dit = make_tiny_dit()

        def forward(self, noisy, step, labels):
            return self.dit(hidden_states=noisy, timestep=step, class_labels=labels, return_dict=False)[0]

    with pytest.raises(UnsupportedModelError, match=r"depends on the denoising state.*'hidden_states'"):
        rfc_compile.optimize(Renamed())(torch.randn(1, 4, 8, 8), torch.tensor([999]), torch.tensor([1]))


@pytest.mark.parametrize("grid", [4, 2])
def test_a_region_on_a_permuted_view_is_cached(grid):
    """Sana's feed-forward runs on the (B, C, H, W) permutation of its tokens (channels-last in
    memory), so its ladder was stacked channels-last while the skip branch passes the cache on
    row-major: torch.cond refused the two branches' strides (and at a 1x1 token grid the strides
    of the size-1 dims alone differed). The cache now leaves the recompute branch row-major; the
    steps equal the reference's."""
    import dataclasses

    family = dataclasses.replace(FAMILIES["sana"], latent_shape=(4, grid, grid))
    kwargs = dict(mode="rfc", order=2, threshold=family.threshold, warmup_steps=2)
    reference_model = family.build()
    reference = ReferenceRFC(FAMILY_REGIONS["sana"](reference_model), **kwargs)
    _, expected = flow_generation(reference_model, family, steps=STEPS, on_step=lambda n: reference.begin_step())
    cached = rfc_compile.optimize(family.build(), RFCConfig(**kwargs))
    _, got = flow_generation(cached, family, steps=STEPS)
    assert cached.stats.full_steps == reference.full_steps and cached.stats.nfc < STEPS
    assert max_diff(got, expected) < 1e-5


def test_a_forward_that_reads_tensor_values_is_refused_naming_the_line():
    """A forward that branches on a tensor's value in Python, or calls .numpy(), cannot be traced
    (LTX-2's spatio-temporal guidance): the error names the model's line, where
    torch.export's said only "Could not guard on data-dependent expression" (with a graph dump) or,
    for .numpy(), ".numpy() is not supported for tensor subclasses" with no location at all."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class BranchOnValue(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            if hidden_states.abs().max() > 100:  # the line the error must name
                hidden_states = hidden_states / 2
            return super().__call__(attn, hidden_states, *args, **kwargs)

    class ReadsNumpy(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            hidden_states.cpu().numpy()  # the line the error must name
            return super().__call__(attn, hidden_states, *args, **kwargs)

    for processor, line in ((BranchOnValue(), "if hidden_states.abs().max() > 100"),
                            (ReadsNumpy(), "hidden_states.cpu().numpy()")):
        model = make_tiny_dit()
        for module in model.modules():
            if hasattr(module, "set_processor"):
                module.set_processor(processor)
        cached = rfc_compile.optimize(model, RFCConfig(mode="rfc"))
        with pytest.raises(UnsupportedModelError, match=r"reads a tensor's values in Python \(.*test_models\.py:\d+: "
                           + re.escape(line)):
            cached(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([999, 999]),
                   class_labels=torch.tensor([1, 2]))


def test_hidream_moe_is_traced_through_its_twin_and_the_model_is_left_alone():
    """HiDream-I1's mixture of experts counts the tokens of each expert with ``.cpu().numpy()``,
    which torch.export cannot trace: capture traces passes/traceable.py's twin in its place. The
    twin gives diffusers' ``moe_infer`` outputs exactly (an expert no token chose included), and the
    user's model keeps its own method: nothing is left on its modules after a capture."""
    from rfc_compile.passes.traceable import hidream_moe_infer

    family = FAMILIES["hidream"]
    model = family.build()
    moe = model.double_stream_blocks[0].block.ff_i
    gen = torch.Generator().manual_seed(0)
    x, weights = torch.randn(12, 16, generator=gen), torch.rand(24, 1, generator=gen)
    for experts in (4, 3):  # with 3, expert 3 gets no token
        chosen = torch.randint(0, experts, (24,), generator=gen)
        with torch.no_grad():
            assert torch.equal(hidream_moe_infer(moe, x, chosen, weights), moe.moe_infer(x, chosen, weights))
    cached = rfc_compile.optimize(model, RFCConfig(mode="rfc", threshold=family.threshold))
    flow_generation(cached, family, steps=2)
    assert not [m for m in model.modules() if "moe_infer" in m.__dict__]


def test_cogvideox_sin_cos_positions_serve_other_sizes_than_the_configs():
    """CogVideoX with sin-cos positions (CogVideoX-2b) builds a new positional table when called
    at another size than its config's and writes it through ``.data``, which torch.export cannot
    trace ("found a fake tensor in the exported program constant's list"): capture traces
    passes/traceable.py's twin, diffusers' table exactly. Caching off equals the original at twice
    the config's latent size, caching on runs skipped steps there."""
    from rfc_compile.export.models import example_inputs
    from rfc_compile.passes.traceable import cogvideox_positional_embeddings

    model = FAMILIES["cogvideox"].build()
    embed = model.patch_embed
    assert (model.config.sample_height, model.config.sample_width) == (4, 4)
    for size in ((8, 8, 5), (4, 6, 9)):
        assert torch.equal(cogvideox_positional_embeddings(embed, *size), embed._get_positional_embeddings(*size))
    call = example_inputs(model, batch=2, height=8, width=8, text_len=model.config.max_text_seq_length, frames=2)
    with torch.no_grad():
        expected = model(**call, return_dict=False)[0]
    assert torch.equal(rfc_compile.optimize(model, RFCConfig(mode="full"))(**call, return_dict=False)[0], expected)
    cached = rfc_compile.optimize(model, RFCConfig(mode="taylorseer", interval=3))
    for n, t in enumerate(range(900, 300, -100)):
        out = cached(**dict(call, timestep=torch.full((2,), t)), return_dict=False)[0]
        assert out.shape == expected.shape and torch.isfinite(out).all()
    assert cached.stats.full_steps == [0, 1, 4]
    assert not [m for m in model.modules() if "_get_positional_embeddings" in m.__dict__]


def test_calls_that_keep_python_state_are_refused_clearly():
    """FLUX.2's KV-cache mode (Flux2KleinKVPipeline) returns a Flux2KVCache object on its first
    step and takes it back on the next ones: neither can be a graph input or output. Both calls
    are refused naming the object (torch.export said only "Found <class ...> in output, which is
    not a known type ... register a pytree")."""
    family = FAMILIES["flux2"]
    model = family.build()
    example = family.example()
    ref = 4  # reference-image tokens in front of the latents
    call = dict(example, hidden_states=torch.cat([torch.randn(2, ref, 4), example["hidden_states"]], 1),
                img_ids=torch.cat([example["img_ids"][:, :ref] + torch.tensor([10, 0, 0, 0]), example["img_ids"]], 1),
                num_ref_tokens=ref, return_dict=False)
    with torch.no_grad():
        _, kv_cache = model(**call, kv_cache_mode="extract")
    cached = rfc_compile.optimize(model, RFCConfig(mode="rfc"))
    with pytest.raises(UnsupportedModelError, match="returns .*Flux2KVCache.* cannot be cached"):
        cached(**call, kv_cache_mode="extract")
    with pytest.raises(UnsupportedModelError, match=r"kv_cache \(Flux2KVCache\).* cannot be cached"):
        cached(**call, kv_cache=kv_cache, kv_cache_mode="cached")


def test_framepack_sections_each_start_a_new_cache_reading_their_own_history():
    """HunyuanVideoFramepackPipeline runs one denoising loop per video section, each with its own
    history latents (clean 1x, 2x, 4x) and frame indices: constant over the section's steps (side
    inputs of the model: the regions' X holds their tokens only as the blocks see them, modulated by
    the timestep), different in the next section. A cached model called for two sections in a row
    starts a new cache when the timestep goes back up, with the same graph, and reads the second
    section's history: it gives what a fresh cached model gives for that section, and the history
    changes the output (a graph that kept the first section's would not)."""
    import dataclasses

    from conftest import hunyuan_video_framepack_conditions

    family = FAMILIES["hunyuan_video_framepack"]
    config = RFCConfig(mode="rfc", order=2, threshold=family.threshold, warmup_steps=2)

    def second_section(batch, gen, history_seed=1):
        cond = hunyuan_video_framepack_conditions(batch, gen, padding_sections=0)
        other = torch.Generator().manual_seed(history_seed)
        for name in ("latents_clean", "latents_history_2x", "latents_history_4x"):
            cond[name] = torch.randn(cond[name].shape, generator=other)
        return cond

    second = dataclasses.replace(family, conditions=second_section)
    cached = rfc_compile.optimize(family.build(), config)
    flow_generation(cached, family, steps=STEPS)
    _, got = flow_generation(cached, second, steps=STEPS)
    assert len(cached._programs) == 1, "both sections run one graph"
    fresh = rfc_compile.optimize(family.build(), config)
    _, expected = flow_generation(fresh, second, steps=STEPS)
    assert cached.stats.full_steps == fresh.stats.full_steps and 2 < fresh.stats.nfc < STEPS
    for n, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"step {n}: {m}")
    _, other_history = flow_generation(rfc_compile.optimize(family.build(), config),
                                       dataclasses.replace(family, conditions=lambda b, g: second_section(b, g, 2)),
                                       steps=STEPS)
    assert max_diff(other_history, expected) > 1e-3


def test_framepack_batch_one_full_mode_equals_original():
    """HunyuanVideoFramepackPipeline runs at batch 1 (one image's latents and embeddings), where
    FramePack's forward cuts the text states to the mask's sum (a data-dependent size) instead of
    masking them; the captured graph (traceable.py's twin) masks the padded prompt token instead: the
    same outputs at every step."""
    family = FAMILIES["hunyuan_video_framepack"]
    _, expected = flow_generation(family.build(), family, steps=STEPS, batch=1)
    cached = rfc_compile.optimize(family.build(), RFCConfig(mode="full"))
    _, got = flow_generation(cached, family, steps=STEPS, batch=1)
    assert cached.stats.full_steps == list(range(STEPS))
    assert max_diff(got, expected) < 1e-5
