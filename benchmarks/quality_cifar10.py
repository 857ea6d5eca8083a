"""Quality benchmark: does I-JEPA pretraining on CIFAR-10 learn features worth having?

One run, side by side, on the offline CIFAR-10 copy (30k train / 10k test, 32 px):

1. pretrain ``recipes/image_cifar10_cpu.toml`` for as many steps as fit ``--minutes`` (30) here, counted
   by timing the recipe's step first (or exactly ``--steps``), with the online k-NN monitor on a 5k/1k
   subset, so probe accuracy is recorded against steps;
2. probe the final target encoder with the full protocol (frozen, average-pooled tokens): a
   converged linear probe (L-BFGS, weight decay chosen on a validation split) and weighted k-NN;
3. the same probes on a randomly initialised encoder of the same architecture, and on raw pixels.

Writes ``benchmarks/results/quality_cifar10.json`` and, with ``--write-docs``, ``docs/results.md`` with
a table, a loss curve and a probe-accuracy-vs-steps plot (PNG).

    python benchmarks/quality_cifar10.py --write-docs         # full benchmark (~45 minutes)
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


def whitened(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening fitted on the training features: every direction of theirs gets unit variance."""
    x = train_x.double()
    mu = x.mean(dim=0)
    evals, evecs = torch.linalg.eigh(torch.cov((x - mu).T))
    w = evecs / evals.clamp_min(1e-10 * evals.max()).sqrt()
    return ((x - mu) @ w).float(), ((test_x.double() - mu) @ w).float()


def probes(name: str, train_x, train_y, test_x, test_y) -> dict:
    """Linear probe and k-NN; also k-NN after whitening, which tells a better geometry (k-NN gains, the
    linear probe, being nearly invariant to a change of basis, does not) from learned information."""
    t = time.perf_counter()
    lin = linear_probe(train_x, train_y, test_x, test_y, 10)
    knn = knn_probe(train_x, train_y, test_x, test_y, 10)
    white_train, white_test = whitened(train_x, test_x)
    knn_white = knn_probe(white_train, train_y, white_test, test_y, 10)
    out = {"linear_top1": lin.top1, "linear_train_top1": lin.train_top1, "linear_val_top1": lin.val_top1,
           "linear_chosen": lin.chosen, "knn_top1": knn.top1, "knn_whitened_top1": knn_white.top1,
           "feature_dim": int(train_x.shape[1]), "effective_rank": effective_rank(train_x),
           "probe_seconds": round(time.perf_counter() - t, 1)}
    log(f"{name:>10}: linear {100 * lin.top1:.1f}% (train {100 * lin.train_top1:.1f}%), "
        f"k-NN {100 * knn.top1:.1f}% (whitened {100 * knn_white.top1:.1f}%), "
        f"rank {out['effective_rank']:.1f}/{out['feature_dim']}")
    return out


