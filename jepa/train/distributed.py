"""Data parallelism under ``torchrun``: one process per device, the same loop as a single process.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init_distributed` joins the
process group (NCCL on GPUs, gloo on CPUs) and gives each rank its device. What the trainer needs on
top of :class:`~torch.nn.parallel.DistributedDataParallel` is here, so that a two-rank run computes
what one rank with the same global batch computes:

* **Loss weighting.** The loss is a mean over real (unpadded) target tokens, and ranks hold different
  numbers of them, so a plain average of the ranks' means would weight tokens unequally. Each rank
  scales its loss by its share of the global token count (:meth:`DistContext.token_weight`); DDP's
  gradient average then equals the gradient of the global token mean.
* **Agreement.** Every decision that ends or changes the loop (a skipped non-finite step, a collapse
  alarm, a signal) is taken from values that are identical on every rank: the all-reduced loss, the
  all-reduced gradients, the gathered feature statistics, and a per-step OR of the signal flags over
  a CPU (gloo) group, which costs no device synchronisation.
* **One writer.** Rank 0 writes the run directory, metrics and checkpoints; the others train silently.
  Checkpoints hold plain (unwrapped) weights, so a run resumes on any number of ranks.

``dist.strategy = "fsdp"`` shards instead of replicating (:func:`shard_fsdp`): FSDP2's ``fully_shard``
on every transformer block, then on each of the three networks. Each rank then holds 1/world of the
weights, gradients and AdamW moments; the loss weighting, agreement and logging above are unchanged.
Checkpoints add the sharded weights and optimizer state written by every rank through
``torch.distributed.checkpoint`` (``dcp/``), which loads on any world size, one process included;
rank 0 still writes the full weights as safetensors for evaluation and export.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """This process's place in the job; a single process is ``rank 0 of 1`` and every method is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process created the default group (and destroys it at the end)
    ctrl: object = None       # a gloo group for host-side flags (None: the default group is gloo)
    grad_sync: bool = True    # FSDP2's current gradient-sync setting (changed only when it must change)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.ctrl)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a tensor (in place)."""
        if self.enabled:
            dist.all_reduce(t)
            t.div_(self.world_size)
        return t

    def token_weight(self, n_local: torch.Tensor) -> torch.Tensor:
        """``world_size * n_local / sum(n)``: the factor that turns this rank's token mean into its share of
        the global token mean. Only called with more than one rank."""
        total = n_local.detach().float().clone()
        dist.all_reduce(total)
        return n_local.float() * self.world_size / total.clamp_min(1.0)

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of every rank, concatenated in rank order (rows may differ in number across ranks)."""
        if not self.enabled:
            return t
        counts = [None] * self.world_size
        dist.all_gather_object(counts, t.shape[0], group=self.ctrl)
        rows = max(counts)
        padded = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])

    def objects(self, obj: object) -> list:
        """``obj`` of every rank, in rank order (small host-side values only)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.ctrl)
        return out

    def any_flag(self, value: int) -> int:
        """The largest of the ranks' values (0 when none is set), over the CPU group: no device sync."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctrl)
        return int(t.item())

    def no_sync(self, module: nn.Module, last_micro: bool):
        """Gradient reduction only on the last micro-batch of an accumulated step: DDP's ``no_sync``, or
        FSDP2's ``set_requires_gradient_sync`` on every sharded module."""
        if not self.enabled:
            return nullcontext()
        if hasattr(module, "no_sync"):
            return module.no_sync() if not last_micro else nullcontext()
        if last_micro != self.grad_sync:  # without accumulation: never, so no per-step module walk
            for m in module.modules():
                if hasattr(m, "set_requires_gradient_sync"):
                    m.set_requires_gradient_sync(last_micro, recurse=False)
            self.grad_sync = last_micro
        return nullcontext()

    def close(self) -> None:
        """Leave the job: wait for every rank, let gloo's worker threads drain, then destroy the group.

        The pause works around a deadlock in torch 2.11's gloo backend. After a collective completes,
        the gloo thread that ran it frees the work holding the tensors, and this needs the GIL. The
        thread does it while holding the group's work lock. ``~ProcessGroupGloo`` runs on this thread
        with the GIL held (when DDP's reducer or the group is freed) and takes the same lock. If the
        group is destroyed within a few milliseconds of the last collective, each thread waits for
        the other forever. Seen in CI: rank 1 hung after the run had finished, 2 runs in 6 here.
        While this thread sleeps, it does not hold the GIL, so the workers finish freeing the work.
        """
        if not (self.owns_group and dist.is_initialized()):
            return
        if self.enabled:
            dist.barrier(group=self.ctrl)  # no rank has a collective in flight after this
            time.sleep(0.1)
        dist.destroy_process_group()


def shard_fsdp(model: nn.Module, ctx: DistContext, device: torch.device, precision: str) -> None:
    """Shard the JEPA's three networks in place with FSDP2: every transformer block, then each network.

    Parameters become ``DTensor`` shards over a 1-D mesh of all ranks. In bf16, blocks compute with
    bf16 copies of their weights and gradients are reduced in fp32 (the master weights stay fp32). The
    target encoder is resharded after its forward too (it has no backward to wait for), so its shards
    line up with the context encoder's for the elementwise EMA update."""
    from timm.models.vision_transformer import Block
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (ctx.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
          else MixedPrecisionPolicy())
    for name in ("encoder", "predictor", "target_encoder"):
        net = getattr(model, name)
        for block in [m for m in net.modules() if isinstance(m, Block)]:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(net, mesh=mesh, mp_policy=mp, reshard_after_forward=True)


def full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """A ``DTensor`` (an FSDP2 gradient norm, say) as a plain tensor; anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the ``torchrun`` job described by the environment, if any; returns the context and this rank's
    device (``cuda:LOCAL_RANK`` on GPUs)."""
    world = world_from_env()
    if world == 1:
        return DistContext(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    ctrl = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return DistContext(rank, world, local, owns, ctrl), device


def wrap_ddp(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``module`` itself on one rank, else DDP around it. Buffers are not broadcast each step: they are
    fixed (position tables) or copied by the EMA, identically on every rank."""
    if not ctx.enabled:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
        gradient_as_bucket_view=True)
