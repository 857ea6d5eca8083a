"""ViT patch tokenizer: a strided convolution over non-overlapping p x p patches."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from jepa import ComponentConfig, JepaError, Tokenizer


class PatchConfig(ComponentConfig):
    patch_size: int | tuple[int, int] = Field(16, description="Patch height and width in pixels (one int or [h, w]).")
    in_chans: int = Field(3, gt=0, description="Input channels.")
    init: Literal["trunc_normal", "xavier"] = Field(
        "trunc_normal", description="Patch-projection init. `trunc_normal`: std 0.02, the reference's (token "
        "content then scales with sqrt(patch area): ~0.55 for 16x16 patches, ~0.14 for 4x4 ones, against "
        "position embeddings of RMS ~0.7). `xavier`: Xavier-uniform on the flattened kernel (as MAE), "
        "which keeps content tokens at ~0.6 whatever the patch size; use it for small patches.")

    @field_validator("patch_size")
    @classmethod
    def _positive(cls, v):
        if any(p <= 0 for p in ((v, v) if isinstance(v, int) else v)):
            raise ValueError("patch sizes must be positive")
        return v

    @property
    def patch_hw(self) -> tuple[int, int]:
        p = self.patch_size
        return (p, p) if isinstance(p, int) else tuple(p)


class PatchTokenizer(Tokenizer):
    """Cuts ``[B, C, H, W]`` images into ``(H/p) x (W/p)`` patch tokens, row-major.

    Any H and W divisible by the patch size work (non-square too); position embeddings follow the
    grid. (timm's ``PatchEmbed`` is this same convolution; holding the conv directly keeps the
    reference checkpoint name ``patch_embed.proj``.)
    """

    Config = PatchConfig
    summary = "ViT patches: non-overlapping p x p patches of an image, any H x W divisible by p"

    def __init__(self, cfg: PatchConfig, embed_dim: int):
        super().__init__(cfg, embed_dim)
        self.proj = nn.Conv2d(cfg.in_chans, embed_dim, kernel_size=cfg.patch_hw, stride=cfg.patch_hw)

    @classmethod
    def grid_for(cls, cfg: PatchConfig, sample_shape: tuple[int, ...]) -> tuple[int, int]:
        if len(sample_shape) != 3:
            raise JepaError(f"tokenizer: patch tokenizer expects images [C, H, W], got shape {list(sample_shape)}")
        c, h, w = sample_shape
        ph, pw = cfg.patch_hw
        if c != cfg.in_chans:
            raise JepaError(f"tokenizer.in_chans: images have {c} channels, the tokenizer expects {cfg.in_chans}")
        if h % ph or w % pw:
            raise JepaError(f"tokenizer.patch_size: image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        return (h // ph, w // pw)

    def init_weights(self) -> None:
        if self.cfg.init == "xavier":
            w = self.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid(tuple(x.shape[1:]))
        return self.proj(x).flatten(2).transpose(1, 2)
