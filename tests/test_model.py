"""Networks: position embeddings, padding invariance, EMA, losses, sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jepa.config import load_recipe
from jepa.config.schema import LossConfig, ModelConfig
from jepa.errors import JepaError
from jepa.model import build_jepa, ema_update, regression_loss, sincos_pos_embed
from jepa.model.loss import variance_covariance
from jepa.model.vit import gather_tokens

from .conftest import tiny_recipe


def reference_layout_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """Independent statement of the reference channel layout: [sin(x w), cos(x w), sin(y w), cos(y w)]."""
    d = dim // 2
    omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
    out = np.zeros((rows * cols, dim))
    for r in range(rows):
        for c in range(cols):
            out[r * cols + c] = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
    return out


@pytest.mark.parametrize("rows, cols", [(4, 4), (3, 5), (1, 7)])
def test_sincos_matches_reference_layout_on_any_grid(rows, cols):
    coords = torch.tensor([(r, c) for r in range(rows) for c in range(cols)])
    ours = sincos_pos_embed(coords, 16).double().numpy()
    np.testing.assert_allclose(ours, reference_layout_2d(16, rows, cols), atol=1e-6)


def test_sincos_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(torch.zeros(3, 2), 6)


def _model(**model):
    r = load_recipe(tiny_recipe(model=model))
    tok_cls, tok_cfg = r.component("tokenizer")
    torch.manual_seed(0)
    return build_jepa(r.recipe.model, r.recipe.loss, tok_cls, tok_cfg).eval()


def test_parameter_names_follow_the_reference_checkpoints():
    m = _model()
    enc = set(m.encoder.state_dict())
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "norm.weight"} <= enc
    pred = set(m.predictor.state_dict())
    assert {"mask_token", "predictor_embed.weight", "predictor_blocks.0.norm1.weight", "predictor_norm.bias",
            "predictor_proj.weight"} <= pred


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_padding_does_not_change_real_tokens(attention):
    from jepa.model import set_attention

    m = _model()
    set_attention(m, attention)
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 5, 9, 20], [1, 2, 3, 4]])
    alone = m.encoder(x, keep=keep)
    padded_keep = torch.cat([keep, torch.tensor([[0, 0], [7, 7]])], dim=1)
    valid = torch.tensor([[True] * 4 + [False] * 2] * 2)
    padded = m.encoder(x, keep=padded_keep, keep_valid=valid)
    torch.testing.assert_close(padded[:, :4], alone, atol=1e-5, rtol=1e-5)
    # Predictor: padding in context and in targets leaves real predictions unchanged.
    grid = m.encoder.grid(x)
    pos = m.predictor.pos(m.encoder.patch_embed.coords, grid, x.device)
    tgt = torch.tensor([[[30, 31], [40, 41]]])  # [M=1, B=2, 2]
    p_alone = m.predictor(alone, keep, tgt, pos)
    tgt_pad = torch.cat([tgt, torch.zeros(1, 2, 1, dtype=torch.int64)], dim=2)
    tv = torch.tensor([[[True, True, False]] * 2])
    p_pad = m.predictor(padded, padded_keep, tgt_pad, pos, valid, tv)
    torch.testing.assert_close(p_pad[:, :2], p_alone, atol=1e-5, rtol=1e-5)


def _predictor_inputs(m, b=2, m_sets=3, kt=4):
    x = torch.randn(b, 3, 32, 32)
    keep = torch.stack([torch.randperm(64)[:10] for _ in range(b)])
    tgt = torch.stack([torch.stack([torch.randperm(64)[:kt] for _ in range(b)]) for _ in range(m_sets)])
    pos = m.predictor.pos(m.encoder.patch_embed.coords, m.encoder.grid(x), x.device)
    return m.encoder(x, keep=keep), keep, tgt, pos


def test_joint_predictor_is_the_per_block_predictor_for_one_block_and_keeps_the_block_order():
    m = _model()
    ctx, keep, tgt, pos = _predictor_inputs(m)
    separate_one = m.predictor(ctx, keep, tgt[:1], pos)
    separate = m.predictor(ctx, keep, tgt, pos)
    m.predictor.joint = True
    torch.testing.assert_close(m.predictor(ctx, keep, tgt[:1], pos), separate_one, atol=1e-5, rtol=1e-5)
    joint = m.predictor(ctx, keep, tgt, pos)
    assert joint.shape == separate.shape == (3 * 2, 4, 64)
    assert not torch.allclose(joint, separate, atol=1e-4)  # blocks see each other's mask tokens
    # Rows stay target-set major (m * B + b): reversing the target sets reverses the row blocks.
    flipped = m.predictor(ctx, keep, tgt.flip(0), pos)
    torch.testing.assert_close(flipped.view(3, 2, 4, -1).flip(0).reshape(6, 4, -1), joint, atol=1e-5, rtol=1e-5)
    # Padded target tokens are invisible to the real ones.
    tv = torch.ones(3, 2, 4, dtype=torch.bool)
    tv[1, :, 2:] = False
    moved = tgt.clone()
    moved[1, :, 2:] = 0
    a, b = m.predictor(ctx, keep, tgt, pos, None, tv), m.predictor(ctx, keep, moved, pos, None, tv)
    torch.testing.assert_close(a.view(3, 2, 4, -1)[:, :, :2], b.view(3, 2, 4, -1)[:, :, :2], atol=1e-5, rtol=1e-5)


def test_batch_normalised_targets_remove_what_position_alone_predicts():
    r = load_recipe(tiny_recipe(loss={"target_batch_norm": True}))
    tok_cls, tok_cfg = r.component("tokenizer")
    torch.manual_seed(0)
    m = build_jepa(r.recipe.model, r.recipe.loss, tok_cls, tok_cfg).eval()
    x = torch.randn(6, 3, 32, 32)
    tgt = torch.arange(64).view(1, 1, 64).expand(1, 6, 64)
    target, _ = m.targets(x, tgt)  # every position of every sample
    torch.testing.assert_close(target.mean(0), torch.zeros(64, 64), atol=1e-5, rtol=0)
    var = target.var(0, unbiased=False)  # var / (var + eps): 1 up to the eps of near-constant channels
    assert var.max() <= 1 + 1e-5 and var.mean() > 0.99
    # So a predictor that outputs the per-position mean (a content-blind guess) scores exactly 1.
    assert regression_loss(torch.zeros_like(target), target).item() == pytest.approx(1.0, abs=0.01)
    with pytest.raises(JepaError, match="batch of at least 2"):
        m.targets(x[:1], tgt[:, :1])


def test_keep_every_token_equals_full_forward_and_non_square_inputs_work():
    m = _model()
    x = torch.randn(2, 3, 24, 40)  # 6 x 10 grid
    full = m.encoder(x)
    assert full.shape == (2, 60, 64)
    torch.testing.assert_close(m.encoder(x, keep=torch.arange(60).expand(2, -1)), full)
    assert torch.equal(gather_tokens(full, torch.tensor([[59], [0]]))[:, 0], torch.stack([full[0, 59], full[1, 0]]))


def test_training_forward_backward_reaches_encoder_and_predictor_only():
    m = _model().train()
    x = torch.randn(3, 3, 32, 32)
    ctx = torch.arange(40).expand(3, -1)
    tgt = torch.arange(48, 64).view(1, 1, 16).expand(4, 3, 16)
    loss, stats = m(x, ctx, tgt, with_stats=True)
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item()) and set(stats) == {"target_std", "pred_std", "target_pooled"}
    assert all(p.grad is not None for p in m.encoder.parameters())
    assert all(p.grad is not None for p in m.predictor.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.target_encoder.parameters())


def test_ema_update_is_the_moving_average():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    before = [p.detach().clone() for p in a.parameters()]
    ema_update(a, b, 0.9)
    for p_new, p_old, p_src in zip(a.parameters(), before, b.parameters(), strict=True):
        torch.testing.assert_close(p_new, 0.9 * p_old + 0.1 * p_src.detach())
    ema_update(a, b, 1.0)
    for p_new, p_old, p_src in zip(a.parameters(), before, b.parameters(), strict=True):
        torch.testing.assert_close(p_new, 0.9 * p_old + 0.1 * p_src.detach())


def test_losses():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 5, 8) * 0.1, torch.randn(2, 5, 8) * 0.1
    l2 = regression_loss(pred, target, kind="l2")
    torch.testing.assert_close(l2, ((pred - target) ** 2).mean())
    torch.testing.assert_close(regression_loss(pred, target, kind="smooth_l1"), 0.5 * l2)  # errors < beta
    torch.testing.assert_close(regression_loss(pred, target, kind="lp", p=1.0), (pred - target).abs().mean())
    valid = torch.zeros(2, 5, dtype=torch.bool)
    valid[0, :2] = True
    torch.testing.assert_close(regression_loss(pred, target, valid), ((pred - target)[0, :2] ** 2).mean())


def test_variance_covariance_terms_are_zero_only_for_spread_decorrelated_features():
    torch.manual_seed(0)
    white = torch.randn(4096, 8) * 1.2  # every channel's std 1.2 > 1, channels independent
    var, cov = variance_covariance(white)
    assert var.item() == 0 and cov.item() < 0.05
    shared = torch.randn(4096, 1).expand(4096, 8)  # eight copies of one channel: spread, fully correlated
    var, cov = variance_covariance(shared)
    assert var.item() == 0 and cov.item() == pytest.approx(7.0, rel=0.1)  # 56 off-diagonal 1s / 8
    var, _ = variance_covariance(torch.zeros(16, 8))  # one embedding for every sample
    assert var.item() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(JepaError, match="batch of at least 2"):
        variance_covariance(torch.zeros(1, 8))


def test_variance_covariance_weights_add_to_the_loss_and_reach_the_encoder_only_through_context():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    ctx, tgt = torch.arange(40).expand(4, -1), torch.arange(48, 64).view(1, 1, 16).expand(2, 4, 16)
    losses = {}
    for weights in ({}, {"variance_weight": 2.0, "covariance_weight": 0.5}):
        r = load_recipe(tiny_recipe(loss=weights))
        tok_cls, tok_cfg = r.component("tokenizer")
        torch.manual_seed(1)
        m = build_jepa(r.recipe.model, r.recipe.loss, tok_cls, tok_cfg).eval()
        losses[bool(weights)] = m(x, ctx, tgt, with_stats=True)
    (base, s0), (reg, s1) = losses[False], losses[True]
    assert "loss_var" not in s0 and s1["loss_var"] > 0
    torch.testing.assert_close(reg, base + 2.0 * s1["loss_var"] + 0.5 * s1["loss_cov"])
    valid = torch.ones(4, 40, dtype=torch.bool)
    valid[:, 30:] = False  # padded context tokens do not enter the pooled embedding
    padded = ctx.clone()
    padded[:, 30:] = 0
    torch.testing.assert_close(m(x, ctx[:, :30], tgt, with_stats=True)[1]["loss_var"],
                               m(x, padded, tgt, context_valid=valid, with_stats=True)[1]["loss_var"],
                               atol=1e-5, rtol=1e-5)


def test_global_term_compares_the_pooled_context_with_the_whole_inputs_target():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    tgt = torch.arange(48, 64).view(1, 1, 16).expand(2, 4, 16)
    r = load_recipe(tiny_recipe(loss={"global_weight": 3.0}))
    tok_cls, tok_cfg = r.component("tokenizer")
    m = build_jepa(r.recipe.model, r.recipe.loss, tok_cls, tok_cfg).eval()
    # at initialisation the target encoder is a copy of the encoder: seeing everything, they agree
    whole = m(x, torch.arange(64).expand(4, -1), tgt, with_stats=True)[1]["loss_global"]
    assert whole.item() == pytest.approx(0.0, abs=1e-10)
    loss, stats = m(x, torch.arange(40).expand(4, -1), tgt, with_stats=True)
    assert stats["loss_global"] > 1e-3
    m.loss_cfg = m.loss_cfg.model_copy(update={"global_weight": 0.0})
    plain, s0 = m(x, torch.arange(40).expand(4, -1), tgt, with_stats=True)
    assert "loss_global" not in s0
    torch.testing.assert_close(loss, plain + 3.0 * stats["loss_global"])


@pytest.mark.parametrize("size, params", [("vit_tiny", 5.5e6), ("vit_small", 21.5e6), ("vit_base", 85.6e6)])
def test_size_presets_have_the_reference_parameter_counts(size, params):
    r = load_recipe(tiny_recipe(model={"size": size}, tokenizer={"patch_size": 16}, source={"crop_size": 224}))
    tok_cls, tok_cfg = r.component("tokenizer")
    m = build_jepa(ModelConfig(size=size), LossConfig(), tok_cls, tok_cfg, device="meta")
    n = sum(p.numel() for p in m.encoder.parameters())
    assert abs(n - params) / params < 0.02
