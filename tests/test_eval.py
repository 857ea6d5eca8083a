"""Evaluation end to end: probes and k-NN through the CLI and API, embeddings, the online monitor."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from jepa import JepaError
from jepa.api import run_pretrain
from jepa.eval.run import ProbeSettings, embed, run_probe

from .conftest import QUICK_TEST, QUICK_TRAIN, read_members, tiny_recipe, write_shard


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "run"
    run_pretrain(tiny_recipe(steps=2), path)
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> tuple[str, str]:
    """600 train / 200 test quickstart images as shards (fast to encode)."""
    d = tmp_path_factory.mktemp("data")
    train = [(k, {"jpg": j, "cls": c}) for k, j, c in read_members(QUICK_TRAIN, 600)]
    test = [(k, {"jpg": j, "cls": c}) for k, j, c in read_members(QUICK_TEST, 200)]
    return str(write_shard(d / "train.tar", train)), str(write_shard(d / "test.tar", test))


def probe(run, data, **kw) -> dict:
    return run_probe(ProbeSettings(checkpoint=str(run), train=data[0], test=data[1], num_workers=0, **kw))


def test_linear_probe_result_shape_outputs_and_determinism(run, small_data, tmp_path):
    a = probe(run, small_data, out=str(tmp_path / "out"))
    assert {"kind", "top1", "top5", "val_top1", "train_top1", "chosen", "n_train", "n_test", "feature_dim",
            "effective_rank"} <= set(a)
    assert a["kind"] == "linear" and a["n_train"] == 600 and a["n_test"] == 200 and a["feature_dim"] == 64
    assert 0.1 < a["top1"] <= a["top5"] <= 1 and a["train_top1"] > a["top1"]  # trained to fit, then generalises less
    assert 1 < a["effective_rank"] <= 64
    assert json.loads((tmp_path / "out" / "linear_target.json").read_text())["top1"] == a["top1"]
    assert (tmp_path / "out" / "linear_target_confusion.png").stat().st_size > 1000
    b = probe(run, small_data, out=str(tmp_path / "out"))  # served from the feature cache
    assert (a["top1"], a["val_top1"], a["chosen"]) == (b["top1"], b["val_top1"], b["chosen"])
    assert len(list((tmp_path / "out" / "cache").glob("*.safetensors"))) == 2


def test_low_shot_knn_and_attentive(run, small_data):
    few = probe(run, small_data, fraction=0.05)
    counts = np.bincount([int(c) for _, _, c in read_members(QUICK_TRAIN, 600)])
    assert few["n_train"] == sum(max(1, round(0.05 * n)) for n in counts)  # class-balanced 5%
    knn = probe(run, small_data, kind="knn")
    assert knn["kind"] == "knn" and knn["val_top1"] is None and 0 < knn["top1"] <= 1
    att = probe(run, small_data, kind="attentive", epochs=2)
    assert att["kind"] == "attentive" and 0 < att["top1"] <= 1


def test_attentive_probe_trains_in_the_asked_precision_on_any_machine(run, small_data, monkeypatch):
    import jepa.eval.features
    import jepa.eval.run

    fp32 = probe(run, small_data, kind="attentive", epochs=1)
    for module in (jepa.eval.features, jepa.eval.run):  # as on a CPU or GPU with fast bf16 units
        monkeypatch.setattr(module, "fast_bf16", lambda device: True, raising=False)
    same = probe(run, small_data, kind="attentive", epochs=1)
    assert (same["precision"], same["top1"], same["val_top1"]) == ("fp32", fp32["top1"], fp32["val_top1"])
    auto = probe(run, small_data, kind="attentive", epochs=1, precision="auto")
    assert auto["precision"] == "bf16"


def _png(w, h, color):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def test_unseen_folder_dataset_non_square_unbalanced(run, tmp_path):
    rng = np.random.default_rng(0)
    for split, counts in (("train", (30, 10, 4)), ("test", (6, 6, 6))):
        for c, n in enumerate(counts):
            (tmp_path / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                base = np.zeros(3)
                base[c] = 200
                img = np.clip(base + rng.normal(0, 30, (40, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(tmp_path / split / f"class{c}" / f"{i}.png")
    res = probe(run, (str(tmp_path / "train"), str(tmp_path / "test")))
    assert res["n_train"] == 44 and res["top1"] > 0.8  # colour classes are easy even for a barely trained encoder
    bigger = probe(run, (str(tmp_path / "train"), str(tmp_path / "test")), input_size=[48, 64])
    assert bigger["feature_dim"] == 64


def test_bad_inputs_are_one_line_errors(run, small_data, tmp_path, jepa_cli):
    only_three = [(k, {"jpg": j, "cls": b"3"}) for k, j, _ in read_members(QUICK_TRAIN, 20)]
    other = [(k, {"jpg": j, "cls": b"7"}) for k, j, _ in read_members(QUICK_TEST, 5)]
    tr, te = write_shard(tmp_path / "a.tar", only_three), write_shard(tmp_path / "b.tar", other)
    (tmp_path / "empty").mkdir()
    no_target = tmp_path / "no_target"
    shutil.copytree(run / "checkpoints" / "step_000002", no_target)
    (no_target / "target_encoder.safetensors").unlink()
    cases = [
        (["--train", str(tr), "--test", str(te)], "test set has label 7, which the training set lacks"),
        (["--train", str(tmp_path / "empty"), "--test", small_data[1]], "no samples found"),
        (["--checkpoint", str(no_target), "--train", small_data[0], "--test", small_data[1]],
         "has no target encoder"),
        (["--train", small_data[0], "--test", small_data[1], "--input-size", "30"], "not divisible by the patch size"),
    ]
    for args, expect in cases:
        full = ["eval", "probe", *(["--checkpoint", str(run)] if "--checkpoint" not in args else []), *args]
        code, out, err = jepa_cli(*full)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code != 0 and len(lines) == 1 and expect in lines[0] and "Traceback" not in err, (args, err)
    code, _, err = jepa_cli("eval", "probe", "--checkpoint", str(no_target), "--train", small_data[0], "--test",
                            small_data[1], "--which", "context", "--json")
    assert code == 0 and "--which context" in cases[2][1] + " --which context", err


def test_cli_json_and_probe_recipe(run, small_data, tmp_path, jepa_cli):
    recipe = tmp_path / "probe.toml"
    recipe.write_text(f'checkpoint = "{run}"\ntrain = "{small_data[0]}"\ntest = "{small_data[1]}"\nnum_workers = 0\n')
    code, out, err = jepa_cli("eval", "knn", str(recipe), "--json")
    assert code == 0, err
    assert json.loads(out)["kind"] == "knn"
    recipe.write_text(recipe.read_text() + "kindd = 'linear'\n")
    code, out, err = jepa_cli("eval", "probe", str(recipe))
    assert code == 2 and "kindd: unknown field; did you mean 'kind'?" in err


def test_embed_npz_and_safetensors(run, small_data, tmp_path):
    s = embed(str(run), small_data[1], str(tmp_path / "e.npz"), per_patch=True, num_workers=0)
    z = np.load(tmp_path / "e.npz")
    assert s["n"] == 200 and z["embeddings"].shape == (200, 64) and z["patch_embeddings"].shape == (200, 64, 64)
    assert z["labels"].shape == (200,) and len(z["keys"]) == 200
    embed(str(run), small_data[1], str(tmp_path / "e.safetensors"), num_workers=0)
    t = load_file(str(tmp_path / "e.safetensors"))
    np.testing.assert_allclose(t["embeddings"].numpy(), z["embeddings"], rtol=1e-6)
    with pytest.raises(JepaError, match="must end in .npz or .safetensors"):
        embed(str(run), small_data[1], str(tmp_path / "e.txt"), num_workers=0)


def test_online_monitor_logs_knn_and_does_not_change_training(small_data, tmp_path):
    plain = run_pretrain(tiny_recipe(steps=4), tmp_path / "plain")
    watched = run_pretrain(tiny_recipe(steps=4, monitor={"every_steps": 2, "train": small_data[0],
                                                         "test": small_data[1], "max_train": 200, "max_test": 100}),
                           tmp_path / "watched")
    records = [json.loads(line) for line in (tmp_path / "watched" / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in knn] == [2, 4] and all(0 < r["knn_top1"] <= 1 for r in knn)
    assert plain["final_loss"] == watched["final_loss"]


def test_online_monitor_extracts_in_fp32_like_the_offline_probe(small_data, tmp_path):
    # bf16 training; the monitor's last figure is the final target encoder's k-NN on the whole of both
    # shards, so it must be exactly what `jepa eval knn` (fp32 extraction by default) reports.
    monitor = {"every_steps": 2, "train": small_data[0], "test": small_data[1], "max_train": 600, "max_test": 200}
    run_pretrain(tiny_recipe(steps=2, train={"precision": "bf16"}, monitor=monitor), tmp_path / "bf16")
    records = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    online = [r["knn_top1"] for r in records if "knn_top1" in r]
    assert len(online) == 1 and online[0] == probe(tmp_path / "bf16", small_data, kind="knn")["top1"]


def test_token_poolings_are_what_they_say():
    import torch

    from jepa.eval.features import pool_tokens

    # 2 samples on a 4x2 grid (row-major), 3 dims; token value = its row (time) index, plus the sample
    rows = torch.arange(4).repeat_interleave(2).float()  # [0, 0, 1, 1, 2, 2, 3, 3]
    t = torch.stack([rows, rows + 10]).unsqueeze(-1).expand(2, 8, 3)
    assert torch.equal(pool_tokens(t, (4, 2)), torch.tensor([[1.5] * 3, [11.5] * 3]))
    ms = pool_tokens(t, (4, 2), "mean_std")
    assert ms.shape == (2, 6) and torch.allclose(ms[:, 3:], torch.full((2, 3), 1.25 ** 0.5))
    seg = pool_tokens(t, (4, 2), "segments:2")  # rows 0-1, then rows 2-3, in order
    assert torch.equal(seg, torch.tensor([[0.5] * 3 + [2.5] * 3, [10.5] * 3 + [12.5] * 3]))
    assert torch.equal(pool_tokens(t, (4, 2), "segments:1"), pool_tokens(t, (4, 2)))
    with pytest.raises(JepaError, match="segments:3 needs the first grid axis"):
        pool_tokens(t, (4, 2), "segments:3")
    with pytest.raises(JepaError, match="unknown pooling 'max'"):
        pool_tokens(t, (4, 2), "max")


def test_probe_pooling_option_end_to_end(run, small_data, jepa_cli):
    seg = probe(run, small_data, pool="segments:2", kind="knn")
    assert seg["feature_dim"] == 128 and seg["pool"] == "segments:2"  # 2 row-halves of the 8x8 grid x 64
    assert probe(run, small_data, pool="mean_std", kind="knn")["feature_dim"] == 128
    code, _, err = jepa_cli("eval", "knn", "--checkpoint", str(run), "--train", small_data[0], "--test",
                            small_data[1], "--pool", "segments:3")
    assert code != 0 and "segments:3 needs the first grid axis (8 of grid 8x8)" in err and "Traceback" not in err


def test_feature_precision_is_fp32_unless_asked_and_keys_the_cache(run, small_data, tmp_path):
    import torch
    from torch.utils.data import DataLoader

    from jepa.api import load
    from jepa.data import build_index
    from jepa.eval.features import EvalDataset, _collate, cached_features, encode_dataset

    model = load(run)
    net, test = model.network("target"), small_data[1]
    fp32 = encode_dataset(net, model.source, test, num_workers=0)
    bf16 = encode_dataset(net, model.source, test, num_workers=0, precision="bf16")
    x = next(iter(DataLoader(EvalDataset(build_index(test), model.source), batch_size=8, collate_fn=_collate)))[0]
    with torch.no_grad():
        direct = net(x).float().mean(1)  # an fp32 forward outside autocast, mean-pooled like the default probe
    torch.testing.assert_close(fp32.pooled[:8], direct, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(bf16.pooled, fp32.pooled, atol=1e-4)  # bf16 autocast really ran
    with pytest.raises(JepaError, match="precision: expected fp32, bf16 or auto"):
        encode_dataset(net, model.source, test, num_workers=0, precision="fp16")
    cache = tmp_path / "cache"
    a = cached_features(model, test, num_workers=0, cache_dir=cache)
    b = cached_features(model, test, num_workers=0, cache_dir=cache, precision="bf16")
    assert len(list(cache.glob("*.safetensors"))) == 2 and not torch.equal(a.pooled, b.pooled)
    assert probe(run, small_data, kind="knn")["precision"] == "fp32"
