"""``jepa recipe``: list installed recipes, validate one and show what it costs, print the reference."""

from __future__ import annotations

import json
from typing import Annotated

import tomli_w
import typer
from rich.table import Table

app = typer.Typer(no_args_is_help=True, help="Validate and inspect recipes.")

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a.b=value (TOML literal). Repeatable.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def is_probe_recipe(path) -> bool:
    """Probe recipes (``jepa eval probe RECIPE``) name a checkpoint and have no model sections."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return "checkpoint" in data and "tokenizer" not in data


def _describe(path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


@app.command("list")
def list_recipes(as_json: JsonOpt = False) -> None:
    """Recipes installed with the package (usable by name: `jepa pretrain quickstart`)."""
    from ..config import list_recipes as _list
    from . import out_console

    rows = [{"name": p.stem, "kind": "probe" if is_probe_recipe(p) else "pretrain", "path": str(p),
             "description": _describe(p)} for p in _list()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="installed recipes")
    table.add_column("name")
    table.add_column("kind")
    table.add_column("description")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["description"])
    out_console.print(table)


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


@app.command("check")
def check(recipe: Annotated[str, typer.Argument(help="Recipe path or installed recipe name.")],
          overrides: SetOpt = None, as_json: JsonOpt = False,
          mfu: Annotated[float, typer.Option(
              "--mfu", help="Model-FLOP utilisation for the expected GPU times: the fraction of the dense bf16 "
              "peak (312 TFLOP/s A100, 989 H100) a step achieves. Default: what the paper's ViT-H/14 run "
              "achieved (at least 0.34). From benchmarks/gpu.sh: its achieved TFLOP/s over that peak.")] = 0.34) -> None:
    """Validate a recipe without training; print the resolved recipe, its cost and expected GPU time."""
    from ..config import find_recipe, load_recipe
    from ..errors import RecipeError
    from ..model.cost import estimate, expected_time
    from . import err_console, out_console

    if is_probe_recipe(find_recipe(recipe)):
        from .eval_cmd import settings

        s = settings(recipe)
        print(json.dumps(s.model_dump(), indent=2) if as_json else tomli_w.dumps(s.model_dump(exclude_none=True)))
        err_console.print("probe recipe OK")
        return
    resolved = load_recipe(recipe, overrides or [])
    cost = estimate(resolved)
    try:
        cost["expected"] = expected_time(cost, mfu)
    except ValueError as e:
        raise RecipeError(str(e)) from None  # a bad option value: exit 2, like a recipe error
    if as_json:
        print(json.dumps({"recipe": resolved.to_dict(), **cost}, indent=2))
        return
    out_console.print(resolved.to_toml(), highlight=False, markup=False)
    table = Table(title="cost")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    p = cost["params"]
    table.add_row("encoder parameters", f"{p['encoder']:,} ({_human(p['encoder'])})")
    table.add_row("predictor parameters", f"{p['predictor']:,} ({_human(p['predictor'])})")
    table.add_row("token grid / tokens per sample", f"{'x'.join(map(str, cost['grid']))} / {cost['tokens_per_sample']}")
    table.add_row("context tokens / targets", f"{cost['context_tokens']} / {cost['target_tokens'][0]} x {cost['target_tokens'][1]}")
    table.add_row("batch per device (world size)", f"{cost['per_device_batch']} ({cost['world_size']})")
    table.add_row("FLOPs per step (all devices)", _human(cost["flops_per_step"]) + "FLOP")
    table.add_row("FLOPs per step per device", _human(cost["flops_per_device_step"]) + "FLOP")
    table.add_row("memory per device (estimate)", f"{cost['memory_gb']:.2f} GB")
    world = cost["world_size"]
    for name, g in cost["expected"]["gpus"].items():
        times = [f"{g['step_s']:.3g} s/step"]
        if g["epoch_h"] is not None:
            times.append(f"{60 * g['epoch_h']:.3g} min/epoch")
        if g["run_h"] is not None:
            times.append(f"{g['run_h']:.3g} h/run")
        table.add_row(f"{world} x {name} at MFU {mfu:g} ({g['peak_tflops']:g} TFLOP/s bf16)", ", ".join(times))
    out_console.print(table)
    err_console.print("recipe OK")


@app.command("reference")
def reference() -> None:
    """Print the recipe reference (Markdown), generated from the schema and the installed components."""
    from ..config.reference import markdown

    print(markdown(), end="")
