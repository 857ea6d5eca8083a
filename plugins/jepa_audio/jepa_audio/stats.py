"""``jepa audio stats DATA``: the log-mel mean and std of a dataset, for ``source.mean`` / ``source.std``.

Statistics are taken over the source's own evaluation view (same rate, mel bins, frame count and
padding as training sees), so the normalisation (x - mean) / (2 std) puts the data near zero mean and
std 0.5, as AudioMAE's fixed AudioSet statistics do for AudioSet.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Annotated

import torch
import typer

from jepa import JepaError, SampleError

app = typer.Typer(no_args_is_help=True, help="Audio plugin tools.")


def dataset_stats(source, spec: str, max_samples: int = 2000) -> dict:
    """Mean and std of the un-normalised log-mel features of up to ``max_samples`` clips of ``spec``."""
    from jepa.data import Reader, build_index

    raw = type(source)(source.cfg.model_copy(update={"mean": 0.0, "std": 0.5}))  # (x - 0) / (2 * 0.5) = x
    index, reader = build_index(spec).spread(max_samples), Reader()
    total, total_sq, count, skipped = 0.0, 0.0, 0, Counter()
    for record in index.records:
        try:
            x = raw.decode(reader.sample(record), random.Random(0), train=False).double()
        except SampleError as e:
            skipped[e.reason] += 1
            continue
        total, total_sq, count = total + x.sum().item(), total_sq + x.square().sum().item(), count + x.numel()
    if not count:
        raise JepaError(f"data: no clip of '{spec}' could be decoded ({dict(skipped)})")
    mean = total / count
    std = max(total_sq / count - mean * mean, 0.0) ** 0.5
    return {"mean": mean, "std": std, "clips": len(index) - sum(skipped.values()), "skipped": dict(skipped)}


def _source(recipe: str | None, overrides: list[str]):
    from jepa.config import load_recipe
    from jepa.plugins import get_plugins

    from .source import AudioSource

    if recipe is None:
        cfg = AudioSource.Config.model_validate(dict(_pair(o) for o in overrides))
        return AudioSource(cfg)
    resolved = load_recipe(recipe, [f"source.{o}" for o in overrides], get_plugins())
    cls, cfg = resolved.component("source")
    if not issubclass(cls, AudioSource):
        raise JepaError(f"source.name: recipe {recipe} uses source '{cls.__name__}', not the audio source")
    return cls(cfg)


def _pair(text: str) -> tuple[str, object]:
    from jepa.config import parse_override

    path, value = parse_override(text)
    return ".".join(path), value


@app.command("stats")
def stats(data: Annotated[str, typer.Argument(help="DATA: shards, a brace pattern, or a folder of clips.")],
          recipe: Annotated[str | None, typer.Option("--recipe", help="Take the source settings from this recipe.")] = None,
          overrides: Annotated[list[str] | None, typer.Option("--set", help="Source setting, e.g. mel_bins=64.")] = None,
          max_samples: Annotated[int, typer.Option("--max-samples", help="Evenly spread subset size.")] = 2000,
          as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False) -> None:
    """Compute the log-mel mean and std of DATA (for `source.mean` and `source.std`)."""
    torch.set_num_threads(1)  # per-clip work is tiny: threads only add overhead
    result = dataset_stats(_source(recipe, overrides or []), data, max_samples)
    if as_json:
        print(json.dumps(result))
        return
    typer.echo(f"# {result['clips']} clips, skipped {result['skipped'] or 'none'}; put in the recipe's [source]:",
               err=True)
    print(f"mean = {result['mean']:.6f}\nstd = {result['std']:.6f}")
