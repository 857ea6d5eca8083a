"""Latent regression losses, averaged over real (non-padded) target tokens and channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def regression_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, kind: str = "l2",
                    p: float = 2.0, beta: float = 1.0) -> torch.Tensor:
    """Distance between predictions and targets, both ``[R, K, D]``.

    Args:
        kind: ``"l2"`` mean squared error (the paper's average L2), ``"smooth_l1"`` (the reference
            code; 0.5 * err^2 / beta below ``beta``, so half the L2 loss in the usual regime), or
            ``"lp"`` mean ``|err|^p``.
        valid: ``[R, K]`` True for real tokens; padded tokens do not count.
    """
    pred, target = pred.float(), target.float()
    if kind == "l2":
        per = (pred - target).pow(2)
    elif kind == "smooth_l1":
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    elif kind == "lp":
        per = (pred - target).abs().pow(p)
    else:
        raise ValueError(f"unknown loss kind {kind!r}")
    per_token = per.mean(dim=-1)
    if valid is None:
        return per_token.mean()
    w = valid.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)
