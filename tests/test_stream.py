"""Streamed shards (``pipe:`` commands, URLs): split across ranks and workers without duplication,
shuffled through a buffer, resumed exactly where a run stopped."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from jepa import JepaError
from jepa.api import run_pretrain
from jepa.config import load_recipe
from jepa.data.stream import StreamingPretrainDataset, expand_urls, is_streaming, iter_shard
from jepa.model import training_grid

from .conftest import QUICK_TRAIN, read_members, tiny_recipe, write_shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards of 24 real quickstart samples each, named through `pipe:cat` (a stand-in for
    `pipe:aws s3 cp s3://... -` or `pipe:curl -s https://...`)."""
    d = tmp_path_factory.mktemp("stream")
    members = read_members(QUICK_TRAIN, 96)
    for i in range(4):
        write_shard(d / f"part-{i}.tar", [(k, {"jpg": j, "cls": c}) for k, j, c in members[24 * i:24 * (i + 1)]])
    return f"pipe:cat {d}/part-{{0..3}}.tar", [k for k, _, _ in members]


def _stream(spec, rank=0, world=1, workers=1, micro=4, start_micro=0, buffer=0):
    r = load_recipe(tiny_recipe())
    (src_cls, src_cfg), (m_cls, m_cfg) = r.component("source"), r.component("masker")
    return StreamingPretrainDataset(expand_urls(spec), src_cls(src_cfg), training_grid(r), m_cls(m_cfg), 0, rank,
                                    world, workers, micro, start_micro, buffer)


def test_streaming_specs_are_recognised_and_expanded(shards):
    spec, _ = shards
    assert is_streaming(spec) and is_streaming("https://host/a-{0..1}.tar") and not is_streaming("/data/a.tar")
    assert len(expand_urls(spec)) == 4 and expand_urls(spec)[1].endswith("part-1.tar")
    with pytest.raises(JepaError, match="use 'pipe:aws s3 cp s3://b/x-0.tar -'"):
        expand_urls("s3://b/x-{0..1}.tar")
    keys = [k for k, _ in iter_shard(expand_urls(spec)[0])]
    assert len(keys) == 24 and set(next(iter_shard(expand_urls(spec)[0]))[1]) == {"jpg", "cls"}


def test_two_ranks_by_two_workers_read_every_sample_once_per_epoch(shards):
    spec, keys = shards
    seen = Counter()
    for rank in range(2):
        ds = _stream(spec, rank=rank, world=2, workers=2)
        for worker in range(2):
            it = ds.raw_stream(worker)
            seen.update(next(it)[1] for _ in range(24))  # one shard per stream per epoch
    assert seen == Counter(keys)  # all 96 samples, none twice
    with pytest.raises(JepaError, match="4 streamed shard.s. cannot feed 2 rank.s. x 4 worker.s."):
        _stream(spec, world=2, workers=4)


def test_the_shuffle_buffer_reorders_without_losing_samples(shards):
    spec, keys = shards
    plain = [next(it)[1] for it in [_stream(spec).raw_stream(0)] for _ in range(96)]
    shuffled = [next(it)[1] for it in [_stream(spec, buffer=16).raw_stream(0)] for _ in range(96 - 16)]
    assert sorted(plain) == sorted(keys) and shuffled != plain[:80]
    assert set(shuffled) <= set(keys) and len(set(shuffled)) == 80  # nothing emitted twice
    again = [next(it)[1] for it in [_stream(spec, buffer=16).raw_stream(0)] for _ in range(80)]
    assert again == shuffled  # seeded


def test_resume_skips_exactly_what_was_consumed(shards):
    spec, _ = shards
    ds = _stream(spec, workers=2, micro=4, start_micro=5)  # micro-batches 0, 2, 4 came from worker 0
    assert [ds.emitted_before_start(w) for w in (0, 1)] == [12, 8]


def test_pretraining_on_a_pipe_stream_resumes_on_the_same_trajectory(shards, tmp_path):
    spec, _ = shards
    recipe = tiny_recipe(spec, steps=6, data={"train": spec, "num_samples": 96, "num_workers": 2,
                                               "shuffle_buffer": 8, "batch_size": 8})
    full = run_pretrain(recipe, tmp_path / "full")
    run_pretrain(recipe, tmp_path / "cut", stop_at=3)
    resumed = run_pretrain(recipe, tmp_path / "cut", resume=True)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("full", "cut")]
    assert resumed["start_step"] == 3 and len(losses[0]) == 6
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # same samples, same masks, same order
    assert full["samples"] == 96


def test_a_stream_without_a_size_or_with_too_few_shards_is_an_error_before_anything_is_written(shards, tmp_path):
    spec, _ = shards
    with pytest.raises(JepaError, match="data.num_samples: streamed DATA"):
        run_pretrain(tiny_recipe(spec, data={"train": spec}), tmp_path / "run")
    with pytest.raises(JepaError, match="4 streamed shard.s. cannot feed 1 rank.s. x 8 worker.s."):
        run_pretrain(tiny_recipe(spec, data={"train": spec, "num_samples": 96, "num_workers": 8}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_unreadable_shard_is_skipped_and_counted_and_no_readable_shard_is_an_error(shards, tmp_path):
    spec, _ = shards
    missing = f"pipe:cat {tmp_path}/missing.tar"  # the command fails: empty output
    items = _stream(f"{spec}::{missing}")
    got = []
    for item in items:
        got.append(item)
        if len(got) == 97:
            break
    bad = [g for g in got if not isinstance(g, tuple)]
    assert len(bad) == 1 and bad[0].reason == "unreadable_shard" and bad[0].shard == missing
    alone = iter(_stream(missing))
    assert next(alone).reason == "unreadable_shard"  # counted first, then the whole pass read nothing:
    with pytest.raises(JepaError, match="no sample could be read from the 1 streamed shard"):
        next(alone)


def test_a_stream_that_dies_in_a_worker_is_a_one_line_error(tmp_path, jepa_cli):
    import tomli_w

    spec = f"pipe:cat {tmp_path}/gone-{{0..1}}.tar"
    toml = tmp_path / "r.toml"
    toml.write_text(tomli_w.dumps(tiny_recipe(spec, data={"train": spec, "num_samples": 96, "num_workers": 1})))
    code, _, err = jepa_cli("pretrain", str(toml), "--run-dir", str(tmp_path / "run"))
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line]
    assert code != 0 and "Traceback" not in err, err
    assert any("no sample could be read from the 2 streamed shard(s)" in line for line in lines), err
