"""Every component of the project's own plugins (image, audio, timeseries) passes jepa.testing's checks,
and the checks themselves catch broken components."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import soundfile as sf
import torch

from jepa import Mask, Masker
from jepa.plugins import get_plugins
from jepa.testing import check_masker, check_source, check_tokenizer

from .conftest import QUICK_TRAIN, read_members


def wav_bytes(seconds: float = 0.5, rate: int = 8000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def npy_bytes(length: int = 300) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.sin(np.arange(length) / 5.0).astype(np.float32))
    return buf.getvalue()


# (plugin, name) -> (config, sample shape or grid, an input the tokenizer must reject)
TOKENIZERS = {
    ("image", "patch"): ({"patch_size": 4}, (3, 32, 32), (3, 30, 32)),
    ("audio", "spectrogram"): ({"patch_size": [16, 8]}, (1, 128, 64), (1, 100, 64)),
    ("timeseries", "signal"): ({"patch_size": 16}, (1, 256), (1, 250)),
}
MASKERS = {
    ("image", "multiblock"): ({}, (8, 8)),
    ("audio", "tf_multiblock"): ({}, (8, 8)),
    ("audio", "random_patch"): ({"num_targets": 2}, (8, 4)),
    ("audio", "time_span"): ({}, (16, 4)),
    ("timeseries", "span"): ({}, (16,)),
}
SOURCES = {
    ("image", "image"): ({"crop_size": 32}, lambda: {"jpg": read_members(QUICK_TRAIN, 1)[0][1], "cls": b"3"}),
    ("audio", "audio"): ({"sample_rate": 8000, "num_frames": 64, "mel_bins": 32}, lambda: {"wav": wav_bytes()}),
    ("timeseries", "npy"): ({"length": 256}, lambda: {"npy": npy_bytes()}),
}
TABLES = {"tokenizer": TOKENIZERS, "masker": MASKERS, "source": SOURCES}


def entry(kind: str, key: tuple[str, str]):
    e = get_plugins().registry.get(kind, f"{key[0]}.{key[1]}")
    return e.cls, e.cls.Config.model_validate(TABLES[kind][key][0])


@pytest.mark.parametrize("kind", list(TABLES))
def test_every_component_of_our_plugins_is_covered(kind):
    """A new component of image/audio/timeseries must join these tables (and so pass the checks)."""
    registry = get_plugins().registry
    ours = {(e.plugin, e.name) for e in registry.entries[kind].values() if e.plugin in {"image", "audio", "timeseries"}}
    assert ours == set(TABLES[kind])


@pytest.mark.parametrize("key", list(TOKENIZERS), ids="_".join)
def test_tokenizer_contract(key):
    cls, cfg = entry("tokenizer", key)
    _, shape, bad = TOKENIZERS[key]
    grid = check_tokenizer(cls(cfg, embed_dim=32), shape, bad_shape=bad)
    assert len(grid) == len(shape) - 1


@pytest.mark.parametrize("key", list(MASKERS), ids="_".join)
def test_masker_contract(key):
    cls, cfg = entry("masker", key)
    check_masker(cls(cfg), MASKERS[key][1])


@pytest.mark.parametrize("key", list(SOURCES), ids="_".join)
def test_source_contract(key):
    cls, cfg = entry("source", key)
    check_source(cls(cfg), SOURCES[key][1]())


class OverlappingMasker(Masker):
    """Broken on purpose: the target is part of the context."""

    def __call__(self, grid, rng):
        n = int(np.prod(grid))
        return Mask(torch.arange(n), [torch.tensor([rng.randrange(n)])])


class UnseededMasker(OverlappingMasker):
    """Broken on purpose: draws from the global RNG, not the one it is given."""

    def __call__(self, grid, rng):
        k = random.randrange(1, int(np.prod(grid)))
        return Mask(torch.arange(k), [torch.arange(k, int(np.prod(grid)))])


@pytest.mark.parametrize("cls, message", [(OverlappingMasker, "share tokens"), (UnseededMasker, "same rng seed")])
def test_masker_checks_catch_broken_maskers(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_masker(cls(cls.Config()), (4, 4))


def test_tokenizer_check_catches_a_wrong_grid():
    cls, cfg = entry("tokenizer", ("timeseries", "signal"))

    class Wrong(cls):
        @classmethod
        def grid_for(klass, cfg, sample_shape):
            return (sample_shape[1] // cfg.patch_size + 1,)

    with pytest.raises(AssertionError, match="grid"):
        check_tokenizer(Wrong(cfg, embed_dim=8), (1, 64))
