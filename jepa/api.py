"""Python API: ``pretrain`` (the same run as the CLI) and ``load`` (trained networks for downstream use)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import torch

from .config.load import Resolved, load_recipe, validate
from .errors import CheckpointError
from .model import build_from_recipe, training_grid
from .plugins import get_plugins
from .train.checkpoint import NETWORKS, load_networks, present_networks, resolve_checkpoint


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
        encoder, target_encoder, predictor: the networks (eval mode); those the checkpoint does not
            hold (an encoder-only import) are None.
        source: the recipe's data source (its evaluation transform is :meth:`preprocess`).
        resolved: the checkpoint's recipe; ``grid``: its training token grid.
    """

    def __init__(self, resolved: Resolved, model, path: Path, present: list[str] | None = None):
        self.resolved, self.path = resolved, path
        self.model = model.eval()
        self.present = list(present or NETWORKS)
        for name in NETWORKS:
            setattr(self, name, getattr(model, name) if name in self.present else None)
        source_cls, source_cfg = resolved.component("source")
        self.source = source_cls(source_cfg)
        self.grid = training_grid(resolved)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return self.model.encoder.embed_dim

    def network(self, which: str) -> torch.nn.Module:
        """``"target"`` or ``"context"`` encoder; a clear error if the checkpoint lacks it."""
        names = {"target": "target_encoder", "context": "encoder"}
        if which not in names:
            raise ValueError(f"which must be 'target' or 'context', got {which!r}")
        net = getattr(self, names[which])
        if net is None:
            other = "context" if which == "target" else "target"
            raise CheckpointError(f"checkpoint {self.path} has no {which} encoder (it holds: "
                                  f"{', '.join(self.present)}); use --which {other} (which='{other}')")
        return net

    def encoder_state(self, which: str = "target") -> dict[str, torch.Tensor]:
        """The encoder's tensors for export: our names, plus ``pos_embed`` ``[1, N, D]`` for the training grid
        (the fixed sin-cos table, or the learned one resampled) in place of a learned table."""
        net = self.network(which)
        sd = {k: v.detach().contiguous() for k, v in net.state_dict().items() if k != "pos_embed_learned"}
        sd["pos_embed"] = net.pos_embed(self.grid, torch.device("cpu")).detach().unsqueeze(0).contiguous()
        return sd

    def preprocess(self, x: Any) -> torch.Tensor:
        """Raw inputs (one, or a list: paths, bytes, PIL images, arrays) -> a batch ``[B, ...]``."""
        items = x if isinstance(x, (list, tuple)) else [x]
        return torch.stack([self.source.preprocess(item) for item in items])

    @torch.no_grad()
    def encode(self, x: torch.Tensor, which: str = "target", keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens ``[B, N, D]`` (or ``[B, K, D]`` for ``keep`` indices) after the final norm."""
        net = self.network(which)
        return net(x.to(self.device), keep=None if keep is None else keep.to(self.device))

    @torch.no_grad()
    def pooled(self, x: torch.Tensor, which: str = "target") -> torch.Tensor:
        """Average-pooled patch tokens ``[B, D]`` (the paper's linear-probe features)."""
        return self.encode(x, which).mean(dim=1)

    @torch.no_grad()
    def predict(self, context_tokens: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor,
                grid: tuple[int, ...] | None = None) -> torch.Tensor:
        """The predictor, in the reference's layout.

        Args:
            context_tokens: ``[B, Nc, D]`` context-encoder outputs (``encode(x, "context", keep=context_idx)``).
            context_idx: ``[B, Nc]`` their token indices.
            target_idx: ``[M, B, Kt]`` target token indices, one set per target block.
            grid: token grid of the input (default: the training grid).

        Returns:
            ``[M * B, Kt, D]`` predicted target representations, target block major.
        """
        if self.predictor is None:
            raise CheckpointError(f"checkpoint {self.path} has no predictor (it holds: {', '.join(self.present)})")
        dev = self.device
        pos = self.predictor.pos(self.model.encoder.patch_embed.coords, tuple(grid or self.grid), dev)
        return self.predictor(context_tokens.to(dev), context_idx.to(dev), target_idx.to(dev), pos)


def load(path: str | Path, device: str = "cpu") -> Pretrained:
    """Load a run directory (its latest checkpoint) or a checkpoint directory (also one written by
    ``jepa import``)."""
    ckpt = resolve_checkpoint(path)
    try:
        data = tomllib.loads((ckpt / "recipe.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CheckpointError(f"checkpoint: cannot read the recipe of {ckpt}: {e}") from None
    plugins = get_plugins()
    resolved = validate(data, plugins.registry, set(plugins.infos), path=ckpt / "recipe.toml")
    model = build_from_recipe(resolved)
    present = present_networks(ckpt)
    if not present:
        raise CheckpointError(f"checkpoint: {ckpt} holds no network weights")
    load_networks(ckpt, {n: getattr(model, n) for n in present})
    return Pretrained(resolved, model.to(device), ckpt, present)
