"""Fixed sine-cosine position embeddings computed from token coordinates.

Works for any grid (non-square images, spectrograms, 1-D signals): the embedding of a token depends
only on its integer coordinates. Channel order follows the reference I-JEPA code so imported weights
keep matching at new resolutions: the LAST coordinate (the column, x, for images) fills the first
block of channels, then the previous one (the row, y). Each block is ``[sin(pos * w), cos(pos * w)]``
with frequencies ``w_i = 1 / 10000^(i / (d/2))``. (timm's helper orders channels differently.)
"""

from __future__ import annotations

import torch


def sincos_pos_embed(coords: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Position embeddings ``[N, dim]`` for integer coordinates ``[N, k]``.

    Args:
        coords: token coordinates, one row per token, ``k`` axes (``(row, col)`` for images).
        dim: embedding width; must be divisible by ``2 * k``.
        temperature: frequency base.
    """
    n, k = coords.shape
    if dim % (2 * k):
        raise ValueError(f"embedding width {dim} must be divisible by {2 * k} for {k}-D sin-cos position embeddings")
    per_axis = dim // k
    omega = torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis / 2.0)
    omega = 1.0 / temperature**omega
    parts = []
    for axis in reversed(range(k)):
        angles = coords[:, axis].to(torch.float64)[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).to(torch.float32)
