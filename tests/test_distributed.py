"""Data parallelism: ``torchrun --nproc_per_node 2`` (gloo, CPU) computes what one process computes
with the same global batch, and its checkpoint resumes on one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from jepa.api import run_pretrain

from .conftest import tiny_recipe

STEPS = 6


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def torchrun(tmp_path: Path, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "jepa", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    # Batch 16: 8 per rank. Multi-block masks differ in size per sample, so ranks hold different numbers
    # of target tokens: the loss weighting is exercised, not just the happy path.
    recipe = tiny_recipe(steps=STEPS, batch=16, checkpoint={"every_steps": 2, "keep_last": 5})
    one = run_pretrain(recipe, tmp / "one")
    toml = tmp / "tiny.toml"
    toml.write_text(tomli_w.dumps(recipe))
    two = torchrun(tmp, ["pretrain", str(toml), "--run-dir", str(tmp / "two"), "--stop-at", "4"])
    assert two.returncode == 0, two.stderr[-3000:]
    resumed = subprocess.run([sys.executable, "-m", "jepa", "pretrain", str(toml), "--run-dir", str(tmp / "two"),
                              "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"tmp": tmp, "one": one, "two_stderr": two.stderr}


def test_two_ranks_follow_the_one_rank_loss_trajectory(runs):
    one, two = losses(runs["tmp"] / "one"), losses(runs["tmp"] / "two")
    assert len(one) == len(two) == STEPS
    # Steps 1-4 ran on two ranks, 5-6 on one rank resumed from the two-rank checkpoint.
    assert two == pytest.approx(one, rel=1e-4)
    assert one[-1] < one[0]


def test_two_rank_checkpoint_has_plain_weights_matching_one_rank(runs):
    a = runs["tmp"] / "one" / "checkpoints" / "step_000004"
    b = runs["tmp"] / "two" / "checkpoints" / "step_000004"
    for net in ("encoder", "predictor", "target_encoder"):
        wa, wb = load_file(str(a / f"{net}.safetensors")), load_file(str(b / f"{net}.safetensors"))
        assert wa.keys() == wb.keys()  # no "module." prefix from the DDP wrapper
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=f"{net}.{k}")


def test_only_rank_zero_writes_and_the_summary_names_the_world(runs):
    two = runs["tmp"] / "two"
    summary = json.loads((two / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["start_step"] == 4 and summary["world_size"] == 1
    steps = [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # one line per step: rank 1 logged nothing


def test_a_global_batch_the_ranks_cannot_share_is_a_recipe_error_before_anything_is_written(tmp_path):
    toml = tmp_path / "odd.toml"
    toml.write_text(tomli_w.dumps(tiny_recipe(steps=2, batch=15)))
    out = torchrun(tmp_path, ["pretrain", str(toml), "--run-dir", str(tmp_path / "run")])
    assert out.returncode != 0
    assert "data.batch_size: global batch 15 is not divisible by world size 2 x train.grad_accum 1" in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_checkpoint_write_that_fails_stops_every_rank_with_a_one_line_reason(tmp_path, strategy):
    """A failed checkpoint write under torchrun: no rank waits at a barrier for one that has stopped, and no
    rank dies with a traceback. DDP: only rank 0 writes, and rank 1 learns that it failed. FSDP: the
    sharded write fails inside torch.distributed.checkpoint (whose exception is a BaseException) on
    every rank. The previous checkpoint stays the latest either way."""
    import resource

    recipe = tiny_recipe(steps=4, batch=16, dist={"strategy": strategy})
    toml = tmp_path / "tiny.toml"
    toml.write_text(tomli_w.dumps(recipe))
    run = tmp_path / "run"
    run_pretrain(recipe, run, stop_at=2)
    limit = (run / "checkpoints" / "step_000002" / "encoder.safetensors").stat().st_size // 2

    def small_files():  # inherited by both ranks
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "jepa",
           "pretrain", str(toml), "--run-dir", str(run), "--resume"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
                         preexec_fn=small_files)
    errors = sorted(line for line in out.stderr.splitlines() if line.startswith("error:"))
    assert out.returncode != 0 and "]: Traceback" not in out.stderr, out.stderr[-3000:]  # no rank's traceback
    assert len(errors) == 2 and all("step_000002" in e for e in errors), errors  # one line per rank
    if strategy == "ddp":
        assert "could not write checkpoint" in errors[0] and "File too large" in errors[0]
        assert "rank 0 could not write the checkpoint of step 4" in errors[1]
    else:
        assert all("could not write the sharded checkpoint of step 4 (rank 0: File too large)" in e for e in errors)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial write is gone


# --------------------------------------------------------------------------- FSDP2
@pytest.fixture(scope="module")
def fsdp_runs(runs):
    """The same recipe sharded with FSDP2 on two ranks for 4 steps, then resumed on ONE unsharded process
    from the sharded (torch.distributed.checkpoint) state: a restore on a different world size."""
    tmp = runs["tmp"]
    recipe = tiny_recipe(steps=STEPS, batch=16, checkpoint={"every_steps": 2, "keep_last": 5},
                         dist={"strategy": "fsdp"})
    toml = tmp / "tiny_fsdp.toml"
    toml.write_text(tomli_w.dumps(recipe))
    two = torchrun(tmp, ["pretrain", str(toml), "--run-dir", str(tmp / "fsdp"), "--stop-at", "4"])
    assert two.returncode == 0, two.stderr[-3000:]
    two_summary = json.loads((tmp / "fsdp" / "summary.json").read_text())
    resumed = subprocess.run([sys.executable, "-m", "jepa", "pretrain", str(toml), "--run-dir", str(tmp / "fsdp"),
                              "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"tmp": tmp, "two_summary": two_summary}


def test_fsdp_two_ranks_follow_the_one_rank_trajectory_and_resume_on_one_process(fsdp_runs):
    one, fsdp = losses(fsdp_runs["tmp"] / "one"), losses(fsdp_runs["tmp"] / "fsdp")
    assert fsdp_runs["two_summary"]["strategy"] == "fsdp" and fsdp_runs["two_summary"]["world_size"] == 2
    assert len(fsdp) == STEPS
    # steps 1-4 sharded over two ranks; 5-6 on one process from the resharded weights and AdamW moments
    assert fsdp == pytest.approx(one, rel=1e-4)


def test_fsdp_checkpoint_holds_every_shard_and_full_weights_matching_one_rank(fsdp_runs):
    a = fsdp_runs["tmp"] / "one" / "checkpoints" / "step_000004"
    b = fsdp_runs["tmp"] / "fsdp" / "checkpoints" / "step_000004"
    assert (b / "dcp" / ".metadata").is_file() and len(list((b / "dcp").glob("*.distcp"))) == 2  # one per rank
    assert "optimizer" not in torch.load(b / "state.pt", weights_only=True)  # it lives in the shards
    for net in ("encoder", "predictor", "target_encoder"):
        wa, wb = load_file(str(a / f"{net}.safetensors")), load_file(str(b / f"{net}.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=f"{net}.{k}")


def test_a_single_process_checkpoint_resumes_sharded_on_two_ranks(runs):
    """The other direction: one process's checkpoint (optimizer state in state.pt, indexed by position)
    resumes under FSDP on two ranks, its AdamW moments placed by parameter name, same trajectory."""
    import shutil

    tmp = runs["tmp"]
    run = tmp / "one_to_fsdp"
    shutil.copytree(tmp / "one", run)
    shutil.rmtree(run / "checkpoints" / "step_000006")
    (run / "checkpoints" / "latest").write_text("step_000004\n")
    toml = tmp / "tiny_fsdp_resume.toml"
    toml.write_text(tomli_w.dumps(tiny_recipe(steps=STEPS, batch=16, checkpoint={"every_steps": 2, "keep_last": 5},
                                              dist={"strategy": "fsdp"})))
    out = torchrun(tmp, ["pretrain", str(toml), "--run-dir", str(run), "--resume"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["strategy"] == "fsdp"
    assert losses(run) == pytest.approx(losses(tmp / "one"), rel=1e-4)
    assert (run / "checkpoints" / "step_000006" / "dcp" / ".metadata").is_file()
