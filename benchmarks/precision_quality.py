"""Does bf16 autocast still learn? fp32 and bf16 pretraining side by side, several seeds, one run.

For each seed, ``recipes/image_cifar10_cpu.toml`` (plus ``--set`` overrides) is pretrained twice on the
offline CIFAR-10 copy on a shortened budget, once with ``train.precision = "fp32"`` and once with
``"bf16"``, everything else equal (same seed, so the same initial weights, masks and data order). The
frozen target encoder of each run is then probed the same way as in ``quality_cifar10.py`` (converged
linear probe, weighted k-NN) on a subset: ``--train-shards`` training shards (3,000 images each) and
one test shard (2,500 images). Reported: per-run accuracies and wall time, the mean over seeds per
precision, and the bf16 - fp32 differences (the scale-out issue asks for the linear probe within one
point).

Writes ``benchmarks/results/precision_quality.json`` (the last stdout line is the same JSON).

    python benchmarks/precision_quality.py                         # 3 seeds x 2 precisions, ~20 min on 2 cores
    python benchmarks/precision_quality.py --seeds 1 --steps 50    # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_cifar10 as q  # noqa: E402  (benchmarks/ is not a package)

import jepa  # noqa: E402
from jepa.api import run_pretrain  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    ap.add_argument("--steps", type=int, default=150, help="pretraining steps per run (default 150)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override a.b=v")
    ap.add_argument("--train-shards", type=int, default=2, help="training shards for the probes (default 2)")
    ap.add_argument("--run-dir", default="runs/precision_quality")
    ap.add_argument("--out", default=str(q.ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    train = f"{q.DATA}/train-{{000000..{args.train_shards - 1:06d}}}.tar"
    test = f"{q.DATA}/test-000000.tar"
    runs = []
    for seed in range(args.seeds):
        for precision in PRECISIONS:
            run_dir = Path(args.run_dir) / f"seed{seed}_{precision}"
            overrides = [*args.overrides, f"train.steps={args.steps}", f'train.precision="{precision}"',
                         f"run.seed={seed}"]
            t0 = time.perf_counter()
            summary = run_pretrain("image_cifar10_cpu", run_dir, overrides=overrides)
            seconds = time.perf_counter() - t0
            q.log(f"seed {seed} {precision}: {args.steps} steps in {seconds:.0f} s, "
                  f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}")
            probe = q.probes(f"{precision}/{seed}", *q.features(jepa.load(run_dir), train, test))
            runs.append({"seed": seed, "precision": summary["precision"], "pretrain_seconds": round(seconds, 1),
                         "first_loss": summary["first_loss"], "final_loss": summary["final_loss"], **probe})
    mean = {p: {k: statistics.fmean(r[k] for r in runs if r["precision"] == p)
                for k in ("linear_top1", "knn_top1", "final_loss", "pretrain_seconds")} for p in PRECISIONS}
    result = {"recipe": "image_cifar10_cpu", "overrides": args.overrides, "steps": args.steps,
              "seeds": args.seeds, "probe_train": train, "probe_test": test, "machine": q.machine("fp32 and bf16"),
              "runs": runs, "mean": mean,
              "bf16_minus_fp32": {k: mean["bf16"][k] - mean["fp32"][k] for k in ("linear_top1", "knn_top1")},
              "bf16_over_fp32_time": mean["bf16"]["pretrain_seconds"] / mean["fp32"]["pretrain_seconds"]}
    d = result["bf16_minus_fp32"]
    q.log(f"mean over {args.seeds} seeds: linear fp32 {100 * mean['fp32']['linear_top1']:.1f}% / bf16 "
          f"{100 * mean['bf16']['linear_top1']:.1f}% ({100 * d['linear_top1']:+.1f} points), k-NN "
          f"{100 * d['knn_top1']:+.1f} points; bf16 / fp32 wall time {result['bf16_over_fp32_time']:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_quality.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
