"""[core] optimize() on a diffusers DiT: exact to the method, traced, drop-in."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_CLASSES, ddim_generation, make_tiny_dit
from reference import ReferenceRFC, dit_regions

import rfc_compile
from rfc_compile import RFCConfig, UnsupportedModelError

STEPS = 30
THRESHOLD = 0.8  # gives both full and skipped steps on the tiny random DiT (measured: NFC 6-9 of 30)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("cfg", [False, True], ids=["batch1", "cfg2"])
def test_full_mode_equals_original_every_step(cfg):
    original = make_tiny_dit()
    _, expected = ddim_generation(original, steps=20, cfg=cfg)
    cached = rfc_compile.optimize(make_tiny_dit(), RFCConfig(mode="full"))
    _, got = ddim_generation(cached, steps=20, cfg=cfg)
    assert cached.stats.full_steps == list(range(20))
    assert _max_diff(got, expected) < 1e-5


@pytest.mark.parametrize("config", [
    RFCConfig(mode="fora", interval=1), RFCConfig(mode="taylorseer", interval=1),
    RFCConfig(mode="rfe", interval=1), RFCConfig(mode="rfc", threshold=0.0),
], ids=lambda c: c.mode)
def test_every_step_schedules_equal_original(config):
    _, expected = ddim_generation(make_tiny_dit(), steps=20, cfg=True)
    cached = rfc_compile.optimize(make_tiny_dit(), config)
    _, got = ddim_generation(cached, steps=20, cfg=True)
    assert cached.stats.nfc == 20
    assert _max_diff(got, expected) < 1e-5


CASES = [(mode, order, cfg) for mode in ("fora", "taylorseer", "rfe", "rfc") for order in (1, 2)
         for cfg in (False, True)] + [("full", 2, False), ("full", 2, True)]


def _against_reference(kwargs: dict, cfg: bool):
    """One generation with tests/reference.py and with optimize(); asserts the same full steps and
    the same outputs step by step, and returns the cached model."""
    reference_model = make_tiny_dit()
    reference = ReferenceRFC(dit_regions(reference_model), **kwargs)
    _, expected = ddim_generation(reference_model, steps=STEPS, cfg=cfg, on_step=lambda n: reference.begin_step())
    cached = rfc_compile.optimize(make_tiny_dit(), RFCConfig(**kwargs))
    _, got = ddim_generation(cached, steps=STEPS, cfg=cfg)
    assert cached.stats.full_steps == reference.full_steps
    for n, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {n}: {m}")
    return cached


@pytest.mark.parametrize("mode,order,cfg", CASES,
                         ids=[f"{m}-o{o}-{'cfg2' if c else 'b1'}" for m, o, c in CASES])
def test_matches_independent_reference(mode, order, cfg):
    """Same full steps and same outputs as tests/reference.py, step by step."""
    kwargs = dict(mode=mode, order=order, threshold=THRESHOLD, warmup_steps=2, interval=3)
    cached = _against_reference(kwargs, cfg)
    if mode != "full":
        assert 2 < cached.stats.nfc < STEPS, "the setting must produce both full and skipped steps"


OPTIONS = {  # RFCConfig options beyond the paper (config.py), each against the reference
    "shrink": dict(mode="rfc", order=2, rfe_shrink=True),
    "shrink-rfe": dict(mode="rfe", order=1, rfe_shrink=True),
    "final-full": dict(mode="rfc", order=2, num_steps=STEPS, final_full_steps=2),
    "all": dict(mode="rfc", order=2, rfe_shrink=True, num_steps=STEPS, final_full_steps=1),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_match_independent_reference(name):
    kwargs = dict(threshold=THRESHOLD, warmup_steps=2, interval=3, **OPTIONS[name])
    cached = _against_reference(kwargs, cfg=True)
    assert 2 < cached.stats.nfc < STEPS
    if kwargs.get("final_full_steps"):
        assert set(range(STEPS - kwargs["final_full_steps"], STEPS)) <= set(cached.stats.full_steps)


def test_fixed_schedule_matches_method_text():
    """warmup 2, N = 4 -> full steps 0, 1, 5, 9, ... (RFC_METHOD.md)."""
    cached = rfc_compile.optimize(make_tiny_dit(), RFCConfig(mode="taylorseer", interval=4))
    ddim_generation(cached, steps=14)
    assert cached.stats.full_steps == [0, 1, 5, 9, 13]


def test_graph_holds_one_cond_and_a_tensor_predicate(tiny_dit):
    cached = rfc_compile.optimize(tiny_dit, RFCConfig(mode="rfc", threshold=THRESHOLD))
    ddim_generation(cached, steps=3)
    gm = cached.graph_module
    conds = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == 1
    predicate = conds[0].args[0]
    assert isinstance(predicate, torch.fx.Node), "the decision must be a graph value, not a Python bool"
    assert predicate.meta["val"].dtype == torch.bool and predicate.meta["val"].dim() == 0
    # both branches are graphs: the predict branch never calls the regions' big matmuls
    true_gm = getattr(gm, conds[0].args[1].target)
    false_gm = getattr(gm, conds[0].args[2].target)
    count = lambda g: sum(1 for n in g.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert count(false_gm) < count(true_gm)


def test_two_generations_equal_fresh_models():
    config = RFCConfig(mode="rfc", threshold=THRESHOLD)
    reused = rfc_compile.optimize(make_tiny_dit(), config)
    runs = []
    for seed in (1, 2):
        latents, _ = ddim_generation(reused, steps=STEPS, cfg=True, seed=seed)
        runs.append((latents, reused.stats.full_steps))
    for seed, (latents, full_steps) in zip((1, 2), runs):
        fresh = rfc_compile.optimize(make_tiny_dit(), config)
        expected, _ = ddim_generation(fresh, steps=STEPS, cfg=True, seed=seed)
        assert full_steps == fresh.stats.full_steps
        assert torch.equal(latents, expected)


def test_explicit_reset_and_example_inputs(tiny_dit):
    x = torch.randn(2, 4, 8, 8)
    example = dict(hidden_states=x, timestep=torch.tensor([999, 999]), class_labels=torch.tensor([1, NUM_CLASSES]),
                   return_dict=False)
    cached = rfc_compile.optimize(tiny_dit, RFCConfig(mode="fora", interval=3), example_inputs=example,
                                  auto_reset=False)
    assert cached.graph_module is not None  # captured eagerly
    for _ in range(4):
        cached(**example)
    assert cached.stats.full_steps == [0, 1]
    cached.reset()
    cached(**example)
    assert cached.stats.steps == 1 and cached.stats.full_steps == [0]


def test_drop_in_attributes_and_return_type(tiny_dit):
    cached = rfc_compile.optimize(tiny_dit, RFCConfig(mode="full"))
    assert cached.config.num_layers == tiny_dit.config.num_layers
    assert cached.dtype == tiny_dit.dtype
    assert cached.state_dict().keys() == tiny_dit.state_dict().keys()
    out = cached(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.tensor([3]))
    assert type(out).__name__ == "Transformer2DModelOutput"
    expected = tiny_dit(torch.randn(1, 4, 8, 8) * 0, torch.tensor([10]), torch.tensor([3]))
    assert out.sample.shape == expected.sample.shape


def test_inputs_requiring_grad_are_refused_not_silently_cut(tiny_dit):
    """The cached step runs without autograd: with grad mode on and latents requiring grad (a
    guidance loss through the model's output), its output was silently detached, and backward()
    gave a gradient without the model's term (19 % off in mode "full"). Refused, naming the inputs;
    grad mode on with inputs that do not require grad, or detached ones, still runs."""
    cached = rfc_compile.optimize(tiny_dit, RFCConfig(mode="full"))
    x, t, labels = torch.randn(2, 4, 8, 8), torch.full((2,), 999), torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match=r"\['hidden_states'\] require grad"):
        cached(hidden_states=x.clone().requires_grad_(), timestep=t, class_labels=labels)
    expected = tiny_dit(hidden_states=x, timestep=t, class_labels=labels).sample
    assert torch.equal(cached(hidden_states=x, timestep=t, class_labels=labels).sample, expected)
    with torch.no_grad():
        out = cached(hidden_states=x.clone().requires_grad_(), timestep=t, class_labels=labels).sample
    assert torch.allclose(out, expected, atol=1e-6)


def test_optimizing_an_optimized_model_starts_from_the_model_it_wraps():
    """optimize(cached, other_config) (e.g. trying another config in a notebook) re-optimizes the
    wrapped model; before, torch.export failed inside the first CachedModel's graph
    ("SymInt ... is not tracked with proxy")."""
    model = make_tiny_dit()
    first = rfc_compile.optimize(model, RFCConfig(mode="taylorseer", interval=3))
    again = rfc_compile.optimize(first, RFCConfig(mode="fora", interval=4))
    assert again.model is model and again.rfc_config.mode == "fora"
    _, got = ddim_generation(again, steps=10)
    _, expected = ddim_generation(rfc_compile.optimize(make_tiny_dit(), RFCConfig(mode="fora", interval=4)), steps=10)
    assert again.stats.full_steps == [0, 1, 5, 9]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_unsupported_models_raise_naming_what_was_found():
    with pytest.raises(UnsupportedModelError, match="Linear|no nn.ModuleList"):
        rfc_compile.optimize(torch.nn.Sequential(torch.nn.Linear(4, 4)))

    class Block(torch.nn.Module):
        def forward(self, x):
            return x

    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

    with pytest.raises(UnsupportedModelError, match="Block x2"):
        rfc_compile.optimize(Weird())


@pytest.mark.parametrize("bad", [
    dict(mode="nope"), dict(order=-1), dict(order=99), dict(threshold=-0.1), dict(threshold=float("nan")),
    dict(warmup_steps=0, mode="rfc"), dict(warmup_steps=1, mode="rfe"), dict(interval=0), dict(max_interval=0),
    dict(eps=0.0),
])
def test_config_rejects_invalid_values(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field if field != "mode" else "mode"):
        RFCConfig(**bad)


def test_config_rejects_wrong_types():
    with pytest.raises(TypeError, match="order"):
        RFCConfig(order=1.5)
    with pytest.raises(TypeError, match="mode"):
        RFCConfig(mode=3)


def test_size_reads_move_to_the_first_tensor_of_that_size():
    """passes/early_sizes.py: a size torch.export first read off a later tensor (Hunyuan-DiT's token
    count, first asked for in the first block's attention, then read by every block) is read off the
    first tensor that has it, so no cached region outputs a size. The graph computes what the module
    does, at other sizes too."""
    from rfc_compile.passes.early_sizes import read_sizes_early

    class Late(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patches = torch.nn.Conv2d(3, 4, 2, stride=2)  # its output's sizes come from the conv's meta
            self.mix = torch.nn.Linear(4, 4)

        def forward(self, x):
            tokens = self.patches(x).flatten(2).transpose(1, 2)  # (B, h*w, 4): the size first exists here
            mixed = self.mix(torch.relu(tokens))
            batch, count, channels = mixed.shape  # first asked for here
            return mixed.reshape(batch * count, channels) + 1

    def symbolic(node):
        value = node.meta.get("val")
        return [d.node.expr for d in value.shape if isinstance(d, torch.SymInt)] if isinstance(value, torch.Tensor) else []

    h, w = torch.export.Dim("h", min=2, max=32), torch.export.Dim("w", min=2, max=32)
    module = Late()
    gm = torch.export.export(module, (torch.randn(2, 3, 8, 10),), dynamic_shapes=({2: 2 * h, 3: 2 * w},)).module()
    reads = lambda: [n for n in gm.graph.nodes if n.target is torch.ops.aten.sym_size.int]  # noqa: E731
    nodes = list(gm.graph.nodes)
    late = [n for n in reads() if n.args[0].op != "placeholder"]
    earliest = {n: next(m for m in nodes if n.meta["val"].node.expr in symbolic(m)) for n in late}
    assert any(earliest[n] is not n.args[0] for n in late), "the example must read a size off a later tensor"
    read_sizes_early(gm)
    nodes = list(gm.graph.nodes)
    for node in late:
        assert node.args[0] is earliest[node] and nodes.index(node) > nodes.index(earliest[node])
    for size in ((8, 10), (6, 4), (12, 14)):
        x = torch.randn(2, 3, *size)
        assert torch.equal(gm(x), module(x))


def test_noop_squeeze_pass_drops_only_squeezes_that_do_nothing():
    """passes/noop_squeeze.py: a squeeze of a dim that is not 1 (PixArt's ``squeeze(1)`` of its tokens)
    is dropped, so the ONNX graph has no Squeeze that onnxruntime refuses at a dynamic size; a squeeze
    that removes a dim of size 1 stays. The graph computes what the module does."""
    from rfc_compile.passes.noop_squeeze import drop_noop_squeezes

    class Squeezes(torch.nn.Module):
        def forward(self, x):
            return x.squeeze(1) * 2, x[:, :1].squeeze(1)

    x = torch.randn(2, 5, 3)
    tokens = torch.export.Dim("tokens", min=2)
    gm = torch.export.export(Squeezes(), (x,), dynamic_shapes=({1: tokens},)).module()
    squeezes = lambda: [n for n in gm.graph.nodes if n.target == torch.ops.aten.squeeze.dim]  # noqa: E731
    assert len(squeezes()) == 2
    drop_noop_squeezes(gm)
    assert len(squeezes()) == 1 and squeezes()[0].meta["val"].dim() == 2
    for size in (5, 7):
        x = torch.randn(2, size, 3)
        doubled, first = gm(x)
        assert torch.equal(doubled, x * 2) and torch.equal(first, x[:, 0])
