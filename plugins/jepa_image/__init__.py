"""The built-in image modality: ViT patch tokenizer, I-JEPA multi-block masker, image source.

Registered through the ``jepa`` entry-point group, exactly like a third-party plugin.
"""

__version__ = "0.1.0"
