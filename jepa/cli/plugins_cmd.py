"""``jepa plugins``: what is installed and what it provides."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

app = typer.Typer(no_args_is_help=True, help="Installed plugins and their components.")


@app.command("list")
def list_plugins(as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False) -> None:
    """List plugins (entry-point group `jepa`) with their tokenizers, maskers and sources."""
    from ..plugins import get_plugins
    from . import out_console

    listing = get_plugins().listing()
    if as_json:
        print(json.dumps(listing, indent=2))
        return
    table = Table(title="jepa plugins")
    for col in ("name", "distribution", "version", "builtin", "tokenizer", "masker", "source"):
        table.add_column(col)
    for p in listing:
        c = p["components"]
        table.add_row(p["name"], p["distribution"], p["version"], "yes" if p["builtin"] else "no",
                      ", ".join(c["tokenizer"]), ", ".join(c["masker"]), ", ".join(c["source"]))
    out_console.print(table)
