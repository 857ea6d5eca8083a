"""The audio modality for jepa: Kaldi log-mel source, spectrogram patch tokenizer, spectrogram maskers.

Its own distribution (``jepa-forge-audio``), registered through the ``jepa`` entry-point group exactly
like a third-party plugin; the core never imports it.
"""

__version__ = "0.1.0"
