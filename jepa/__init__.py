"""jepa: plugin-based, modality-agnostic self-supervised pretraining with Joint-Embedding Predictive
Architectures.

Public API::

    import jepa
    run_dir = jepa.pretrain("quickstart", train={"steps": 100})   # same as `jepa pretrain`
    model = jepa.load(run_dir)                                    # trained networks
    feats = model.pooled(model.preprocess(images))                # [B, D]

Plugin authors use :data:`hookimpl` and subclass :class:`Tokenizer`, :class:`Masker`, :class:`Source`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .components import ComponentConfig, Mask, Masker, Source, Tokenizer, grid_coords
from .errors import CheckpointError, JepaError, MaskConfigError, PluginError, RecipeError, SampleError
from .hookspecs import hookimpl

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import Pretrained


def pretrain(recipe: Any, run_dir: str | None = None, resume: bool = False, overrides: list[str] | None = None,
             **sections: dict) -> str:
    """Run pretraining exactly as ``jepa pretrain`` does and return the run directory.

    Args:
        recipe: a recipe path, an installed recipe name, or a dict.
        run_dir: where to write (default ``runs/<run.name>``).
        resume: continue from the run directory's latest checkpoint.
        overrides: ``"a.b=v"`` strings, as ``--set``.
        **sections: overrides by section, e.g. ``train={"steps": 100}``.
    """
    from .api import pretrain as _pretrain

    return _pretrain(recipe, run_dir=run_dir, resume=resume, overrides=overrides, **sections)


def load(path: str, device: str = "cpu") -> Pretrained:
    """Load trained networks from a run directory (its latest checkpoint) or a checkpoint directory."""
    from .api import load as _load

    return _load(path, device=device)


__all__ = [
    "CheckpointError", "ComponentConfig", "JepaError", "Mask", "MaskConfigError", "Masker", "PluginError",
    "RecipeError", "SampleError", "Source", "Tokenizer", "__version__", "grid_coords", "hookimpl", "load", "pretrain",
]
