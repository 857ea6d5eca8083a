"""The ``jepa`` command line. Each command group lives in its own small module.

Errors caused by input are printed as one line each (``section.field: message``) and exit non-zero,
with no traceback. ``--json`` prints exactly one JSON document on stdout; everything for humans goes
to stderr.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from ..errors import JepaError

err_console = Console(stderr=True)
out_console = Console()


def build_app() -> typer.Typer:
    from . import eval_cmd, interop_cmd, plugins_cmd, pretrain_cmd, recipe_cmd, viz_cmd

    app = typer.Typer(name="jepa", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                      help="Self-supervised pretraining with Joint-Embedding Predictive Architectures.")
    app.add_typer(plugins_cmd.app, name="plugins")
    app.add_typer(recipe_cmd.app, name="recipe")
    app.add_typer(eval_cmd.app, name="eval")
    app.add_typer(viz_cmd.app, name="viz")
    app.command("embed")(eval_cmd.embed_cmd)
    pretrain_cmd.register(app)
    interop_cmd.register(app)
    from ..plugins import get_plugins

    get_plugins().pm.hook.jepa_register_commands(app=app)
    return app


def one_line_messages(e: JepaError) -> list[str]:
    """The problem lines of an error. An error raised in a DataLoader worker arrives re-wrapped with the
    worker's traceback; only its last line (the original message) is the user's business."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return [last.split(": ", 1)[1] if last.startswith(("jepa.", "jepa_")) and ": " in last else last]
    return text.splitlines() or [type(e).__name__]


def report(e: JepaError) -> int:
    for line in one_line_messages(e):
        err_console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
    return e.exit_code


def main(argv: list[str] | None = None) -> None:
    try:
        app = build_app()
        app(args=argv, prog_name="jepa")
    except JepaError as e:
        sys.exit(report(e))
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
