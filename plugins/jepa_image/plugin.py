"""Entry point of the image plugin: registers its components through the jepa hooks."""

from jepa import hookimpl

from . import interop
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


@hookimpl
def jepa_convert_checkpoint(state, source, options):
    return interop.from_reference(state, source, options) or interop.from_hf(state, source, options)


@hookimpl
def jepa_export_checkpoint(model, fmt, out, which):
    return interop.export(model, fmt, out, which)
