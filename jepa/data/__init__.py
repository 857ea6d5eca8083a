"""Data: indexing shards and folders, seeded per-sample views and masks, collation."""

from .pipeline import Batch, Collate, PretrainDataset, StepBatchSampler, build_loader, derive_seed
from .shards import Index, Reader, Record, build_index, expand_spec

__all__ = ["Batch", "Collate", "Index", "PretrainDataset", "Reader", "Record", "StepBatchSampler",
           "build_index", "build_loader", "derive_seed", "expand_spec"]
