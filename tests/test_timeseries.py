"""The example third-party plugin (examples/jepa-timeseries): installed with plain pip, listed, and
pretraining through the normal CLI; the core tree never imports it; the tutorial quotes its real files."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from .conftest import write_shard

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "jepa-timeseries"
TUTORIAL = ROOT / "docs" / "plugins" / "writing-a-plugin.md"


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def signal_shard(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(320)
    samples = [(f"{i:04d}", {"npy": npy(np.sin(t / (3 + i % 3) + rng.uniform(0, 6)).astype(np.float32)),
                             "cls": str(i % 3).encode()}) for i in range(n)]
    samples.append(("garbage", {"npy": b"\x93NUMPY not really", "cls": b"0"}))
    return write_shard(path, samples)


def test_listed_as_a_third_party_plugin(jepa_cli):
    code, out, err = jepa_cli("plugins", "list", "--json")
    assert code == 0, err
    ts = {p["name"]: p for p in json.loads(out)}["timeseries"]
    assert ts["distribution"] == "jepa-timeseries" and ts["builtin"] is False
    assert ts["components"] == {"tokenizer": ["signal"], "masker": ["span"], "source": ["npy"]}


def test_pretrains_through_the_cli_and_skips_garbage(tmp_path, jepa_cli):
    recipe = {
        "requires": ["timeseries"], "run": {"name": "ts", "device": "cpu"}, "model": {"size": "vit_test"},
        "tokenizer": {"name": "signal", "patch_size": 16}, "masker": {"name": "span", "span": 3},
        "source": {"name": "npy", "length": 256},
        "data": {"train": str(signal_shard(tmp_path / "train.tar")), "batch_size": 8, "num_workers": 0},
        "schedule": {"warmup_steps": 1}, "train": {"steps": 3}, "checkpoint": {"every_steps": 3},
        "log": {"every_steps": 1, "tensorboard": False, "progress": False},
    }
    path = tmp_path / "ts.toml"
    path.write_text(tomli_w.dumps(recipe))
    code, out, err = jepa_cli("pretrain", str(path), "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert set(summary["skipped"]) == {"corrupt"}  # the garbage array, met once or twice
    assert 'name = "timeseries.signal"' in (tmp_path / "run" / "recipe.toml").read_text()


def test_core_never_imports_a_plugin():
    pattern = re.compile(r"^\s*(from|import)\s+(jepa_timeseries|jepa_audio|jepa_image)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "jepa").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def quoted_files(text: str) -> dict[str, str]:
    """``<!-- file: PATH -->`` followed by a fenced block -> {PATH: block text}."""
    blocks = re.findall(r"<!-- file: (\S+) -->\n```[a-z]*\n(.*?)```\n", text, re.S)
    return dict(blocks)


def test_tutorial_quotes_every_file_of_the_example_verbatim():
    quoted = quoted_files(TUTORIAL.read_text())
    real = {str(p.relative_to(ROOT)) for p in EXAMPLE.rglob("*") if p.suffix in (".py", ".toml")
            and "egg-info" not in str(p) and "__pycache__" not in str(p)}
    assert set(quoted) == real
    for path, text in quoted.items():
        assert text == (ROOT / path).read_text(), f"{path} in the tutorial differs from the real file"


@pytest.mark.parametrize("broken", ["```python\nx = 1\n```\n"])
def test_quote_parser_needs_the_file_marker(broken):
    assert quoted_files(broken) == {}
    assert quoted_files(f"<!-- file: a.py -->\n{broken}") == {"a.py": "x = 1\n"}
