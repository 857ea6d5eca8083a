"""Exponential moving average of the context encoder into the target encoder."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def local_tensors(params) -> list[torch.Tensor]:
    """This rank's (detached) part of each parameter: the local shard of an FSDP2 ``DTensor``, else the
    tensor itself. The EMA is elementwise and both encoders are sharded alike, so shards suffice."""
    return [p.to_local().detach() if isinstance(p, DTensor) else p.detach() for p in params]


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online``, as one fused foreach op.

    Buffers are copied (the encoders hold no statistics, but a tokenizer might).
    """
    if momentum < 1.0:
        torch._foreach_lerp_(local_tensors(target.parameters()), local_tensors(online.parameters()), 1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers(), strict=True):
        tb.copy_(ob)
