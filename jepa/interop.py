"""Foreign checkpoints in, portable weights out.

Import reads a file or folder *safely* (``torch.load(weights_only=True, mmap=True)``: a pickle that
needs code to run is refused, never executed; tensors stay on disk until used) and asks the plugins
(``jepa_convert_checkpoint``, first result wins) to turn it into a :class:`Converted`: a recipe that
describes the networks plus their state dicts. The result is written as one of our checkpoint
directories, one network at a time.

Export writes the target (or context) encoder as plain ``safetensors`` with a JSON sidecar (here), or
in a plugin's formats (``jepa_export_checkpoint``: the image plugin writes timm and Hugging Face).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, JepaError
from .train.checkpoint import NETWORKS, write_checkpoint


@dataclass
class Converted:
    """A foreign checkpoint in our terms.

    Attributes:
        recipe: a recipe dict describing the networks (model, tokenizer, masker, source sections).
        networks: state dicts by network name (``encoder``, ``predictor``, ``target_encoder``); a port
            that kept only one encoder has only that one.
        source_format: a short name of what was read (``"ijepa-reference"``, ``"hf-ijepa"``).
        info: anything worth recording in ``meta.json`` (epoch, original keys dropped, ...).
        extra_state: kept verbatim in ``state.pt`` (e.g. the original optimizer state, on request).
    """

    recipe: dict
    networks: dict[str, dict[str, torch.Tensor]]
    source_format: str
    info: dict = field(default_factory=dict)
    extra_state: dict = field(default_factory=dict)


def read_foreign(path: str | Path) -> Any:
    """Load a foreign checkpoint without executing code. One-line errors for every failure."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"import: no such file or directory: {p}")
    if p.is_dir():
        cfg, weights = p / "config.json", p / "model.safetensors"
        if not (cfg.is_file() and weights.is_file()):
            found = ", ".join(sorted(x.name for x in p.iterdir())[:10]) or "nothing"
            raise CheckpointError(f"import: {p} is a folder but not a model folder (expected config.json and "
                                  f"model.safetensors; found {found})")
        try:
            return {"config": json.loads(cfg.read_text()), "weights": load_file(str(weights))}
        except (ValueError, SafetensorError, OSError) as e:
            raise CheckpointError(f"import: {p} is unreadable or truncated: {e}") from None
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"import: {p} is unreadable or truncated: {e}") from None
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise CheckpointError(f"import: refused {p}: it needs code to run when unpickled, which is never done "
                                  "(only tensors and plain containers are loaded)") from None
        raise CheckpointError(f"import: {p} is not a readable checkpoint: {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"import: {p} is truncated or corrupt: {first}") from None


def describe(state: Any) -> str:
    """What a loaded object holds, for an error message."""
    if isinstance(state, dict):
        keys = sorted(map(str, state))
        more = f" and {len(keys) - 12} more" if len(keys) > 12 else ""
        return f"top-level keys {', '.join(keys[:12])}{more}"
    return f"a {type(state).__name__}"


def import_checkpoint(path: str | Path, out: str | Path, keep_optimizer: bool = False, num_heads: int | None = None,
                      plugins=None) -> dict:
    """Convert a foreign checkpoint into one of our checkpoint directories at ``out``."""
    from . import __version__
    from .config.load import load_recipe
    from .plugins import get_plugins

    plugins = plugins or get_plugins()
    out = Path(out)
    _check_out(out, "import")
    state = read_foreign(path)
    options = {"num_heads": num_heads} if num_heads else {}
    try:
        converted = plugins.pm.hook.jepa_convert_checkpoint(state=state, source=str(path), options=options)
    except (KeyError, IndexError, TypeError, AttributeError) as e:  # a known format with parts missing
        raise CheckpointError(f"import: {path} is malformed ({type(e).__name__}: {e}); found {describe(state)}") from None
    if converted is None:
        raise CheckpointError(f"import: no installed plugin recognises {path}: found {describe(state)} (expected a "
                              "reference I-JEPA checkpoint with encoder/predictor/target_encoder, or a Hugging Face "
                              "I-JEPA folder)")
    resolved = load_recipe(converted.recipe, plugins=plugins)
    verify(resolved, converted.networks)
    meta = {"imported_from": str(Path(path).resolve()), "format": converted.source_format, "step": 0,
            "versions": {"jepa": __version__, **plugins.versions()}, **converted.info}
    extra = converted.extra_state if keep_optimizer else {}
    write_checkpoint(out, converted.networks, {"step": 0, "imported": True, **extra}, meta, resolved.to_toml())
    return {"checkpoint": str(out), "format": converted.source_format, "networks": sorted(converted.networks),
            "recipe": resolved.to_dict()["model"], **converted.info}


def _check_out(out: Path, verb: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JepaError(f"{verb}: {out} already exists and is not an empty folder; choose another --out")


def verify(resolved, networks: dict[str, dict]) -> None:
    """Build the model the recipe describes (on the meta device: nothing allocated) and check that every
    converted state dict fits it exactly, so an import never writes a checkpoint that cannot load."""
    from .model import build_from_recipe

    try:
        model = build_from_recipe(resolved, device="meta")
    except (AssertionError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"import: the converted architecture cannot be built: {e}") from None
    for name, state in networks.items():
        own = getattr(model, name).state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
        if missing or extra or bad:
            detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else
                      f"{bad[0]} has shape {list(state[bad[0]].shape)}, the model {list(own[bad[0]].shape)}")
            raise CheckpointError(f"import: the converted {name} does not fit its architecture: {detail}")


def export_checkpoint(ckpt: str | Path, fmt: str, out: str | Path, which: str = "target", plugins=None) -> list[str]:
    """Export the ``which`` encoder of a checkpoint to ``out`` as ``safetensors`` or a plugin format."""
    from .api import load
    from .plugins import get_plugins

    plugins = plugins or get_plugins()
    model = load(ckpt)
    model.network(which)  # clear error if the checkpoint lacks it
    out = Path(out)
    _check_out(out, "export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:  # written to a temporary folder, renamed when complete: a failed export leaves nothing behind
        if fmt == "safetensors":
            written = export_safetensors(model, tmp, which)
        else:
            written = plugins.pm.hook.jepa_export_checkpoint(model=model, fmt=fmt, out=str(tmp), which=which)
        if written is None:
            raise JepaError(f"export: no installed plugin writes format '{fmt}' for this model (formats: "
                            "safetensors, and timm / hf for image models)")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [str(out / Path(f).name) for f in written]


def export_safetensors(model, out: Path, which: str) -> list[str]:
    """Plain tensors of one encoder (our names, plus ``pos_embed`` for the training grid) and a JSON sidecar
    with everything needed to rebuild it."""
    from . import __version__

    net = model.network(which)
    state = model.encoder_state(which)
    if "pos_embed_learned" in net.state_dict():  # keep the learned table itself too
        state["pos_embed_learned"] = net.pos_embed_learned.detach().contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "network": which})
    d = model.resolved.to_dict()
    sidecar = {"jepa_version": __version__, "network": which, "grid": list(model.grid),
               "embed_dim": net.embed_dim, "model": d["model"], "tokenizer": d["tokenizer"], "source": d["source"],
               "note": "pos_embed is the fixed sin-cos table of the training grid (not a trained weight) unless "
                       "model.pos_embed is 'learned'"}
    (out / "config.json").write_text(json.dumps(sidecar, indent=2))
    return [str(out / "model.safetensors"), str(out / "config.json")]


__all__ = ["NETWORKS", "Converted", "describe", "export_checkpoint", "import_checkpoint", "read_foreign"]
