"""Audio source: stored clip -> normalised Kaldi log-mel spectrogram ``[1, frames, mel_bins]``.

The filterbank runs here, in the DataLoader workers, rather than in the tokenizer: Kaldi ``fbank`` works
on one waveform at a time (no batching, so it would serialise the training step on the accelerator),
the token grid must be known before the model runs (the masker needs it in the worker), and probes and
``jepa embed`` reuse this very evaluation view. The tokenizer then only patches a fixed-size image.

Train view: a random window of the clip (or the clip at a random offset, padded with silence);
eval view: the centre. Randomness comes only from the per-sample ``rng``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from jepa import ComponentConfig, SampleError, Source

from .fbank import log_mel, read_waveform, samples_for_frames, to_rate

AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974


class AudioSourceConfig(ComponentConfig):
    sample_rate: int = Field(16000, gt=0, description="Clips are resampled to this rate (Hz) before the filterbank.")
    num_frames: int = Field(1024, gt=0, description="Spectrogram length in 10 ms frames (clips are cropped or padded).")
    mel_bins: int = Field(128, gt=0, description="Mel filterbank channels (use ~64 at 8 kHz: 128 leave empty bins).")
    frame_length_ms: float = Field(25.0, gt=0, description="Analysis window length (ms).")
    frame_shift_ms: float = Field(10.0, gt=0, description="Hop between frames (ms).")
    mean: float = Field(AUDIOSET_MEAN, description="Dataset log-mel mean (`jepa audio stats DATA` computes it).")
    std: float = Field(AUDIOSET_STD, gt=0, description="Dataset log-mel std; features are (x - mean) / (2 std).")
    min_duration: float = Field(0.0, ge=0, description="Clips shorter than this (seconds, after resampling) are "
                                "skipped and counted as `too_short`; longer short clips are padded with silence.")


def place(length: int, window: int, rng: random.Random | None) -> int:
    """Offset of a ``window`` inside ``length`` samples (or of the clip inside the window when it is
    shorter): uniform from ``rng`` at train time, centred when ``rng`` is None."""
    slack = abs(length - window)
    return rng.randint(0, slack) if rng is not None else slack // 2


class AudioSource(Source):
    Config = AudioSourceConfig
    summary = "Audio (wav, flac, ogg) via soundfile: mono, resampled, cropped/padded, Kaldi log-mel [1, T, F]"
    extensions = ("wav", "flac", "ogg")

    def sample_shape(self) -> tuple[int, int, int]:
        return (1, self.cfg.num_frames, self.cfg.mel_bins)

    def resized(self, size: Any) -> AudioSource:
        """The same source with another spectrogram length (``size``: frames, or [frames, mel_bins])."""
        frames, *mel = [size] if isinstance(size, int) else list(size)
        update = {"num_frames": int(frames), **({"mel_bins": int(mel[0])} if mel else {})}
        return AudioSource(self.cfg.model_copy(update=update))

    def decode(self, sample: dict[str, Any], rng: random.Random, train: bool) -> torch.Tensor:
        ext = next((e for e in self.extensions if e in sample), None)
        if ext is None:
            raise SampleError("no_audio", f"no audio member among {sorted(sample)}")
        wav, rate = read_waveform(sample[ext])
        return self.spectrogram(to_rate(wav, rate, self.cfg.sample_rate), rng if train else None)

    def spectrogram(self, wav: torch.Tensor, rng: random.Random | None) -> torch.Tensor:
        """Crop or pad a waveform at the recipe rate to ``num_frames`` frames; normalised log-mel."""
        cfg = self.cfg
        if wav.shape[0] < cfg.min_duration * cfg.sample_rate:
            raise SampleError("too_short", f"{wav.shape[0] / cfg.sample_rate:.3f} s < min_duration {cfg.min_duration:g} s")
        window = samples_for_frames(cfg.num_frames, cfg.sample_rate, cfg.frame_length_ms, cfg.frame_shift_ms)
        offset = place(wav.shape[0], window, rng)
        if wav.shape[0] >= window:
            wav = wav[offset:offset + window]
        else:  # silence around the clip: a short clip looks like a recording with pauses
            wav = torch.nn.functional.pad(wav, (offset, window - wav.shape[0] - offset))
        mel = log_mel(wav, cfg.sample_rate, cfg.mel_bins, cfg.frame_length_ms, cfg.frame_shift_ms)
        return ((mel - cfg.mean) / (2.0 * cfg.std))[None]

    def preprocess(self, raw: Any) -> torch.Tensor:
        """Eval view of a path, encoded bytes, or a waveform (array/tensor at ``sample_rate``, or (array, rate))."""
        if isinstance(raw, (str, Path)):
            raw = Path(raw).read_bytes()
        if isinstance(raw, (bytes, bytearray)):
            wav, rate = read_waveform(bytes(raw))
        elif isinstance(raw, tuple):
            wav, rate = torch.as_tensor(np.asarray(raw[0]), dtype=torch.float32), int(raw[1])
        else:
            wav, rate = torch.as_tensor(np.asarray(raw), dtype=torch.float32), self.cfg.sample_rate
        if wav.ndim == 2:  # [channels, T] -> mono
            wav = wav.mean(dim=0)
        return self.spectrogram(to_rate(wav, rate, self.cfg.sample_rate), None)
