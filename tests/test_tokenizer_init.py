"""Patch-projection init: the reference's std-0.02 default, and a patch-size-independent option."""

from __future__ import annotations

import pytest
import torch

from jepa.config import load_recipe
from jepa.model import build_from_recipe

from .conftest import tiny_recipe


def content_std(patch: int, init: str | None, crop: int = 32) -> float:
    tokenizer = {"patch_size": patch} | ({"init": init} if init else {})
    resolved = load_recipe(tiny_recipe(tokenizer=tokenizer, source={"crop_size": crop},
                                       model={"size": "vit_test", "embed_dim": 192, "num_heads": 4}))
    torch.manual_seed(0)
    model = build_from_recipe(resolved)
    with torch.no_grad():
        return model.encoder.patch_embed(torch.randn(8, 3, crop, crop)).std().item()


def test_default_is_the_reference_init_whose_content_scales_with_patch_area():
    # std 0.02 per weight: token content ~ 0.02 * sqrt(3 p^2), weak next to sin-cos positions for small p
    assert content_std(4, None) == pytest.approx(0.02 * (3 * 16) ** 0.5, rel=0.15)
    assert content_std(16, None) == pytest.approx(0.02 * (3 * 256) ** 0.5, rel=0.15)


@pytest.mark.parametrize("patch", [4, 16])
def test_xavier_init_keeps_token_content_on_the_scale_of_the_positions(patch):
    # Xavier-uniform on the flattened kernel: var = 2 / (fan_in + fan_out) per weight, so the token
    # variance is 2 * fan_in / (fan_in + fan_out), order one whatever the patch size.
    fan_in, fan_out = 3 * patch * patch, 192
    assert content_std(patch, "xavier", crop=64) == pytest.approx((2 * fan_in / (fan_in + fan_out)) ** 0.5, rel=0.15)


def test_target_encoder_starts_as_an_exact_copy_under_either_init():
    resolved = load_recipe(tiny_recipe(tokenizer={"patch_size": 4, "init": "xavier"}))
    model = build_from_recipe(resolved)
    for a, b in zip(model.encoder.state_dict().values(), model.target_encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
