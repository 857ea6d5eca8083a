"""Tokenizer: non-overlapping patches of ``p`` samples of a ``[channels, length]`` signal."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from jepa import ComponentConfig, JepaError, Tokenizer


class SignalConfig(ComponentConfig):
    patch_size: int = Field(16, gt=0, description="Samples per token.")
    in_chans: int = Field(1, gt=0, description="Channels of the signal.")


class SignalTokenizer(Tokenizer):
    Config = SignalConfig
    summary = "1-D patches: non-overlapping windows of p samples, one token each"

    def __init__(self, cfg: SignalConfig, embed_dim: int):
        super().__init__(cfg, embed_dim)
        self.proj = nn.Conv1d(cfg.in_chans, embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    @classmethod
    def grid_for(cls, cfg: SignalConfig, sample_shape: tuple[int, ...]) -> tuple[int]:
        # The grid is 1-D: (tokens,). The core derives 1-D position embeddings from it.
        if len(sample_shape) != 2 or sample_shape[0] != cfg.in_chans:
            raise JepaError(f"tokenizer: expected signals [{cfg.in_chans}, length], got {list(sample_shape)}")
        if sample_shape[1] % cfg.patch_size:
            raise JepaError(f"tokenizer.patch_size: length {sample_shape[1]} is not divisible by {cfg.patch_size}")
        return (sample_shape[1] // cfg.patch_size,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, L] -> [B, L / p, D]
        return self.proj(x).transpose(1, 2)
