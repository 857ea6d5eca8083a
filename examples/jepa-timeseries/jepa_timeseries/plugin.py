"""The module named in the entry point: each hook hands the plugin a ``register`` callback."""

from jepa import hookimpl

from .masking import SpanMasker
from .source import NpySource
from .tokenizer import SignalTokenizer


@hookimpl
def jepa_register_tokenizers(register):
    register("signal", SignalTokenizer)


@hookimpl
def jepa_register_maskers(register):
    register("span", SpanMasker)


@hookimpl
def jepa_register_sources(register):
    register("npy", NpySource)
