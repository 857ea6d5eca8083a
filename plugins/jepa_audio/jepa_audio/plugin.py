"""Entry point of the audio plugin (``[project.entry-points.jepa] audio = "jepa_audio.plugin"``)."""

from jepa import hookimpl

from .masking import RandomPatchMasker, TFMultiBlockMasker, TimeSpanMasker
from .source import AudioSource
from .tokenizer import SpectrogramTokenizer


@hookimpl
def jepa_register_tokenizers(register):
    register("spectrogram", SpectrogramTokenizer)


@hookimpl
def jepa_register_maskers(register):
    register("tf_multiblock", TFMultiBlockMasker)
    register("random_patch", RandomPatchMasker)
    register("time_span", TimeSpanMasker)


@hookimpl
def jepa_register_sources(register):
    register("audio", AudioSource)


@hookimpl
def jepa_register_commands(app):
    from .stats import app as audio_app  # Typer is only needed once the CLI is built

    app.add_typer(audio_app, name="audio")
