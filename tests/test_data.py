"""Indexing, per-sample seeding, worker independence, collation, corrupt samples."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from jepa import JepaError
from jepa.config import load_recipe
from jepa.data import PretrainDataset, StepBatchSampler, build_index, build_loader
from jepa.data.pipeline import Collate
from jepa.data.shards import split_key
from jepa.model import training_grid

from .conftest import QUICK_TEST, QUICK_TRAIN, read_members, tiny_recipe, write_shard


def _dataset(spec: str, seed: int = 0, **sections) -> PretrainDataset:
    r = load_recipe(tiny_recipe(spec, **sections))
    (src_cls, src_cfg), (m_cls, m_cfg) = r.component("source"), r.component("masker")
    return PretrainDataset(build_index(spec), src_cls(src_cfg), training_grid(r), m_cls(m_cfg), seed)


def test_split_key_follows_webdataset():
    assert split_key("a/b/0001.seg.png") == ("a/b/0001", "seg.png")
    assert split_key("0001.jpg") == ("0001", "jpg")


def test_index_of_shipped_shards_and_spec_forms():
    index = build_index(str(QUICK_TRAIN))
    assert len(index) == 4000 and {"jpg", "cls"} == set(index.records[0].members)
    both = build_index(f"{QUICK_TRAIN}::{QUICK_TEST}")
    assert len(both) == 5000
    assert len(build_index(str(QUICK_TRAIN.parent))) == 5000  # a folder of .tar files
    with pytest.raises(JepaError, match="no such file or directory"):
        build_index(str(QUICK_TRAIN.parent / "nope-{0..1}.tar"))


def test_folder_datasets_labelled_and_unlabelled(tmp_path):
    img = io.BytesIO()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(img, "PNG")
    for cls in ("cat", "dog"):
        (tmp_path / "lab" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "lab" / cls / f"{i}.png").write_bytes(img.getvalue())
    index = build_index(str(tmp_path / "lab"))
    assert index.classes == ["cat", "dog"] and sorted(r.label for r in index.records) == [0, 0, 0, 1, 1, 1]
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(img.getvalue())
    assert [r.label for r in build_index(str(tmp_path / "flat")).records] == [-1]
    ds = _dataset(str(tmp_path / "lab"))
    x, mask, label, _ = ds[4]
    assert x.shape == (3, 32, 32) and label in (0, 1)


def test_samples_are_deterministic_per_seed_and_differ_across_epochs():
    a, b = _dataset(str(QUICK_TRAIN)), _dataset(str(QUICK_TRAIN))
    xa, ma, la, _ = a[17]
    xb, mb, lb, _ = b[17]
    assert torch.equal(xa, xb) and torch.equal(ma.context, mb.context) and la == lb
    n = len(a)
    assert a.sample_index(17)[1] != a.sample_index(17 + n)[1] or not torch.equal(a[17][0], a[17 + n][0])
    c = _dataset(str(QUICK_TRAIN), seed=1)
    assert not torch.equal(c[17][0], xa)
    # Every epoch is a permutation: each sample exactly once.
    assert sorted(a.sample_index(p)[1] for p in range(n)) == list(range(n))


def test_batches_do_not_depend_on_worker_count():
    ds = _dataset(str(QUICK_TRAIN))

    def batches(workers):
        sampler = StepBatchSampler(8, 0, 1, 1, start_step=3, total_steps=6)
        return list(build_loader(ds, sampler, workers, "pad"))

    b0, b2 = batches(0), batches(2)
    assert len(b0) == 3
    for u, v in zip(b0, b2, strict=True):
        assert torch.equal(u.x, v.x) and torch.equal(u.context_idx, v.context_idx)
        assert torch.equal(u.target_idx, v.target_idx) and torch.equal(u.positions, v.positions)
    assert b0[0].positions.tolist() == list(range(24, 32))


def test_ranks_and_accumulation_partition_the_global_batch():
    seen = []
    for rank in range(2):
        seen += [p for mb in StepBatchSampler(8, rank, 2, 2, 0, 3) for p in mb]
    assert sorted(seen) == list(range(24))
    with pytest.raises(JepaError, match="not divisible"):
        StepBatchSampler(10, 0, 4, 1, 0, 1)


def test_pad_keeps_every_mask_and_truncate_cuts_to_the_batch_minimum():
    ds = _dataset(str(QUICK_TRAIN))
    items = [ds[p] for p in range(16)]
    lengths = [len(it[1].context) for it in items]
    padded = Collate("pad")(items)
    assert padded.context_idx.shape[1] == max(lengths)
    assert padded.context_valid.sum(1).tolist() == lengths
    assert padded.target_idx.shape[:2] == (4, 16)
    cut = Collate("truncate")(items)
    assert cut.context_idx.shape[1] == min(lengths) and cut.context_valid is None and cut.target_valid is None
    # every row holds its own sample's indices: in full where padded (zeros after), as a prefix where cut
    for b, (_, mask, _, _) in enumerate(items):
        n = len(mask.context)
        assert torch.equal(padded.context_idx[b, :n], mask.context) and not padded.context_idx[b, n:].any()
        assert torch.equal(cut.context_idx[b], mask.context[: cut.context_idx.shape[1]])
        for m, t in enumerate(mask.targets):
            k = padded.target_valid[m, b].sum() if padded.target_valid is not None else padded.target_idx.shape[2]
            assert torch.equal(padded.target_idx[m, b, :k], t) and k == len(t)
            assert torch.equal(cut.target_idx[m, b], t[: cut.target_idx.shape[2]])
    assert padded.context_idx.dtype == padded.target_idx.dtype == torch.int64


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    good = read_members(QUICK_TRAIN, 6)
    bad_jpeg = good[0][1][: len(good[0][1]) // 2]
    samples = [(k, {"jpg": j, "cls": c}) for k, j, c in good]
    samples += [("bad1", {"jpg": b"not an image at all", "cls": b"1"}), ("bad2", {"jpg": b"", "cls": b"1"}),
                ("bad3", {"jpg": bad_jpeg, "cls": b"2"}), ("bad4", {"txt": b"hello"})]
    shard = write_shard(tmp_path / "mixed.tar", samples)
    ds = _dataset(str(shard), data={"shuffle": False})
    batch = Collate("pad")([ds[p] for p in range(len(ds))])
    assert len(batch) == 6
    assert sorted(s.reason for s in batch.skipped) == ["corrupt", "empty", "no_image", "truncated"]
    assert all(s.shard == str(shard) and s.key.startswith("bad") for s in batch.skipped)
