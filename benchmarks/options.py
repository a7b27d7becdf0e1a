"""RFCConfig options beyond the paper, measured against the paper's RFC and its baselines.

    python benchmarks/options.py            # both zoo models, 32 samples, NFC 14/10/8/7

For each zoo model and target NFC: TaylorSeer and RFE at fixed intervals, the paper's RFC
(order 1 and 2, tau calibrated to the target on samples 0..7), and RFC with each option of
``RFCConfig`` that is not in the paper (``rfe_shrink=True``, ``final_full_steps=1``), each
calibrated to the same target. Metrics and
sampling are those of ``benchmarks/quality.py`` (PSNR / FD to the full-compute output of the
same sample). Writes the ``options`` section of ``benchmarks/RESULTS.md``; an option is worth
keeping where its row beats the paper's RFC of the same order.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402  (benchmarks/quality.py: sampling, metrics, calibration helpers)

log = logging.getLogger("options")
START, END = "<!-- options:start -->", "<!-- options:end -->"
COMMAND = ".venv/bin/python benchmarks/options.py"

#: label -> (kind, mode, order, RFCConfig options); "{S}" in an option value is the step count
VARIANTS: dict[str, tuple[str, str, int, dict]] = {
    "TaylorSeer o2": ("fixed", "taylorseer", 2, {}),
    "RFE o2": ("fixed", "rfe", 2, {}),
    "RFC o1": ("rcs", "rfc", 1, {}),
    "RFC o1 +final": ("rcs", "rfc", 1, {"final_full_steps": 1}),
    "RFC o2": ("rcs", "rfc", 2, {}),
    "RFC o2 +shrink": ("rcs", "rfc", 2, {"rfe_shrink": True}),
    "RFC o2 +final": ("rcs", "rfc", 2, {"final_full_steps": 1}),
}


#: What the last run's numbers say, written after reading them (rendered under the tables).
FINDINGS = """
Findings (2026-11-30 run): no option wins on both models. `+final` is the big one on dit-digits
(RFC o2 +4.0 / +2.7 / +0.2 / +2.8 dB at NFC 14 / 10 / 8 / 7, the best row at 10, 8 and 7 and
0.2 dB under TaylorSeer o2 at 14): RCS there leaves the last steps to extrapolation. On
flux-digits RCS already computes the last step at NFC 14 (+0.00 dB) and at NFC 8 the forced step
costs one in the middle (-5.2 dB). `+shrink` wins on flux-digits (+1.8 / +1.1 dB at NFC 14 / 8,
the best rows) and is mixed on dit-digits (-2.4 dB at 14, +1.2 at 7). `+divided` loses at every
budget on dit-digits (-0.3 to -4.0 dB), so TaylorSeer's latest-gap convention stays and the
option was removed from RFCConfig after this run (its rows, and `+all` = divided + shrink + final,
are kept here as the record; the command above no longer accepts them). A per-token RFE magnitude
came later, was measured as a candidate of the quality section's "RFC (calibrated options)" and
was removed too (never chosen there).
Hence `rfc_compile.calibrate(..., candidates=[...], score_fn=...)`: per model and budget, calibrate
each candidate and keep the best-scoring one on a few prompts.
"""


def run_model(name: str, args) -> dict:
    torch.set_num_threads(args.threads)
    from rfc_compile import zoo
    from rfc_compile.zoo import data as zoo_data

    bundle = zoo.load(name)
    samples, calib = list(range(args.seeds)), list(range(args.calib_seeds))
    classifier = zoo.load_classifier()
    real, _ = zoo_data.load_digits16()
    full = q.sample_batched(bundle, samples, args.steps)
    labels = torch.tensor([q.label_of(i) for i in samples])
    scorer = q.Scorer(full, labels, classifier, classifier.features(real).numpy())
    start = time.perf_counter()
    ctx = q.Ctx(name, bundle, args.steps, samples, calib, scorer, notes={}, batch_probe_target=None)
    for label in args.variants:
        kind, mode, order, options = VARIANTS[label]
        if options.get("final_full_steps"):
            options = {**options, "num_steps": args.steps}
        if kind == "fixed":
            q.run_fixed(ctx, mode, order, label, args.targets)
        else:
            q.run_rcs(ctx, mode, order, label, args.targets, options=options)
    return {"model": name, "rows": ctx.rows, "seconds": round(time.perf_counter() - start, 1), "setup": {"steps": args.steps, "seeds": len(samples),
                                                       "calib_seeds": len(calib), "targets": args.targets}}


def render(results: list[dict], args, wall: float | None) -> str:
    lines = [START, "## Options beyond the paper", "",
             f"Command: `{COMMAND}{' ' + ' '.join(args.argv) if args.argv else ''}` (wrote this section"
             + (f"; {wall / 60:.0f} min wall on the 2-core CPU" if wall else "")
             + "; per-model workers and logs in `out/options/`).", "",
             f"Setup: {results[0]['setup']['steps']} steps, {results[0]['setup']['seeds']} samples per model, "
             f"thresholds calibrated to each target on samples 0..{results[0]['setup']['calib_seeds'] - 1}, "
             "metrics as in the quality section (PSNR-to-full dB / FD-to-full, achieved NFC in parentheses). "
             "Options (RFCConfig): `+shrink` = `rfe_shrink=True` (RFE magnitude times the cosine between "
             "the Taylor term and the change measured at the last full step), `+final` = "
             "`final_full_steps=1, num_steps=S` (the last step always computed in full); removed since: "
             "`+divided` = `differences=\"divided\"` (divided differences over the real gaps between full "
             "steps), `+all` = divided + shrink + final.", ""]
    for res in results:
        rows = res["rows"]
        targets = res["setup"]["targets"]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        command = (f"{COMMAND} --models {res['model']} --targets {','.join(map(str, targets))} "
                   f"--seeds {res['setup']['seeds']} --variants \"{','.join(methods)}\"")
        lines += [f"### {res['model']}", "", f"Rows from `{command}`.", "", "| method | " + " | ".join(f"NFC {t}" for t in targets) + " |",
                  "|---|" + "---|" * len(targets)]
        best = {t: max(r["psnr"] for r in rows if r["target"] == t) for t in targets}
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = []
            for t in targets:
                r = next((r for r in rows if r["method"] == method and r["target"] == t), None)
                if r is None:
                    cells.append("-")
                    continue
                psnr = f"**{r['psnr']:.2f}**" if r["psnr"] == best[t] else f"{r['psnr']:.2f}"
                cells.append(f"{psnr} / {r['fd_full']:.3f} ({r['nfc']:.2f})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        for t in targets:
            for order in (1, 2):
                base = next((r for r in rows if r["method"] == f"RFC o{order}" and r["target"] == t), None)
                if base is None:
                    continue
                deltas = [f"{r['method'][len(f'RFC o{order} '):]} {r['psnr'] - base['psnr']:+.2f} dB"
                          for r in rows if r["method"].startswith(f"RFC o{order} +") and r["target"] == t]
                if deltas:
                    lines.append(f"- NFC {t}, vs RFC o{order}: " + ", ".join(deltas))
        lines.append("")
    lines += [FINDINGS.strip(), "", END]
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(q.MODELS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seeds", type=int, default=32)
    p.add_argument("--calib-seeds", type=int, default=8)
    p.add_argument("--targets", default="14,10,8,7")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="models run in parallel processes")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", default=str(q.ROOT / "out" / "options"))
    p.add_argument("--render-only", action="store_true", help="re-render from the JSON results in --out")
    p.add_argument("--model-only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    raw = list(argv if argv is not None else sys.argv[1:])
    args.argv = [a for a in raw if a != "--render-only"]
    if "--model-only" in args.argv:
        j = args.argv.index("--model-only")
        del args.argv[j:j + 2]
    args.targets = [int(t) for t in str(args.targets).split(",")]
    args.variants = [v for v in str(args.variants).split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("rfc_compile", "diffusers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model_only:
        (out / f"{args.model_only}.json").write_text(json.dumps(run_model(args.model_only, args), indent=1))
        return 0
    start, models = time.perf_counter(), args.models.split(",")
    if args.render_only:
        results = [json.loads((out / f"{name}.json").read_text()) for name in models]
        meta = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        args.argv = meta.get("argv", args.argv)
        text = render(results, args, meta.get("wall"))
        print(text)
        if not args.no_write:
            q.write_section(text, q.RESULTS, START, END)
        return 0
    results = q.run_workers(__file__, args, models, out)
    if results is None:
        return 1
    wall = time.perf_counter() - start
    (out / "run.json").write_text(json.dumps({"argv": args.argv, "wall": wall}))
    text = render(results, args, wall)
    print(text)
    if not args.no_write:
        q.write_section(text, q.RESULTS, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
