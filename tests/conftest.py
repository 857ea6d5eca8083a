"""Shared fixtures: tiny recipes over the quickstart shards shipped in the repo, and shard builders."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest

from jepa.config.load import recipes_dir

QUICK_TRAIN = recipes_dir() / "data" / "cifar10-quick" / "train-000000.tar"
QUICK_TEST = recipes_dir() / "data" / "cifar10-quick" / "test-000000.tar"


def tiny_recipe(shards: str | None = None, steps: int = 4, batch: int = 8, **sections) -> dict:
    """A vit_test-sized recipe on 32 px images (8x8 grid) that trains in about a second per step, in fp32
    on every machine (``precision = "auto"`` would pick bf16 where the CPU has bf16 units)."""
    recipe = {
        "requires": ["image"],
        "run": {"name": "tiny", "seed": 0, "device": "cpu"},
        "model": {"size": "vit_test"},
        "tokenizer": {"name": "patch", "patch_size": 4},
        "masker": {"name": "multiblock"},
        "source": {"name": "image", "crop_size": 32, "eval_crop_ratio": 1.0},
        "data": {"train": shards or str(QUICK_TRAIN), "batch_size": batch, "num_workers": 0},
        "schedule": {"warmup_steps": 1},
        "train": {"steps": steps, "precision": "fp32"},  # not "auto": exact comparisons must not depend on the CPU
        "checkpoint": {"every_steps": 2, "keep_last": 5},
        "log": {"every_steps": 1, "tensorboard": False, "progress": False},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return recipe


def read_members(shard: Path, limit: int) -> list[tuple[str, bytes, bytes]]:
    """The first ``limit`` (key, jpg, cls) samples of a shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
            if len(out) > limit:
                break
    return [(k, v["jpg"], v["cls"]) for k, v in list(out.items())[:limit]]


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def jepa_cli():
    """Run the real console entry point in a subprocess: (exit code, stdout, stderr)."""
    import subprocess

    def run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
        proc = subprocess.run([sys.executable, "-m", "jepa", *args], capture_output=True, text=True, cwd=cwd,
                              env=env, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    return run
