"""From an index of samples to batches of (images, masks), deterministic and resumable.

The training stream is an endless sequence of *positions*: position ``p`` is sample
``perm_e[p mod n]`` of epoch ``e = p // n``, where ``perm_e`` is a permutation seeded by
(seed, epoch). Optimizer step ``s`` consumes positions ``[s * B, (s + 1) * B)`` of the global batch
``B``; rank ``r`` of ``W`` takes its contiguous share. Crops and masks of a sample are drawn from
RNGs seeded by (seed, epoch, sample index), so nothing depends on the number of ranks or workers,
and resuming at step ``s`` reproduces the stream exactly.
"""

from __future__ import annotations

import hashlib
import random
import signal
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..components import Masker, Source
from ..errors import JepaError, SampleError
from .shards import Index, Reader, parse_label
from .skips import Skipped


def derive_seed(*parts: object) -> int:
    """A stable 64-bit seed from any parts (Python's ``hash`` is salted per process; this is not)."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


@dataclass
class Batch:
    """A collated batch. Index tensors follow the reference layout: targets are ``[M, B, Kt]``."""

    x: torch.Tensor
    context_idx: torch.Tensor
    target_idx: torch.Tensor
    context_valid: torch.Tensor | None
    target_valid: torch.Tensor | None
    labels: torch.Tensor
    positions: torch.Tensor
    skipped: list[Skipped] = field(default_factory=list)

    def to(self, device: torch.device, non_blocking: bool = True) -> Batch:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return Batch(mv(self.x), mv(self.context_idx), mv(self.target_idx), mv(self.context_valid),
                     mv(self.target_valid), mv(self.labels), self.positions, self.skipped)

    def __len__(self) -> int:
        return self.x.shape[0]


class PretrainDataset(Dataset):
    """Map-style dataset over stream positions: decode + augment (source), then mask (masker)."""

    def __init__(self, index: Index, source: Source, grid: tuple[int, ...], masker: Masker, seed: int,
                 shuffle: bool = True):
        # Every sample has the source's fixed shape, so one token grid (computed once) serves them all.
        self.index, self.source, self.grid, self.masker = index, source, tuple(grid), masker
        self.seed, self.shuffle = seed, shuffle
        self.reader = Reader()
        self._perm: tuple[int, torch.Tensor] | None = None  # (epoch, permutation), one epoch cached

    def __len__(self) -> int:
        return len(self.index)

    def sample_index(self, position: int) -> tuple[int, int]:
        """(epoch, dataset index) of a stream position."""
        n = len(self.index)
        epoch, i = divmod(position, n)
        if not self.shuffle:
            return epoch, i
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "perm", epoch) & 0x7FFF_FFFF_FFFF_FFFF)
            self._perm = (epoch, torch.randperm(n, generator=g))
        return epoch, int(self._perm[1][i])

    def __getitem__(self, position: int):
        epoch, i = self.sample_index(position)
        record = self.index.records[i]
        shard = record.members[next(iter(record.members))].path
        try:
            raw = self.reader.sample(record)
            x = self.source.decode(raw, random.Random(derive_seed(self.seed, epoch, i, "view")), train=True)
        except SampleError as e:
            return Skipped(e.reason, record.key, shard, e.detail)
        except OSError as e:
            return Skipped("unreadable", record.key, shard, str(e))
        except Exception as e:  # noqa: BLE001 - a decoder bug on one odd file must not end a week-long run
            return Skipped("decode_error", record.key, shard, f"{type(e).__name__}: {e}")
        mask = self.masker(self.grid, random.Random(derive_seed(self.seed, epoch, i, "mask")))
        return x, mask, parse_label(raw, record), position


def _rows(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences ``flat[starts[i]:starts[i] + lengths[i]]`` as ``[n, length]`` rows, each cut or zero-padded
    to ``length``, and their validity, gathered in one vectorised step."""
    cols = np.arange(length)
    valid = cols < np.minimum(lengths, length)[:, None]
    out = flat[np.where(valid, starts[:, None] + cols, 0)] if flat.size else np.zeros(valid.shape, np.int64)
    out[~valid] = 0
    return out, valid


