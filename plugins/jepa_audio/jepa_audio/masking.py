"""Maskers for spectrogram token grids ``(time, frequency)``, flat index ``t * F + f``.

* ``tf_multiblock``: I-JEPA multi-block on a rectangular grid (blocks sized in tokens of each axis);
* ``random_patch``: unstructured masking, the best choice on every audio task of Riou et al. (2024);
* ``time_span``: spans of time covering every frequency, as in speech models.

Each ``check(grid)`` rejects an infeasible configuration before training with one line naming the
field, instead of failing (or hanging in redraws) mid-run. Named so that they never collide with the
image plugin's ``multiblock``.
"""

from __future__ import annotations

import math
import operator
import random

import numpy as np
import torch
from pydantic import Field, field_validator

from jepa import ComponentConfig, Mask, MaskConfigError, Masker

#: seeded draws behind tf_multiblock's feasibility estimate, and the largest accepted chance that one
#: sample exhausts max_attempts (a run draws ~1e8 masks, and one failure stops it)
CHECK_DRAWS, MAX_FAILURE = 256, 1e-9


def grid_2d(grid, masker: str) -> tuple[int, int]:
    """``grid`` as (time, freq) positive ints, or a MaskConfigError naming the masker."""
    try:
        sizes = tuple(operator.index(g) for g in grid)
    except TypeError:
        sizes = ()
    if len(sizes) != 2 or min(sizes) < 1:
        raise MaskConfigError(f"masker: {masker} needs a 2-D (time, frequency) token grid, got {grid!r}")
    return sizes


def _range(lo_hi: tuple[float, float], upper: float | None = 1.0) -> tuple[float, float]:
    lo, hi = lo_hi
    if not (0 < lo <= hi and (upper is None or hi <= upper) and math.isfinite(hi)):
        bound = f" <= {upper:g}" if upper is not None else ""
        raise ValueError(f"must be (lo, hi) with 0 < lo <= hi{bound}, got ({lo:g}, {hi:g})")
    return float(lo), float(hi)


# --------------------------------------------------------------------------- tf_multiblock
class TFMultiBlockConfig(ComponentConfig):
    num_targets: int = Field(4, ge=1, description="Target blocks per sample.")
    target_scale: tuple[float, float] = Field((0.15, 0.2), description="Fraction of the grid one target block covers.")
    target_aspect: tuple[float, float] = Field((0.75, 1.5), description="Time / frequency extent of a target block "
                                               "(in tokens), log-uniform.")
    context_scale: tuple[float, float] = Field((0.85, 1.0), description="Fraction of the grid the context block covers.")
    min_keep: int = Field(4, ge=1, description="Minimum context tokens after removing the targets.")
    max_attempts: int = Field(50, ge=1, description="Whole-sample redraws before giving up (constraints never relax).")

    _scales = field_validator("target_scale", "context_scale")(lambda v: _range(v))
    _aspect = field_validator("target_aspect")(lambda v: _range(v, None))


class TFMultiBlockMasker(Masker):
    """Multi-block masking on a (time, frequency) grid: context block minus several target blocks."""

    Config = TFMultiBlockConfig
    summary = "Time-frequency multi-block: one context block minus several target blocks (rectangular grids)"

    def __init__(self, cfg: TFMultiBlockConfig):
        super().__init__(cfg)
        self._checked: dict[tuple, str | None] = {}

    @property
    def num_targets(self) -> int:  # type: ignore[override]
        return self.cfg.num_targets

    def _block(self, scale, aspect, T: int, F: int, rnd) -> tuple[int, int, int, int]:
        """(t0, f0, rows, cols): scale uniform, aspect log-uniform, position uniform; clamped to the grid."""
        n = (scale[0] + (scale[1] - scale[0]) * rnd()) * T * F
        a = math.exp(math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * rnd())
        h = min(T, max(1, round(math.sqrt(n * a))))
        w = min(F, max(1, round(math.sqrt(n / a))))
        return int(rnd() * (T - h + 1)), int(rnd() * (F - w + 1)), h, w

    def _attempt(self, T: int, F: int, rnd):
        c = self.cfg
        blocks = [self._block(c.target_scale, c.target_aspect, T, F, rnd) for _ in range(c.num_targets)]
        ct, cf, ch, cw = self._block(c.context_scale, (1.0, 1.0), T, F, rnd)
        keep = np.zeros((T, F), dtype=bool)
        keep[ct:ct + ch, cf:cf + cw] = True
        for t, f, h, w in blocks:
            keep[t:t + h, f:f + w] = False
        context = np.flatnonzero(keep)
        return (context if len(context) >= c.min_keep else None), blocks

    def _diagnose(self, T: int, F: int) -> str | None:
        c, g = self.cfg, f"{T}x{F}"
        if c.min_keep > T * F:
            return f"masker.min_keep: {c.min_keep} context tokens cannot be kept on a {g} grid of {T * F} tokens"
        rnd = random.Random(0).random
        ok = sum(self._attempt(T, F, rnd)[0] is not None for _ in range(CHECK_DRAWS))
        q = 1.0 - ok / CHECK_DRAWS  # per-attempt failure rate, bounded above (~2 sigma, rule of three)
        q_up = min(1.0, q + 2.0 * math.sqrt(q * (1.0 - q) / CHECK_DRAWS) + 3.0 / CHECK_DRAWS)
        if q_up ** c.max_attempts > MAX_FAILURE:
            return (f"masker.min_keep: only {ok}/{CHECK_DRAWS} draws on a {g} grid keep {c.min_keep} context tokens "
                    f"after removing {c.num_targets} target blocks (target_scale {c.target_scale}); lower min_keep, "
                    "num_targets or target_scale, or raise context_scale or max_attempts")
        return None

    def check(self, grid) -> None:
        T, F = grid_2d(grid, "tf_multiblock")
        if (T, F) not in self._checked:
            self._checked[(T, F)] = self._diagnose(T, F)
        if self._checked[(T, F)]:
            raise MaskConfigError(self._checked[(T, F)])

    def __call__(self, grid, rng: random.Random) -> Mask:
        self.check(grid)
        T, F = grid_2d(grid, "tf_multiblock")
        index = np.arange(T * F, dtype=np.int64).reshape(T, F)
        for _ in range(self.cfg.max_attempts):
            context, blocks = self._attempt(T, F, rng.random)
            if context is not None:
                return Mask(torch.from_numpy(context.astype(np.int64)),
                            [torch.from_numpy(index[t:t + h, f:f + w].reshape(-1)) for t, f, h, w in blocks])
        raise MaskConfigError(f"masker.min_keep: no draw in max_attempts={self.cfg.max_attempts} kept "
                              f"{self.cfg.min_keep} context tokens on a {T}x{F} grid")


