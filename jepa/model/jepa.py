"""The JEPA module: context encoder, EMA target encoder and predictor, plus the loss."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config.schema import LossConfig, ModelConfig
from ..errors import JepaError, RecipeError
from .loss import regression_loss, variance_covariance
from .sizes import SIZES
from .vit import Encoder, Predictor, batch_standardize, layer_norm_targets


def resolve_arch(cfg: ModelConfig) -> dict:
    """Widths, depths and heads after applying explicit overrides to the size preset."""
    size = SIZES[cfg.size]
    embed_dim = cfg.embed_dim or size.embed_dim
    num_heads = cfg.num_heads or size.num_heads
    pred_dim = cfg.predictor_embed_dim or size.predictor_embed_dim
    pred_heads = cfg.predictor_num_heads or num_heads
    problems = [f"model.{field}: width {w} is not divisible by {h} heads" for field, w, h in
                (("num_heads", embed_dim, num_heads), ("predictor_num_heads", pred_dim, pred_heads)) if w % h]
    problems += [f"model.{field}: width {w} must be divisible by 4 for 2-D sin-cos position embeddings"
                 for field, w in (("embed_dim", embed_dim), ("predictor_embed_dim", pred_dim)) if w % 4]
    if problems:
        raise RecipeError(problems)
    return {
        "embed_dim": embed_dim,
        "depth": cfg.depth or size.depth,
        "num_heads": num_heads,
        "mlp_ratio": cfg.mlp_ratio or size.mlp_ratio,
        "predictor_embed_dim": cfg.predictor_embed_dim or size.predictor_embed_dim,
        "predictor_depth": cfg.predictor_depth or size.predictor_depth,
        "predictor_num_heads": cfg.predictor_num_heads or num_heads,
        "predictor_mlp_ratio": cfg.predictor_mlp_ratio,
    }


class JEPA(nn.Module):
    """I-JEPA training module.

    ``forward`` returns the loss for one batch; the target encoder is never trained by gradients and
    is updated by :func:`jepa.model.ema.ema_update` after each optimizer step.
    """

    def __init__(self, encoder: Encoder, predictor: Predictor, loss: LossConfig | None = None):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.loss_cfg = loss or LossConfig()

    def targets(self, x: torch.Tensor, target_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target features at the target positions ``[M * B, Kt, D]`` and the full features ``[B, N, D]``."""
        with torch.no_grad():
            cfg = self.loss_cfg
            h = self.target_encoder(x)
            h_norm = layer_norm_targets(h) if cfg.target_norm else h
            if cfg.target_batch_norm:
                h_norm = batch_standardize(h_norm)
            m, b, kt = target_idx.shape
            rows = torch.arange(b, device=x.device)[None, :, None]
            return h_norm[rows, target_idx].reshape(m * b, kt, -1), h

    def forward(self, x: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor,
                context_valid: torch.Tensor | None = None, target_valid: torch.Tensor | None = None,
                with_stats: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training forward pass.

        Args:
            x: input batch.
            context_idx: ``[B, Nc]`` context token indices; ``context_valid`` marks real entries.
            target_idx: ``[M, B, Kt]`` target token indices per target set; ``target_valid`` likewise.
            with_stats: also compute the statistics (the trainer asks only on logging steps).

        Returns:
            The loss and detached statistics (feature spread, to watch for collapse), or ``{}``.
        """
        m, b, kt = target_idx.shape
        target, h = self.targets(x, target_idx)
        z = self.encoder(x, keep=context_idx, keep_valid=context_valid)
        pos = self.predictor.pos(self.encoder.patch_embed.coords, self.encoder.grid(x), x.device)
        pred = self.predictor(z, context_idx, target_idx, pos, context_valid, target_valid)
        valid = target_valid.reshape(m * b, kt) if target_valid is not None else None
        cfg = self.loss_cfg
        loss = regression_loss(pred, target, valid, cfg.kind, cfg.p, cfg.beta)
        extra = {}
        if cfg.variance_weight or cfg.covariance_weight or cfg.global_weight:
            pooled_context = _masked_mean(z, context_valid)
        if cfg.variance_weight or cfg.covariance_weight:
            extra["loss_var"], extra["loss_cov"] = variance_covariance(pooled_context)
            loss = loss + cfg.variance_weight * extra["loss_var"] + cfg.covariance_weight * extra["loss_cov"]
        if cfg.global_weight:  # the context's pooled output regresses the target encoder's, of the whole input
            extra["loss_global"] = (pooled_context - h.float().mean(dim=1)).pow(2).mean()
            loss = loss + cfg.global_weight * extra["loss_global"]
        if not with_stats:
            return loss, {}
        with torch.no_grad():
            pooled = h.float().mean(dim=1)
            stats = {
                "target_std": pooled.std(dim=0).mean(),
                "pred_std": pred.float().std(dim=(0, 1)).mean(),
                **{k: v.detach() for k, v in extra.items()},
                "target_pooled": pooled,  # [B, D]: the trainer's effective rank (RankMe) of the batch
            }
        return loss, stats


def _masked_mean(z: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``[B, N, D]`` tokens over the real (not padded) ones: ``[B, D]``."""
    if valid is None:
        return z.float().mean(dim=1)
    w = valid.to(torch.float32).unsqueeze(-1)
    return (z.float() * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def build_jepa(model_cfg: ModelConfig, loss_cfg: LossConfig, tokenizer_cls: type, tokenizer_cfg,
               device: str | torch.device = "cpu", grid: tuple[int, ...] | None = None) -> JEPA:
    """Build the three networks. On ``device="meta"`` nothing is allocated (cost estimates).

    ``grid`` is the training token grid; learned position embeddings are stored for it.
    """
    arch = resolve_arch(model_cfg)
    pos_grid = None
    if model_cfg.pos_embed == "learned":
        pos_grid = tuple(model_cfg.pos_grid or grid or ())
        if not pos_grid:
            raise ValueError("learned position embeddings need model.pos_grid or the training grid")
    with torch.device(device):
        tokenizer = tokenizer_cls(tokenizer_cfg, arch["embed_dim"])
        encoder = Encoder(tokenizer, arch["depth"], arch["num_heads"], arch["mlp_ratio"], model_cfg.qkv_bias,
                          pos_grid=pos_grid)
        predictor = Predictor(arch["embed_dim"], arch["predictor_embed_dim"], arch["predictor_depth"],
                              arch["predictor_num_heads"], arch["predictor_mlp_ratio"], model_cfg.qkv_bias,
                              joint=model_cfg.predictor_joint)
        return JEPA(encoder, predictor, loss_cfg)


def training_grid(resolved) -> tuple[int, ...]:
    """The token grid of the recipe's training samples (the tokenizer's grid for the source's sample
    shape); a mismatch between the two is a recipe error (exit 2)."""
    source_cls, source_cfg = resolved.component("source")
    tok_cls, tok_cfg = resolved.component("tokenizer")
    try:
        return tok_cls.grid_for(tok_cfg, tuple(source_cls(source_cfg).sample_shape()))
    except RecipeError:
        raise
    except JepaError as e:
        raise RecipeError(str(e)) from None


def build_from_recipe(resolved, device: str | torch.device = "cpu") -> JEPA:
    """Build the networks a resolved recipe describes."""
    tok_cls, tok_cfg = resolved.component("tokenizer")
    r = resolved.recipe
    return build_jepa(r.model, r.loss, tok_cls, tok_cfg, device=device, grid=training_grid(resolved))
