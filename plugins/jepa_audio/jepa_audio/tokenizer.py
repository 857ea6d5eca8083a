"""Spectrogram tokenizer: non-overlapping (time x frequency) patches of a log-mel spectrogram.

Samples are ``[1, frames, mel_bins]`` (the audio source computes the filterbank). The grid is
``(frames / pt, mel_bins / pf)``, time-major, so token ``n`` sits at (time ``n // F'``, frequency
``n % F'``); the core builds 2-D sin-cos position embeddings from those coordinates.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from jepa import ComponentConfig, JepaError, Tokenizer


class SpectrogramConfig(ComponentConfig):
    patch_size: int | tuple[int, int] = Field(16, description="Patch size in (frames, mel bins): one int or [t, f].")
    in_chans: int = Field(1, gt=0, description="Input channels (1 for a log-mel spectrogram).")
    init: Literal["trunc_normal", "xavier"] = Field(
        "trunc_normal", description="Patch-projection init. `trunc_normal`: std 0.02 (the reference's; content "
        "std ~0.02 * sqrt(patch area) for a normalised spectrogram, 0.32 for 16x16). `xavier`: Xavier-uniform on "
        "the flattened kernel, content on the scale of the position embeddings whatever the patch size.")

    @field_validator("patch_size")
    @classmethod
    def _positive(cls, v):
        if any(p <= 0 for p in ((v, v) if isinstance(v, int) else v)):
            raise ValueError("patch sizes must be positive")
        return v

    @property
    def patch_tf(self) -> tuple[int, int]:
        p = self.patch_size
        return (p, p) if isinstance(p, int) else tuple(p)


class SpectrogramTokenizer(Tokenizer):
    """A strided convolution over (time, frequency) patches, as AudioMAE / A-JEPA patch 16 x 16."""

    Config = SpectrogramConfig
    summary = "Log-mel patches: non-overlapping (time x frequency) patches of a [1, frames, mel] spectrogram"

    def __init__(self, cfg: SpectrogramConfig, embed_dim: int):
        super().__init__(cfg, embed_dim)
        self.proj = nn.Conv2d(cfg.in_chans, embed_dim, kernel_size=cfg.patch_tf, stride=cfg.patch_tf)

    @classmethod
    def grid_for(cls, cfg: SpectrogramConfig, sample_shape: tuple[int, ...]) -> tuple[int, int]:
        if len(sample_shape) != 3:
            raise JepaError("tokenizer: the spectrogram tokenizer expects [channels, frames, mel_bins], got shape "
                            f"{list(sample_shape)}")
        c, t, f = sample_shape
        pt, pf = cfg.patch_tf
        if c != cfg.in_chans:
            raise JepaError(f"tokenizer.in_chans: spectrograms have {c} channels, the tokenizer expects {cfg.in_chans}")
        if t % pt or f % pf:
            raise JepaError(f"tokenizer.patch_size: a {t} frames x {f} mel bins spectrogram is not divisible by the "
                            f"patch size {pt}x{pf}; set source.num_frames / source.mel_bins to multiples of it")
        return (t // pt, f // pf)

    def init_weights(self) -> None:
        if self.cfg.init == "xavier":
            w = self.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid(tuple(x.shape[1:]))
        return self.proj(x).flatten(2).transpose(1, 2)
