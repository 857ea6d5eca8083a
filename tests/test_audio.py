"""The audio plugin: decoding and bad input, the spectrogram grid, masker feasibility checks, and a tiny
pretraining run whose checkpoint the unchanged `jepa eval probe|knn` and `jepa embed` evaluate."""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pytest
import soundfile as sf
import tomli_w
import torch
from jepa_audio.masking import RandomPatchMasker, TFMultiBlockMasker, TimeSpanMasker
from jepa_audio.source import AudioSource
from jepa_audio.tokenizer import SpectrogramTokenizer

from jepa import MaskConfigError, SampleError
from jepa.api import run_pretrain
from jepa.plugins import get_plugins

from .conftest import write_shard

RATE = 8000
SMALL = {"sample_rate": RATE, "num_frames": 32, "mel_bins": 16, "mean": -8.0, "std": 4.0}


def tone(freq: float, seconds: float = 0.3, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(samples: np.ndarray, rate: int = RATE, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def source(**cfg) -> AudioSource:
    return AudioSource(AudioSource.Config(**{**SMALL, **cfg}))


def eval_view(src: AudioSource, data: bytes) -> torch.Tensor:
    return src.decode({"wav": data}, random.Random(0), train=False)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (encode(np.zeros(0, dtype=np.float32)), "empty"),          # a valid header with no samples
    (b"RIFF\x10\x00\x00\x00WAVEfmt garbage" * 3, "corrupt"),
    (encode(tone(300))[:30], "corrupt"),                        # truncated inside the header
])
def test_unusable_clips_raise_sample_error(data, reason):
    with pytest.raises(SampleError) as e:
        eval_view(source(), data)
    assert e.value.reason == reason


def test_wrong_sample_rate_is_resampled():
    """A 1 kHz tone recorded at 16 kHz lands in the same mel bins as the same tone at 8 kHz."""
    native, wrong = eval_view(source(), encode(tone(1000))), eval_view(source(), encode(tone(1000, rate=16000), 16000))
    assert native.shape == wrong.shape == (1, 32, 16)
    peak_native, peak_wrong = native[0, 12:20].mean(0), wrong[0, 12:20].mean(0)
    assert peak_native.argmax() == peak_wrong.argmax()
    assert abs(peak_native.max() - peak_wrong.max()) < 0.1


def test_stereo_is_mixed_down():
    left, right = tone(500), tone(1500)
    stereo = eval_view(source(), encode(np.stack([left, right], axis=1), subtype="FLOAT"))
    mono = eval_view(source(), encode((left + right) / 2, subtype="FLOAT"))
    assert torch.allclose(stereo, mono, atol=1e-4)


def test_clip_shorter_than_one_patch_is_padded_and_centred():
    src = source()
    short = encode(tone(700, seconds=0.04))  # 4 frames; one 8-frame patch needs 0.095 s
    x = eval_view(src, short)
    assert x.shape == (1, 32, 16)
    energy = x[0].mean(dim=1)
    loud = torch.nonzero(energy > energy.min() + 1.0).flatten()
    assert 10 <= loud.min() and loud.max() <= 21  # the clip sits in the middle, silence around it
    views = {tuple(src.decode({"wav": short}, random.Random(s), train=True)[0].mean(1).argmax().reshape(1).tolist())
             for s in range(8)}
    assert len(views) > 1  # train time: a random offset, from the rng only


def test_min_duration_skips_with_a_reason():
    with pytest.raises(SampleError, match="too_short: 0.040 s < min_duration 0.1 s"):
        eval_view(source(min_duration=0.1), encode(tone(700, seconds=0.04)))


def test_long_clip_train_crop_is_seeded_and_eval_is_centred():
    src, data = source(), {"wav": encode(np.random.default_rng(0).standard_normal(RATE * 2).astype(np.float32) * 0.1)}
    a, b = (src.decode(data, random.Random(s), train=True) for s in (1, 2))
    assert torch.equal(a, src.decode(data, random.Random(1), train=True)) and not torch.equal(a, b)
    assert torch.equal(src.decode(data, random.Random(1), train=False), src.decode(data, random.Random(2), train=False))


def test_flac_and_ogg_decode():
    for fmt, ext in (("FLAC", "flac"), ("OGG", "ogg")):
        x = source().decode({ext: encode(tone(600), fmt=fmt)}, random.Random(0), train=False)
        assert x.shape == (1, 32, 16) and torch.isfinite(x).all()