def collate_indices(contexts: list, targets: list[list], mode: str) -> tuple[np.ndarray, ...]:
    """Context ``[B, Nc]`` and target ``[M, B, Kt]`` index arrays with their validity masks.

    ``contexts`` holds B index tensors, ``targets`` M lists of B. ``truncate`` cuts every set to the
    shortest of its kind in the batch, ``pad`` zero-pads to the longest. All (1 + M) * B sets are
    concatenated once and gathered in NumPy: collation runs for every batch in the DataLoader workers,
    where per-sample torch calls (slicing, ``len``, row writes) cost microseconds each."""
    B, M = len(contexts), len(targets)
    sets = contexts + [t for ts in targets for t in ts]
    lengths = np.fromiter((s.shape[0] for s in sets), np.int64, len(sets))
    flat = torch.cat(sets).numpy().astype(np.int64, copy=False)
    starts = np.cumsum(lengths) - lengths
    pick = np.min if mode == "truncate" else np.max
    nc, kt = int(pick(lengths[:B])), int(pick(lengths[B:]))
    context_idx, context_valid = _rows(flat, starts[:B], lengths[:B], nc)
    target_idx, target_valid = _rows(flat, starts[B:], lengths[B:], kt)
    return context_idx, context_valid, target_idx.reshape(M, B, kt), target_valid.reshape(M, B, kt)


class Collate:
    """Stack samples and pad (default) or truncate (reference behaviour) their index sets.

    ``pad`` keeps every sample's own context and targets; the validity masks are None when nothing
    needed padding. ``truncate`` cuts every context, and every target set, to the shortest in the
    batch, which makes the kept fraction shrink as the per-device batch grows (the reference's flaw,
    kept for parity runs).
    """

    def __init__(self, mode: str = "pad"):
        self.mode = mode

    def __call__(self, items: list) -> Batch:
        skipped = [it for it in items if isinstance(it, Skipped)]
        good = [it for it in items if not isinstance(it, Skipped)]
        if not good:
            reasons = ", ".join(sorted({s.reason for s in skipped}))
            raise JepaError(f"data: every sample of a batch failed to decode ({reasons}); is the data source right?")
        xs, masks, labels, positions = zip(*good, strict=True)
        context_idx, context_valid, target_idx, target_valid = collate_indices(
            [m.context for m in masks], [[m.targets[t] for m in masks] for t in range(len(masks[0].targets))],
            self.mode)
        return Batch(
            x=torch.stack(xs),
            context_idx=torch.from_numpy(context_idx),
            target_idx=torch.from_numpy(target_idx),
            context_valid=None if context_valid.all() else torch.from_numpy(context_valid),
            target_valid=None if target_valid.all() else torch.from_numpy(target_valid),
            labels=torch.tensor(labels, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            skipped=skipped,
        )


def per_device_batch(global_batch: int, world_size: int, grad_accum: int) -> int:
    """Samples per device per micro-batch; the global batch must split evenly (a recipe error if not)."""
    from ..errors import RecipeError

    per_rank, rem = divmod(global_batch, world_size * grad_accum)
    if rem or per_rank == 0:
        raise RecipeError(f"data.batch_size: global batch {global_batch} is not divisible by world size "
                          f"{world_size} x train.grad_accum {grad_accum}")
    return per_rank


class StepBatchSampler:
    """Yields, for each optimizer step from ``start_step`` on, this rank's micro-batches of positions."""

    def __init__(self, global_batch: int, rank: int, world_size: int, grad_accum: int, start_step: int,
                 total_steps: int):
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.grad_accum, self.micro = grad_accum, per_device_batch(global_batch, world_size, grad_accum)
        self.start_step, self.total_steps = start_step, total_steps

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.grad_accum

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            base = step * self.global_batch + self.rank * self.micro * self.grad_accum
            for a in range(self.grad_accum):
                start = base + a * self.micro
                yield list(range(start, start + self.micro))


def _worker_init(_):
    torch.set_num_threads(1)
    # Ctrl-C and SIGTERM are the main process's business: it finishes the step (which may still need
    # batches from the workers), writes a checkpoint and shuts the workers down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(dataset: PretrainDataset, sampler: StepBatchSampler, num_workers: int, mode: str,
                 pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=Collate(mode),
                      pin_memory=pin_memory, worker_init_fn=_worker_init if num_workers else None,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)
