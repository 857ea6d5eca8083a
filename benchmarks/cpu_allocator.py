"""What does ``train.cpu_allocator = "tuned"`` buy? glibc's default allocator and the tuned one, side by side.

glibc's ``mallopt`` settings are process-wide, so each arm runs as its own ``train_step.py``
subprocess. The arms alternate, ``system`` then ``tuned``, for ``--rounds`` rounds per precision, so
drift of the machine (its clock, other load) falls on both. Reported per precision: the median ms/step
of each arm, ``tuned / system`` of the medians, the per-round ratios, and each arm's peak RSS. The
mechanism is in ``jepa/train/host.py``.

Writes ``benchmarks/results/cpu_allocator_<recipe>.json`` (the last stdout line is the same JSON).

    python benchmarks/cpu_allocator.py                                   # CIFAR recipe, batch 64, ~6 min
    python benchmarks/cpu_allocator.py --recipe benchmarks/recipes/vit_small_224.toml --precision bf16
    python benchmarks/cpu_allocator.py --rounds 1 --steps 1 --warmup 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = ("system", "tuned")


def time_arm(args: argparse.Namespace, precision: str, arm: str) -> dict:
    cmd = [sys.executable, str(HERE / "train_step.py"), args.recipe, "--json", "--precision", precision,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--set", f'train.cpu_allocator="{arm}"']
    for s in args.set or []:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"train_step.py failed ({arm}, {precision}): {out.stderr.strip().splitlines()[-1:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["cpu_allocator"] != arm:
        sys.exit(f"asked for cpu_allocator {arm!r}, the step ran with {result['cpu_allocator']!r} (not glibc?)")
    return result


def compare(args: argparse.Namespace, precision: str) -> dict:
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm in ARMS:
            res = time_arm(args, precision, arm)
            runs[arm].append(res)
            print(f"{precision} round {r + 1}/{args.rounds} {arm}: {res['ms_per_step']:.0f} ms/step, "
                  f"MFU {res['mfu']:.1%}, peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr)
    ms = {arm: [x["ms_per_step"] for x in runs[arm]] for arm in ARMS}
    med = {arm: statistics.median(v) for arm, v in ms.items()}
    return {
        "precision": precision,
        "ms_per_step": {arm: round(med[arm], 1) for arm in ARMS},
        "tuned_over_system": round(med["tuned"] / med["system"], 3),
        "per_round_ratio": [round(t / s, 3) for s, t in zip(ms["system"], ms["tuned"], strict=True)],
        "mfu": {arm: round(statistics.median(x["mfu"] for x in runs[arm]), 3) for arm in ARMS},
        "peak_rss_mb": {arm: max(x["peak_rss_mb"] for x in runs[arm]) for arm in ARMS},
        "gflops_per_step": runs["tuned"][0]["gflops_per_step"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/image_cifar10_cpu.toml")
    ap.add_argument("--set", action="append", help="recipe override for both arms (default: data.batch_size=64)")
    ap.add_argument("--precision", action="append", choices=["fp32", "bf16"], help="default: both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.set is None:
        args.set = ["data.batch_size=64"]
    import torch  # only for the record of where it ran

    result = {"recipe": args.recipe, "overrides": args.set, "rounds": args.rounds, "steps": args.steps,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "results": [compare(args, p) for p in args.precision or ["fp32", "bf16"]]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cpu_allocator_{Path(args.recipe).stem}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
