"""Plugin manager: discovers plugins through the ``jepa`` entry-point group.

Built-in plugins are ordinary plugins: the image plugin is found through the same entry-point
table a third-party distribution uses. Two environment variables select plugins:

* ``JEPA_PLUGINS=a,b``: load only these (an allow-list);
* ``JEPA_DISABLE_PLUGINS=c``: never load these (a block-list; wins over the allow-list).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType

import pluggy

from . import hookspecs
from .errors import PluginError
from .registry import KINDS, Registry

GROUP = "jepa"
CORE_DISTRIBUTION = "jepa-forge"


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    builtin: bool
    module: str
    hooks: list[str] = field(default_factory=list)


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    return pm


def register_plugin(pm: pluggy.PluginManager, module: ModuleType | object, name: str,
                    infos: dict[str, PluginInfo], distribution: str = "", version: str = "") -> None:
    """Register one plugin object and validate its hook implementations up front."""
    pm.register(module, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        pm.unregister(name=name)
        raise PluginError(f"plugin '{name}' is invalid: {e}") from None
    hooks = sorted(h.name for h in pm.get_hookcallers(module) or [])
    infos[name] = PluginInfo(name, distribution or "-", version or "-",
                             distribution == CORE_DISTRIBUTION, getattr(module, "__name__", repr(module)), hooks)


def load_entry_points(pm: pluggy.PluginManager) -> dict[str, PluginInfo]:
    """Load every plugin of the ``jepa`` entry-point group that the allow/block lists admit."""
    allow, block = _env_list("JEPA_PLUGINS"), _env_list("JEPA_DISABLE_PLUGINS") or set()
    infos: dict[str, PluginInfo] = {}
    for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
        if ep.name in block or (allow is not None and ep.name not in allow) or ep.name in infos:
            continue
        dist = ep.dist.metadata["Name"] if ep.dist else ""
        version = ep.dist.version if ep.dist else ""
        try:
            module = ep.load()
        except Exception as e:  # a broken third-party plugin must name itself
            raise PluginError(f"plugin '{ep.name}' (from {dist or 'unknown distribution'}) failed to load: "
                              f"{type(e).__name__}: {e}; disable it with JEPA_DISABLE_PLUGINS={ep.name}") from None
        register_plugin(pm, module, ep.name, infos, dist, version)
    return infos


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every ``jepa_register_*`` hook once, attributing each registration to its plugin."""
    registry = Registry()
    for kind in KINDS:
        caller = getattr(pm.hook, f"jepa_register_{kind}s")
        for impl in caller.get_hookimpls():
            impl.function(register=functools.partial(registry.register, kind, plugin=impl.plugin_name))
    return registry


@dataclass
class Plugins:
    """The loaded plugin manager, what each plugin is, and the registry of components."""

    pm: pluggy.PluginManager
    infos: dict[str, PluginInfo]
    registry: Registry

    def listing(self) -> list[dict]:
        """``jepa plugins list --json``: one dict per plugin (the CLI contract)."""
        return [
            {"name": i.name, "distribution": i.distribution, "version": i.version, "builtin": i.builtin,
             "hooks": i.hooks, "components": self.registry.by_plugin(i.name)}
            for i in self.infos.values()
        ]

    def versions(self) -> dict[str, str]:
        return {i.name: i.version for i in self.infos.values()}


@functools.lru_cache(maxsize=1)
def _default() -> Plugins:
    pm = new_manager()
    infos = load_entry_points(pm)
    return Plugins(pm, infos, build_registry(pm))


def get_plugins(refresh: bool = False) -> Plugins:
    """The process-wide plugins, loaded lazily on first use (nothing happens at import time)."""
    if refresh:
        _default.cache_clear()
    return _default()


def from_modules(*modules: tuple[str, object]) -> Plugins:
    """A fresh, isolated plugin set from ``(name, module)`` pairs (tests, notebooks)."""
    pm = new_manager()
    infos: dict[str, PluginInfo] = {}
    for name, module in modules:
        register_plugin(pm, module, name, infos)
    return Plugins(pm, infos, build_registry(pm))
