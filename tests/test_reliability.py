"""Crash safety and numerical guards, on real training runs (vit_test, 32 px, a few steps).

Subprocesses are used only where a process must really die or be limited: SIGKILL at random points,
and RLIMIT_FSIZE while a checkpoint is written.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from jepa import CheckpointError
from jepa.api import load, run_pretrain
from jepa.config import load_recipe
from jepa.errors import TrainingStopped
from jepa.train import Trainer
from jepa.train.checkpoint import list_checkpoints, save_checkpoint

from .conftest import tiny_recipe

NETS = ("encoder", "predictor", "target_encoder")


def weights(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(str(ckpt / f"{n}.safetensors")) for n in NETS}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    for net in NETS:
        assert wa[net].keys() == wb[net].keys()
        differ = [k for k in wa[net] if not torch.equal(wa[net][k], wb[net][k])]
        assert not differ, f"{net}: {differ[:3]} differ between {a} and {b}"


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(tomli_w.dumps(recipe))
    return path


def last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps, default=0)


def pretrain_cmd(recipe: Path, run: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "jepa", "pretrain", str(recipe), "--run-dir", str(run)] + (["--resume"] if resume else [])


# --------------------------------------------------------------------------- kill -9
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_weights(tmp_path):
    steps = 16
    recipe = tiny_recipe(steps=steps, checkpoint={"every_steps": 2, "keep_last": 2})
    run_pretrain(recipe, tmp_path / "straight")
    # Kill within about one step of the threshold; the step time is this machine's, so a fast machine
    # does not finish the run before the kill lands.
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    step_s = sorted(recipe["data"]["batch_size"] / r["samples_per_s"] for r in rows)[len(rows) // 2]
    toml = write_recipe(tmp_path / "tiny.toml", recipe)
    run = tmp_path / "killed"
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    kills, after = [], 0
    for _ in range(3):
        # Kill once a step past the previous kill has been logged, at a random moment within the next
        # step (which includes checkpoint writes): every kill makes progress, none is predictable.
        threshold = after + rng.randint(1, 2)
        started = (run / "recipe.toml").exists()  # a kill during start-up may come before the run directory
        proc = subprocess.Popen(pretrain_cmd(toml, run, resume=started), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600  # generous: start-up alone is slow on a loaded machine
        while proc.poll() is None and last_step(run / "metrics.jsonl") < threshold and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5 * step_s))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append(last_step(run / "metrics.jsonl"))
        proc.wait(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), f"seed {seed}: {proc.stderr.read()}"
        after = last_step(run / "metrics.jsonl")
        # Whatever the moment, no half-written checkpoint is visible and every listed one loads.
        for ckpt in list_checkpoints(run / "checkpoints"):
            weights(ckpt)
            torch.load(ckpt / "state.pt", weights_only=True)
    assert len(kills) >= 2, f"seed {seed}: the run finished before it could be killed ({kills})"
    done = subprocess.run(pretrain_cmd(toml, run, resume=True), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"seed {seed}, killed after steps {kills}: {done.stderr}"
    name = f"step_{steps:06d}"
    assert_same_weights(run / "checkpoints" / name, tmp_path / "straight" / "checkpoints" / name)
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, steps + 1))


# --------------------------------------------------------------------------- a failing write
def test_a_checkpoint_write_that_fails_keeps_the_previous_one_and_says_so(tmp_path):
    recipe = tiny_recipe(steps=4)
    toml = write_recipe(tmp_path / "tiny.toml", recipe)
    run = tmp_path / "run"
    run_pretrain(recipe, run, stop_at=2)
    size = (run / "checkpoints" / "step_000002" / "encoder.safetensors").stat().st_size
    limit = size // 2  # every network file is larger; metrics, recipe and summary are far smaller

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(pretrain_cmd(toml, run, resume=True), capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert "could not write checkpoint" in errors[0] and "step_000004" in errors[0]
    assert "File too large" in errors[0] and "step_000002" in errors[0]  # the cause and where to go back to
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_000002"] and not list(ckpts.glob(".tmp-*"))
    assert load(run).path.name == "step_000002"
    summary = json.loads((run / "summary.json").read_text())
    assert "could not write checkpoint" in summary["stopped"]
    # Once there is room again, the run continues from the intact checkpoint to the end.
    assert run_pretrain(recipe, run, resume=True)["start_step"] == 2
    run_pretrain(recipe, tmp_path / "straight")
    assert_same_weights(ckpts / "step_000004", tmp_path / "straight" / "checkpoints" / "step_000004")


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite weights"):
        save_checkpoint(tmp_path / "checkpoints", 1, {"encoder": net}, {"step": 1}, {}, "", 3)
    assert not list_checkpoints(tmp_path / "checkpoints") and not (tmp_path / "checkpoints" / "latest").exists()


# --------------------------------------------------------------------------- SIGTERM / SIGINT
class SignalAt(Trainer):
    """Sends this process ``signum`` while step ``at`` (0-based) is running."""

    at, signum = 2, signal.SIGTERM

    def loader(self):
        for step, batch in enumerate(super().loader(), start=self.start_step):
            if step == self.at:
                os.kill(os.getpid(), self.signum)
            yield batch


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_at_the_step_boundary_and_resume_is_exact(tmp_path, signum):
    recipe = tiny_recipe(steps=4, checkpoint={"every_steps": 100})
    run_pretrain(recipe, tmp_path / "straight")
    trainer = SignalAt(load_recipe(recipe), tmp_path / "run")
    trainer.signum = signum
    before = signal.getsignal(signum)
    with pytest.raises(TrainingStopped, match=f"stopped by {signum.name} after step 3; checkpoint .*step_000003; "
                                              "continue with --resume") as err:
        trainer.fit()
    assert err.value.exit_code == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    assert signal.getsignal(signum) == before  # the previous handler is back
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert run_pretrain(recipe, tmp_path / "run", resume=True)["start_step"] == 3
    assert_same_weights(tmp_path / "run/checkpoints/step_000004", tmp_path / "straight/checkpoints/step_000004")


# --------------------------------------------------------------------------- resume edge cases
def test_resume_refuses_corrupt_checkpoints_and_starts_over_only_when_there_is_none(tmp_path):
    recipe = tiny_recipe(steps=2)
    run = tmp_path / "run"
    run_pretrain(recipe, run)
    state = run / "checkpoints" / "step_000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot load .*state.pt"):
        run_pretrain(recipe, run, resume=True)
    (run / "checkpoints" / "latest").write_text("step_000009\n")
    with pytest.raises(CheckpointError, match="names 'step_000009', which is missing"):
        run_pretrain(recipe, run, resume=True)
    # A run killed before its first checkpoint holds only recipe.toml: --resume starts it over, loudly,
    # and still refuses a different recipe.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "recipe.toml").write_text((run / "recipe.toml").read_text())
    with pytest.raises(CheckpointError, match="differs from the checkpoint's in optim.lr"):
        run_pretrain(tiny_recipe(steps=2, optim={"lr": 0.5}), fresh, resume=True)
    assert run_pretrain(recipe, fresh, resume=True)["start_step"] == 0
    with pytest.raises(Exception, match="already holds a run"):
        run_pretrain(recipe, fresh)


def test_fields_added_by_a_newer_version_do_not_block_a_resume_at_their_defaults(tmp_path):
    import tomllib

    run = tmp_path / "run"
    run_pretrain(tiny_recipe(steps=4), run, stop_at=2)
    saved = run / "checkpoints" / "step_000002" / "recipe.toml"
    old = tomllib.loads(saved.read_text())
    del old["health"]  # as written by a version without the [health] section
    saved.write_text(tomli_w.dumps(old))
    with pytest.raises(CheckpointError, match=r"differs from the checkpoint's in health.min_rank; pass "
                                              r"--allow-changes health.min_rank"):
        run_pretrain(tiny_recipe(steps=4, health={"min_rank": 3.0}), run, resume=True)
    assert run_pretrain(tiny_recipe(steps=4), run, resume=True)["start_step"] == 2


# --------------------------------------------------------------------------- non-finite steps
class Poisoned(Trainer):
    """Feeds NaN inputs at the given (0-based) steps: their loss and gradients are non-finite."""

    poison: set[int] = set()

    def loader(self):
        for step, batch in enumerate(super().loader(), start=self.start_step):
            if step in self.poison:
                batch.x = torch.full_like(batch.x, float("nan"))
            yield batch


def test_a_non_finite_step_is_skipped_exactly_and_counted(tmp_path):
    trainer = Poisoned(load_recipe(tiny_recipe(steps=3)), tmp_path / "run")
    trainer.poison = {2}
    summary = trainer.fit()
    ck = tmp_path / "run" / "checkpoints"
    # Step 3 changed nothing: no optimizer step (weights, moments, step count) and no EMA update.
    assert_same_weights(ck / "step_000002", ck / "step_000003")
    s2, s3 = (torch.load(ck / f"step_00000{i}" / "state.pt", weights_only=True)["optimizer"] for i in (2, 3))
    for key, value in s2["state"].items():
        assert all(torch.equal(value[k], s3["state"][key][k]) for k in value)
    assert summary["nonfinite_steps"] == 1 and summary["stopped"] is None
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1] and records[2]["loss"] is None
    assert summary["final_loss"] == records[1]["loss"]  # the last interval that had a finite step
    assert all(r["loss"] > 0 for r in records[:2])


def test_non_finite_steps_in_a_row_stop_the_run_naming_the_steps_and_the_checkpoint(tmp_path):
    trainer = Poisoned(load_recipe(tiny_recipe(steps=8, health={"max_nonfinite_in_a_row": 2})), tmp_path / "run")
    trainer.poison = {2, 3, 4, 5}
    with pytest.raises(TrainingStopped, match=r"2 steps in a row had a non-finite loss or gradient \(steps 3-4, "
                                              r"all skipped\); stopped; the last good checkpoint is .*step_000002"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000002"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 2 and summary["stopped"].startswith("2 steps in a row")
