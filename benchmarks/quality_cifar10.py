"""Quality benchmark: does I-JEPA pretraining on CIFAR-10 learn features worth having?

One run, side by side, on the offline CIFAR-10 copy (30k train / 10k test, 32 px):

1. pretrain ``recipes/image_cifar10_cpu.toml`` (about 30 minutes on 2 cores in bf16), with the online
   k-NN monitor on a 5k/1k subset, so probe accuracy is recorded against steps;
2. probe the final target encoder with the full protocol (frozen, average-pooled tokens): a
   converged linear probe (L-BFGS, weight decay chosen on a validation split) and weighted k-NN;
3. the same probes on a randomly initialised encoder of the same architecture, and on raw pixels.

Writes ``benchmarks/results/quality_cifar10.json`` and, with ``--write-docs``, ``docs/results.md`` with
a table, a loss curve and a probe-accuracy-vs-steps plot (PNG).

    python benchmarks/quality_cifar10.py                      # full benchmark (~40 minutes)
    python benchmarks/quality_cifar10.py --steps 300 --quick  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import jepa
from jepa.api import run_pretrain
from jepa.config import load_recipe
from jepa.eval.features import encode_dataset
from jepa.eval.probes import effective_rank, knn_probe, linear_probe
from jepa.model import build_from_recipe
from jepa.train.checkpoint import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JEPA_DATA_ROOT", ROOT.parent / "shared" / "data")) / "cifar10"
TRAIN, TEST = f"{DATA}/train-{{000000..000009}}.tar", f"{DATA}/test-{{000000..000003}}.tar"


def machine(precision: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    return f"{os.cpu_count()} cores of {cpu}, torch {torch.__version__}, {precision}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def probes(name: str, train_x, train_y, test_x, test_y) -> dict:
    t = time.perf_counter()
    lin = linear_probe(train_x, train_y, test_x, test_y, 10)
    knn = knn_probe(train_x, train_y, test_x, test_y, 10)
    out = {"linear_top1": lin.top1, "linear_train_top1": lin.train_top1, "linear_val_top1": lin.val_top1,
           "linear_chosen": lin.chosen, "knn_top1": knn.top1, "feature_dim": int(train_x.shape[1]),
           "effective_rank": effective_rank(train_x), "probe_seconds": round(time.perf_counter() - t, 1)}
    log(f"{name:>10}: linear {100 * lin.top1:.1f}% (train {100 * lin.train_top1:.1f}%), "
        f"k-NN {100 * knn.top1:.1f}%, rank {out['effective_rank']:.1f}/{out['feature_dim']}")
    return out


def features(model, train: str, test: str, which: str = "target"):
    tr = encode_dataset(model.network(which), model.source, train, num_workers=2)
    te = encode_dataset(model.network(which), model.source, test, num_workers=2)
    return tr.pooled, tr.labels, te.pooled, te.labels


def pixels(source, train: str, test: str):
    from torch.utils.data import DataLoader

    from jepa.data import build_index
    from jepa.eval.features import EvalDataset, _collate

    out = []
    for spec in (train, test):
        xs, ys = [], []
        for x, y, _, _ in DataLoader(EvalDataset(build_index(spec), source), batch_size=1000, num_workers=2,
                                     collate_fn=_collate):
            xs.append(x.flatten(1))
            ys.append(y)
        out += [torch.cat(xs), torch.cat(ys)]
    return out


def random_init_checkpoint(recipe_overrides: list[str], path: Path) -> Path:
    resolved = load_recipe("image_cifar10_cpu", recipe_overrides)
    torch.manual_seed(resolved.recipe.run.seed)
    model = build_from_recipe(resolved)
    nets = {n: getattr(model, n) for n in ("encoder", "predictor", "target_encoder")}
    return write_checkpoint(path, nets, {"step": 0}, {"step": 0, "random_init": True}, resolved.to_toml())


def plots(run_dir: Path, out_dir: Path, baselines: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    knn = [(r["step"], r["knn_top1"]) for r in records if "knn_top1" in r]
    files = []
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(*zip(*loss, strict=True))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (L2, layer-normed targets)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "quality_cifar10_loss.png")
    files.append("quality_cifar10_loss.png")
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    if knn:
        ax.plot(*zip(*[(s, 100 * v) for s, v in knn], strict=True), marker="o", label="I-JEPA (k-NN, 5k/1k subset)")
    for name, style in (("random_init", "--"), ("pixels", ":")):
        ax.axhline(100 * baselines[name]["knn_top1"], linestyle=style, color="gray", label=f"{name} (k-NN, full)")
    ax.set_xlabel("step")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "quality_cifar10_knn.png")
    files.append("quality_cifar10_knn.png")
    plt.close("all")
    return files


# The bar: linear >= random init + 8 points, k-NN above the reference implementation's 32.3%.
BAR_LINEAR_GAIN, BAR_KNN = 0.08, 0.323

HISTORY = """How the recipe got here. Full protocol (all 30k / 10k images), batch 128, fp32 on machine B:

