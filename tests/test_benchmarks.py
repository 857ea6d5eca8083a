"""The benchmark scripts still run (one tiny step each): they are measurements, so only their plumbing
is tested here, never their timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from .conftest import tiny_recipe

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_train_step_benchmark_reports_a_consistent_json_line(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe(train={"steps": 4, "activation_checkpointing": True})))
    out = _run(str(BENCH / "train_step.py"), str(recipe), "--steps", "2", "--warmup", "1", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["batch_size"] == 8 and r["steps"] == 2 and r["gflops_per_step"] > 0
    assert r["achieved_gflops"] / r["peak_gflops"] == pytest.approx(r["mfu"], rel=1e-2)


def test_cpu_allocator_benchmark_runs_both_arms_and_reports_their_ratio(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe()))
    out = _run(str(BENCH / "cpu_allocator.py"), "--recipe", str(recipe), "--set", "data.batch_size=8",
               "--precision", "fp32", "--rounds", "1", "--steps", "1", "--warmup", "1", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])["results"][0]
    assert r["tuned_over_system"] == pytest.approx(r["ms_per_step"]["tuned"] / r["ms_per_step"]["system"], rel=1e-2)
    assert json.loads((tmp_path / "cpu_allocator_tiny.json").read_text())["results"][0] == r


def test_masks_benchmark_and_a_missing_reference_checkout(tmp_path):
    out = _run(str(BENCH / "masks.py"), "--grid", "8x8", "--n", "50", "--repeats", "1", "--batch", "16")
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["results"][0]["grid"] == [8, 8] and r["results"][0]["masks_per_s"] > 0
    bad = _run(str(BENCH / "reference.py"), "--ijepa", str(tmp_path))
    assert bad.returncode != 0 and "not a checkout of facebookresearch/ijepa" in bad.stderr


def test_gpu_script_plumbing_in_smoke_mode_on_the_cpu(tmp_path):
    """benchmarks/gpu.sh is for a GPU; SMOKE=1 runs an item on the CPU: one JSON per item and a summary."""
    import os

    env = {**os.environ, "SMOKE": "1", "ONLY": "vitb16_fp32", "OUT": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(BENCH / "gpu.sh")], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["vitb16_fp32"] and rows[0]["ms_per_step"] > 0 and "peak_cuda_mb" in rows[0]


def test_cifar_results_state_the_bar_from_the_numbers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import quality_cifar10

    def result(linear, random, knn):
        return {"ijepa": {"linear_top1": linear, "knn_top1": knn}, "random_init": {"linear_top1": random}}

    assert "bar is reached" in quality_cifar10.verdict(result(0.56, 0.475, 0.33))
    assert "bar is not reached" in quality_cifar10.verdict(result(0.56, 0.475, 0.32))  # k-NN below 32.3%
    line = quality_cifar10.verdict(result(0.50, 0.45, 0.40))  # +5 points: below the +8 bar
    assert "bar is not reached" in line and "+5.0 points linear" in line


def test_precision_quality_pairs_fp32_and_bf16_runs_of_one_seed(tmp_path):
    """The bf16-vs-fp32 benchmark on the shipped quick shards: per seed one run of each precision,
    started from the same weights and data (their first losses agree to bf16 rounding), and the means."""
    import os

    from .conftest import QUICK_TEST, QUICK_TRAIN

    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "train-000000.tar").symlink_to(QUICK_TRAIN)
    (tmp_path / "cifar10" / "test-000000.tar").symlink_to(QUICK_TEST)
    args = [str(BENCH / "precision_quality.py"), "--seeds", "1", "--steps", "2", "--train-shards", "1",
            "--set", "data.batch_size=16", "--set", "data.num_workers=0", "--set", f'data.train="{QUICK_TRAIN}"',
            "--run-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JEPA_DATA_ROOT": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads((tmp_path / "out" / "precision_quality.json").read_text())
    fp32, bf16 = r["runs"]
    assert (fp32["precision"], bf16["precision"], fp32["seed"], bf16["seed"]) == ("fp32", "bf16", 0, 0)
    assert fp32["first_loss"] == pytest.approx(bf16["first_loss"], rel=0.03) and fp32["first_loss"] != bf16["first_loss"]
    assert r["bf16_minus_fp32"]["linear_top1"] == pytest.approx(bf16["linear_top1"] - fp32["linear_top1"])


def test_cifar_whitening_gives_the_training_features_identity_covariance(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    import quality_cifar10

    torch.manual_seed(0)
    mix = torch.randn(6, 6) * torch.tensor([10.0, 1, 1, 0.1, 0.1, 0.01])  # channels of very different scale
    train = torch.randn(2000, 6) @ mix + 3.0
    wtrain, wtest = quality_cifar10.whitened(train, train[:10])
    torch.testing.assert_close(torch.cov(wtrain.double().T), torch.eye(6, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(wtest, wtrain[:10])  # test features go through the map fitted on train


def test_cifar_budget_becomes_whole_log_intervals_of_the_step_measured_here(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import quality_cifar10

    assert quality_cifar10.steps_for(100.0, 0.3) == 325  # 333 steps fit: cut to whole log intervals of 25
    assert quality_cifar10.steps_for(1.0, 0.3) == 25  # never none
    tiny = ['model.size="vit_test"', "model.depth=2", "data.batch_size=8"]  # the recipe's step, made small
    steps, seconds = quality_cifar10.calibrated_steps(2.0, tiny, timed=3)
    assert 0 < seconds < 5 and steps == quality_cifar10.steps_for(2.0 * 60 * quality_cifar10.BUDGET_SHARE, seconds)
