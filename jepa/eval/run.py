"""Evaluation runs: probes and k-NN on frozen features of a checkpoint, with results written to disk."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import JepaError
from .features import PRECISION_HELP, Features, cached_features, check_pool, use_bf16


class ProbeSettings(BaseModel):
    """An evaluation, as CLI options or a probe recipe (``jepa eval probe RECIPE.toml``)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(description="Run directory, checkpoint directory, or imported checkpoint.")
    train: str = Field(description="Labelled training DATA (shards with .cls, or class folders).")
    test: str = Field(description="Labelled test DATA.")
    kind: Literal["linear", "attentive", "knn"] = "linear"
    which: Literal["target", "context"] = Field("target", description="Encoder to evaluate (the paper: target).")
    layers: int = Field(1, ge=1, description="Concatenate the pooled outputs of the last N blocks (the paper: 1 or 4).")
    pool: str = Field("mean", description="Token pooling: `mean` (the paper), `mean_std` (mean and std over tokens), "
                      "or `segments:N` (the mean of each of N spans of the grid's first axis, e.g. time).")
    fraction: float = Field(1.0, gt=0, le=1, description="Class-balanced fraction of the training labels (0.01: 1%).")
    seed: int = 0
    out: str | None = Field(None, description="Folder for results JSON, confusion matrix PNG and the feature cache.")
    input_size: list[int] | None = Field(None, description="Evaluate at another input size (e.g. [64, 64]).")
    batch_size: int = Field(256, gt=0)
    num_workers: int = Field(2, ge=0)
    device: str = Field("auto", description="`auto` (CUDA if present), `cpu` or `cuda[:N]`.")
    precision: Literal["fp32", "bf16", "auto"] = Field("fp32", description=PRECISION_HELP)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    weight_decays: list[float] = Field([0.0, 1e-5, 1e-4, 1e-3, 1e-2], description="Linear probe L2 grid.")
    lrs: list[float] = Field([1e-3], description="Attentive probe learning rates.")
    attentive_weight_decays: list[float] = Field([0.05], description="Attentive probe weight decays.")
    epochs: int = Field(20, gt=0, description="Attentive probe epochs.")
    k: int = Field(20, gt=0, description="k-NN neighbours.")
    temperature: float = Field(0.07, gt=0, description="k-NN vote temperature.")

    @field_validator("pool")
    @classmethod
    def _known_pool(cls, v: str) -> str:
        try:
            check_pool(v)
        except JepaError as e:
            raise ValueError(str(e).removeprefix("pool: ")) from None
        return v


def _check_labels(feats: Features, name: str) -> None:
    if (feats.labels < 0).any():
        n = int((feats.labels < 0).sum())
        raise JepaError(f"{name}: {n} samples have no label; a probe needs labels (.cls members or class folders)")