def steps_for(budget_s: float, seconds_per_step: float, multiple: int = 25) -> int:
    """Whole multiples of ``multiple`` steps (the log interval) that fit ``budget_s`` seconds; at least one."""
    return max(multiple, int(budget_s / seconds_per_step) // multiple * multiple)


#: Share of --minutes given to the timed step; the rest is for what the loop adds (decoding, logging, the
#: online monitor, checkpoints) and the host's drift: at 0.85 of the median step a 4,025-step bf16 run on
#: machine D averaged 0.445 s a step against 0.380 s timed before it and took 30.1 minutes.
BUDGET_SHARE = 0.8


def calibrated_steps(minutes: float, overrides: list[str], share: float = BUDGET_SHARE,
                     timed: int = 16) -> tuple[int, float]:
    """Pretraining steps that fit ``minutes`` on this machine, and the measured seconds per step.

    Times the recipe's own optimizer step with ``benchmarks/train_step.py`` (same model, masks, batch and
    precision, synthetic images) and takes the mean of ``timed`` steps after its warm-up, since a run's
    time is their sum and the step time varies with the masks; ``share`` of the budget goes to them.
    """
    import train_step  # benchmarks/train_step.py

    sets = [a for o in overrides for a in ("--set", o)]
    timing = train_step.run(train_step.parse_args(["image_cifar10_cpu", "--steps", str(timed), *sets]))
    seconds = timing["ms_per_step_mean"] / 1e3
    return steps_for(minutes * 60 * share, seconds), seconds


LAST_N = 4  # the paper's other probe input: the pooled outputs of the last 4 blocks, concatenated


def features(model, train: str, test: str, which: str = "target", layers: int = 1):
    """Pooled features (fp32 extraction, the probes' default) and labels of train and test."""
    tr = encode_dataset(model.network(which), model.source, train, layers=layers, num_workers=2)
    te = encode_dataset(model.network(which), model.source, test, layers=layers, num_workers=2)
    return tr.pooled, tr.labels, te.pooled, te.labels


def last_block(feats):
    """The last block's slice of ``features(..., layers=LAST_N)`` (blocks are concatenated in depth order)."""
    train_x, train_y, test_x, test_y = feats
    width = train_x.shape[1] // LAST_N
    return train_x[:, -width:], train_y, test_x[:, -width:], test_y


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

HISTORY = """How the recipe got here. Full protocol (all 30k / 10k images), batch 128, last-block probe; fp32 on
machine B (2 AVX2 cores, no bf16 units) unless noted:

| run | steps | linear (random init) | k-NN (random init) | note |
| --- | ---: | ---: | ---: | --- |
| `tokenizer.init = "trunc_normal"` (std 0.02), lr 1e-3 | 300 | | | loss 0.06 by step 300, pooled std 0.10-0.18, rank about 8: token content (std about 0.13) is drowned by the sin-cos positions (about 0.5), so targets are mostly position |
| Xavier patch init, lr 1e-3 | 800 | | | features stay spread (std 0.3-0.4, rank 9-12), but the loss falls to 0.07 again |
| Xavier, lr 5e-4, warm-up 40 | 400 | **46.6%** (45.4%) | 28.4% (28.6%) | 32.1 minutes; nothing collapses, nothing separates from random init; the best run so far |
| Xavier, lr 1e-3, warm-up 40, `loss.target_batch_norm`, `model.predictor_joint` | 480 | 40.8% (45.4%) | 27.7% (28.6%) | 26.7 minutes; loss 0.99 -> 0.48 (the predictor explains half the position-centred target variance), yet the features fall below random init, rank 8.3 |
| Xavier, lr 1e-3, warm-up 200, VICReg terms (`variance_weight` 1, `covariance_weight` 0.04); bf16 on machine C (2 cores with AMX), the run above this table and now the recipe | 2,000 | 45.9% (45.4%) | **41.9%** (28.6%) | 25.0 minutes at about 175 samples/s, 8.5 epochs; rank 133; online k-NN 34.1% at step 250, 38.8% at 750, then 35-36% |
| the recipe with `optim.lr = 2e-3`, bf16 on machine D (2 AVX512-BF16 cores) | 1,375 of 1,600 | | | stopped at step 1,375: online k-NN 34.4% at step 400, 20.0% at 800, 19.4% at 1,200; no collapse (rank 60-64), but the loss rose 0.77 -> 1.0 while the prediction std fell 0.61 -> 0.30 and the target std rose 0.45 -> 0.90: the predictor lost track of drifting targets |
| the recipe with `optim.lr = 5e-4`, bf16 on machine D | 1,800 | 45.7% (45.3%) | 41.4% (28.6%) | 28.8 minutes at 116-159 samples/s (10th-90th percentile of the log intervals; median 134); rank 102; last 4 blocks 50.3% (45.6%); online k-NN 33.7% at step 300, 37.2% at 600, then 35.0, 33.3 and 33.5%: the same mid-run peak and decline as at lr 1e-3, so the learning rate is not what caps the probes |
| the recipe (then) with `masker.context_scale = [0.4, 0.6]`: a context block of 40-60% of the grid, about 15 context tokens once the targets are out (30 with the default 0.85-1.0); fp32 on machine E (2 AVX2 cores) | 800 | 43.2% (45.4%) | 37.5% (28.6%) | 26.2 minutes; rank 79; last 4 blocks 47.3%; a smaller context alone lowers the linear probe |
| the same with `loss.global_weight = 1`: the pooled context output also regresses the target encoder's pooled output of the whole image; fp32 on machine E, **now the recipe** | 800 | **49.4%** (45.4%) | 34.2% (28.6%) | 25.8 minutes at 67-80 samples/s; rank 28.5; linear train 50.2%; last 4 blocks 51.6% (46.1%); **+3.9 points** on the last block, +6.2 over the same context without the term; online k-NN 28.4% at step 400, 31.1% at 800 |
| the same with `loss.global_weight = 3` | 800 | 45.9% (45.4%) | 28.5% (28.6%) | 27.8 minutes; rank 11.3; last 4 blocks 48.0%: the term dominates (0.071 at step 25, 0.027 at 800) and the features fold onto a few directions |
| the recipe, its context encoder probed instead (`--which context`) | 800 | 48.9% (45.4%) | 38.8% (28.6%) | rank 40.3; the EMA target's lag costs nothing at this length |
| the recipe with `loss.global_weight = 2` and a residual MLP head (hidden 384, starting as the identity; a patch, not kept) from the pooled context to the global target, as BYOL's predictor | 800 | 47.4% (45.4%) | 31.2% (28.6%) | 29.5 minutes; rank 18.9; the head meets the term at once (0.063 at step 25, 0.031 at 250, against 0.11 throughout without it), so it no longer shapes the features |
| the recipe with `ema.momentum = 0.99` (the target follows faster; 1.0 at the end as before) | 800 | 49.6% (45.4%) | 40.2% (28.6%) | 31.9 minutes in a slower hour of machine E (54-62 samples/s, 67-80 for the recipe's run); rank 40.1; last 4 blocks 52.0% (46.1%); online k-NN 31.3% at step 400, 35.1% at 800: a wider, better-clustered embedding, the same linear probe |
| the same with `model.predictor_joint = true` (one predictor sequence per sample), **now the recipe** | 800 | **49.6%** (45.4%) | **40.0%** (28.6%) | 24.8 minutes at 62-84 samples/s; rank 40.1; linear train 51.3%; last 4 blocks 52.1% (46.1%); online k-NN 31.2% at step 400, 36.0% at 800; the trajectory follows the run above (loss within 0.01, effective rank within 0.3 at every logged step) |
| the recipe with a colour-distorted context view (SimCLR's colour jitter at strength 0.5 with probability 0.8, then grayscale with probability 0.2, on the context encoder's copy of the crop only; a patch, not kept); bf16 on machine D (2 AVX512-BF16 cores) | 800 | 48.7% (45.3%) | 41.3% (28.6%) | 6.2 minutes at 290-315 samples/s; rank 41.0; last 4 blocks 51.1% (45.6%); within a point of the recipe's 49.6% without it (fp32 on machine E): colour invariance adds nothing to the linear probe at this length |
| the recipe, bf16 on machine D, as many steps as the benchmark's calibration then fitted into 30 minutes (85% of the budget over the median of 8 timed steps) | 4,025 | **53.5%** (45.3%) | **48.4%** (28.6%) | 30.1 minutes at 240-344 samples/s: 6 s over the budget, so the calibration now takes the mean of 16 steps and 80%; rank 66.1; linear train 55.8%; last 4 blocks 56.4% (45.6%); online k-NN 36.4% at step 500, 40.3% at 1,000, 42.7% at 2,000, 43.5% at 4,000; **+8.2 points**: the 800-step runs above were short of steps, not of a setting |

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
1.5 points. In the full run (4x the proxies' steps, 2x their batch, bf16 on a faster machine) they give
k-NN 41.9% against 28.6% for random init, above the reference's 32.3% and near raw pixels' 44.0%, and
effective rank 133 of 192; the linear probe gains only 0.5 points on the last block and 3.6 on the last 4
blocks, short of the 8 the issue asks for. Its step-1,000 checkpoint probes at 45.5% linear / 42.7% k-NN:
the linear probe had plateaued by mid-run, so more steps at this rate are unlikely to close the gap. The
recipe now has these terms, Xavier init, warm-up 200 and
2,000 steps, which `python benchmarks/quality_cifar10.py --write-docs` then ran.

Quick proxies of a later session (machine D, bf16): pretraining on 2 shards, 250 steps of batch 64
with the recipe's warm-up of 200 and its VICReg terms; probes with `--quick`, on 3,000 train / 2,500
test images (random init: 40.1% linear, 39.0% on the last 4 blocks, 24.0% k-NN):

| change to the recipe | linear | linear, last 4 blocks | k-NN | rank |
| --- | ---: | ---: | ---: | ---: |
| none | 40.2% | 40.9% | 27.1% | 21.5 |
| `masker.num_targets = 2`, `masker.target_scale = [0.2, 0.3]` | 39.7% | 42.7% | 26.9% | 21.0 |
| `masker.context_scale = [0.5, 0.7]` | 40.2% | 42.2% | 26.8% | 22.7 |
| `model.predictor_depth = 2` | 40.2% | 40.0% | 27.6% | 21.4 |
| a global term, weight 1: the context's pooled output regresses the whole image's pooled target (`loss.global_weight = 1`, default context) | 40.4% | 41.5% | 25.0% | 11.2 |

With 3,000 probe-training images the linear probes overfit (train top-1 50-59%), so 1-2 points are
noise; no change moves the last-block probe more than 0.3 points from random init. The global term
is nearly met from the start (0.07 -> 0.06): a mean over half of an image's tokens is already close
to the mean over all of them, so the term asks for little, and it halved the rank.

Feature extraction runs in fp32 (`jepa eval --precision`, default fp32): extracting the same features
under bf16 autocast cost the random-init encoder 2.9 points of linear probe (45.4% -> 42.5%, k-NN 28.6%
-> 28.7%) and the trained one nothing (45.9% both), so bf16 extraction flatters a trained encoder
against a random one.

**k-NN measures geometry as much as learning** (machine E, 2 AVX2 cores, fp32; the benchmark's
`probes()` now adds k-NN on PCA-whitened features, the whitening fitted on the 30k training features).
Whitening the random-init encoder's features lifts its k-NN from 28.6% to **47.9%** (last block; 51.6%
for the last 4 blocks), above the 41.9% of the earlier recipe's 2,000-step run and raw pixels' 44.0%;
standardising each channel alone gives 29.1%. The random features hold the information, spread over
directions of tiny variance that cosine similarity ignores. A linear probe is nearly invariant to such a
change of basis, and it put that run within 0.5 points of random init: what the VICReg terms bought in
k-NN (+13.3 points) is mostly a whiter geometry, not class information that random features lack. So the
k-NN bar (above 32.3%) is met by the protocol but is not evidence of learning; the linear bar is the one
that tests it.

**A standing global task** (machine E, fp32, 800 steps of batch 128 each, full protocol; the last three
rows of the first table). The global term asks the visible part of an image for the target encoder's
pooled view of the whole of it. With the default context block (85-100% of the grid, about 30 of the 64
tokens once the targets are out) it is nearly met from the start (the quick proxy above). With a 40-60%
block, about 15 tokens, it stays near 0.11 through the run at weight 1 (0.117 at step 25, 0.108 at step
400): a task like the crop invariance of BYOL or VICReg, with the EMA target's view of the whole image
in place of a second augmented view, so no augmentation is added. Together the two changes give the
first last-block linear probe clearly above random init: 49.4% against 45.4% (+3.9 points; the last 4
blocks 51.6% against 46.1%), with linear train accuracy 50.2%, so the probe is not overfitting. The k-NN
falls to 34.2%, still above the reference's 32.3%, with the effective rank (28.5). The small context
without the term gives 43.2%. At weight 3 the term dominates and the linear probe is back at random
init. This is still about 4 points short of the +8 bar. The recipe's 2,000 steps, about 25 minutes where
bf16 units exist, were not run with these settings.

**Around the global term** (the last four rows of the first table, same machine and protocol). Probing
the context encoder instead of its EMA target changes nothing (48.9%). A BYOL-like predictor head
between the pooled context and the global target, at weight 2, lets the head rather than the encoder
meet the term, and the probe falls to 47.4%. EMA 0.99 instead of 0.996 leaves the linear probe where it
was (49.6%) but widens the embedding (rank 40 against 28.5) and lifts k-NN to 40.2%, whitened k-NN
49.7% (random init 47.9%). The joint predictor gives the same run, step for step, for less compute per
step; the recipe now has both. The linear probe has stayed at 49.4-49.6% through these changes, +4.1
points at best.

**More steps, not another setting** (machine D: 2 AMD EPYC cores with AVX512-BF16, no AMX; bf16; the
last two rows of the first table). The joint predictor and the 40-60% context block brought the bf16
step there to about 0.35-0.40 s, so 30 minutes now hold about 3,800-4,000 steps of batch 128 (16-17
passes over the 30k images), where a 2-core AVX2 machine in fp32 holds about 800. The unchanged recipe
at 4,025 steps reached 53.5% linear against 45.3% for random init (+8.2 points; the last 4 blocks 56.4%
against 45.6%), k-NN 48.4% (raw pixels 44.0%) and whitened k-NN 53.5% (random init 47.9%), with rank 66.
Its online k-NN kept rising to the end (36.4% at step 500, 43.5% at 4,000), where the VICReg-only
recipe's had peaked mid-run. A colour-distorted context view (SimCLR's jitter on the context encoder's
copy only) gave 48.7% at 800 steps, within a point of the recipe without it, and was not kept. On an
AVX2-only machine the same 30 minutes give the 800-step figure, 49.6%, and the bar is not reached there.
The table at the top is the run after the calibration change: 3,775 steps in 29.0 minutes, 53.4% linear
(+8.1 points) and 48.0% k-NN, so the bar holds by a small margin within the budget."""


def verdict(result: dict) -> str:
    gain = result["ijepa"]["linear_top1"] - result["random_init"]["linear_top1"]
    knn = result["ijepa"]["knn_top1"]
    met = gain >= BAR_LINEAR_GAIN and knn > BAR_KNN
    text = (f"**Status: the bar is {'reached' if met else 'not reached'}.** The issue asks for linear >= random "
            f"init + {100 * BAR_LINEAR_GAIN:.0f} points and k-NN above the reference's {100 * BAR_KNN:.1f}%; here "
            f"I-JEPA is {100 * gain:+.1f} points linear and {100 * knn:.1f}% k-NN")
    if f"ijepa_last{LAST_N}" in result:
        gain4 = result[f"ijepa_last{LAST_N}"]["linear_top1"] - result[f"random_init_last{LAST_N}"]["linear_top1"]
        text += f" ({100 * gain4:+.1f} points linear on the last {LAST_N} blocks)"
    return text + "."


def write_docs(result: dict, path: Path) -> None:
    rows = [("I-JEPA (target encoder)", result["ijepa"]), ("random init, same architecture", result["random_init"]),
            ("raw pixels", result["pixels"])]
    if f"ijepa_last{LAST_N}" in result:
        rows[2:2] = [(f"I-JEPA, last {LAST_N} blocks concatenated", result[f"ijepa_last{LAST_N}"]),
                     (f"random init, last {LAST_N} blocks", result[f"random_init_last{LAST_N}"])]
    white = all("knn_whitened_top1" in r for _, r in rows)  # results written before it was added lack it
    lines = ["## CIFAR-10 quality benchmark (`benchmarks/quality_cifar10.py`)", "",
             f"Pretraining: `{result['recipe']}` with {' '.join(f'`{o}`' for o in result['overrides']) or 'no overrides'}, "
             f"**{result['steps']} steps in {result['pretrain_minutes']:.1f} minutes** (including the online k-NN "
             f"monitor) on {result['machine']}; loss {result['first_loss']:.3f} -> {result['final_loss']:.3f}. "
             "Probes on the frozen, average-pooled target-encoder features (last block, the paper's probe, and "
             "the last 4 blocks concatenated), extracted in fp32, of all 30,000 training and 10,000 test "
             "images: a converged multinomial logistic regression (L-BFGS, weight decay chosen on a 10% validation "
             "split, then refit) and weighted k-NN (k = 20, cosine, T = 0.07).", "",
             "| features | linear top-1 | linear train top-1 | k-NN top-1 | "
             + ("k-NN, whitened features | " if white else "") + "effective rank |",
             "| --- " * (6 if white else 5) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | {100 * r['linear_top1']:.1f}% | {100 * r['linear_train_top1']:.1f}% | "
                     f"{100 * r['knn_top1']:.1f}% | " + (f"{100 * r['knn_whitened_top1']:.1f}% | " if white else "")
                     + f"{r['effective_rank']:.1f} / {r['feature_dim']} |")
    lines += ["", verdict(result), "",
              "For scale (measured by the issue's author on a 2-core machine with bf16 units, same probes): the "
              "reference I-JEPA implementation with this encoder, batch 128, 2,200 steps in 27 minutes in bf16 "
              "reached 47.6-48.9% linear and 32.3% k-NN; random init 47.5% / 27.8%.", "",
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
    ap.add_argument("--steps", type=int, default=None,
                    help="pretraining steps (default: as many as fit --minutes on this machine)")
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="pretraining budget when --steps is not given: the steps are calibrated by timing the "
                    "recipe's step here first (default 30, the issue's budget)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override a.b=v")
    ap.add_argument("--run-dir", default="runs/quality_cifar10")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--write-docs", action="store_true", help="write docs/results.md and its plots")
    ap.add_argument("--quick", action="store_true", help="probe on 5k/1k subsets (smoke runs)")
    ap.add_argument("--monitor-every", type=int, default=250, help="online k-NN monitor interval (steps)")
    ap.add_argument("--probe-only", metavar="JSON",
                    help="skip pretraining: probe the finished run in --run-dir again, taking its pretraining "
                    "figures (and overrides) from this earlier result JSON of the same run")
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    if args.probe_only:
        earlier = json.loads(Path(args.probe_only).read_text())
        result = {k: earlier[k] for k in ("recipe", "overrides", "steps", "pretrain_minutes", "first_loss",
                                          "final_loss", "machine", "command")}
        recipe_overrides = [o for o in result["overrides"] if not o.startswith("train.steps=")]
    else:
        steps, calibration = args.steps, None
        if steps is None:
            steps, seconds = calibrated_steps(args.minutes, args.overrides)
            calibration = {"minutes": args.minutes, "seconds_per_step": round(seconds, 3), "steps": steps}
            log(f"calibrated: {seconds:.2f} s per step here, so {steps} steps for a {args.minutes:g}-minute budget")
        overrides = list(args.overrides) + [f"train.steps={steps}"]
        monitor = [f"monitor.every_steps={args.monitor_every}", f'monitor.train="{TRAIN}"', f'monitor.test="{TEST}"']
        t0 = time.perf_counter()
        summary = run_pretrain("image_cifar10_cpu", run_dir, overrides=overrides + monitor)
        minutes = (time.perf_counter() - t0) / 60
        log(f"pretrained {summary['steps']} steps in {minutes:.1f} min, loss {summary['first_loss']:.3f} -> "
            f"{summary['final_loss']:.3f}")
        result = {"recipe": "image_cifar10_cpu", "overrides": overrides, "steps": summary["steps"],
                  "pretrain_minutes": minutes, "first_loss": summary["first_loss"],
                  "final_loss": summary["final_loss"], "machine": machine(summary["precision"]),
                  "command": "python benchmarks/quality_cifar10.py " + shlex.join(sys.argv[1:]),
                  "calibration": calibration}
        recipe_overrides = args.overrides
    train, test = TRAIN, TEST
    if args.quick:  # one shard each: 3,000 train / 2,500 test images
        train, test = str(DATA / "train-000000.tar"), str(DATA / "test-000000.tar")
    # One fp32 pass per encoder with the last 4 blocks: the last block's slice is the paper's probe.
    rand = jepa.load(random_init_checkpoint(recipe_overrides, run_dir / "random_init"))
    for name, model in (("ijepa", jepa.load(run_dir)), ("random_init", rand)):
        last4 = features(model, train, test, layers=LAST_N)
        result[name] = probes(name, *last_block(last4))
        result[f"{name}_last{LAST_N}"] = probes(f"{name} last {LAST_N}", *last4)
    result["pixels"] = probes("pixels", *pixels(rand.source, train, test))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_cifar10.json").write_text(json.dumps(result, indent=2))
    if args.write_docs:
        result["plots"] = plots(run_dir, ROOT / "docs", result)
        write_docs(result, ROOT / "docs" / "results.md")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
