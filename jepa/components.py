"""Base classes of the three pluggable components: tokenizer, masker and source.

A component is a class with a nested pydantic ``Config`` (``extra="forbid"``). The recipe section
that selects it (``[tokenizer] name = "patch"``) is validated against that ``Config``; the instance
receives only its own section. The core never looks inside a component beyond these contracts:

* a **source** turns one stored sample (a dict of raw bytes by extension) into a tensor;
* a **tokenizer** declares the token grid for a sample shape and turns a batch into tokens ``[B, N, D]``;
* a **masker** draws, on that grid, one context index set and several target index sets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class ComponentConfig(BaseModel):
    """Base for every component's own settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Component:
    """Shared metadata of a component class."""

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    #: one-line description shown by ``jepa plugins list``
    summary: ClassVar[str] = ""


def grid_coords(grid: tuple[int, ...]) -> torch.Tensor:
    """Integer coordinates ``[N, k]`` of a k-dimensional grid in row-major order.

    For an image grid ``(rows, cols)`` token ``n`` sits at ``(n // cols, n % cols)``.
    """
    axes = [torch.arange(g) for g in grid]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=-1)


class Tokenizer(Component, nn.Module):
    """Turns a batch of samples into a sequence of token embeddings.

    Subclasses set ``self.embed_dim`` and implement :meth:`grid` and :meth:`forward`. The grid is a
    pure function of the config and the per-sample shape, so the data pipeline can compute it in a
    worker (via :meth:`grid_for`) without building the module.
    """

    def __init__(self, cfg: ComponentConfig, embed_dim: int):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.embed_dim = embed_dim

    @classmethod
    def grid_for(cls, cfg: ComponentConfig, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The token grid (e.g. ``(rows, cols)``) for one sample of ``sample_shape`` (no batch dim).

        Raises :class:`jepa.errors.JepaError` when the shape cannot be tokenized.
        """
        raise NotImplementedError

    def grid(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        return type(self).grid_for(self.cfg, tuple(sample_shape))

    def init_weights(self) -> None:
        """Called by the encoder after its generic initialisation (truncated normal, std 0.02, for
        every linear and conv weight), so a tokenizer can own the init of its own layers."""

    def coords(self, grid: tuple[int, ...]) -> torch.Tensor:
        """Coordinates ``[N, k]`` of the tokens of ``grid``; position embeddings are built from them."""
        return grid_coords(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B, N, D]
        raise NotImplementedError


@dataclass
class Mask:
    """One sample's masks, as flat token indices into the grid (row-major)."""

    context: torch.Tensor  # [Nc] int64, sorted
    targets: list[torch.Tensor]  # M tensors [Kt_m] int64, sorted


class Masker(Component):
    """Draws context and target index sets on a token grid. Index space only: no pixels, no tensors
    of data. Runs in DataLoader workers, once per sample, with a per-sample seeded RNG."""

    def __init__(self, cfg: ComponentConfig):
        self.cfg = cfg

    #: number of target sets every mask has (fixed per configuration)
    num_targets: int = 1

    def check(self, grid: tuple[int, ...]) -> None:
        """Raise :class:`jepa.errors.MaskConfigError` if no valid mask exists on ``grid``.

        Called once, before training, so an infeasible configuration fails fast instead of hanging.
        """

    def __call__(self, grid: tuple[int, ...], rng: random.Random) -> Mask:
        raise NotImplementedError


class Source(Component):
    """Decodes one stored sample into a tensor.

    A stored sample is a dict ``{extension: bytes}`` (``{"jpg": b"...", "cls": b"3"}``) exactly as
    WebDataset groups tar members; folder datasets are presented the same way. The core handles
    labels (``cls``), shuffling, batching and seeding; the source only decodes and augments.
    """

    #: extensions this source can decode, in order of preference
    extensions: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: ComponentConfig):
        self.cfg = cfg

    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one training sample (no batch dim) as :meth:`decode` returns it."""
        raise NotImplementedError

    def decode(self, sample: dict[str, Any], rng: random.Random, train: bool) -> torch.Tensor:
        """Decode (and at train time augment, drawing randomness only from ``rng``) one sample.

        Raise :class:`jepa.errors.SampleError` for a corrupt or unusable sample: it is skipped and
        counted, never fatal.
        """
        raise NotImplementedError

    def preprocess(self, raw: Any) -> torch.Tensor:
        """Evaluation transform of one raw input (a file path, bytes, or an in-memory object)."""
        raise NotImplementedError

    def render(self, x: torch.Tensor) -> Any:
        """A picture of one decoded sample for ``jepa viz``: a float ``[H, W, 3]`` NumPy array in [0, 1].

        Rows and columns of the picture must run along axes 0 and 1 of the tokenizer's grid, so the
        viz commands can lay the token grid over it. The default shows ``[3, H, W]`` tensors as colour
        (each sample stretched to its own range), ``[1, H, W]`` and ``[H, W]`` ones (spectrograms) as a
        heat image, and 1-D signals as a one-row strip. Override it to undo a normalisation or to
        transpose a layout.
        """
        return default_render(x)

    def resized(self, size: Any) -> Source:
        """A copy producing samples of another input size (evaluation at a new resolution)."""
        from .errors import JepaError

        raise JepaError(f"--input-size: the {type(self).__name__} source has no adjustable input size")


def default_render(x: torch.Tensor) -> Any:
    """See :meth:`Source.render`."""
    import numpy as np

    a = x.detach().float().cpu()
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[0] != 3):
        raise ValueError(f"cannot picture a sample of shape {list(x.shape)}; give the source a render() method")
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else torch.zeros_like(a)
    if a.ndim == 3:
        return a.permute(1, 2, 0).numpy()
    v = a.numpy()
    # A "hot" ramp (black, red, yellow, white) without matplotlib's colour maps.
    return np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
