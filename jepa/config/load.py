"""Loading a recipe: TOML -> overrides -> ${VAR} expansion -> pass one (core) -> pass two (components).

Every problem becomes one ``section.field: message`` line, with a did-you-mean where it helps.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from ..components import ComponentConfig
from ..errors import RecipeError
from ..registry import KNOWN_PLUGINS, Entry
from .schema import COMPONENT_SECTIONS, Recipe

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# --------------------------------------------------------------------------- locating recipes
def recipes_dir() -> Path:
    """The folder of recipes installed with the package (``recipes/`` in a checkout)."""
    return Path(str(resources.files("jepa_recipes")))


def list_recipes() -> list[Path]:
    return sorted(recipes_dir().glob("*.toml"))


def find_recipe(spec: str | os.PathLike) -> Path:
    """A recipe path, or the name of an installed recipe (``image_vith14`` or ``image_vith14.toml``)."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name if path.suffix == ".toml" else f"{path.name}.toml"
    if path.parent == Path(".") and (recipes_dir() / name).is_file():
        return recipes_dir() / name
    names = [p.stem for p in list_recipes()]
    close = difflib.get_close_matches(path.stem, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; installed recipes: {', '.join(names)}"
    raise RecipeError(f"recipe: no such file or installed recipe '{spec}'{hint}")


# --------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=v`` -> (["a", "b"], v) with ``v`` parsed as a TOML literal (bare words stay strings)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise RecipeError(f"--set {text}: expected section.field=value, e.g. --set optim.lr=1e-3")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.split("."), parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {text}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def expand_vars(value: Any) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string; unset variables stay as written.

    A variable at the start of a value holding a relative path is made absolute against the current
    directory (where the user set it); a default written in the recipe stays relative to the recipe.
    """
    if isinstance(value, dict):
        return {k: expand_vars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_vars(v) for v in value]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            env = os.environ.get(m.group(1))
            if m.group(2) is not None and not env:  # like the shell: default when unset or empty
                return m.group(2)
            if env is None:
                return m.group(0)
            # A relative path in a variable means relative to where the user is, not to the recipe.
            if m.start() == 0 and env and not env.startswith(("/", "~", "pipe:")) and "://" not in env:
                return os.path.abspath(env)
            return env
        return _VAR.sub(sub, value)
    return value


def unexpanded_var(value: str) -> str | None:
    m = _VAR.search(value)
    return m.group(1) if m else None


def resolve_data_spec(spec: str, base: Path) -> str:
    """Resolve each ``::``-joined part of a DATA spec against ``base`` unless absolute or a URL."""
    parts = []
    for part in spec.split("::"):
        if "://" in part or part.startswith("pipe:") or Path(part).is_absolute() or _VAR.search(part):
            parts.append(part)
        else:
            parts.append(str((base / part).resolve()) if not part.startswith("~") else str(Path(part).expanduser()))
    return "::".join(parts)


# --------------------------------------------------------------------------- error rendering
def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            sub = _submodel(arg)
            if sub is not None:
                return sub
    return None


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        sub = _submodel(field.annotation) if field else None
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _section_holding(model: type[BaseModel], field: str) -> str | None:
    """The one top-level section of ``model`` that has ``field`` (``schedule.momentum`` -> ``ema``), if any."""
    holders = [name for name in model.model_fields if field in _fields_at(model, (name,))]
    return holders[0] if len(holders) == 1 else None


def render_errors(err: ValidationError, model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[str]:
    """One ``section.field: message`` line per pydantic error, with a did-you-mean where possible."""
    lines: list[str] = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in prefix + loc) or "recipe"
        kind = e["type"]
        if kind == "extra_forbidden":
            fields = [f for f in _fields_at(model, loc[:-1]) if f != "name" or prefix]
            close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.5)
            elsewhere = _section_holding(model, str(loc[-1])) if len(loc) == 2 and not close else None
            msg = f"unknown field; did you mean '{close[0]}'?" if close else \
                f"unknown field; did you mean '{elsewhere}.{loc[-1]}'?" if elsewhere else \
                f"unknown field; valid fields: {', '.join(fields) or 'none'}"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "literal_error":
            expected = re.findall(r"'([^']*)'", e["ctx"].get("expected", ""))
            close = difflib.get_close_matches(str(e["input"]), expected, n=1)
            msg = f"{e['msg']} (got {e['input']!r})" + (f"; did you mean '{close[0]}'?" if close else "")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if not isinstance(e.get("input"), (dict, list)) and kind not in ("value_error", "assertion_error"):
                msg += f" (got {e['input']!r})"
        line = f"{where}: {msg}"
        if line not in lines:
            lines.append(line)
    return lines


# --------------------------------------------------------------------------- the resolved recipe
@dataclass
class Resolved:
    """A validated recipe: the core sections plus each component's class and validated config."""

    recipe: Recipe
    components: dict[str, tuple[Entry, ComponentConfig]]
    path: Path | None = None

    def component(self, kind: str) -> tuple[type, ComponentConfig]:
        entry, cfg = self.components[kind]
        return entry.cls, cfg

    def to_dict(self) -> dict:
        """Every setting, defaults filled in, unset optional values omitted (TOML has no null)."""
        out = self.recipe.model_dump(mode="json", exclude_none=True)
        for kind, (entry, cfg) in self.components.items():
            out[kind] = {"name": f"{entry.plugin}.{entry.name}", **cfg.model_dump(mode="json", exclude_none=True)}
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


PATH_FIELDS = (("data", "train"), ("model", "init"), ("monitor", "train"), ("monitor", "test"))


def resolve_paths(data: dict, base: Path) -> dict:
    """Resolve the recipe's path fields (``data.train``, ``model.init``) against ``base``."""
    data = copy.deepcopy(data)
    for section, key in PATH_FIELDS:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and value:
            data[section][key] = resolve_data_spec(value, base)
    return data


def missing_plugins(recipe: Recipe, registry, plugin_names: set[str]) -> list[str]:
    """One line per known plugin that is absent but provides components the recipe names.

    A recipe without ``requires`` that uses a missing modality (tokenizer, masker and source) would
    otherwise get three "unknown component" lines for one cause.
    """
    needed: dict[str, list[str]] = {}
    for kind in COMPONENT_SECTIONS:
        name = getattr(recipe, kind).name
        owner, _, short = name.rpartition(".")
        if short in registry.entries[kind]:
            continue
        for plugin, info in KNOWN_PLUGINS.items():
            if plugin not in plugin_names and short in info["components"].get(kind, []) and owner in ("", plugin):
                needed.setdefault(plugin, []).append(f"{kind} '{name}'")
    lines = []
    for plugin, uses in needed.items():
        verb = "are" if len(uses) > 1 else "is"
        lines.append(f"{uses[0].split()[0]}.name: {' and '.join(uses)} {verb} provided by the '{plugin}' plugin, which "
                     f"is not installed or is disabled; install it with `{KNOWN_PLUGINS[plugin]['install']}`")
    return lines


def validate(data: dict, registry, plugin_names: set[str], path: Path | None = None) -> Resolved:
    """Validate a recipe dict (variables already expanded) in two passes. Raises RecipeError listing
    every problem."""
    # Pass one: core sections, components only by name.
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(render_errors(e, Recipe)) from None
    problems = []
    for plugin in recipe.requires:
        if plugin not in plugin_names:
            hint = KNOWN_PLUGINS.get(plugin, {}).get("install", f"install the distribution that provides '{plugin}'")
            problems.append(f"requires: plugin '{plugin}' is not installed or is disabled; install it with `{hint}`")
    if not problems:
        problems = missing_plugins(recipe, registry, plugin_names)
    if problems:
        raise RecipeError(problems)
    # Pass two: each component's own Config gets only its own section.
    components: dict[str, tuple[Entry, ComponentConfig]] = {}
    for kind in COMPONENT_SECTIONS:
        section = getattr(recipe, kind)
        try:
            entry = registry.get(kind, section.name, field_path=f"{kind}.name")
        except RecipeError as e:
            problems.extend(e.problems)
            continue
        try:
            components[kind] = (entry, entry.cls.Config.model_validate(section.model_extra or {}))
        except ValidationError as e:
            problems.extend(render_errors(e, entry.cls.Config, (kind,)))
    if problems:
        raise RecipeError(problems)
    return Resolved(recipe, components, path)


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(spec: str | os.PathLike | dict, overrides: list[str] | None = None, plugins=None,
                extra: dict | None = None) -> Resolved:
    """Load, override and validate a recipe given as a path, an installed name, or a dict.

    ``extra`` merges section dicts (``{"train": {"steps": 10}}``) before the ``--set`` overrides.
    Relative paths written in a recipe file resolve against the file's folder; relative paths given
    as overrides (or in a dict recipe) resolve against the current directory.
    """
    from ..plugins import get_plugins

    plugins = plugins or get_plugins()
    if isinstance(spec, dict):
        data, path = resolve_paths(expand_vars(spec), Path.cwd()), None
    else:
        path = find_recipe(spec)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path.name}: not valid TOML: {e}") from None
        data = resolve_paths(expand_vars(data), path.resolve().parent)
    changes = apply_overrides(copy.deepcopy(extra or {}), overrides or [])
    data = deep_merge(data, resolve_paths(expand_vars(changes), Path.cwd()))
    return validate(data, plugins.registry, set(plugins.infos), path)
