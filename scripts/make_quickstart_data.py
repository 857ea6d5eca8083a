"""Build the quickstart dataset shipped in recipes/data/cifar10-quick from ../shared/data/cifar10.

A class-balanced subset (400 train and 100 test images per class), JPEG bytes unchanged, written as
reproducible WebDataset shards (ustar, mtime 0, sorted keys). Run from the repository root:

    python scripts/make_quickstart_data.py ../shared/data/cifar10 recipes/data/cifar10-quick
"""

from __future__ import annotations

import io
import random
import sys
import tarfile
from collections import defaultdict
from pathlib import Path


def read_samples(shards: list[Path]) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in shards:
        with tarfile.open(shard) as tf:
            for m in tf:
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    samples[key][ext] = tf.extractfile(m).read()
    return samples


def pick(samples: dict, per_class: int, rng: random.Random) -> list[str]:
    by_class = defaultdict(list)
    for key in sorted(samples):
        by_class[int(samples[key]["cls"])].append(key)
    keys = [k for c in sorted(by_class) for k in rng.sample(by_class[c], per_class)]
    rng.shuffle(keys)
    return keys


def write(path: Path, samples: dict, keys: list[str]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key in keys:
            for ext in ("jpg", "cls"):
                data = samples[key][ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))


def main(src: str, dst: str) -> None:
    src_dir, out = Path(src), Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, per_class in (("train", 400), ("test", 100)):
        samples = read_samples(sorted(src_dir.glob(f"{split}-*.tar")))
        write(out / f"{split}-000000.tar", samples, pick(samples, per_class, rng))


if __name__ == "__main__":
    main(*sys.argv[1:3])
