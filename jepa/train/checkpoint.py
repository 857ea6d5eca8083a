"""Atomic checkpoints.

Layout of ``RUN/checkpoints/step_000500/``: the three networks as safetensors
(``encoder``, ``predictor``, ``target_encoder``), ``state.pt`` (optimizer, step, data position; loads
with ``torch.load(weights_only=True)``), ``recipe.toml`` and ``meta.json`` (step, recipe hash, versions).
A checkpoint is written under a temporary name, every file fsynced, then renamed into place;
``RUN/checkpoints/latest`` (a small text file naming the newest complete checkpoint) is replaced last.
A crash at any moment leaves the previous checkpoint intact and ``latest`` pointing at it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from ..errors import CheckpointError

NETWORKS = ("encoder", "predictor", "target_encoder")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file + fsync + rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it private; the result gets the usual permissions
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_checkpoint(final: Path, networks: dict[str, torch.nn.Module | dict], state: dict, meta: dict,
                     recipe_toml: str, tmp: Path | None = None) -> Path:
    """Write a checkpoint directory atomically: a temporary sibling, every file fsynced, then renamed.

    ``networks`` maps names to modules or state dicts; they are written one at a time, so converting
    a large imported checkpoint never holds more than one network's serialised copy in memory.
    ``tmp``: a temporary directory from :func:`temporary_checkpoint_dir` that already holds files
    (the ``dcp/`` shards every rank wrote); it is completed and renamed like a fresh one.
    """
    for name, net in networks.items():
        tensors = net.state_dict().values() if isinstance(net, torch.nn.Module) else net.values()
        if not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
            raise CheckpointError(f"refusing to write checkpoint {final.name}: {name} has non-finite weights")
    tmp = tmp or temporary_checkpoint_dir(final)
    try:
        for name, net in networks.items():
            sd = net.state_dict() if isinstance(net, torch.nn.Module) else net
            save_file(_contiguous(sd), str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
        torch.save(state, tmp / "state.pt")
        (tmp / "recipe.toml").write_text(recipe_toml)
        (tmp / "meta.json").write_text(json.dumps({**meta, "networks": sorted(networks)}, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        for f in sorted(tmp.rglob("*")):  # temporary files are private; the checkpoint gets the usual permissions
            if f.is_dir():
                os.chmod(f, 0o777 & ~umask)
                continue
            os.chmod(f, 0o666 & ~umask)
            _fsync_file(f)
        for d in sorted((d for d in tmp.rglob("*") if d.is_dir()), reverse=True):
            _fsync_dir(d)
        os.chmod(tmp, 0o777 & ~umask)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception):  # torch.save reports a full disk as RuntimeError, safetensors as its own
            raise CheckpointError(f"could not write checkpoint {final} ({failure_reason(e)}); "
                                  f"any previous checkpoint is intact") from None
        raise
    return final


def temporary_checkpoint_dir(final: Path) -> Path:
    """A new private temporary sibling of ``final`` (where a checkpoint is written before its rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))


def failure_reason(e: BaseException) -> str:
    """The cause of a failed write in a few words (``File too large``, ``No space left on device``)."""
    failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException: per-rank causes
    if isinstance(failures, dict) and failures:
        rank, (cause, _) = min(failures.items(), key=lambda kv: kv[0])
        return f"rank {rank}: {failure_reason(cause)}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def save_checkpoint(ckpt_root: Path, step: int, networks: dict[str, torch.nn.Module | dict], state: dict, meta: dict,
                    recipe_toml: str, keep_last: int, tmp: Path | None = None) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, prune to ``keep_last``."""
    final = write_checkpoint(ckpt_root / f"step_{step:06d}", networks, state, {**meta, "step": step}, recipe_toml,
                             tmp)
    try:
        write_text_atomic(ckpt_root / "latest", final.name + "\n")
    except OSError as e:  # the new checkpoint is complete; `latest` still names the previous one
        raise CheckpointError(f"could not update {ckpt_root / 'latest'} ({e.strerror or e}); it still names "
                              "the previous checkpoint") from None
    prune(ckpt_root, keep_last)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune(ckpt_root: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(ckpt_root)
    for old in ckpts[:-keep_last]:
        # Renamed first (atomic), then deleted: a kill during the delete must not leave a
        # half-deleted step_* directory that looks like a checkpoint. The next prune removes it.
        trash = old.with_name(f".tmp-{old.name}-deleting")
        try:
            os.replace(old, trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step_*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (-> its latest checkpoint), a checkpoint directory, or an error saying which."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint: no such file or directory: {p}")
    if (p / "meta.json").is_file():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    latest = root / "latest"
    if latest.is_file():
        target = root / latest.read_text().strip()
        if (target / "meta.json").is_file():
            return target
        raise CheckpointError(f"checkpoint: {latest} names '{target.name}', which is missing or incomplete")
    ckpts = [c for c in list_checkpoints(root) if (c / "meta.json").is_file()]
    if ckpts:
        return ckpts[-1]
    raise CheckpointError(f"checkpoint: no checkpoint found in {p} (expected a run directory, a checkpoint "
                          "directory with meta.json, or an imported checkpoint)")


def present_networks(ckpt: Path) -> list[str]:
    """Which of the three networks a checkpoint holds (an imported encoder-only port holds one)."""
    return [n for n in NETWORKS if (ckpt / f"{n}.safetensors").is_file()]


def load_networks(ckpt: Path, networks: dict[str, torch.nn.Module], strict: bool = True) -> None:
    """Load the safetensors weights of ``networks`` from ``ckpt``; a missing file or a mismatch is an error."""
    for name, net in networks.items():
        f = ckpt / f"{name}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"checkpoint: {ckpt} has no {name} weights ({f.name} missing)")
        try:
            state = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint: {f} is unreadable or truncated: {e}") from None
        own = net.state_dict()
        if ("pos_embed_learned" in state) != ("pos_embed_learned" in own):
            has = "learned" if "pos_embed_learned" in state else "sin-cos"
            raise CheckpointError(f"checkpoint: {name} has {has} position embeddings and this model does not; set "
                                  f"model.pos_embed = \"{'learned' if has == 'learned' else 'sincos'}\" in the recipe")
        for key, value in state.items():
            if key in own and own[key].shape != value.shape:
                raise CheckpointError(f"checkpoint: {name} does not match this model: {key} has shape "
                                      f"{list(value.shape)} in the checkpoint, {list(own[key].shape)} here")
        try:
            if any(isinstance(p, DTensor) for p in net.parameters()):  # FSDP2 shards: each rank takes its part
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(net, state, options=StateDictOptions(full_state_dict=True, strict=strict))
            else:
                net.load_state_dict(state, strict=strict)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
            raise CheckpointError(f"checkpoint: {f.name} does not match this model: {detail}") from None


def load_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here must be reported, never a silent restart
        raise CheckpointError(f"checkpoint: cannot load {ckpt / 'state.pt'}: {type(e).__name__}: {e}") from None
