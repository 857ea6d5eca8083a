"""``jepa viz features``: the first three principal components of patch features as RGB, beside each
sample. Patches of the same object or texture get similar colours when the features are good; a flat
or noisy picture means they carry little spatial structure (or the model collapsed)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..data.shards import Reader, build_index
from ..errors import JepaError, SampleError
from .common import picture, plane, pyplot, save, upsample


def decode_samples(source, data: str, n: int) -> torch.Tensor:
    """``n`` evaluation views spread evenly over the data (no randomness)."""
    index = build_index(data).spread(4 * n)
    reader, xs = Reader(), []
    for record in index.records:
        try:
            xs.append(source.decode(reader.sample(record), random.Random(0), train=False))
        except (SampleError, OSError):
            continue
        if len(xs) == n:
            break
    if not xs:
        raise JepaError(f"data: no sample of '{data}' could be decoded")
    return torch.stack(xs)


def pca_rgb(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, N, D]`` -> ``[B, N, 3]`` in [0, 1]: projections on the top three principal components of
    all patches together (so colours compare across samples), each stretched over its 1-99% range."""
    b, n, d = tokens.shape
    flat = tokens.reshape(b * n, d).double()
    flat = flat - flat.mean(0)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    proj = flat @ v[: min(3, v.shape[0])].T
    if proj.shape[1] < 3:
        proj = torch.cat([proj, proj.new_zeros(len(proj), 3 - proj.shape[1])], 1)
    lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return rgb.reshape(b, n, 3).float()


def draw_features(checkpoint: str, data: str, out: str | Path, samples: int = 8, which: str = "target") -> Path:
    """Write the feature picture of a checkpoint over ``samples`` samples of ``data``."""
    plt = pyplot()
    from ..api import load

    model = load(checkpoint)
    x = decode_samples(model.source, data, samples)
    tokens = model.encode(x, which=which).float().cpu()
    grid = tuple(model.model.encoder.grid(x))
    rows, cols = plane(grid)
    rgb = pca_rgb(tokens).reshape(len(x), rows, cols, 3).numpy()
    pairs = 2 if len(x) > 1 else 1
    nrows = -(-len(x) // pairs)
    fig, axes = plt.subplots(nrows, 2 * pairs, figsize=(3.0 * 2 * pairs, 3.0 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i in range(len(x)):
        img = picture(model.source, x[i])
        left, right = axes[i // pairs, 2 * (i % pairs)], axes[i // pairs, 2 * (i % pairs) + 1]
        left.imshow(img, interpolation="nearest", aspect="auto")
        right.imshow(upsample(rgb[i], *img.shape[:2]), interpolation="nearest", aspect="auto")
        if i < pairs:
            left.set_title("sample", fontsize=9)
            right.set_title(f"PCA of {which} features", fontsize=9)
    for j in range(len(x), nrows * pairs):
        axes[j // pairs, 2 * (j % pairs)].axis("off")
        axes[j // pairs, 2 * (j % pairs) + 1].axis("off")
    fig.suptitle(f"{model.path}: top-3 principal components of patch features as RGB "
                 f"({'x'.join(map(str, grid))} tokens, D={tokens.shape[-1]})", fontsize=9)
    return save(fig, out)
