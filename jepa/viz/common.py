"""Shared helpers: importing matplotlib (Agg, PNG), laying a token grid over a rendered sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import JepaError


def pyplot():
    """matplotlib's pyplot on the Agg backend, or a one-line error naming the fix."""
    try:
        import matplotlib
    except ImportError:
        raise JepaError("jepa viz needs matplotlib, which is not installed; install it with "
                        "`pip install matplotlib`") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plane(grid: tuple[int, ...]) -> tuple[int, int]:
    """The grid as (rows, cols): 2-D grids as they are, 1-D ones as a single row."""
    if len(grid) == 1:
        return 1, grid[0]
    if len(grid) == 2:
        return grid[0], grid[1]
    raise JepaError(f"jepa viz draws 1-D and 2-D token grids; this one is {len(grid)}-D ({'x'.join(map(str, grid))})")


def on_grid(indices, grid: tuple[int, ...]) -> np.ndarray:
    """A boolean (rows, cols) map of flat token indices (row-major, as masks are)."""
    rows, cols = plane(grid)
    out = np.zeros(rows * cols, dtype=bool)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    out[idx[(idx >= 0) & (idx < out.size)]] = True
    return out.reshape(rows, cols)


def upsample(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    """Stretch a (rows, cols[, ...]) cell map to (height, width[, ...]) pixels (nearest cell)."""
    rows, cols = cells.shape[:2]
    r = np.minimum(np.arange(height) * rows // height, rows - 1)
    c = np.minimum(np.arange(width) * cols // width, cols - 1)
    return cells[r][:, c]


def picture(source, x) -> np.ndarray:
    """The source's [H, W, 3] picture of one sample, checked (a plugin's render may be wrong)."""
    img = np.asarray(source.render(x), dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise JepaError(f"{type(source).__name__}.render returned shape {list(img.shape)}; expected [H, W, 3]")
    return np.clip(img, 0, 1)


def save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out