# --------------------------------------------------------------------------- grid and maskers
def test_audioset_grid_is_time_major_64x8():
    cfg = SpectrogramTokenizer.Config(patch_size=16)
    tok = SpectrogramTokenizer(cfg, embed_dim=32)
    assert SpectrogramTokenizer.grid_for(cfg, (1, 1024, 128)) == (64, 8)
    coords = tok.coords((64, 8))
    assert coords[9].tolist() == [1, 1]  # token t * 8 + f
    assert tok(torch.zeros(1, 1, 1024, 128)).shape == (1, 512, 32)


@pytest.mark.parametrize("init, expected", [("trunc_normal", 0.02 * 16), ("xavier", (2 * 256 / (256 + 128)) ** 0.5)])
def test_spectrogram_init_options_set_the_token_scale(init, expected):
    tok = SpectrogramTokenizer(SpectrogramTokenizer.Config(patch_size=16, init=init), embed_dim=128)
    torch.nn.init.trunc_normal_(tok.proj.weight, std=0.02)  # the core's generic init, then the tokenizer's own
    tok.init_weights()
    torch.manual_seed(0)
    with torch.no_grad():
        assert tok(torch.randn(8, 1, 64, 64)).std().item() == pytest.approx(expected, rel=0.15)


@pytest.mark.parametrize("masker, grid, message", [
    (TFMultiBlockMasker(TFMultiBlockMasker.Config(min_keep=70)), (8, 8), "masker.min_keep: 70 context tokens"),
    (TFMultiBlockMasker(TFMultiBlockMasker.Config(num_targets=6, target_scale=(0.5, 0.6), min_keep=10)), (8, 8), "masker.min_keep"),
    (RandomPatchMasker(RandomPatchMasker.Config(mask_ratio=0.95)), (4, 4), "masker.min_keep"),
    (RandomPatchMasker(RandomPatchMasker.Config(mask_ratio=0.1, num_targets=4)), (4, 4), "masker.mask_ratio"),
    (TimeSpanMasker(TimeSpanMasker.Config(num_targets=4, span=(0.2, 0.3))), (10, 1), "masker.span"),
    (TimeSpanMasker(TimeSpanMasker.Config()), (64,), "2-D (time, frequency)"),
])
def test_infeasible_masker_configs_fail_fast(masker, grid, message):
    with pytest.raises(MaskConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        masker.check(grid)


def test_time_span_targets_cover_every_frequency():
    mask = TimeSpanMasker(TimeSpanMasker.Config(num_targets=1, span=(0.25, 0.25)))((8, 4), random.Random(3))
    t = mask.targets[0]
    assert len(t) == 8 and set((t % 4).tolist()) == {0, 1, 2, 3} and len(set((t // 4).tolist())) == 2
    assert len(mask.context) == 24


def test_image_multiblock_and_audio_maskers_coexist_by_name():
    registry = get_plugins().registry
    assert registry.get("masker", "multiblock").plugin == "image"
    assert {registry.get("masker", n).plugin for n in ("tf_multiblock", "random_patch", "time_span")} == {"audio"}


# --------------------------------------------------------------------------- pretrain + eval
def audio_shard(path, n: int, start: int = 0, bad: bool = False):
    """``n`` labelled tones (class = pitch), plus, with ``bad``, one sample of each kind of bad input."""
    rng = np.random.default_rng(start)
    samples = []
    for i in range(n):
        label = i % 4
        clip = tone(300 + 400 * label, seconds=rng.uniform(0.1, 0.5)) + 0.01 * rng.standard_normal(1).astype(np.float32)
        samples.append((f"{start + i:06d}", {"wav": encode(clip), "cls": str(label).encode()}))
    if bad:
        samples += [("bad_corrupt", {"wav": b"RIFF....WAVEjunk", "cls": b"0"}),
                    ("bad_empty", {"wav": encode(np.zeros(0, dtype=np.float32)), "cls": b"1"}),
                    ("bad_stereo_16k", {"wav": encode(np.stack([tone(300, rate=16000)] * 2, 1), 16000), "cls": b"0"}),
                    ("bad_short", {"wav": encode(tone(700, seconds=0.02)), "cls": b"1"})]
    return write_shard(path, samples)


def tiny_audio_recipe(train: str) -> dict:
    return {
        "requires": ["audio"], "run": {"name": "tiny_audio", "seed": 0, "device": "cpu"},
        "model": {"size": "vit_test"}, "tokenizer": {"name": "spectrogram", "patch_size": 8},
        "masker": {"name": "random_patch"}, "source": {"name": "audio", **SMALL},
        "data": {"train": train, "batch_size": 8, "num_workers": 0}, "schedule": {"warmup_steps": 1},
        "train": {"steps": 4}, "checkpoint": {"every_steps": 4},
        "log": {"every_steps": 1, "tensorboard": False, "progress": False},
    }


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    """A 4-step run on 16 clips + 4 bad ones; train/test shards for the probes."""
    tmp = tmp_path_factory.mktemp("audio")
    train = audio_shard(tmp / "train.tar", 16, bad=True)
    test = audio_shard(tmp / "test.tar", 8, start=100)
    summary = run_pretrain(tiny_audio_recipe(str(train)), tmp / "run")
    return tmp, summary, str(train), str(test)


def test_bad_clips_are_skipped_and_counted_without_stopping_the_run(audio_run):
    _, summary, _, _ = audio_run
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    # 4 steps x 8 = 32 positions over 20 samples: each bad sample is met once or twice
    assert set(summary["skipped"]) == {"corrupt", "empty"}
    assert all(ex.split(":")[0] in {"corrupt", "empty"} and "bad_" in ex for ex in summary["skipped_examples"])


def test_eval_probe_knn_embed_work_on_an_audio_checkpoint(audio_run, jepa_cli):
    tmp, summary, train, test = audio_run
    run = str(tmp / "run")
    for kind in ("probe", "knn"):
        code, out, err = jepa_cli("eval", kind, "--checkpoint", run, "--train", train, "--test", test, "--json")
        assert code == 0, err
        result = json.loads(out)
        assert result["n_test"] == 8 and result["feature_dim"] == 64 and 0 <= result["top1"] <= 1
        assert result["skipped"]["train"] == {"corrupt": 1, "empty": 1}
    code, out, err = jepa_cli("embed", "--checkpoint", run, "--data", test, "--out", str(tmp / "emb.npz"), "--per-patch")
    assert code == 0, err
    emb = np.load(tmp / "emb.npz")
    assert emb["embeddings"].shape == (8, 64) and emb["patch_embeddings"].shape == (8, 8, 64)


def test_stats_command_matches_the_source(audio_run, jepa_cli):
    tmp, _, train, _ = audio_run
    sets = [f"--set={k}={v}" for k, v in SMALL.items() if k not in ("mean", "std")]
    code, out, err = jepa_cli("audio", "stats", train, *sets, "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["clips"] == 18 and stats["skipped"] == {"corrupt": 1, "empty": 1}
    raw = source(mean=0.0, std=0.5)
    x = torch.stack([eval_view(raw, encode(tone(300 + 400 * (i % 4), 0.3))) for i in range(4)])
    assert -16 < stats["mean"] < -2 and 1 < stats["std"] < 10 and abs(x.mean() - stats["mean"]) < 3


def test_disabled_audio_plugin_gives_one_line_install_hint(tmp_path, jepa_cli):
    recipe = tmp_path / "a.toml"
    recipe.write_text(tomli_w.dumps(tiny_audio_recipe(str(tmp_path))))
    env = {**os.environ, "JEPA_DISABLE_PLUGINS": "audio"}
    for args in (["recipe", "check", "audio_fsdd_cpu"], ["pretrain", str(recipe), "--run-dir", str(tmp_path / "r")]):
        code, out, err = jepa_cli(*args, env=env)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert "plugin 'audio' is not installed or is disabled" in lines[0]
        assert "pip install -e plugins/jepa_audio" in lines[0]
    assert not (tmp_path / "r").exists()


def test_recipes_validate(jepa_cli):
    code, out, err = jepa_cli("recipe", "check", "audio_vitb16_audioset", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["grid"] == [64, 8] and report["tokens_per_sample"] == 512
    assert 85e6 < report["params"]["encoder"] < 87e6


def test_missing_plugin_without_requires_is_still_one_line(monkeypatch):
    """A recipe that forgets `requires` gets one line for the missing plugin, not one per component."""
    from jepa.config.load import validate
    from jepa.errors import RecipeError
    from jepa.plugins import build_registry, load_entry_points, new_manager

    monkeypatch.setenv("JEPA_DISABLE_PLUGINS", "audio")
    pm = new_manager()
    infos = load_entry_points(pm)
    recipe = {k: v for k, v in tiny_audio_recipe("x.tar").items() if k != "requires"}
    with pytest.raises(RecipeError) as e:
        validate(recipe, build_registry(pm), set(infos))
    assert e.value.problems == [
        "tokenizer.name: tokenizer 'spectrogram' and masker 'random_patch' and source 'audio' are provided by the "
        "'audio' plugin, which is not installed or is disabled; install it with `pip install -e plugins/jepa_audio`"]
