"""``jepa viz masks|features|curves``: PNG pictures of masks, features and training curves (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

app = typer.Typer(no_args_is_help=True, help="Pictures (PNG): masks over samples, PCA of features, training curves.")

Out = Annotated[Path, typer.Option("--out", help="PNG file to write.")]
Samples = Annotated[int, typer.Option("--samples", min=1, max=64, help="How many samples to show.")]


@app.command("masks")
def masks(
    recipe: Annotated[str, typer.Argument(help="Recipe path or installed recipe name.")],
    out: Out,
    data: Annotated[str | None, typer.Option("--data", help="DATA to draw samples from (default: the recipe's data.train; none: blank samples).")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a.b=value (TOML literal).")] = None,
    samples: Samples = 8,
    draws: Annotated[int, typer.Option("--draws", min=1, help="Masks drawn for the frequency heat-maps.")] = 1000,
) -> None:
    """Context and target blocks over training samples, plus per-token context / target frequencies."""
    from ..config import load_recipe
    from ..viz import draw_masks

    resolved = load_recipe(recipe, list(overrides or []))
    path = draw_masks(resolved, data or resolved.recipe.data.train, out, samples, draws)
    print(path)


@app.command("features")
def features(
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Run directory or checkpoint directory.")],
    data: Annotated[str, typer.Option("--data", help="DATA to encode.")],
    out: Out,
    samples: Samples = 8,
    which: Annotated[Literal["target", "context"], typer.Option("--which", help="Encoder.")] = "target",
) -> None:
    """PCA of patch features (top three components as RGB) beside each sample."""
    from ..viz import draw_features

    print(draw_features(checkpoint, data, out, samples, which))


@app.command("curves")
def curves(
    run: Annotated[str, typer.Argument(help="Run directory (or its metrics.jsonl).")],
    out: Out,
) -> None:
    """Loss, learning rate, EMA momentum, feature std and effective rank against the step."""
    from ..viz import draw_curves

    print(draw_curves(run, out))
