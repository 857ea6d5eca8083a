"""Contract checks for plugin authors: call them from your own tests.

Each check exercises a component exactly as the core will (grid from ``grid_for``, masks drawn with
seeded RNGs in workers, samples decoded from raw bytes) and raises ``AssertionError`` with a message
naming the broken rule::

    from jepa.testing import check_masker, check_source, check_tokenizer

    def test_my_masker():
        check_masker(SpanMasker(SpanMasker.Config()), grid=(16,))

Nothing here is imported by the core at run time.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from .components import Masker, Source, Tokenizer
from .errors import JepaError, SampleError

__all__ = ["check_masker", "check_source", "check_tokenizer"]


def check_tokenizer(tokenizer: Tokenizer, sample_shape: tuple[int, ...], batch: int = 2,
                    bad_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Tokens ``[B, N, D]`` with ``N`` = the size of ``grid_for(cfg, sample_shape)``; coordinates
    ``[N, k]`` unique, integral and inside the grid. Returns the grid.

    ``bad_shape``: a sample shape the tokenizer must reject with a :class:`JepaError`.
    """
    grid = type(tokenizer).grid_for(tokenizer.cfg, tuple(sample_shape))
    assert isinstance(grid, tuple) and grid and all(isinstance(g, int) and g > 0 for g in grid), \
        f"grid_for must return a tuple of positive ints, got {grid!r}"
    assert tokenizer.grid(tuple(sample_shape)) == grid, "grid() disagrees with grid_for()"
    n = math.prod(grid)
    with torch.no_grad():
        tokens = tokenizer(torch.randn(batch, *sample_shape))
    assert tuple(tokens.shape) == (batch, n, tokenizer.embed_dim), \
        f"forward gave {list(tokens.shape)}, expected [{batch}, {n}, {tokenizer.embed_dim}] for grid {grid}"
    coords = tokenizer.coords(grid)
    assert tuple(coords.shape) == (n, len(grid)), f"coords shape {list(coords.shape)}, expected [{n}, {len(grid)}]"
    assert not coords.is_floating_point(), "coords must be integers"
    assert bool((coords >= 0).all()) and bool((coords < torch.tensor(grid)).all()), "coords outside the grid"
    assert len({tuple(c) for c in coords.tolist()}) == n, "coords are not unique"
    if bad_shape is not None:
        try:
            type(tokenizer).grid_for(tokenizer.cfg, tuple(bad_shape))
        except JepaError:
            pass
        else:
            raise AssertionError(f"grid_for accepted the untokenizable shape {list(bad_shape)}")
    return grid


def _check_index_set(t: torch.Tensor, n: int, what: str) -> None:
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.ndim == 1, \
        f"{what} must be a 1-D int64 tensor, got {getattr(t, 'dtype', type(t))} {list(getattr(t, 'shape', []))}"
    assert len(t) > 0, f"{what} is empty"
    assert bool((t >= 0).all()) and bool((t < n).all()), f"{what} has indices outside [0, {n})"
    assert bool((t[1:] > t[:-1]).all()), f"{what} is not sorted and unique"


def check_masker(masker: Masker, grid: tuple[int, ...], seeds: range = range(25)) -> None:
    """On ``grid``: ``check`` passes; every mask has ``num_targets`` sorted, unique, in-range target sets
    and a context disjoint from all of them; the same seed gives the same mask."""
    masker.check(grid)
    n = math.prod(grid)
    masks = []
    for seed in seeds:
        mask = masker(grid, random.Random(seed))
        again = masker(grid, random.Random(seed))
        _check_index_set(mask.context, n, f"seed {seed}: context")
        assert len(mask.targets) == masker.num_targets, \
            f"seed {seed}: {len(mask.targets)} target sets, num_targets is {masker.num_targets}"
        for m, target in enumerate(mask.targets):
            _check_index_set(target, n, f"seed {seed}: target {m}")
            overlap = set(mask.context.tolist()) & set(target.tolist())
            assert not overlap, f"seed {seed}: context and target {m} share tokens {sorted(overlap)[:5]}"
        assert torch.equal(mask.context, again.context) and all(
            torch.equal(a, b) for a, b in zip(mask.targets, again.targets, strict=True)), \
            f"seed {seed}: the same rng seed gave different masks (draw randomness only from rng)"
        masks.append(mask)
    if len(masks) > 1:
        assert any(not torch.equal(masks[0].context, m.context) or
                   any(not torch.equal(a, b) for a, b in zip(masks[0].targets, m.targets, strict=True))
                   for m in masks[1:]), "every seed gave the same mask"


def check_source(source: Source, sample: dict[str, Any], seeds: range = range(3)) -> torch.Tensor:
    """``decode`` returns ``sample_shape()`` at train and eval time, deterministically per seed (eval
    ignores the seed); garbage, empty and missing members raise :class:`SampleError`. Returns the eval view."""
    shape = tuple(source.sample_shape())
    view = source.decode(dict(sample), random.Random(0), train=False)
    assert tuple(view.shape) == shape, f"eval decode gave {list(view.shape)}, sample_shape() is {list(shape)}"
    assert view.is_floating_point() and bool(torch.isfinite(view).all()), "decoded sample is not finite floats"
    assert torch.equal(view, source.decode(dict(sample), random.Random(1), train=False)), \
        "the eval view depends on the rng"
    for seed in seeds:
        x = source.decode(dict(sample), random.Random(seed), train=True)
        assert tuple(x.shape) == shape, f"train decode gave {list(x.shape)}, sample_shape() is {list(shape)}"
        assert torch.equal(x, source.decode(dict(sample), random.Random(seed), train=True)), \
            f"seed {seed}: the train view is not a function of the rng"
    ext = next((e for e in source.extensions if e in sample), None)
    assert ext is not None, f"sample has no member among the source's extensions {source.extensions}"
    for bad, what in ((b"\x00garbage\xff" * 8, "garbage bytes"), (b"", "empty bytes"), (None, "a missing member")):
        broken = {k: v for k, v in sample.items() if k != ext}
        if bad is not None:
            broken[ext] = bad
        try:
            source.decode(broken, random.Random(0), train=True)
        except SampleError:
            continue
        raise AssertionError(f"decode of {what} in .{ext} did not raise SampleError")
    return view
