"""``jepa eval probe|knn`` and ``jepa embed``: frozen-feature evaluation of a checkpoint."""

from __future__ import annotations

import json
import tomllib
from typing import Annotated, Literal

import typer
from pydantic import ValidationError
from rich.table import Table

from ..errors import RecipeError

app = typer.Typer(no_args_is_help=True, help="Evaluate frozen features: linear / attentive probes, k-NN.")

Ckpt = Annotated[str | None, typer.Option("--checkpoint", help="Run directory or checkpoint directory.")]
Train = Annotated[str | None, typer.Option("--train", help="Labelled training DATA.")]
Test = Annotated[str | None, typer.Option("--test", help="Labelled test DATA.")]
Which = Annotated[Literal["target", "context"] | None, typer.Option("--which", help="Encoder (default: target).")]
Out = Annotated[str | None, typer.Option("--out", help="Folder for results JSON, confusion PNG, feature cache.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
POOL_HELP = "Token pooling: mean (default), mean_std, or segments:N (N spans of the first grid axis)."
Pool = Annotated[str | None, typer.Option("--pool", help=POOL_HELP)]
Precision = Annotated[Literal["fp32", "bf16", "auto"] | None, typer.Option(
    "--precision", help="Feature extraction: fp32 (default; bf16 rounds away weak directions and biases comparisons), "
    "bf16 or auto.")]


def settings(recipe: str | None, **given):
    """Probe settings from an optional probe recipe, overridden by the options given on the command line.

    In a probe recipe, ``train`` and ``test`` are relative to the recipe's folder (data ships with
    recipes); ``checkpoint`` and ``out`` are relative to the working directory (runs live there).
    """
    from ..config.load import expand_vars, find_recipe, render_errors, resolve_data_spec
    from ..eval.run import ProbeSettings

    data: dict = {}
    if recipe is not None:
        path = find_recipe(recipe)
        try:
            data = expand_vars(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path.name}: not valid TOML: {e}") from None
        for key in ("train", "test"):
            if isinstance(data.get(key), str):
                data[key] = resolve_data_spec(data[key], path.resolve().parent)
    data.update({k: v for k, v in given.items() if v is not None})
    try:
        return ProbeSettings.model_validate(expand_vars(data))
    except ValidationError as e:
        raise RecipeError(render_errors(e, ProbeSettings)) from None


def show(result: dict, as_json: bool) -> None:
    from . import out_console

    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{result['kind']} evaluation ({result['which']} encoder)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("top1", "top5", "val_top1", "train_top1"):
        if result.get(key) is not None:
            table.add_row(key, f"{100 * result[key]:.2f}%")
    table.add_row("chosen", json.dumps(result["chosen"]))
    table.add_row("train / test samples", f"{result['n_train']} / {result['n_test']}")
    table.add_row("feature dim (effective rank)", f"{result['feature_dim']} ({result['effective_rank']:.1f})")
    table.add_row("seconds", f"{result['seconds']:.1f}")
    out_console.print(table)


@app.command("probe")
def probe(
    recipe: Annotated[str | None, typer.Argument(help="Optional probe recipe: a TOML path or installed name (probe_quickstart).")] = None,
    checkpoint: Ckpt = None, train: Train = None, test: Test = None,
    kind: Annotated[Literal["linear", "attentive"] | None, typer.Option("--kind", help="Probe (default linear).")] = None,
    which: Which = None,
    layers: Annotated[int | None, typer.Option("--layers", help="Concatenate the last N blocks' pooled outputs.")] = None,
    pool: Pool = None,
    fraction: Annotated[float | None, typer.Option("--fraction", help="Class-balanced fraction of train labels.")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    input_size: Annotated[str | None, typer.Option("--input-size", help="Evaluate at another size: 64 or 48x64.")] = None,
    precision: Precision = None, out: Out = None, as_json: Json = False,
) -> None:
    """Train a linear or attentive probe on frozen features and report test accuracy."""
    from ..eval.run import run_probe

    try:
        size = [int(v) for v in input_size.lower().split("x")] if input_size else None
    except ValueError:
        raise RecipeError(f"--input-size: expected a size like 64 or 48x64, got '{input_size}'") from None
    s = settings(recipe, checkpoint=checkpoint, train=train, test=test, kind=kind, which=which, layers=layers,
                 pool=pool, fraction=fraction, seed=seed, out=out, input_size=size, precision=precision)
    show(run_probe(s), as_json)


@app.command("knn")
def knn(
    recipe: Annotated[str | None, typer.Argument(help="Optional probe recipe: a TOML path or installed name.")] = None,
    checkpoint: Ckpt = None, train: Train = None, test: Test = None, which: Which = None, pool: Pool = None,
    k: Annotated[int | None, typer.Option("--k", help="Neighbours (default 20).")] = None,
    precision: Precision = None, out: Out = None, as_json: Json = False,
) -> None:
    """Weighted k-NN (cosine, k = 20, temperature 0.07) on frozen pooled features."""
    from ..eval.run import run_probe

    s = settings(recipe, checkpoint=checkpoint, train=train, test=test, which=which, pool=pool, k=k, out=out,
                 kind="knn", precision=precision)
    show(run_probe(s), as_json)


def embed_cmd(
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Run directory or checkpoint directory.")],
    data: Annotated[str, typer.Option("--data", help="DATA to embed.")],
    out: Annotated[str, typer.Option("--out", help="Output file: .npz or .safetensors.")],
    per_patch: Annotated[bool, typer.Option("--per-patch", help="Also write per-patch embeddings [n, N, D].")] = False,
    which: Annotated[Literal["target", "context"], typer.Option("--which")] = "target",
    layers: Annotated[int, typer.Option("--layers", help="Concatenate the last N blocks' pooled outputs.")] = 1,
    pool: Annotated[str, typer.Option("--pool", help=POOL_HELP)] = "mean",
    precision: Precision = None, as_json: Json = False,
) -> None:
    """Write embeddings (pooled, optionally per patch) with labels and keys."""
    from ..eval.run import embed

    summary = embed(checkpoint, data, out, which, per_patch, layers, pool=pool, precision=precision or "fp32")
    print(json.dumps(summary, indent=2) if as_json else summary["out"])
