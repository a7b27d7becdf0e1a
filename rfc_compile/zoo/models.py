"""Architectures of the zoo models (configs live with each checkpoint's json)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# DiT: class-conditional pixel-space DiTTransformer2DModel (noise/velocity prediction).
# --------------------------------------------------------------------------------------------

DIT_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    sample_size=16,
    patch_size=2,
    num_embeds_ada_norm=10,  # LabelEmbedding reserves index 10 as the null (uncond) label
)


def build_dit(config: dict | None = None):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**(config or DIT_CONFIG))


def set_dit_label_dropout(model: nn.Module, p: float) -> None:
    """Set every block's internal LabelEmbedding dropout.

    Each DiT block has its own ``CombinedTimestepLabelEmbeddings`` whose ``LabelEmbedding`` drops
    labels independently (p=0.1 hard-coded) in train mode; the training loop drops labels itself
    (same decision for all blocks), so it switches the internal dropout off. The null row of the
    embedding table (index ``num_classes``) exists regardless, since the table was built with p>0.
    """
    for m in model.modules():
        if m.__class__.__name__ == "LabelEmbedding":
            m.dropout_prob = p


# --------------------------------------------------------------------------------------------
# FLUX: a small FluxTransformer2DModel, class label as learned "text" tokens + pooled vector.
# --------------------------------------------------------------------------------------------

FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=4,  # 16x16x1 image packed 2x2 -> 8x8 tokens of 4 channels (like FluxPipeline)
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
FLUX_TEXT_TOKENS = 4


class ClassConditioner(nn.Module):
    """Class label -> FLUX conditioning: ``n_tokens`` learned "text" tokens and a pooled vector.

    Index ``num_classes`` (10) is the null label used for classifier-free guidance.
    """

    def __init__(self, num_classes: int = 10, n_tokens: int = FLUX_TEXT_TOKENS,
                 joint_attention_dim: int = 64, pooled_projection_dim: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.n_tokens = n_tokens
        self.joint_attention_dim = joint_attention_dim
        self.text = nn.Embedding(num_classes + 1, n_tokens * joint_attention_dim)
        self.pooled = nn.Embedding(num_classes + 1, pooled_projection_dim)
        nn.init.normal_(self.text.weight, std=1.0)
        nn.init.normal_(self.pooled.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        txt = self.text(labels).view(labels.shape[0], self.n_tokens, self.joint_attention_dim)
        return txt, self.pooled(labels)


def build_flux(config: dict | None = None):
    from diffusers import FluxTransformer2DModel

    cfg = dict(config or FLUX_CONFIG)
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return FluxTransformer2DModel(**cfg)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), the 2x2 packing of ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    b, _, d = x.shape
    c = d // 4
    x = x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """FLUX ``img_ids`` for an (h/2 x w/2) token grid: (h/2 * w/2, 3), [0, row, col]."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def text_ids(n_tokens: int) -> torch.Tensor:
    """FLUX ``txt_ids``: zeros (n_tokens, 3), as FluxPipeline uses."""
    return torch.zeros(n_tokens, 3)


# --------------------------------------------------------------------------------------------
# Classifier: a tiny CNN on 16x16 images in [0, 1].
# --------------------------------------------------------------------------------------------

CLASSIFIER_CONFIG = dict(channels=(16, 32, 64), feature_dim=128, num_classes=10)


class DigitsCNN(nn.Module):
    """16x16x1 in [0, 1] -> 10 logits; ``features`` is the 128-d penultimate (post-ReLU) layer."""

    def __init__(self, channels=(16, 32, 64), feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)  # 16x16
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)  # 8x8
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)  # 4x4
        self.fc = nn.Linear(c3 * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.drop = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) * 2.0
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))
