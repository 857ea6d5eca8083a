"""Pictures of a run (``jepa viz``): masks over real samples, PCA of patch features, training curves.

Modality-agnostic: the token grid comes from the tokenizer and samples are drawn by the source's
:meth:`jepa.Source.render`, so an audio plugin's spectrograms are shown the same way as images.
matplotlib is optional; every entry point says so in one line when it is missing.
"""

from .curves import draw_curves
from .features import draw_features
from .masks import draw_masks

__all__ = ["draw_curves", "draw_features", "draw_masks"]
