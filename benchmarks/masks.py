"""Masks per second per DataLoader worker: can mask sampling keep up with the model?

Masks are drawn in DataLoader workers, one per sample, with a per-sample seeded ``random.Random``
(as the data pipeline does), then collated into a batch. This times both parts in one process (one
worker) for the image plugin's multi-block masker at 224/16 (14x14 tokens) and 448/16 (28x28), or
any masker and grid given on the command line, and prints one JSON object as the last stdout line.

A worker must produce ``samples_per_s_needed / num_workers`` masks per second; a ViT-H/14 step on an
A100 consumes about 128 samples in ~1 s, so anything above a few thousand masks/s per worker is
irrelevant next to image decoding.

    python benchmarks/masks.py                       # multiblock at 14x14 and 28x28
    python benchmarks/masks.py --grid 8x8 --n 5000   # the CIFAR-10 grid
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

from jepa.data.pipeline import Collate, derive_seed
from jepa.plugins import get_plugins


def time_masker(masker, grid: tuple[int, ...], n: int, batch: int, repeats: int) -> dict:
    masker.check(grid)  # cached per grid: not part of the per-sample cost
    rates, collate_ms = [], []
    collate = Collate("pad")
    for rep in range(repeats):
        t = time.perf_counter()
        masks = [masker(grid, random.Random(derive_seed(0, rep, i, "mask"))) for i in range(n)]
        rates.append(n / (time.perf_counter() - t))
        items = [(torch.zeros(1), m, -1, i) for i, m in enumerate(masks[:batch])]
        t = time.perf_counter()
        collate(items)
        collate_ms.append(1e3 * (time.perf_counter() - t))
    m = masks[0]
    return {"grid": list(grid), "masks_per_s": statistics.median(rates), "us_per_mask": 1e6 / statistics.median(rates),
            "collate_ms_per_batch": statistics.median(collate_ms), "batch": batch,
            "context_tokens_example": int(len(m.context)), "targets_example": [int(len(t)) for t in m.targets]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masker", default="multiblock", help="registered masker name")
    ap.add_argument("--grid", action="append", help="token grid, e.g. 14x14 (repeatable; default 14x14 and 28x28)")
    ap.add_argument("--n", type=int, default=2000, help="masks per repeat")
    ap.add_argument("--batch", type=int, default=128, help="samples per collated batch")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    entry = get_plugins().registry.get("masker", args.masker)
    masker = entry.cls(entry.cls.Config())
    grids = [tuple(int(g) for g in s.split("x")) for s in (args.grid or ["14x14", "28x28"])]
    results = []
    for grid in grids:
        r = time_masker(masker, grid, args.n, args.batch, args.repeats)
        print(f"{args.masker} {'x'.join(map(str, grid))}: {r['masks_per_s']:,.0f} masks/s per worker, "
              f"collate {r['collate_ms_per_batch']:.2f} ms per batch of {args.batch}", file=sys.stderr)
        results.append(r)
    print(json.dumps({"masker": f"{entry.plugin}.{entry.name}", "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
