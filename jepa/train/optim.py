"""AdamW with the reference's parameter groups: no weight decay on biases and 1-D parameters."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(*modules: nn.Module) -> list[dict]:
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def build_optimizer(cfg, *modules: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused kernel where this torch has one for the device (CPU and CUDA do)."""
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    try:
        return torch.optim.AdamW(param_groups(*modules), fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups(*modules), foreach=True, **kwargs)


def set_hparams(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd"):
            group["weight_decay"] = wd
