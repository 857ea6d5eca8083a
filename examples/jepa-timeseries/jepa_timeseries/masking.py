"""Masker: a few contiguous spans are targets; every token outside them is context."""

from __future__ import annotations

import random

import torch
from pydantic import Field

from jepa import ComponentConfig, Mask, MaskConfigError, Masker


class SpanConfig(ComponentConfig):
    num_targets: int = Field(2, ge=1, description="Target spans per sample (they may overlap each other).")
    span: int = Field(4, ge=1, description="Tokens per target span.")
    min_keep: int = Field(2, ge=1, description="Minimum context tokens.")


class SpanMasker(Masker):
    Config = SpanConfig
    summary = "Span masking on a 1-D grid: contiguous target spans, the rest is context"

    @property
    def num_targets(self) -> int:
        return self.cfg.num_targets

    def check(self, grid: tuple[int, ...]) -> None:
        if len(grid) != 1:
            raise MaskConfigError(f"masker: span masking needs a 1-D grid, got {grid}")
        n, c = grid[0], self.cfg
        if c.span > n or n - c.num_targets * c.span < c.min_keep:
            raise MaskConfigError(f"masker.span: {c.num_targets} spans of {c.span} tokens on {n} tokens can leave "
                                  f"fewer than min_keep={c.min_keep} context tokens; lower span or num_targets")

    def __call__(self, grid: tuple[int, ...], rng: random.Random) -> Mask:
        n, span = grid[0], self.cfg.span
        covered = torch.zeros(n, dtype=torch.bool)
        targets = []
        for _ in range(self.cfg.num_targets):
            start = rng.randint(0, n - span)  # the only randomness: the seeded per-sample rng
            covered[start:start + span] = True
            targets.append(torch.arange(start, start + span))
        return Mask(context=torch.nonzero(~covered).flatten(), targets=targets)
