"""Exponential moving average of the context encoder into the target encoder."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online``, as one fused foreach op.

    Buffers are copied (the encoders hold no statistics, but a tokenizer might).
    """
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    if momentum < 1.0:
        torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers(), strict=True):
        tb.copy_(ob)
