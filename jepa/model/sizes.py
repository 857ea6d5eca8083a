"""Encoder and predictor sizes of the reference I-JEPA code (``vit_test`` is ours, for tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    predictor_depth: int
    predictor_embed_dim: int


SIZES: dict[str, Size] = {
    "vit_test": Size(64, 2, 2, 4.0, 1, 32),
    "vit_tiny": Size(192, 12, 3, 4.0, 6, 96),
    "vit_small": Size(384, 12, 6, 4.0, 6, 192),
    "vit_base": Size(768, 12, 12, 4.0, 6, 384),
    "vit_large": Size(1024, 24, 16, 4.0, 12, 384),
    "vit_huge": Size(1280, 32, 16, 4.0, 12, 384),
    "vit_giant": Size(1408, 40, 16, 48 / 11, 16, 384),
}
