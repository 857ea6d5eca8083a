"""Training: trainer, optimizer groups, schedules, checkpoints, metrics."""

from .trainer import Trainer

__all__ = ["Trainer"]
