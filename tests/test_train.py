"""Training end to end on CPU: exact resume, checkpoint layout, run-directory safety, the Python API."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import jepa
from jepa import CheckpointError, JepaError
from jepa.api import run_pretrain
from jepa.train.schedules import cosine_ramp, linear_ramp, warmup_cosine

from .conftest import QUICK_TRAIN, read_members, tiny_recipe, write_shard


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_plus_two_resumed_steps_equal_four(tmp_path, precision):
    recipe = tiny_recipe(steps=4, train={"precision": precision})
    run_pretrain(recipe, tmp_path / "straight")
    run_pretrain(recipe, tmp_path / "resumed", stop_at=2)
    run_pretrain(recipe, tmp_path / "resumed", resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # bit for bit
    a = load_file(str(tmp_path / "straight/checkpoints/step_000004/target_encoder.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoints/step_000004/target_encoder.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_layout_and_reloading(tmp_path):
    summary = run_pretrain(tiny_recipe(steps=4), tmp_path / "run")
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000004"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000002", "step_000004"]
    step4 = ck / "step_000004"
    assert {p.name for p in step4.iterdir()} == {"encoder.safetensors", "predictor.safetensors",
                                               "target_encoder.safetensors", "state.pt", "meta.json", "recipe.toml"}
    state = torch.load(step4 / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["data_position"] == 32
    meta = json.loads((step4 / "meta.json").read_text())
    assert meta["step"] == 4 and "image" in meta["versions"]
    assert (tmp_path / "run" / "recipe.toml").read_text().startswith("# resolved recipe")
    assert summary["checkpoint"] == str(step4)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "wd", "momentum", "samples_per_s", "target_std", "pred_std", "rank"} <= set(records[0])
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 for r in records)


def test_run_directory_is_never_overwritten_and_bad_resume_is_an_error(tmp_path):
    run_pretrain(tiny_recipe(steps=2), tmp_path / "run")
    with pytest.raises(JepaError, match="already holds a run"):
        run_pretrain(tiny_recipe(steps=2), tmp_path / "run")
    with pytest.raises(CheckpointError, match="no such file"):
        run_pretrain(tiny_recipe(steps=2), tmp_path / "empty", resume=True)
    ck = tmp_path / "run" / "checkpoints" / "step_000002"
    (ck / "encoder.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        run_pretrain(tiny_recipe(steps=4), tmp_path / "run", resume=True, allow_changes=("train.steps",))


def test_missing_data_and_unknown_length_are_clear(tmp_path):
    with pytest.raises(JepaError, match="data: no such file or directory: .*missing.tar"):
        run_pretrain(tiny_recipe(str(tmp_path / "missing.tar")), tmp_path / "r1")
    r = tiny_recipe()
    del r["train"]
    with pytest.raises(JepaError, match="train.steps: give the training length"):
        run_pretrain(r, tmp_path / "r2")


def test_corrupt_images_are_skipped_counted_and_training_continues(tmp_path):
    good = read_members(QUICK_TRAIN, 30)
    samples = [(k, {"jpg": j, "cls": c}) for k, j, c in good]
    samples += [("bad1", {"jpg": b"\x89PNG garbage", "cls": b"0"}), ("bad2", {"jpg": b"", "cls": b"0"})]
    shard = write_shard(tmp_path / "mixed.tar", samples)
    summary = run_pretrain(tiny_recipe(str(shard), steps=8), tmp_path / "run")  # 64 draws: 2 epochs
    assert summary["skipped"] == {"corrupt": 2, "empty": 2}
    assert summary["final_loss"] is not None and summary["checkpoint"]


def test_python_api_load_preprocess_encode_pooled(tmp_path):
    run_dir = jepa.pretrain(tiny_recipe(steps=2), run_dir=str(tmp_path / "run"))
    model = jepa.load(run_dir)
    jpgs = [j for _, j, _ in read_members(QUICK_TRAIN, 3)]
    x = model.preprocess(jpgs)
    assert x.shape == (3, 3, 32, 32)
    tokens = model.encode(x)
    assert tokens.shape == (3, 64, 64)
    assert not torch.equal(tokens, model.encode(x, which="context"))
    torch.testing.assert_close(model.pooled(x), tokens.mean(1))
    keep = torch.tensor([[0, 1, 2]] * 3)
    assert model.encode(x, keep=keep).shape == (3, 3, 64)
    # A checkpoint directory loads too, to the same weights.
    again = jepa.load(str(tmp_path / "run" / "checkpoints" / "step_000002"))
    torch.testing.assert_close(again.pooled(x), model.pooled(x))


def test_schedules_are_pure_functions_of_the_step():
    assert warmup_cosine(0, 10, 100, 2e-4, 1e-3, 1e-6) == 2e-4
    assert warmup_cosine(10, 10, 100, 2e-4, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert warmup_cosine(100, 10, 100, 2e-4, 1e-3, 1e-6) == pytest.approx(1e-6)
    assert cosine_ramp(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_ramp(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert linear_ramp(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert linear_ramp(80, 100 * 1.25, 0.996, 1.0) < 1.0  # the reference's stretched horizon


def test_resume_with_a_changed_recipe_lists_the_changes(tmp_path):
    run_pretrain(tiny_recipe(steps=4), tmp_path / "run", stop_at=2)
    with pytest.raises(CheckpointError, match=r"differs from the checkpoint's in optim.lr, train.steps; pass "
                                              r"--allow-changes optim.lr,train.steps"):
        run_pretrain(tiny_recipe(steps=6, optim={"lr": 0.1}), tmp_path / "run", resume=True)
    summary = run_pretrain(tiny_recipe(steps=6), tmp_path / "run", resume=True, allow_changes=("train.steps",))
    assert summary["start_step"] == 2 and summary["steps"] == 6


def test_init_copies_all_three_networks_from_a_checkpoint(tmp_path):
    run_pretrain(tiny_recipe(steps=2), tmp_path / "a")
    src = jepa.load(str(tmp_path / "a"))
    # One step at learning rate 0 with EMA momentum 1: the networks stay exactly the initial ones.
    run_pretrain(tiny_recipe(steps=1, optim={"lr": 0.0, "start_lr": 0.0, "final_lr": 0.0, "weight_decay": 0.0,
                                             "final_weight_decay": 0.0}, ema={"momentum": 1.0},
                             model={"init": str(tmp_path / "a")}), tmp_path / "b")
    dst = jepa.load(str(tmp_path / "b"))
    for name in ("encoder", "target_encoder", "predictor"):
        a, b = getattr(src, name).state_dict(), getattr(dst, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_loss_logged_after_an_odd_resume_averages_only_the_steps_run(tmp_path):
    every = run_pretrain(tiny_recipe(steps=4), tmp_path / "every")  # logs each step
    per_step = losses(tmp_path / "every")
    recipe = tiny_recipe(steps=4, log={"every_steps": 2})
    run_pretrain(recipe, tmp_path / "odd", stop_at=3)
    run_pretrain(recipe, tmp_path / "odd", resume=True)
    records = {json.loads(line)["step"]: json.loads(line)["loss"]
               for line in (tmp_path / "odd" / "metrics.jsonl").read_text().splitlines()}
    assert records[4] == pytest.approx(per_step[3], rel=1e-6)  # step 4 alone, not (step 4) / 2
    assert every["final_loss"] == per_step[3]


def test_a_failed_start_leaves_the_run_directory_usable(tmp_path):
    bad = tiny_recipe(monitor={"every_steps": 1, "train": str(tmp_path / "missing.tar"), "test": str(tmp_path / "m.tar")})
    with pytest.raises(JepaError, match="no such file"):
        run_pretrain(bad, tmp_path / "run")
    assert not (tmp_path / "run" / "recipe.toml").exists()
    run_pretrain(tiny_recipe(steps=1), tmp_path / "run")  # no --resume needed: nothing was written


def test_architecture_and_batch_mistakes_are_recipe_errors(tmp_path):
    from jepa import RecipeError

    with pytest.raises(RecipeError, match="model.num_heads: width 64 is not divisible by 5 heads"):
        run_pretrain(tiny_recipe(model={"num_heads": 5}), tmp_path / "a")
    with pytest.raises(RecipeError, match="data.batch_size: global batch 8 is not divisible"):
        run_pretrain(tiny_recipe(train={"grad_accum": 3}), tmp_path / "b")


def test_activation_checkpointing_recomputes_the_same_training(tmp_path):
    """Recomputing block activations in backward is a memory trade, not a change of the model: the loss
    trajectory and the weights are those of the plain run (to float rounding)."""
    plain = run_pretrain(tiny_recipe(steps=3), tmp_path / "plain")
    ckpt = run_pretrain(tiny_recipe(steps=3, train={"steps": 3, "activation_checkpointing": True}), tmp_path / "ac")
    rows = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("plain", "ac")]
    assert rows[1] == pytest.approx(rows[0], rel=1e-5) and len(rows[0]) == 3
    for net in ("encoder", "predictor"):
        a = load_file(str(tmp_path / "plain" / "checkpoints" / "step_000003" / f"{net}.safetensors"))
        b = load_file(str(tmp_path / "ac" / "checkpoints" / "step_000003" / f"{net}.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{net}.{k}")
    assert plain["final_loss"] == pytest.approx(ckpt["final_loss"], rel=1e-5)


def test_activation_checkpointing_recomputes_in_backward():
    """It is really on: the block forward runs again during backward (and not for the no-grad target)."""
    from jepa.config import load_recipe
    from jepa.model import build_jepa

    res = load_recipe(tiny_recipe())
    tok_cls, tok_cfg = res.component("tokenizer")
    model = build_jepa(res.recipe.model, res.recipe.loss, tok_cls, tok_cfg, grid=(8, 8))
    calls = {"n": 0}
    # a pre-hook: the recomputation stops early, after the last tensor backward needs, so post-hooks may not run
    model.encoder.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    x, ctx, tgt = torch.randn(2, 3, 32, 32), torch.arange(40).repeat(2, 1), torch.arange(40, 50).repeat(4, 2, 1)
    for flag, expected in ((False, 1), (True, 2)):
        model.encoder.grad_checkpointing = flag
        calls["n"] = 0
        loss, _ = model(x, ctx, tgt)
        loss.backward()
        assert calls["n"] == expected


FAULTS_SCRIPT = """
import resource, sys, torch
from jepa.train.host import tune_cpu_malloc
if sys.argv[1] == "tuned":
    assert tune_cpu_malloc()
for _ in range(2):  # 64 MB, twice: its pages are mapped now
    x = torch.ones(16 * 2**20); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    x = torch.ones(16 * 2**20); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_tuned_cpu_allocator_reuses_freed_pages_instead_of_faulting_them_in_again(tmp_path):
    """glibc maps a 64 MB tensor afresh on each allocation: 16,384 page faults each time. Tuned, the
    freed pages are reused (measured: 0 faults in most runs, one refault of the 64 MB in some, when an
    aligned allocation lands next to the freed chunk). Fresh processes: the setting is process-wide."""
    faults = {arm: int(subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, arm], capture_output=True, text=True,
                                      check=True).stdout) for arm in ("system", "tuned")}
    assert faults["system"] > 5 * 16_000, faults
    assert faults["tuned"] <= 16_384 + 1_000, faults
    summary = run_pretrain(tiny_recipe(steps=1), tmp_path / "run")
    assert summary["cpu_allocator"] == "tuned"