def run_probe(s: ProbeSettings) -> dict:
    """Extract (or reuse) features, fit the probe, return the result dict (the ``--json`` shape)."""
    from ..api import load
    from ..train.trainer import pick_device
    from .probes import attentive_probe, balanced_subset, effective_rank, knn_probe, linear_probe

    start = time.perf_counter()
    model = load(s.checkpoint, device=str(pick_device(s.device)))
    model.network(s.which)
    bf16 = use_bf16(s.precision, model.device)  # features, and an attentive head: fp32 unless asked
    cache = Path(s.out) / "cache" if s.out else None
    tokens = s.kind == "attentive"
    size = (s.input_size[0] if len(s.input_size) == 1 else s.input_size) if s.input_size else None
    kw = dict(which=s.which, layers=s.layers, tokens=tokens, batch_size=s.batch_size, num_workers=s.num_workers,
              cache_dir=cache, input_size=size, pool=s.pool, precision=s.precision)
    train, test = cached_features(model, s.train, **kw), cached_features(model, s.test, **kw)
    _check_labels(train, "train")
    _check_labels(test, "test")
    idx = balanced_subset(train.labels, s.fraction, s.seed) if s.fraction < 1 else torch.arange(len(train))
    tx, ty = train.pooled[idx], train.labels[idx]
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    if s.kind == "linear":
        res = linear_probe(tx, ty, test.pooled, test.labels, num_classes, weight_decays=tuple(s.weight_decays),
                           val_fraction=s.val_fraction, seed=s.seed)
    elif s.kind == "knn":
        res = knn_probe(tx, ty, test.pooled, test.labels, num_classes, k=s.k, temperature=s.temperature)
    else:
        res = attentive_probe(train.tokens[idx], ty, test.tokens, test.labels, num_classes,
                              lrs=tuple(s.lrs), weight_decays=tuple(s.attentive_weight_decays), epochs=s.epochs,
                              val_fraction=s.val_fraction, seed=s.seed, device=str(model.device),
                              bf16=bf16)
    result = {
        "kind": res.kind, "top1": res.top1, "top5": res.top5, "val_top1": res.val_top1, "train_top1": res.train_top1,
        "chosen": res.chosen, "n_train": int(len(ty)), "n_test": int(len(test)), "feature_dim": int(tx.shape[1]),
        "effective_rank": effective_rank(tx), "which": s.which, "layers": s.layers, "pool": s.pool,
        "precision": "bf16" if bf16 else "fp32",
        "fraction": s.fraction,
        "seed": s.seed, "checkpoint": str(model.path), "train": s.train, "test": s.test, "grid": res.grid,
        "skipped": {"train": dict(train.skipped), "test": dict(test.skipped)},
        "seconds": round(time.perf_counter() - start, 2),
    }
    if s.out:
        write_outputs(Path(s.out), result, res.confusion, _class_names(s.test))
    return result


def _class_names(spec: str) -> list[str] | None:
    from ..data.shards import build_index

    classes = build_index(spec).classes
    return classes or None


def write_outputs(out: Path, result: dict, confusion: torch.Tensor, names: list[str] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['kind']}_{result['which']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot_confusion(confusion, names, out / f"{stem}_confusion.png",
                   f"{result['kind']} probe, {result['which']} encoder: top-1 {100 * result['top1']:.1f}%")


def plot_confusion(confusion: torch.Tensor, names: list[str] | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = confusion.float()
    norm = c / c.sum(dim=1, keepdim=True).clamp_min(1)
    n = c.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 0.8 + 0.45 * n), dpi=120)
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    labels = names or [str(i) for i in range(n)]
    ax.set_xticks(range(n), labels, rotation=90 if n > 10 or max(map(len, labels)) > 3 else 0, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if c[i, j] > 0:
                    ax.text(j, i, int(c[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def embed(checkpoint: str, data: str, out: str, which: str = "target", per_patch: bool = False, layers: int = 1,
          batch_size: int = 256, num_workers: int = 2, pool: str = "mean", precision: str = "fp32") -> dict:
    """Write pooled (and optionally per-patch) embeddings with labels and keys to ``.npz`` or ``.safetensors``."""
    from ..api import load

    model = load(checkpoint)
    feats = cached_features(model, data, which=which, layers=layers, tokens=per_patch, batch_size=batch_size,
                            num_workers=num_workers, pool=pool, precision=precision)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"embeddings": feats.pooled, "labels": feats.labels}
    if per_patch:
        arrays["patch_embeddings"] = feats.tokens
    if path.suffix == ".npz":
        import numpy as np

        np.savez(path, **{k: v.numpy() for k, v in arrays.items()}, keys=np.array(feats.keys))
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in arrays.items()}, str(path),
                  metadata={"keys": json.dumps(feats.keys), "which": which, "checkpoint": str(model.path)})
    else:
        raise JepaError(f"--out: {path.name} must end in .npz or .safetensors")
    return {"out": str(path), "n": len(feats), "dim": int(feats.pooled.shape[1]), "per_patch": per_patch,
            "skipped": dict(feats.skipped)}
