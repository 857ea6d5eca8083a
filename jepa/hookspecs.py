"""The extension contract: every hook a jepa plugin may implement.

A plugin is a module listed in the ``jepa`` entry-point group of its distribution::

    [project.entry-points.jepa]
    audio = "jepa_audio.plugin"

and implements some of the hooks below with ``@jepa.hookimpl``. Hooks run once, when the registry or
the CLI is built, never inside a training step. All arguments are keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("jepa")
hookimpl = pluggy.HookimplMarker("jepa")

Register = Callable[[str, type], None]


@hookspec
def jepa_register_tokenizers(register: Register) -> None:
    """Add tokenizers: call ``register(name, TokenizerClass)`` for each one."""


@hookspec
def jepa_register_maskers(register: Register) -> None:
    """Add maskers: ``register(name, MaskerClass)``. Maskers work in index space only."""


@hookspec
def jepa_register_sources(register: Register) -> None:
    """Add data sources: ``register(name, SourceClass)``; a source decodes one stored sample."""


@hookspec
def jepa_register_commands(app: Any) -> None:
    """Add CLI commands or groups to the Typer ``app``."""


@hookspec(firstresult=True)
def jepa_convert_checkpoint(state: dict, source: str) -> dict | None:
    """Turn a foreign checkpoint ``state`` (loaded from file ``source``) into ours, or return None."""