# --------------------------------------------------------------------------- random_patch
class RandomPatchConfig(ComponentConfig):
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of tokens that become targets.")
    num_targets: int = Field(1, ge=1, description="The target tokens are split into this many disjoint sets.")
    min_keep: int = Field(4, ge=1, description="Minimum context tokens (all non-target tokens are context).")


class RandomPatchMasker(Masker):
    """Unstructured masking: a uniformly random subset of tokens are targets, the rest is context."""

    Config = RandomPatchConfig
    summary = "Unstructured random-patch masking: random tokens are targets, the others context"

    @property
    def num_targets(self) -> int:  # type: ignore[override]
        return self.cfg.num_targets

    def _sizes(self, n: int) -> tuple[int, int]:
        return round(self.cfg.mask_ratio * n), n - round(self.cfg.mask_ratio * n)

    def check(self, grid) -> None:
        n = math.prod(grid_2d(grid, "random_patch"))
        k, keep = self._sizes(n)
        if k < self.cfg.num_targets:
            raise MaskConfigError(f"masker.mask_ratio: {self.cfg.mask_ratio:g} of {n} tokens is {k} target tokens, "
                                  f"fewer than num_targets={self.cfg.num_targets}; raise mask_ratio")
        if keep < self.cfg.min_keep:
            raise MaskConfigError(f"masker.min_keep: mask_ratio {self.cfg.mask_ratio:g} leaves {keep} of {n} tokens "
                                  f"as context, fewer than min_keep={self.cfg.min_keep}; lower mask_ratio or min_keep")

    def __call__(self, grid, rng: random.Random) -> Mask:
        self.check(grid)
        n = math.prod(grid)
        k, _ = self._sizes(n)
        perm = np.random.default_rng(rng.getrandbits(64)).permutation(n)
        targets = [np.sort(part) for part in np.array_split(perm[:k], self.cfg.num_targets)]
        return Mask(torch.from_numpy(np.sort(perm[k:])), [torch.from_numpy(t) for t in targets])


# --------------------------------------------------------------------------- time_span
class TimeSpanConfig(ComponentConfig):
    num_targets: int = Field(2, ge=1, description="Target spans per sample (they may overlap each other).")
    span: tuple[float, float] = Field((0.1, 0.25), description="Fraction of the time axis one span covers.")
    min_keep: int = Field(4, ge=1, description="Minimum context tokens (every frequency outside the spans).")

    _span = field_validator("span")(lambda v: _range(v))


class TimeSpanMasker(Masker):
    """Time spans across all frequencies are targets; every time step outside them is context."""

    Config = TimeSpanConfig
    summary = "Time-span masking: spans of time (all frequencies) are targets, the rest context"

    @property
    def num_targets(self) -> int:  # type: ignore[override]
        return self.cfg.num_targets

    def _widths(self, T: int) -> tuple[int, int]:
        lo, hi = self.cfg.span
        return max(1, round(lo * T)), min(T, max(1, round(hi * T)))

    def check(self, grid) -> None:
        T, F = grid_2d(grid, "time_span")
        _, w_hi = self._widths(T)
        worst = (T - min(T, self.cfg.num_targets * w_hi)) * F  # spans never overlapping: fewest context tokens
        if worst < self.cfg.min_keep:
            raise MaskConfigError(f"masker.span: {self.cfg.num_targets} spans of up to {w_hi} of {T} time steps can "
                                  f"leave {worst} context tokens, fewer than min_keep={self.cfg.min_keep}; lower "
                                  "span, num_targets or min_keep")

    def __call__(self, grid, rng: random.Random) -> Mask:
        self.check(grid)
        T, F = grid_2d(grid, "time_span")
        w_lo, w_hi = self._widths(T)
        index = np.arange(T * F, dtype=np.int64).reshape(T, F)
        covered = np.zeros(T, dtype=bool)
        targets = []
        for _ in range(self.cfg.num_targets):
            w = rng.randint(w_lo, w_hi)
            t0 = rng.randint(0, T - w)
            covered[t0:t0 + w] = True
            targets.append(torch.from_numpy(index[t0:t0 + w].reshape(-1)))
        return Mask(torch.from_numpy(index[~covered].reshape(-1)), targets)
