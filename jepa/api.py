"""Python API: ``pretrain`` (the same run as the CLI) and ``load`` (trained networks for downstream use)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib
import torch

from .config.load import Resolved, load_recipe, validate
from .errors import CheckpointError
from .model import build_jepa
from .plugins import get_plugins
from .train.checkpoint import NETWORKS, load_networks, resolve_checkpoint


def run_pretrain(recipe: Any, run_dir: str | Path | None = None, resume: bool = False,
                 overrides: list[str] | None = None, allow_changes: tuple[str, ...] = (), console=None,
                 stop_at: int | None = None, **sections: dict) -> dict:
    """Validate the recipe, train, and return the run summary (what ``jepa pretrain`` prints)."""
    from .train import Trainer

    plugins = get_plugins()
    resolved = load_recipe(recipe, overrides, plugins, extra=sections)
    run_dir = Path(run_dir) if run_dir else Path("runs") / resolved.recipe.run.name
    from . import __version__

    versions = {"jepa": __version__, **plugins.versions()}
    trainer = Trainer(resolved, run_dir, resume=resume, allow_changes=allow_changes, versions=versions,
                      console=console, stop_at=stop_at)
    return trainer.fit()


def pretrain(recipe: Any, run_dir: str | Path | None = None, resume: bool = False,
             overrides: list[str] | None = None, **sections: dict) -> str:
    return run_pretrain(recipe, run_dir, resume, overrides, **sections)["run_dir"]


class Pretrained:
    """Trained networks of a checkpoint, ready for feature extraction.

    Attributes:
        encoder, target_encoder, predictor: the three networks (eval mode, no grad needed).
        source: the recipe's data source (its evaluation transform is :meth:`preprocess`).
        resolved: the checkpoint's recipe.
    """

    def __init__(self, resolved: Resolved, model, path: Path):
        self.resolved, self.path = resolved, path
        self.model = model.eval()
        self.encoder, self.target_encoder, self.predictor = model.encoder, model.target_encoder, model.predictor
        source_cls, source_cfg = resolved.component("source")
        self.source = source_cls(source_cfg)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def preprocess(self, x: Any) -> torch.Tensor:
        """Raw inputs (one, or a list: paths, bytes, PIL images, arrays) -> a batch ``[B, ...]``."""
        items = x if isinstance(x, (list, tuple)) else [x]
        return torch.stack([self.source.preprocess(item) for item in items])

    @torch.no_grad()
    def encode(self, x: torch.Tensor, which: str = "target", keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens ``[B, N, D]`` (or ``[B, K, D]`` for ``keep`` indices) after the final norm."""
        if which not in ("target", "context"):
            raise ValueError(f"which must be 'target' or 'context', got {which!r}")
        net = self.target_encoder if which == "target" else self.encoder
        return net(x.to(self.device), keep=None if keep is None else keep.to(self.device))

    @torch.no_grad()
    def pooled(self, x: torch.Tensor, which: str = "target") -> torch.Tensor:
        """Average-pooled patch tokens ``[B, D]`` (the paper's linear-probe features)."""
        return self.encode(x, which).mean(dim=1)


def load(path: str | Path, device: str = "cpu") -> Pretrained:
    """Load a run directory (its latest checkpoint) or a checkpoint directory."""
    ckpt = resolve_checkpoint(path)
    try:
        data = tomllib.loads((ckpt / "recipe.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CheckpointError(f"checkpoint: cannot read the recipe of {ckpt}: {e}") from None
    plugins = get_plugins()
    resolved = validate(data, plugins.registry, set(plugins.infos), path=ckpt / "recipe.toml")
    tok_cls, tok_cfg = resolved.component("tokenizer")
    model = build_jepa(resolved.recipe.model, resolved.recipe.loss, tok_cls, tok_cfg)
    load_networks(ckpt, {n: getattr(model, n) for n in NETWORKS})
    return Pretrained(resolved, model.to(device), ckpt)
