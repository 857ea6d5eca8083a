"""Entry point of the image plugin: registers its components through the jepa hooks."""

from jepa import hookimpl

from .masking import MultiBlockMasker
from .source import ImageSource
from .tokenizer import PatchTokenizer


@hookimpl
def jepa_register_tokenizers(register):
    register("patch", PatchTokenizer)


@hookimpl
def jepa_register_maskers(register):
    register("multiblock", MultiBlockMasker)


@hookimpl
def jepa_register_sources(register):
    register("image", ImageSource)