| run | steps | linear (random init) | k-NN (random init) | note |
| --- | ---: | ---: | ---: | --- |
| `tokenizer.init = "trunc_normal"` (std 0.02), lr 1e-3 | 300 | | | loss 0.06 by step 300, pooled std 0.10-0.18, rank about 8: token content (std about 0.13) is drowned by the sin-cos positions (about 0.5), so targets are mostly position |
| Xavier patch init, lr 1e-3 | 800 | | | features stay spread (std 0.3-0.4, rank 9-12), but the loss falls to 0.07 again |
| Xavier, lr 5e-4, warm-up 40 | 400 | **46.6%** (45.4%) | 28.4% (28.6%) | 32.1 minutes; nothing collapses, nothing separates from random init; the best run so far |
| Xavier, lr 1e-3, warm-up 40, `loss.target_batch_norm`, `model.predictor_joint` (the run above this table) | 480 | 40.8% (45.4%) | 27.7% (28.6%) | 26.7 minutes; loss 0.99 -> 0.48 (the predictor explains half the position-centred target variance), yet the features fall below random init, rank 8.3 |

Short proxies (2 shards = 6,000 train / 2,500 test images, same probes; random init of the patch-4
encoder: 40.8% linear / 24.6% k-NN; of the patch-8 encoder: 35.4% / 26.6%), Xavier, lr 1e-3:

| run | steps x batch | linear | k-NN | samples/s |
| --- | ---: | ---: | ---: | ---: |
| `loss.target_batch_norm` | 250 x 64 | 42.0% | 27.0% | 30 |
| + `model.predictor_joint` | 250 x 64 | 40.4% | 25.1% | 39 |
| + joint, EMA 0.99, targets = mean of the last 3 blocks | 250 x 64 | 38.9% | 26.4% | 37 |
| `loss.target_batch_norm`, patch 8 (4x4 grid, `masker.min_keep = 4`) | 500 x 128 | 36.1% | 27.3% | 110 |
| `loss.variance_weight = 1`, `loss.covariance_weight = 0.04` (VICReg terms on the pooled context) | 250 x 64 | 42.3% | **30.0%** | 39 |
| the same terms, EMA 0.99 -> 0.995 | 250 x 64 | 39.9% | **31.5%** | 39 |
| the same terms x 5 (`variance_weight = 5`, `covariance_weight = 0.2`) | 250 x 64 | 42.0% | **30.2%** | 39 |

