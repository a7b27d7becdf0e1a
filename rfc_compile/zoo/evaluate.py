"""Measure the zoo models: classifier accuracy of samples, and wall time per generation.

    python -m rfc_compile.zoo.evaluate dit-digits --cfg 1 1.5 2 3 [--n 64] [--grid out.png]

For each CFG scale: ``n`` samples (classes cycling 0..9, seed 0, 50 steps, generated in batches
of 10 with seeds 0, 1, ...), classified by :func:`rfc_compile.zoo.load_classifier`; plus the wall
time of one 50-step generation of a batch of 10 (one CPU thread unless ``--threads``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def sample_accuracy(bundle, classifier, n: int = 64, guidance_scale: float | None = None,
                    steps: int = 50, batch: int = 10) -> tuple[float, torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % 10
    imgs = []
    for i, s in enumerate(range(0, n, batch)):
        imgs.append(bundle.sample(labels[s:s + batch], num_inference_steps=steps, seed=i,
                                  guidance_scale=guidance_scale))
    imgs = torch.cat(imgs)
    pred = classifier.classify(imgs)
    return (pred == labels).float().mean().item(), imgs, pred


def time_generation(bundle, guidance_scale=None, steps: int = 50, batch: int = 10, reps: int = 2) -> float:
    labels = list(range(batch))
    bundle.sample(labels, num_inference_steps=steps, seed=0, guidance_scale=guidance_scale)  # warm
    t0 = time.perf_counter()
    for r in range(reps):
        bundle.sample(labels, num_inference_steps=steps, seed=r, guidance_scale=guidance_scale)
    return (time.perf_counter() - t0) / reps


def evaluate(name: str, checkpoint_dir=None, guidance_scales=(1.5,), n: int = 64,
             grid: str | None = None, timing: bool = True) -> dict:
    from . import load, load_classifier

    bundle = load(name, checkpoint_dir)
    clf_dir = checkpoint_dir if (Path(checkpoint_dir or ".") / "classifier.json").exists() else None
    clf = load_classifier(clf_dir)
    res = {"n_samples": n, "steps": 50, "seed_batches_of": 10, "accuracy": {}}
    grids = []
    for gs in guidance_scales:
        acc, imgs, pred = sample_accuracy(bundle, clf, n=n, guidance_scale=gs)
        res["accuracy"][str(gs)] = round(acc, 4)
        print(f"{name}: CFG {gs}: sample accuracy {acc:.4f} ({n} samples)", flush=True)
        grids.append((gs, imgs, pred))
    if timing:
        secs = time_generation(bundle, guidance_scale=guidance_scales[0])
        res["seconds_per_50_step_batch10"] = round(secs, 3)
        res["threads"] = torch.get_num_threads()
        print(f"{name}: {secs:.2f} s per 50-step generation of a batch of 10 "
              f"(CFG {guidance_scales[0]}, {torch.get_num_threads()} thread(s))", flush=True)
    if grid:
        save_grid(grids, grid, name)
    return res


def save_grid(grids, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(grids)
    n = min(40, grids[0][1].shape[0])
    fig, axes = plt.subplots(rows * 4, 10, figsize=(10, rows * 4.4))
    axes = axes.reshape(rows * 4, 10)
    for r, (gs, imgs, pred) in enumerate(grids):
        for i in range(n):
            ax = axes[r * 4 + i // 10, i % 10]
            ax.imshow(imgs[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{pred[i].item()}", fontsize=7, color="k" if pred[i] == i % 10 else "r")
        axes[r * 4, 0].set_ylabel(f"cfg {gs}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m rfc_compile.zoo.evaluate", description=__doc__)
    p.add_argument("model")
    p.add_argument("--cfg", type=float, nargs="+", default=None)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--grid", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--record", action="store_true",
                   help="write the results into the checkpoint json's \"eval\" entry")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model == "classifier":
        from . import data, load_classifier

        clf = load_classifier(args.checkpoint_dir)
        x, y = data.test_split()
        print(f"classifier held-out accuracy: {(clf.classify(x) == y).float().mean().item():.4f}")
        return
    if args.cfg is None:
        from . import load

        args.cfg = [load(args.model, args.checkpoint_dir).guidance_scale]
    res = evaluate(args.model, args.checkpoint_dir, args.cfg, n=args.n, grid=args.grid,
                   timing=not args.no_timing)
    if args.record:
        import json

        from . import CHECKPOINT_DIR

        path = Path(args.checkpoint_dir or CHECKPOINT_DIR) / f"{args.model}.json"
        meta = json.loads(path.read_text())
        meta["eval"] = res
        path.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
