"""Model code: single-device networks; distribution is applied from outside."""

from .ema import ema_update
from .jepa import JEPA, build_from_recipe, build_jepa, resolve_arch, training_grid
from .loss import regression_loss
from .pos_embed import sincos_pos_embed
from .vit import Encoder, Predictor, set_attention

__all__ = ["JEPA", "Encoder", "Predictor", "build_from_recipe", "build_jepa", "training_grid", "ema_update", "regression_loss", "resolve_arch",
           "set_attention", "sincos_pos_embed"]
