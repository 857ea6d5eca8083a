"""Hostile data (six kinds of bad sample, broken shards, empty sources) and the collapse alarm."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import pytest
from PIL import Image

from jepa import JepaError
from jepa.api import run_pretrain
from jepa.config import load_recipe
from jepa.data.shards import build_index
from jepa.errors import TrainingStopped
from jepa.train import Trainer

from .conftest import QUICK_TRAIN, read_members, tiny_recipe, write_shard


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image: a decompression bomb as far as a decoder can tell."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def broken_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, "PNG")
    png = buf.getvalue()
    return png[:60] + b"\0" * 40 + png[100:]  # valid signature and header, damaged pixel data


def bad_samples(jpg: bytes) -> dict[str, dict[str, bytes]]:
    """One sample of each kind, by the reason it must be counted under."""
    return {
        "empty": {"jpg": b"", "cls": b"0"},
        "truncated": {"jpg": jpg[: len(jpg) // 2], "cls": b"0"},
        "corrupt": {"png": broken_png(), "cls": b"0"},
        "wrong_format": {"jpg": b"RIFF\x24\0\0\0WAVEfmt " + b"\0" * 40, "cls": b"0"},
        "too_large": {"png": png_claiming(20000, 20000), "cls": b"0"},
        "no_image": {"txt": b"a caption without its image", "cls": b"0"},
    }


def test_one_percent_bad_samples_of_six_kinds_train_to_completion_and_are_reported(tmp_path):
    good = read_members(QUICK_TRAIN, 594)
    samples = [(k, {"jpg": j, "cls": c}) for k, j, c in good]
    bad = bad_samples(good[0][1])
    for n, (reason, members) in enumerate(bad.items()):  # spread through the shard: 6 of 600 = 1%
        samples.insert(97 * (n + 1), (f"bad_{reason}", members))
    shard = write_shard(tmp_path / "mixed.tar", samples)
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"this is not a tar file" * 100)
    recipe = tiny_recipe(f"{shard}::{broken}", steps=12, batch=50, checkpoint={"every_steps": 100})  # 600 draws
    summary = run_pretrain(recipe, tmp_path / "run")
    assert summary["checkpoint"].endswith("step_000012") and summary["final_loss"] is not None
    assert summary["skipped"] == dict.fromkeys(sorted(bad), 1)  # every sample drawn exactly once
    assert summary["skipped_by_shard"] == {str(shard): summary["skipped"]}
    assert {(e["reason"], e["key"]) for e in summary["skipped_samples"]} == {(r, f"bad_{r}") for r in bad}
    assert len(summary["bad_shards"]) == 1 and str(broken) in summary["bad_shards"][0]
    assert "cannot be opened" in summary["bad_shards"][0]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [e for r in records for e in r.get("skipped_new", [])]
    assert sorted((e["reason"], e["shard"], e["key"]) for e in logged) == sorted(
        (r, str(shard), f"bad_{r}") for r in bad)
    assert records[-1]["skipped_reasons"] == summary["skipped"] and records[-1]["skipped"] == 6
    assert records[0]["bad_shards"] == summary["bad_shards"]


def test_a_shard_cut_short_keeps_its_complete_samples(tmp_path):
    good = read_members(QUICK_TRAIN, 10)
    shard = write_shard(tmp_path / "s.tar", [(k, {"jpg": j, "cls": c}) for k, j, c in good])
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    index = build_index(str(cut))
    assert 0 < len(index) < 10
    assert all(m.offset + m.size <= len(data) // 2 for r in index.records for m in r.members.values())
    assert "truncated" in index.bad_shards[0] or "damaged" in index.bad_shards[0]


def test_an_empty_data_source_is_an_error_before_training(tmp_path):
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(JepaError, match="data: no samples found"):
        run_pretrain(tiny_recipe(str(empty)), tmp_path / "a")
    captions = write_shard(tmp_path / "captions.tar", [(f"{i:03d}", {"txt": b"words", "cls": b"1"}) for i in range(5)])
    with pytest.raises(JepaError, match=r"none of the 5 samples .* has a member this source decodes .*found: cls, txt"):
        run_pretrain(tiny_recipe(str(captions)), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- collapse alarm
def test_collapsed_target_features_raise_the_alarm_and_a_normal_run_does_not(tmp_path):
    normal = run_pretrain(tiny_recipe(steps=4), tmp_path / "normal")
    assert normal["collapse_alarms"] == []
    rec = [json.loads(x) for x in (tmp_path / "normal" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rank"] > 1.5 and r["target_std"] > 0.01 for r in rec)
    # A target encoder whose final LayerNorm has zero gain maps every input to the same point (its
    # bias): complete collapse. EMA momentum 1 keeps it there.
    recipe = tiny_recipe(steps=6, ema={"momentum": 1.0, "final_momentum": 1.0},
                         health={"collapse": "stop", "collapse_patience": 2})
    trainer = Trainer(load_recipe(recipe), tmp_path / "collapsed")
    trainer.model.target_encoder.norm.weight.data.zero_()
    with pytest.raises(TrainingStopped, match=r"collapse alarm at step 2: target feature std 0 < 0.01 and effective "
                                              r"rank 0.00 < 1.5 for 2 log intervals.*stopped"):
        trainer.fit()
    rec = [json.loads(x) for x in (tmp_path / "collapsed" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("collapse_alarm", False) for r in rec] == [False, True]
    assert json.loads((tmp_path / "collapsed" / "summary.json").read_text())["collapse_alarms"] == [2]


def test_the_collapse_alarm_warns_once_per_episode_by_default(tmp_path):
    recipe = tiny_recipe(steps=5, ema={"momentum": 1.0, "final_momentum": 1.0}, health={"collapse_patience": 2})
    trainer = Trainer(load_recipe(recipe), tmp_path / "run")
    trainer.model.target_encoder.norm.weight.data.zero_()
    summary = trainer.fit()
    assert summary["collapse_alarms"] == [2] and summary["checkpoint"].endswith("step_000005")


def test_a_collapsing_configuration_raises_the_alarm_and_the_normal_one_does_not(tmp_path):
    # No EMA (the target encoder is the context encoder itself) and a learning rate ten times the
    # usual: measured, the pooled target features fall to one direction (effective rank ~1.2 of 16)
    # within 20 steps. The same recipe with the default EMA and learning rate keeps rank ~5.
    steps = 200
    log = {"every_steps": 10, "tensorboard": False, "progress": False}
    collapsing = tiny_recipe(steps=steps, batch=16, log=log, ema={"momentum": 0.0, "final_momentum": 0.0},
                             optim={"lr": 1e-2, "start_lr": 1e-3}, checkpoint={"every_steps": steps})
    summary = run_pretrain(collapsing, tmp_path / "collapsing")
    assert summary["collapse_alarms"], "the alarm did not fire"
    rec = [json.loads(x) for x in (tmp_path / "collapsing" / "metrics.jsonl").read_text().splitlines()]
    fired = next(r for r in rec if r.get("collapse_alarm"))
    assert fired["step"] <= 100 and fired["rank"] < 1.5
    normal = run_pretrain(tiny_recipe(steps=steps, batch=16, log=log, checkpoint={"every_steps": steps}),
                          tmp_path / "normal")
    assert normal["collapse_alarms"] == []


def test_dimensional_collapse_relative_to_the_runs_own_peak_rank_raises_the_alarm():
    from jepa.config.schema import HealthConfig
    from jepa.train.guards import CollapseAlarm

    # Feature ranks logged every 20 steps by the FSDD recipe at lr 1e-3 held for 900 steps: rank 24
    # fell to about 4 by step 220 while the feature std stayed healthy.
    ranks = [23.9, 20.7, 19.5, 21.3, 23.2, 20.3, 20.8, 10.7, 7.8, 4.8, 4.1, 4.6, 8.1]
    alarm = CollapseAlarm(HealthConfig())
    fired = [20 * (i + 1) for i, r in enumerate(ranks) if alarm.update(20 * (i + 1), {"target_std": 0.2, "rank": r})]
    assert fired == [240]  # the third interval below 0.25 x 23.9
    # The peak survives a resume, so a run resumed after the drop still knows what healthy looked like.
    resumed = CollapseAlarm(HealthConfig(), alarm.state_dict())
    assert [resumed.update(s, {"target_std": 0.2, "rank": 4.0}) is not None for s in (300, 320, 340)] == [False, False, True]
    # A run whose rank stays within its usual range never fires.
    steady = CollapseAlarm(HealthConfig())
    assert not any(steady.update(s, {"target_std": 0.1, "rank": r}) for s, r in enumerate([9.5, 10.2, 10.3, 9.7, 10.1,
                                                                                            10.4, 10.7, 9.9]))
