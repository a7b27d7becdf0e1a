"""[bench] calibrate(): the RCS threshold for a target NFC."""

from __future__ import annotations

import pytest
from conftest import ddim_generation, make_tiny_dit

import rfc_compile
from rfc_compile.calibrate import calibrate_options, calibrate_threshold, measure_nfc


def _generations(cached):
    for seed in (0, 1):
        ddim_generation(cached, steps=16, cfg=True, seed=seed)


def test_calibration_hits_the_target_nfc():
    model = make_tiny_dit(layers=1)
    result = calibrate_threshold(model, _generations, 6, rfc_compile.RFCConfig(order=1))
    assert abs(result.nfc - 6) <= 1, result.trials
    assert result.config.mode == "rfc" and result.config.order == 1
    # the returned config really gives that NFC when used again
    assert measure_nfc(model, _generations, result.config) == result.nfc


def _branch_steps(cached, with_context: bool, wobble: tuple[float, float]) -> None:
    """12 steps, each a cond then an uncond call on latents that move by ``wobble[branch]``
    (in cache_context; without it both branches must see the same latents)."""
    import contextlib

    import torch
    from conftest import NUM_CLASSES

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for n in range(12):
        t = torch.full((1,), 900 - 75 * n)
        for (name, label), amount in zip((("cond", 3), ("uncond", NUM_CLASSES)), wobble):
            context = cached.cache_context(name) if with_context else contextlib.nullcontext()
            with context:
                cached(hidden_states=x + amount * n * torch.sin(3 * x + n), timestep=t,
                       class_labels=torch.tensor([label]), return_dict=False)


def test_nfc_counts_every_branch_cache():
    """A sampler calling its cond and uncond branches separately (in cache_context, or with the
    same latents outside it) runs one generation per branch: measure_nfc averages all of them,
    not only the cache used last."""
    config = rfc_compile.RFCConfig(mode="rfc", threshold=0.6)
    reference = rfc_compile.optimize(make_tiny_dit(), config)
    _branch_steps(reference, True, (0.02, 0.15))  # the uncond latents move more: more full steps
    nfcs = [g.nfc for g in reference.all_generations]
    assert len(nfcs) == 2 and nfcs[0] < nfcs[1]
    assert measure_nfc(make_tiny_dit(), lambda c: _branch_steps(c, True, (0.02, 0.15)), config) == sum(nfcs) / 2
    # outside cache_context, same latents: still a generation per branch
    cached = rfc_compile.optimize(make_tiny_dit(), config)
    _branch_steps(cached, False, (0.15, 0.15))
    assert [g.steps for g in cached.all_generations] == [12, 12]


def test_target_below_warmup_is_rejected():
    with pytest.raises(ValueError, match="warmup"):
        rfc_compile.calibrate(make_tiny_dit(), _generations, 1)


def test_digits_clis_refuse_bad_arguments_in_one_line(capsys):
    """`rfc-compile calibrate`: a target NFC outside [warm-up steps, --steps] and an unknown zoo
    model are one-line errors before any model is loaded (a traceback / a 19-trial search that
    printed NFC 50 for a target of 60, before); so are `rfc-compile demo`'s."""
    from rfc_compile.cli import main

    assert main(["calibrate", "--target-nfc", "60", "--steps", "50"]) == 2
    assert "between the warm-up steps (2, always full) and --steps (50)" in capsys.readouterr().out
    assert main(["calibrate", "--target-nfc", "1"]) == 2
    assert main(["calibrate", "--target-nfc", "14", "--order", "99"]) == 2
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", "nope", "--target-nfc", "5"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    # the demo's arguments too (tracebacks before): classes, model, config
    for bad, message in ((["--classes", "3,x"], "not a comma-separated list of digits"),
                         (["--classes", "12"], "the zoo models know the digits 0..9"),
                         (["--model", "nope"], "invalid choice: 'nope'")):
        with pytest.raises(SystemExit):
            main(["demo", *bad])
        assert message in capsys.readouterr().err
    assert main(["demo", "--order", "99"]) == 2
    assert "RFCConfig.order must be in [0, 8]" in capsys.readouterr().out


def test_calibration_chooses_the_best_scoring_options():
    model = make_tiny_dit(layers=1)
    full = ddim_generation(model, steps=16, cfg=True, seed=0)[0]

    def score(cached):  # closeness to full compute of one generation
        return -float((ddim_generation(cached, steps=16, cfg=True, seed=0)[0] - full).pow(2).mean())

    candidates = [{}, {"num_steps": 16, "final_full_steps": 1}]
    result = calibrate_options(model, _generations, 6, score, candidates, rfc_compile.RFCConfig(order=1))
    assert [options for options, *_ in result.scores] == candidates
    assert all(abs(nfc - 6) <= 1 for _, _, nfc, _ in result.scores)
    best = max(result.scores, key=lambda entry: entry[3])
    assert result.config == best[1]
    # the scores are real: re-scoring the chosen config gives the same number
    assert score(rfc_compile.optimize(model, result.config)) == best[3]
    with pytest.raises(ValueError, match="score_fn"):
        rfc_compile.calibrate(model, _generations, 6, candidates=candidates)
