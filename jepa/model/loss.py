"""Latent regression losses, averaged over real (non-padded) target tokens and channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import JepaError


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


def variance_covariance(x: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's anti-collapse terms for ``[B, D]`` features, over the batch.

    Returns the variance hinge ``mean(relu(1 - std))`` (zero once every channel's batch standard
    deviation is at least 1) and the covariance penalty ``sum(offdiag(C)^2) / D`` (zero for
    decorrelated channels).
    """
    if x.shape[0] < 2:
        raise JepaError("loss.variance_weight / loss.covariance_weight need a per-device batch of at least 2 samples")
    # Unbiased [D, D] covariance; its diagonal holds each channel's variance. Written out rather than
    # torch.cov, which calls aten::equal: that has no meta kernel, so FLOP counting crashed.
    xc = x.float() - x.float().mean(dim=0)
    cov = xc.T @ xc / (x.shape[0] - 1)
    var = torch.diagonal(cov)
    hinge = F.relu(1.0 - torch.sqrt(var + eps)).mean()
    return hinge, (cov.pow(2).sum() - var.pow(2).sum()) / x.shape[1]
