"""Audio quality benchmark: does I-JEPA pretraining on spoken digits (FSDD) learn useful features?

1. pretrain ``recipes/audio_fsdd_cpu.toml`` on the FSDD train split (2,700 clips, takes 5-49);
2. probe the frozen target encoder (average-pooled tokens) on the test split (300 clips, takes 0-4):
   a converged linear probe (L-BFGS, weight decay chosen on a validation split) and weighted k-NN;
3. the same probes on a randomly initialised encoder of the same architecture, and on the log-mel
   spectrogram itself (the source's normalised eval view): a clip summary (per-bin mean and std over
   time) and the whole spectrogram, average-pooled ``--mel-pool`` x ``--mel-pool`` and flattened.

Writes ``benchmarks/results/quality_fsdd.json`` and prints a Markdown section; ``--write-docs`` puts
it in ``docs/results.md``.

    python benchmarks/quality_fsdd.py --write-docs     # the benchmark: ~11 min of pretraining, ~3 min of probes
    python benchmarks/quality_fsdd.py --steps 20       # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from quality_cifar10 import log, probes, write_section  # same protocol as the image benchmark
from torch.utils.data import DataLoader

import jepa
from jepa.api import run_pretrain
from jepa.config import load_recipe
from jepa.data import build_index
from jepa.eval.features import EvalDataset, _collate, encode_dataset
from jepa.model import build_from_recipe
from jepa.train.checkpoint import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JEPA_DATA_ROOT", ROOT.parent / "shared" / "data")) / "fsdd"
TRAIN, TEST = f"{DATA}/train-{{000000..000001}}.tar", f"{DATA}/test-000000.tar"
RECIPE = "audio_fsdd_cpu"


def features(model, which: str = "target"):
    tr = encode_dataset(model.network(which), model.source, TRAIN, num_workers=1)
    te = encode_dataset(model.network(which), model.source, TEST, num_workers=1)
    return tr.pooled, tr.labels, te.pooled, te.labels


def log_mel(source, pool: int):
    """Two log-mel baselines from the normalised eval views ``[1, frames, mel]``:

    * ``clip``: per mel bin, mean and std over time (a clip-level summary, like the pooled encoder
      features it is compared with);
    * ``grid``: the whole spectrogram average-pooled ``pool x pool`` and flattened (keeps the time
      order that average-pooled tokens give up).
    """
    out = {"clip": [], "grid": []}
    for spec in (TRAIN, TEST):
        xs, clip, ys = [], [], []
        for x, y, _, _ in DataLoader(EvalDataset(build_index(spec), source), batch_size=500, num_workers=1,
                                     collate_fn=_collate):
            xs.append(torch.nn.functional.avg_pool2d(x, pool).flatten(1))
            clip.append(torch.cat([x.mean(dim=2), x.std(dim=2)], dim=-1).flatten(1))
            ys.append(y)
        out["grid"] += [torch.cat(xs), torch.cat(ys)]
        out["clip"] += [torch.cat(clip), torch.cat(ys)]
    return out


def random_init(overrides: list[str], path: Path):
    resolved = load_recipe(RECIPE, overrides)
    torch.manual_seed(resolved.recipe.run.seed)
    model = build_from_recipe(resolved)
    nets = {n: getattr(model, n) for n in ("encoder", "predictor", "target_encoder")}
    return jepa.load(write_checkpoint(path, nets, {"step": 0}, {"step": 0, "random_init": True}, resolved.to_toml()))


def markdown(r: dict) -> str:
    rows = [("I-JEPA (target encoder)", r["ijepa"]), ("random init, same architecture", r["random_init"]),
            ("log-mel clip summary (per-bin mean and std over time)", r["log_mel_clip"]),
            (f"log-mel whole spectrogram ({r['mel_pool']}x{r['mel_pool']}-pooled, flattened)", r["log_mel_grid"])]
    lines = ["## FSDD audio quality benchmark (`benchmarks/quality_fsdd.py`)", "",
             f"Pretraining: `{r['recipe']}`{' with ' + ' '.join(r['overrides']) if r['overrides'] else ''}, "
             f"{r['steps']} steps in "
             f"{r['pretrain_minutes']:.1f} minutes on {r['machine']} (loss {r['first_loss']:.3f} -> "
             f"{r['final_loss']:.3f}). Probes on frozen, average-pooled features: train split (2,700 clips, "
             "takes 5-49) -> test split (300 clips, takes 0-4, the official FSDD split; same six speakers).", "",
             "| features | linear top-1 | linear train top-1 | k-NN top-1 | effective rank |",
             "| --- | --- | --- | --- | --- |"]
    for name, x in rows:
        lines.append(f"| {name} | {100 * x['linear_top1']:.1f}% | {100 * x['linear_train_top1']:.1f}% | "
                     f"{100 * x['knn_top1']:.1f}% | {x['effective_rank']:.1f} / {x['feature_dim']} |")
    lines += ["", f"Reproduce: `{r['command']}` (JSON: `benchmarks/results/quality_fsdd.json`).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the recipe's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override a.b=v")
    ap.add_argument("--run-dir", default="runs/quality_fsdd")
    ap.add_argument("--mel-pool", type=int, default=2, help="log-mel baseline: average-pool factor")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--write-docs", action="store_true", help="write the FSDD section of docs/results.md")
    args = ap.parse_args()
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps else [])
    overrides.append(f'data.train="{TRAIN}"')
    run_dir = Path(args.run_dir)
    t0 = time.perf_counter()
    summary = run_pretrain(RECIPE, run_dir, overrides=overrides)
    minutes = (time.perf_counter() - t0) / 60
    log(f"pretrained {summary['steps']} steps in {minutes:.1f} min, loss {summary['first_loss']:.3f} -> "
        f"{summary['final_loss']:.3f}")
    model = jepa.load(run_dir)
    result = {"recipe": RECIPE, "overrides": overrides[:-1], "steps": summary["steps"], "pretrain_minutes": minutes,
              "first_loss": summary["first_loss"], "final_loss": summary["final_loss"], "mel_pool": args.mel_pool,
              "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {summary['precision']}",
              "command": "python benchmarks/quality_fsdd.py " + " ".join(sys.argv[1:])}
    result["ijepa"] = probes("I-JEPA", *features(model))
    result["random_init"] = probes("random init", *features(random_init(overrides, run_dir / "random_init")))
    mel = log_mel(model.source, args.mel_pool)
    result["log_mel_clip"] = probes("log-mel clip", *mel["clip"])
    result["log_mel_grid"] = probes("log-mel grid", *mel["grid"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_fsdd.json").write_text(json.dumps(result, indent=2))
    print(markdown(result))
    if args.write_docs:
        write_section(ROOT / "docs" / "results.md", "fsdd", markdown(result))


if __name__ == "__main__":
    main()