Without the variance and covariance terms every proxy is within about 2 points of its random init, and
the full run with `target_batch_norm` + `predictor_joint` is 4.6 points below it: at one to two epochs
of CIFAR-10 the objective learns local statistics (a falling loss) that a random ViT's pooled features
already hold or that pooling discards. The VICReg terms are the first change that moves k-NN: +5.4 to
+6.9 points over random init on the proxy (online k-NN on the 5k / 1k monitor subset 32.2-32.4% at
step 250, against 26-27% without them), with effective rank 23-32 instead of 8-12; linear stays within
1.5 points. They have not had a full-protocol run yet. None of these options is in the recipe."""


def verdict(result: dict) -> str:
    gain = result["ijepa"]["linear_top1"] - result["random_init"]["linear_top1"]
    knn = result["ijepa"]["knn_top1"]
    met = gain >= BAR_LINEAR_GAIN and knn > BAR_KNN
    return (f"**Status: the bar is {'reached' if met else 'not reached'}.** The issue asks for linear >= random init "
            f"+ {100 * BAR_LINEAR_GAIN:.0f} points and k-NN above the reference's {100 * BAR_KNN:.1f}%; here I-JEPA "
            f"is {100 * gain:+.1f} points linear and {100 * knn:.1f}% k-NN.")


def write_docs(result: dict, path: Path) -> None:
    rows = [("I-JEPA (target encoder)", result["ijepa"]), ("random init, same architecture", result["random_init"]),
            ("raw pixels", result["pixels"])]
    lines = ["## CIFAR-10 quality benchmark (`benchmarks/quality_cifar10.py`)", "",
             f"Pretraining: `{result['recipe']}` with {' '.join(f'`{o}`' for o in result['overrides']) or 'no overrides'}, "
             f"**{result['steps']} steps in {result['pretrain_minutes']:.1f} minutes** (including the online k-NN "
             f"monitor) on {result['machine']}; loss {result['first_loss']:.3f} -> {result['final_loss']:.3f}. "
             "Probes on the frozen, average-pooled target-encoder features of all 30,000 training and 10,000 test "
             "images: a converged multinomial logistic regression (L-BFGS, weight decay chosen on a 10% validation "
             "split, then refit) and weighted k-NN (k = 20, cosine, T = 0.07).", "",
             "| features | linear top-1 | linear train top-1 | k-NN top-1 | effective rank |", "| --- | --- | --- | --- | --- |"]
    for name, r in rows:
        lines.append(f"| {name} | {100 * r['linear_top1']:.1f}% | {100 * r['linear_train_top1']:.1f}% | "
                     f"{100 * r['knn_top1']:.1f}% | {r['effective_rank']:.1f} / {r['feature_dim']} |")
    lines += ["", verdict(result), "",
              "For scale (measured on machine A by the issue's author with the same probes): the reference I-JEPA "
              "implementation with this encoder, batch 128, 2,200 steps in 27 minutes in bf16 reached 47.6-48.9% "
              "linear and 32.3% k-NN; random init 47.5% / 27.8%. Machine B (this run's) has no bf16 matrix units "
              "and about half machine A's fp32 rate, so 30 minutes here buy about a fifth of those samples.", "",
              "![loss](quality_cifar10_loss.png) ![k-NN vs steps](quality_cifar10_knn.png)", "",
              f"Reproduce: `{result['command']}` (JSON: `benchmarks/results/quality_cifar10.json`).", "", HISTORY]
    write_section(path, "cifar10", "\n".join(lines))


def write_section(path: Path, key: str, text: str) -> None:
    """Replace (or append) one benchmark's section of ``docs/results.md``, keeping the others."""
    import re

    begin, end = f"<!-- {key}: written by benchmarks, do not edit -->", f"<!-- /{key} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    doc = path.read_text() if path.exists() else "# Results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the recipe's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override a.b=v")
    ap.add_argument("--run-dir", default="runs/quality_cifar10")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--write-docs", action="store_true", help="write docs/results.md and its plots")
    ap.add_argument("--quick", action="store_true", help="probe on 5k/1k subsets (smoke runs)")
    ap.add_argument("--monitor-every", type=int, default=250, help="online k-NN monitor interval (steps)")
    args = ap.parse_args()
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps else [])
    monitor = [f"monitor.every_steps={args.monitor_every}", f'monitor.train="{TRAIN}"', f'monitor.test="{TEST}"']
    run_dir = Path(args.run_dir)
    t0 = time.perf_counter()
    summary = run_pretrain("image_cifar10_cpu", run_dir, overrides=overrides + monitor)
    minutes = (time.perf_counter() - t0) / 60
    log(f"pretrained {summary['steps']} steps in {minutes:.1f} min, loss {summary['first_loss']:.3f} -> "
        f"{summary['final_loss']:.3f}")
    model = jepa.load(run_dir)
    train, test = TRAIN, TEST
    if args.quick:  # one shard each: 3,000 train / 2,500 test images
        train, test = str(DATA / "train-000000.tar"), str(DATA / "test-000000.tar")
    result = {"recipe": "image_cifar10_cpu", "overrides": overrides, "steps": summary["steps"],
              "pretrain_minutes": minutes, "first_loss": summary["first_loss"], "final_loss": summary["final_loss"],
              "machine": machine(summary["precision"]),
              "command": "python benchmarks/quality_cifar10.py " + shlex.join(sys.argv[1:])}
    result["ijepa"] = probes("I-JEPA", *features(model, train, test))
    rand = jepa.load(random_init_checkpoint(args.overrides, run_dir / "random_init"))
    result["random_init"] = probes("random", *features(rand, train, test))
    result["pixels"] = probes("pixels", *pixels(model.source, train, test))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_cifar10.json").write_text(json.dumps(result, indent=2))
    if args.write_docs:
        result["plots"] = plots(run_dir, ROOT / "docs", result)
        write_docs(result, ROOT / "docs" / "results.md")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
