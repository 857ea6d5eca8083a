"""Learning rate, weight decay and EMA momentum as pure functions of the global step.

No generators to replay: resuming at step ``s`` just evaluates the functions at ``s``.
``horizon`` is the length the decays are stretched over (``total_steps * horizon_scale``; the
reference code uses a scale of 1.25, so its schedules stop short of their final values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_cosine(step: int, warmup: int, horizon: float, start: float, peak: float, final: float) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup`` steps, then cosine to ``final`` at ``horizon``."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1.0, horizon - warmup))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_ramp(step: int, horizon: float, start: float, final: float) -> float:
    """Cosine-shaped move from ``start`` to ``final`` over ``horizon`` steps (weight decay 0.04 -> 0.4)."""
    progress = min(1.0, step / max(1.0, horizon))
    return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_ramp(step: int, horizon: float, start: float, final: float) -> float:
    """Linear move from ``start`` to ``final`` over ``horizon`` steps (EMA momentum 0.996 -> 1.0)."""
    progress = min(1.0, step / max(1.0, horizon))
    return start + (final - start) * progress


@dataclass(frozen=True)
class Schedules:
    total_steps: int
    warmup_steps: int
    horizon_scale: float
    lr: tuple[float, float, float]  # start, peak, final
    weight_decay: tuple[float, float]
    momentum: tuple[float, float]

    @property
    def horizon(self) -> float:
        return self.total_steps * self.horizon_scale

    def __call__(self, step: int) -> dict[str, float]:
        return {
            "lr": warmup_cosine(step, self.warmup_steps, self.horizon, *self.lr),
            "wd": cosine_ramp(step, self.horizon, *self.weight_decay),
            "momentum": linear_ramp(step, self.horizon, *self.momentum),
        }


def training_length(recipe, num_samples: int | None) -> int | None:
    """Total optimizer steps: ``train.steps``, or ``train.epochs`` converted with the dataset size
    (None when the length cannot be known without the data)."""
    t = recipe.train
    if t.steps:
        return t.steps
    if t.epochs and num_samples:
        return max(1, math.ceil(t.epochs * num_samples / recipe.data.batch_size))
    return None


def build_schedules(recipe, total_steps: int, steps_per_epoch: int | None) -> Schedules:
    sc, opt, ema = recipe.schedule, recipe.optim, recipe.ema
    if sc.warmup_steps is not None:
        warmup = sc.warmup_steps
    elif sc.warmup_epochs is not None:
        if steps_per_epoch is None:
            raise ValueError("schedule.warmup_epochs needs the dataset size")
        warmup = round(sc.warmup_epochs * steps_per_epoch)
    else:
        warmup = round(0.1 * total_steps)
    return Schedules(total_steps, min(warmup, total_steps), sc.horizon_scale, (opt.start_lr, opt.lr, opt.final_lr),
                     (opt.weight_decay, opt.final_weight_decay), (ema.momentum, ema.final_momentum))
