"""The digits data the zoo models are trained on.

scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``, 1797 images,
no download), upsampled bilinearly to 16x16. A fixed, stratified 80/20 split (seed 0) gives
1437 training and 360 held-out images; every zoo model trains on the training split only, and the
held-out split measures the classifier.

Pixel ranges: ``[0, 1]`` for the classifier and for what ``bundle.sample`` returns, ``[-1, 1]`` for
what the generators model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digits16() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(N, 1, 16, 16)`` float32 in ``[0, 1]`` and ``(N,)`` int64 labels."""
    from sklearn.datasets import load_digits  # scikit-learn is only needed to (re)train / evaluate

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0).contiguous(), torch.from_numpy(d.target.astype(np.int64))


def split(x: torch.Tensor, y: torch.Tensor):
    """The fixed stratified split: ``(x_train, y_train, x_test, y_test)``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(
        idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y.numpy()
    )
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return x[tr], y[tr], x[te], y[te]


def train_split() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits16()
    xtr, ytr, _, _ = split(x, y)
    return xtr, ytr


def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits16()
    _, _, xte, yte = split(x, y)
    return xte, yte


def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    return x01 * 2.0 - 1.0


def to_unit_range(xm: torch.Tensor) -> torch.Tensor:
    return ((xm + 1.0) * 0.5).clamp(0.0, 1.0)
