"""Name -> component class, remembering which plugin provided each one.

Names are unique across plugins; a duplicate is an error naming both plugins. A component can
always be addressed unambiguously as ``plugin.name`` (``image.multiblock``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from .components import Component, Masker, Source, Tokenizer
from .errors import PluginError, RecipeError

KINDS: dict[str, type] = {"tokenizer": Tokenizer, "masker": Masker, "source": Source}

# First-party plugins that may not be installed, so an unknown name can say how to get it.
KNOWN_PLUGINS: dict[str, dict] = {
    "image": {"distribution": "jepa-forge", "install": "pip install jepa-forge",
              "components": {"tokenizer": ["patch"], "masker": ["multiblock"], "source": ["image"]}},
    "audio": {"distribution": "jepa-forge-audio", "install": "pip install -e plugins/jepa_audio",
              "components": {"tokenizer": ["spectrogram"], "masker": ["tf_multiblock", "random_patch", "time_span"],
                             "source": ["audio"]}},
}


@dataclass
class Entry:
    kind: str
    name: str
    cls: type
    plugin: str


@dataclass
class Registry:
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})

    def register(self, kind: str, name: str, cls: type, plugin: str) -> None:
        base = KINDS[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"plugin '{plugin}' registered {kind} '{name}' = {cls!r}, which is not a "
                              f"subclass of jepa.{base.__name__}")
        if "." in name or not name:
            raise PluginError(f"plugin '{plugin}' registered {kind} name '{name}': names must be non-empty "
                              "and contain no '.'")
        if not issubclass(cls.Config, Component.Config):
            raise PluginError(f"{kind} '{name}' of plugin '{plugin}': Config must subclass jepa.ComponentConfig")
        table = self.entries[kind]
        if name in table:
            other = table[name].plugin
            raise PluginError(f"{kind} '{name}' is registered by both plugin '{other}' and plugin '{plugin}'; "
                              f"disable one with JEPA_DISABLE_PLUGINS={plugin}")
        table[name] = Entry(kind, name, cls, plugin)

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def by_plugin(self, plugin: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {k: [] for k in KINDS}
        for kind, table in self.entries.items():
            out[kind] = sorted(e.name for e in table.values() if e.plugin == plugin)
        return out

    def get(self, kind: str, name: str, *, field_path: str | None = None) -> Entry:
        """Look up ``name`` (or ``plugin.name``); unknown names raise a RecipeError with suggestions."""
        table = self.entries[kind]
        plugin, _, short = name.rpartition(".")
        entry = table.get(short)
        if entry is not None and (not plugin or entry.plugin == plugin):
            return entry
        raise RecipeError(f"{field_path or kind}: {self._unknown(kind, name)}")

    def _unknown(self, kind: str, name: str) -> str:
        table = self.entries[kind]
        plugin, _, short = name.rpartition(".")
        available = ", ".join(f"{e.name} ({e.plugin})" for e in sorted(table.values(), key=lambda e: e.name))
        msg = f"unknown {kind} '{name}'; available: {available or 'none'}"
        for pname, info in KNOWN_PLUGINS.items():
            if short in info["components"].get(kind, []) and (not plugin or plugin == pname):
                return (f"{kind} '{name}' is provided by the '{pname}' plugin, which is not installed or is "
                        f"disabled; install it with `{info['install']}`")
        close = difflib.get_close_matches(short, list(table), n=1)
        if close:
            msg += f"; did you mean '{close[0]}'?"
        return msg
