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
    python benchmarks/masks.py --ijepa /tmp/ijepa    # side by side with the reference's mask collator

With ``--ijepa PATH`` (a checkout of facebookresearch/ijepa, see ``benchmarks/reference.py``) each grid
also times, in the same process and alternating, one whole batch of ``--ref-batch`` samples both
ways: the reference's ``MaskCollator`` (its multi-block masks, 1 context + 4 targets, cut to the batch
minimum) and ours (the masker once per sample with its seeded RNG, then ``Collate("truncate")``), on
1-element placeholder samples so that only mask work is timed; ``speedup`` = reference / ours.
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


def time_vs_reference(masker, grid: tuple[int, ...], ref_collator, batch: int, n: int) -> dict:
    """Per-batch time of the reference collator and of ours on the same grid, alternating."""
    collate = Collate("truncate")
    blank = torch.zeros(1)  # both sides get prebuilt placeholder samples: only mask work is timed
    ref_items = [(blank, 0) for _ in range(batch)]
    ref_ms, our_ms = [], []
    for i in range(n):
        t = time.perf_counter()
        ref_collator(ref_items)
        ref_ms.append(1e3 * (time.perf_counter() - t))
        t = time.perf_counter()
        collate([(blank, masker(grid, random.Random(derive_seed(0, i, j, "mask"))), -1, j)
                 for j in range(batch)])
        our_ms.append(1e3 * (time.perf_counter() - t))
    ref, ours = statistics.median(ref_ms), statistics.median(our_ms)
    return {"batch": batch, "ref_ms_per_batch": round(ref, 3), "ours_ms_per_batch": round(ours, 3),
            "ref_samples_per_s": round(batch / ref * 1e3), "ours_samples_per_s": round(batch / ours * 1e3),
            "speedup": round(ref / ours, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masker", default="multiblock", help="registered masker name")
    ap.add_argument("--grid", action="append", help="token grid, e.g. 14x14 (repeatable; default 14x14 and 28x28)")
    ap.add_argument("--n", type=int, default=2000, help="masks per repeat")
    ap.add_argument("--batch", type=int, default=128, help="samples per collated batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ijepa", help="checkout of facebookresearch/ijepa: also time its mask collator")
    ap.add_argument("--ref-batch", type=int, default=16, help="batch of the side-by-side timing (default 16)")
    ap.add_argument("--ref-n", type=int, default=300, help="batches of the side-by-side timing (default 300)")
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
        if args.ijepa:
            if len(grid) != 2 or grid[0] != grid[1]:
                ap.error("--ijepa compares square grids only (the reference collator takes one input size)")
            from reference import import_reference  # benchmarks/reference.py

            ref = import_reference(args.ijepa)
            collator = ref["MaskCollator"](input_size=16 * grid[0], patch_size=16, nenc=1, npred=masker.cfg.num_targets,
                                           enc_mask_scale=masker.cfg.context_scale, pred_mask_scale=masker.cfg.target_scale,
                                           aspect_ratio=masker.cfg.target_aspect, min_keep=masker.cfg.min_keep,
                                           allow_overlap=False)
            r["vs_reference"] = v = time_vs_reference(masker, grid, collator, args.ref_batch, args.ref_n)
            print(f"  vs the reference collator, batch of {v['batch']}: reference {v['ref_ms_per_batch']:.2f} ms, "
                  f"ours {v['ours_ms_per_batch']:.2f} ms ({v['speedup']}x)", file=sys.stderr)
        results.append(r)
    print(json.dumps({"masker": f"{entry.plugin}.{entry.name}", "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
