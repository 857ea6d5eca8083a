"""``jepa viz masks``: context and target blocks over real training samples, and how often each
token is context or target over many draws (a sampler that never reaches a border shows it here)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from ..data.pipeline import PretrainDataset, derive_seed
from ..data.shards import build_index
from ..data.skips import Skipped
from ..errors import JepaError
from ..model import training_grid
from .common import on_grid, picture, plane, pyplot, save, upsample

TARGET_COLOURS = ((1.0, 0.35, 0.1), (0.15, 0.8, 0.25), (0.95, 0.85, 0.1), (0.85, 0.2, 0.85),
                  (0.1, 0.85, 0.9), (1.0, 0.55, 0.7))


def training_samples(resolved, data: str, n: int) -> list[tuple]:
    """The first ``n`` usable (sample, mask) pairs exactly as training draws them (same crops, same masks)."""
    r = resolved.recipe
    source_cls, source_cfg = resolved.component("source")
    masker_cls, masker_cfg = resolved.component("masker")
    grid = training_grid(resolved)
    ds = PretrainDataset(build_index(data), source_cls(source_cfg), grid, masker_cls(masker_cfg), r.run.seed,
                         r.data.shuffle)
    out = []
    for position in range(min(len(ds) * 2, 20 * n)):
        item = ds[position]
        if not isinstance(item, Skipped):
            out.append((item[0], item[1]))
        if len(out) == n:
            break
    if not out:
        raise JepaError(f"data: no sample of '{data}' could be decoded")
    return out


def frequencies(masker, grid: tuple[int, ...], draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of ``draws`` masks in which each token is context, and in which it is in some target."""
    ctx = np.zeros(plane(grid))
    tgt = np.zeros(plane(grid))
    for i in range(draws):
        mask = masker(grid, random.Random(derive_seed(seed, "viz-masks", i)))
        ctx += on_grid(mask.context, grid)
        tgt += np.logical_or.reduce([on_grid(t, grid) for t in mask.targets])
    return ctx / draws, tgt / draws


def overlay(img: np.ndarray, mask, grid: tuple[int, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Dim everything outside the context; tint each target block with its own colour."""
    h, w = img.shape[:2]
    ctx = upsample(on_grid(mask.context, grid), h, w)
    out = img * np.where(ctx, 1.0, 0.3)[..., None]
    blocks = []
    for t, idx in enumerate(mask.targets):
        block = upsample(on_grid(idx, grid), h, w)
        colour = np.array(TARGET_COLOURS[t % len(TARGET_COLOURS)])
        out = np.where(block[..., None], 0.45 * out + 0.55 * colour, out)
        blocks.append(block)
    return out, blocks


def draw_masks(resolved, data: str | None, out: str | Path, samples: int = 8, draws: int = 1000) -> Path:
    """Write the masks picture for a resolved recipe; ``data`` None draws the masks on blank samples."""
    plt = pyplot()
    grid = training_grid(resolved)
    rows, cols = plane(grid)
    masker_cls, masker_cfg = resolved.component("masker")
    masker = masker_cls(masker_cfg)
    masker.check(grid)
    seed = resolved.recipe.run.seed
    if data:
        source_cls, source_cfg = resolved.component("source")
        source = source_cls(source_cfg)
        pairs = [(picture(source, x), m) for x, m in training_samples(resolved, data, samples)]
    else:
        blank = np.full((rows * 16, cols * 16, 3), 0.75)
        pairs = [(blank, masker(grid, random.Random(derive_seed(seed, 0, i, "mask")))) for i in range(samples)]
    ncols = min(4, len(pairs))
    nrows = -(-len(pairs) // ncols)
    fig = plt.figure(figsize=(3.2 * ncols, 3.2 * nrows + 3.6))
    spec = fig.add_gridspec(nrows + 1, 2 * ncols, height_ratios=[1] * nrows + [1.15], wspace=0.35)
    for i, (img, mask) in enumerate(pairs):
        ax = fig.add_subplot(spec[i // ncols, 2 * (i % ncols):2 * (i % ncols) + 2])
        shown, blocks = overlay(img, mask, grid)
        ax.imshow(shown, interpolation="nearest", aspect="auto")
        for t, block in enumerate(blocks):
            ax.contour(block.astype(float), levels=[0.5], colors=[TARGET_COLOURS[t % len(TARGET_COLOURS)]],
                       linewidths=1.2)
        ax.set_title(f"context {len(mask.context)} / {rows * cols} tokens, {len(mask.targets)} targets", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    ctx, tgt = frequencies(masker, grid, draws, seed)
    heat = spec[nrows, :].subgridspec(1, 2, wspace=0.3)  # room for each colour bar
    for k, (freq, name) in enumerate(((ctx, "context"), (tgt, "in a target"))):
        ax = fig.add_subplot(heat[0, k])
        ax.set_xticks(range(cols))
        ax.set_yticks(range(rows))
        ax.tick_params(labelsize=7)
        im = ax.imshow(freq, vmin=0, vmax=1, cmap="viridis", interpolation="nearest", aspect="auto")
        edge = f"; last row {freq[-1].mean():.2f}, last col {freq[:, -1].mean():.2f}" if rows > 1 else ""
        ax.set_title(f"P({name}) per token over {draws} draws: min {freq.min():.2f}, max {freq.max():.2f}{edge}",
                     fontsize=8)
        ax.set_xlabel(f"grid axis 1 ({cols})", fontsize=8)
        if k == 0:
            ax.set_ylabel(f"grid axis 0 ({rows})", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"masker {masker_cls.__name__} on a {'x'.join(map(str, grid))} token grid "
                 "(dimmed: not context; coloured: target blocks)", fontsize=10)
    return save(fig, out)
