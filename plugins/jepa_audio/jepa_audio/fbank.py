"""Waveform decoding and the Kaldi log-mel filterbank (the audio SSL literature's front end).

Decoding uses soundfile: torchaudio 2.11 can only decode through torchcodec + FFmpeg. Every way a
stored clip can be unusable becomes a :class:`jepa.SampleError` with a stable reason, so the data
pipeline skips and counts it instead of crashing mid-run.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import torch
import torchaudio

from jepa import SampleError


def read_waveform(data: bytes) -> tuple[torch.Tensor, int]:
    """Decode WAV/FLAC/OGG bytes to a mono float32 waveform ``[T]`` and its sample rate.

    Multi-channel audio is mixed down by averaging the channels.
    """
    if not data:
        raise SampleError("empty", "zero-byte audio file")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise SampleError("corrupt", f"cannot decode audio: {e}") from None
    if samples.shape[0] == 0:
        raise SampleError("empty", "audio file holds no samples")
    if not np.isfinite(samples).all():
        raise SampleError("corrupt", "audio holds NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1))), int(rate)


def to_rate(wav: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """Resample ``wav`` from ``rate`` to ``target`` Hz (band-limited sinc, torchaudio)."""
    if rate == target:
        return wav
    return torchaudio.functional.resample(wav, orig_freq=rate, new_freq=target)


def window_samples(sample_rate: int, ms: float) -> int:
    return int(round(sample_rate * ms / 1000.0))


def samples_for_frames(frames: int, sample_rate: int, length_ms: float, shift_ms: float) -> int:
    """Waveform length that gives exactly ``frames`` Kaldi frames (``snip_edges=True``)."""
    return window_samples(sample_rate, length_ms) + (frames - 1) * window_samples(sample_rate, shift_ms)


def log_mel(wav: torch.Tensor, sample_rate: int, mel_bins: int, length_ms: float, shift_ms: float) -> torch.Tensor:
    """Kaldi-compatible log-mel filterbank ``[frames, mel_bins]`` of a mono waveform ``[T]``.

    Settings of AudioMAE / A-JEPA: Hanning window, HTK-compatible layout, no energy, no dither
    (dither would make the features random), waveform mean removed.
    """
    wav = wav - wav.mean()
    return torchaudio.compliance.kaldi.fbank(
        wav[None], htk_compat=True, sample_frequency=float(sample_rate), use_energy=False, window_type="hanning",
        num_mel_bins=mel_bins, dither=0.0, frame_length=length_ms, frame_shift=shift_ms)
