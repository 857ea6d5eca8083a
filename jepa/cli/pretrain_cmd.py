"""``jepa pretrain``: train a recipe; the run directory holds everything it produces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)


def pretrain(
    recipe: Annotated[str, typer.Argument(help="Recipe path or installed recipe name (`jepa recipe list`).")],
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a.b=value (TOML literal).")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default runs/<run.name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run directory's latest checkpoint.")] = False,
    allow_changes: Annotated[str, typer.Option("--allow-changes", help="With --resume: recipe fields allowed to differ, comma-separated.")] = "",
    init: Annotated[str | None, typer.Option("--init", help="Initialise the networks from this checkpoint.")] = None,
    stop_at: Annotated[int | None, typer.Option("--stop-at", min=1, help="Stop after this global step, with a checkpoint (continue later with --resume).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON on stdout.")] = False,
) -> None:
    """Pretrain a JEPA from a recipe."""
    from ..api import run_pretrain
    from . import err_console

    sets = list(overrides or [])
    if init:
        sets.append(f"model.init={json.dumps(str(Path(init).resolve()))}")
    allowed = tuple(a.strip() for a in allow_changes.split(",") if a.strip())
    summary = run_pretrain(recipe, run_dir=run_dir, resume=resume, overrides=sets, allow_changes=allowed,
                           console=err_console, stop_at=stop_at)
    if summary.get("rank", 0) != 0:  # under torchrun, rank 0 reports for the job
        return
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    skipped = summary["skipped"]
    ran = summary["steps"] - summary["start_step"]
    losses = (f"; loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
              if summary["final_loss"] is not None else "")
    err_console.print(f"done: {ran} steps in {summary['seconds']:.0f} s on {summary['device']} "
                      f"({summary['precision']}){losses}", highlight=False)
    if skipped:
        err_console.print("skipped samples: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
                          + " (where: summary.json)", highlight=False)
    if summary.get("nonfinite_steps"):
        err_console.print(f"skipped {summary['nonfinite_steps']} steps with a non-finite loss or gradient", highlight=False)
    if summary.get("collapse_alarms"):
        err_console.print(f"collapse alarm at steps {summary['collapse_alarms']}; see docs/reliability.md", highlight=False)
    print(f"checkpoint: {summary['checkpoint']}")
