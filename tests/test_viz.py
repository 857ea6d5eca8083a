"""``jepa viz masks|features|curves`` write PNGs that show what they claim; render hooks; no matplotlib."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from jepa.api import run_pretrain
from jepa.cli import main
from jepa.components import default_render
from jepa.viz.common import on_grid, upsample

from .conftest import QUICK_TRAIN, tiny_recipe

plt = pytest.importorskip("matplotlib.pyplot")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("viz") / "run"
    run_pretrain(tiny_recipe(steps=3), run)
    return run


def jepa(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def png(path) -> np.ndarray:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return plt.imread(str(path))[..., :3]


def test_viz_masks_shows_samples_blocks_and_frequencies(tmp_path, capsys):
    from jepa.config import load_recipe
    from jepa.plugins import get_plugins
    from jepa.viz.masks import frequencies

    recipe = tmp_path / "r.toml"
    import tomli_w

    recipe.write_text(tomli_w.dumps(tiny_recipe()))
    out = tmp_path / "masks.png"
    assert jepa("viz", "masks", str(recipe), "--data", str(QUICK_TRAIN), "--out", str(out), "--draws", "200") == 0
    assert capsys.readouterr().out.strip() == str(out)
    img = png(out)
    assert img.shape[0] > 500 and img.shape[1] > 800 and img.std() > 0.1
    # The overlay colours (target tints) are present, not just the photographs.
    assert (np.abs(img[..., 0] - img[..., 2]) > 0.4).mean() > 0.01
    # The heat-maps' data: this masker reaches every token, borders included (the reference never
    # put a block on the last row and column).
    masker_entry = get_plugins().registry.get("masker", "multiblock")
    ctx, tgt = frequencies(masker_entry.cls(masker_entry.cls.Config()), (8, 8), 300, 0)
    assert tgt[-1].max() > 0 and tgt[:, -1].max() > 0 and ctx.min() > 0 and 0.9 < ctx.max() + tgt.min() + 1
    assert load_recipe(str(recipe)).recipe.data.train  # the recipe itself was not needed beyond loading


def test_viz_features_and_curves_from_a_real_run(run_dir, tmp_path):
    out = tmp_path / "features.png"
    assert jepa("viz", "features", "--checkpoint", str(run_dir), "--data", str(QUICK_TRAIN), "--out", str(out),
                "--samples", "4") == 0
    img = png(out)
    assert img.std() > 0.1 and img.shape[1] > img.shape[0]  # two sample/PCA pairs side by side
    out = tmp_path / "curves.png"
    assert jepa("viz", "curves", str(run_dir), "--out", str(out)) == 0
    img = png(out)
    assert img.shape[0] > 400 and (img < 0.5).mean() > 0.005  # axes, text and lines drawn


def test_viz_needs_matplotlib_and_says_so_in_one_line(run_dir, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert jepa("viz", "curves", str(run_dir), "--out", str(tmp_path / "c.png")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: jepa viz needs matplotlib, which is not installed; install it with `pip install matplotlib`"]
    assert not (tmp_path / "c.png").exists()


def test_default_render_images_and_spectrograms():
    rgb = default_render(torch.stack([torch.zeros(4, 5), torch.ones(4, 5), torch.full((4, 5), 0.5)]))
    assert rgb.shape == (4, 5, 3) and rgb[0, 0].tolist() == [0.0, 1.0, 0.5]
    spec = default_render(torch.linspace(-80, 0, 6 * 7).reshape(1, 6, 7))  # a log-mel: [1, F, T]
    assert spec.shape == (6, 7, 3) and spec.min() == 0.0 and spec.max() == 1.0
    assert (np.diff(spec.sum(-1).reshape(-1)) >= 0).all()  # louder is brighter
    with pytest.raises(ValueError, match="give the source a render"):
        default_render(torch.zeros(2, 3, 4, 5))


def test_image_source_render_undoes_the_normalisation():
    from PIL import Image

    from jepa.plugins import get_plugins

    entry = get_plugins().registry.get("source", "image")
    source = entry.cls(entry.cls.Config(crop_size=8))
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    back = source.render(source.to_tensor(Image.fromarray(pixels)))
    assert np.abs(back - pixels / 255.0).max() < 1e-5


def test_grid_overlay_maps_tokens_to_pixel_cells():
    cells = on_grid([0, 5], (2, 3))
    assert cells.tolist() == [[True, False, False], [False, False, True]]
    px = upsample(cells, 4, 6)
    assert px[:2, :2].all() and px[2:, 4:].all() and px.sum() == 8
    assert on_grid([1, 3], (5,)).tolist() == [[False, True, False, True, False]]  # a 1-D grid: one row
