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
def jepa_convert_checkpoint(state: dict, source: str, options: dict) -> Any:
    """Turn a foreign checkpoint into ours, or return None if it is not yours to convert.

    ``state`` is what ``source`` holds, loaded safely (``torch.load(weights_only=True, mmap=True)`` for
    a file; ``{"config": dict, "weights": dict}`` for a folder of ``config.json`` + ``model.safetensors``).
    ``options`` holds what the user told ``jepa import`` (e.g. ``num_heads`` for a non-standard width).
    Return a :class:`jepa.interop.Converted`. First result wins.
    """


@hookspec(firstresult=True)
def jepa_export_checkpoint(model: Any, fmt: str, out: str, which: str) -> list[str] | None:
    """Write the ``which`` encoder of ``model`` (a :class:`jepa.api.Pretrained`) to folder ``out`` in
    format ``fmt`` (e.g. ``"timm"``, ``"hf"``); return the files written, or None if ``fmt`` or this
    model is not yours. First result wins."""
