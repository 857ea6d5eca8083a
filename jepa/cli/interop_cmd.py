"""``jepa import`` and ``jepa export``: weights in from the reference code or Hugging Face, out to timm,
Hugging Face or plain safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer


def register(app: typer.Typer) -> None:
    app.command("import")(import_cmd)
    app.command("export")(export_cmd)


def import_cmd(
    source: Annotated[Path, typer.Argument(help="Reference I-JEPA .pth.tar, or a Hugging Face I-JEPA folder.")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write.")],
    keep_optimizer: Annotated[bool, typer.Option("--keep-optimizer", help="Keep the original optimizer state in state.pt.")] = False,
    num_heads: Annotated[int | None, typer.Option("--num-heads", help="Attention heads, for a width outside the reference model zoo.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a summary as JSON on stdout.")] = False,
) -> None:
    """Import foreign weights as a jepa checkpoint (evaluate it, or continue pretraining with --init)."""
    from ..interop import import_checkpoint
    from . import err_console

    summary = import_checkpoint(source, out, keep_optimizer=keep_optimizer, num_heads=num_heads)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    err_console.print(f"imported {summary['format']} ({', '.join(summary['networks'])})", highlight=False)
    print(f"checkpoint: {summary['checkpoint']}")


def export_cmd(
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Run directory or checkpoint directory.")],
    fmt: Annotated[Literal["timm", "hf", "safetensors"], typer.Option("--format", help="Output format.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write.")],
    which: Annotated[Literal["target", "context"], typer.Option("--which", help="Encoder to export.")] = "target",
) -> None:
    """Export an encoder (the target encoder by default, as the paper evaluates) for other libraries."""
    from ..interop import export_checkpoint

    for f in export_checkpoint(checkpoint, fmt, out, which):
        print(f)
