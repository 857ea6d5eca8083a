"""Source: one ``.npy`` array per sample, ``[length]`` or ``[channels, length]``, cut to a fixed window."""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from pydantic import Field

from jepa import ComponentConfig, SampleError, Source


class NpyConfig(ComponentConfig):
    channels: int = Field(1, gt=0, description="Channels of every signal.")
    length: int = Field(256, gt=0, description="Window length in samples (shorter signals are skipped).")
    standardize: bool = Field(True, description="Scale each window to zero mean, unit std per channel.")


class NpySource(Source):
    Config = NpyConfig
    summary = "1-D signals stored as .npy arrays; random window at train time, centre window at eval"
    extensions = ("npy",)

    def sample_shape(self) -> tuple[int, int]:
        return (self.cfg.channels, self.cfg.length)

    def decode(self, sample: dict, rng: random.Random, train: bool) -> torch.Tensor:
        if "npy" not in sample:
            raise SampleError("no_npy", f"no .npy member among {sorted(sample)}")
        return self.window(self.load(sample["npy"]), rng if train else None)

    def load(self, data: bytes) -> np.ndarray:
        """Parse the bytes of a .npy file; anything that is not a finite numeric array is a SampleError."""
        try:
            # The .npy format only: np.load would also open a zip (.npz) archive, which is not an array.
            arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - untrusted bytes: the header parser raises SyntaxError, TokenError, ...
            raise SampleError("corrupt", f"not a .npy array: {type(e).__name__}: {e}"[:200]) from None
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[0] != self.cfg.channels or not np.issubdtype(arr.dtype, np.number):
            raise SampleError("bad_shape", f"expected [{self.cfg.channels}, length], got {arr.dtype} {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise SampleError("corrupt", "signal holds NaN or infinite values")
        return arr.astype(np.float32)

    def window(self, arr: np.ndarray, rng: random.Random | None) -> torch.Tensor:
        n, length = arr.shape[1], self.cfg.length
        if n < length:
            raise SampleError("too_short", f"{n} samples < length {length}")
        start = rng.randint(0, n - length) if rng is not None else (n - length) // 2
        x = torch.from_numpy(np.ascontiguousarray(arr[:, start:start + length]))
        if self.cfg.standardize:
            x = (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True).clamp_min(1e-6)
        return x

    def preprocess(self, raw) -> torch.Tensor:
        """Eval view of an array (or .npy bytes)."""
        arr = self.load(raw) if isinstance(raw, bytes) else np.asarray(raw, dtype=np.float32)
        return self.window(arr[None] if arr.ndim == 1 else arr, None)
