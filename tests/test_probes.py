"""Evaluation probes on synthetic features whose structure is known: what each probe can and cannot learn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import jepa.eval.probes as probes
from jepa.errors import JepaError
from jepa.eval.probes import (
    attentive_probe,
    balanced_subset,
    effective_rank,
    knn_probe,
    linear_probe,
    split_train_val,
)


def clusters(per_class: int, seed: int, num_classes: int = 4, dim: int = 8, spread: float = 6.0,
             centre_seed: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Isotropic unit-variance Gaussian clusters around fixed random centres (same centres for every seed)."""
    centres = spread * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(centre_seed))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[y] + torch.randn(len(y), dim, generator=g), y


def marked_tokens(n: int, seed: int, num_classes: int = 4, tokens: int = 6, dim: int = 16):
    """Every sample holds one token per class (class c: 2 * e_c), at random positions, plus noise tokens.

    The label is the class of the one token that also carries a marker (3 * e_C). The mean over tokens
    is the same for every label (each class token occurs once), so mean pooling cannot beat chance;
    a query that attends to the marker reads the label off the marked token.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = 0.1 * torch.randn(n, tokens, dim, generator=g)
    perm = torch.argsort(torch.rand(n, tokens, generator=g), dim=1)  # token i carries class perm[i] if < C
    onehot = F.one_hot(perm.clamp(max=num_classes - 1), num_classes) * (perm < num_classes)[..., None]
    x[..., :num_classes] += 2.0 * onehot
    marked = (perm == y[:, None]).float().argmax(1)
    x[torch.arange(n), marked, num_classes] += 3.0
    return x, y


def assert_one_line_error(excinfo, *fragments: str):
    message = str(excinfo.value)
    assert "\n" not in message and message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------------- splits


def test_split_is_stratified_disjoint_and_keeps_every_class_in_train():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 2 + [3] * 1)[torch.randperm(33, generator=torch.Generator().manual_seed(0))]
    train, val = split_train_val(labels, 0.2, seed=0)
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(33))
    assert torch.equal(train, torch.sort(train).values) and torch.equal(val, torch.sort(val).values)
    val_counts = torch.bincount(labels[val], minlength=4).tolist()
    train_counts = torch.bincount(labels[train], minlength=4).tolist()
    assert val_counts == [2, 4, 1, 0]  # round(0.2 * count), at least 1 when count >= 2, none for a singleton
    assert train_counts == [8, 16, 1, 1]
    _, no_val = split_train_val(labels, 0.0, seed=0)
    assert no_val.numel() == 0


def test_split_is_seeded():
    labels = torch.arange(200) % 5
    a, b = split_train_val(labels, 0.3, seed=3), split_train_val(labels, 0.3, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(split_train_val(labels, 0.3, seed=4)[1], a[1])


def test_balanced_subset_counts_per_class():
    labels = torch.tensor([0] * 100 + [1] * 10 + [2] * 3 + [5] * 7)
    for fraction, expected in ((0.1, {0: 10, 1: 1, 2: 1, 5: 1}), (0.5, {0: 50, 1: 5, 2: 2, 5: 4}),
                               (1.0, {0: 100, 1: 10, 2: 3, 5: 7})):
        idx = balanced_subset(labels, fraction, seed=0)
        assert idx.unique().numel() == idx.numel()
        assert {c: int((labels[idx] == c).sum()) for c in (0, 1, 2, 5)} == expected
    assert torch.equal(balanced_subset(labels, 0.1, seed=1), balanced_subset(labels, 0.1, seed=1))
    assert not torch.equal(balanced_subset(labels, 0.1, seed=1), balanced_subset(labels, 0.1, seed=2))


# ---------------------------------------------------------------------------------------- RankMe


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_effective_rank_of_rank_r_data_with_equal_singular_values_is_r(rank):
    g = torch.Generator().manual_seed(rank)
    left = torch.randn(200, rank, generator=g, dtype=torch.float64)
    left, _ = torch.linalg.qr(left - left.mean(0))  # orthonormal and still centred
    right, _ = torch.linalg.qr(torch.randn(32, rank, generator=g, dtype=torch.float64))
    x = 5.0 * left @ right.T + torch.randn(32, generator=g, dtype=torch.float64)  # offset: centring removes it
    assert effective_rank(x) == pytest.approx(rank, abs=1e-6)


def test_effective_rank_drops_when_one_direction_dominates():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g, dtype=torch.float64)
    assert 14.0 < effective_rank(x) <= 16.0
    x[:, 0] *= 1000.0
    assert effective_rank(x) < 1.5
    assert effective_rank(torch.ones(10, 4)) == 0.0


# ----------------------------------------------------------------------------------- linear probe


def test_linear_probe_separates_separable_clusters_and_converges():
    x, y = clusters(100, seed=0)
    xt, yt = clusters(50, seed=1)
    r = linear_probe(x, y, xt, yt)
    assert r.kind == "linear"
    assert r.top1 >= 0.98 and r.top5 == 1.0  # 4 classes: top-5 covers all
    assert r.train_top1 >= 0.99  # converged: a separable training set is fitted
    assert r.val_top1 is not None and r.val_top1 >= 0.95
    assert r.predictions.shape == (200,) and r.confusion.shape == (4, 4) and r.confusion.dtype == torch.int64
    assert int(r.confusion.sum()) == 200
    assert r.confusion.trace().item() / 200 == pytest.approx(r.top1)
    assert torch.equal(r.confusion.sum(1), torch.bincount(yt, minlength=4))  # rows are the true class


def test_linear_probe_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(800, 16, generator=g), torch.randn(800, 16, generator=g)
    y, yt = torch.randint(0, 4, (800,), generator=g), torch.randint(0, 4, (800,), generator=g)
    r = linear_probe(x, y, xt, yt)
    assert 0.17 < r.top1 < 0.33  # chance is 0.25; the std of the estimate is 0.015
    expected = torch.zeros(4, 4, dtype=torch.int64)  # many errors: rows vs cols matters here
    for true, pred in zip(yt.tolist(), r.predictions.tolist(), strict=True):
        expected[true, pred] += 1
    assert torch.equal(r.confusion, expected)


def test_linear_probe_grid_has_every_weight_decay_and_chooses_the_best_on_val():
    x, y = clusters(30, seed=0, spread=1.0)
    xt, yt = clusters(30, seed=1, spread=1.0)
    wds = (0.0, 1e-4, 1e-2, 1.0)
    r = linear_probe(x, y, xt, yt, weight_decays=wds, val_fraction=0.3)
    assert [e["weight_decay"] for e in r.grid] == list(wds)
    best = max(r.grid, key=lambda e: (e["val_top1"], -e["val_loss"]))  # ties: lower val cross-entropy
    assert r.chosen == {"weight_decay": best["weight_decay"]}
    assert r.val_top1 == best["val_top1"]


def shared_nuisance(per_class: int, seed: int, num_classes: int = 4, dim: int = 64):
    """The class shifts x0, but under a large nuisance that x1 measures too: x0 - x1 recovers the label.

    A weakly regularised head learns that difference from enough data; a strongly regularised one is
    pulled towards the class-mean direction (x0 alone) and stays close to chance.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = torch.randn(len(y), dim, generator=g)
    nuisance = 3.0 * torch.randn(len(y), generator=g)
    x[:, 0] = y.float() + nuisance + 0.3 * x[:, 0]
    x[:, 1] = nuisance + 0.3 * x[:, 1]
    return x, y


def test_linear_probe_chooses_more_weight_decay_for_few_shot_than_for_plentiful_data():
    wds = (1e-6, 1e-4, 1e-2, 1.0)
    # 8 shots per class in 64 dims: an unregularised head interpolates the noise, while strong decay
    # approaches the class-mean classifier, which is what isotropic Gaussian clusters call for.
    x, y = clusters(8, seed=0, dim=64, spread=0.3)
    xt, yt = clusters(100, seed=999, dim=64, spread=0.3)
    few = linear_probe(x, y, xt, yt, weight_decays=wds, val_fraction=0.5)
    x, y = shared_nuisance(500, seed=0)
    xt, yt = shared_nuisance(200, seed=999)
    many = linear_probe(x, y, xt, yt, weight_decays=wds, val_fraction=0.3)
    assert few.chosen["weight_decay"] >= 1e-2
    assert many.chosen["weight_decay"] <= 1e-4
    assert many.top1 > 0.7  # the weakly regularised head really learned the difference


def test_linear_probe_is_deterministic_and_the_seed_only_moves_the_split():
    x, y = clusters(40, seed=0, spread=1.0)
    xt, yt = clusters(40, seed=1, spread=1.0)
    a, b = linear_probe(x, y, xt, yt, seed=5), linear_probe(x, y, xt, yt, seed=5)
    assert a.top1 == b.top1 and a.train_top1 == b.train_top1 and a.grid == b.grid and a.chosen == b.chosen
    assert torch.equal(a.predictions, b.predictions) and torch.equal(a.confusion, b.confusion)
    c = linear_probe(x, y, xt, yt, seed=6)
    assert [e["val_top1"] for e in c.grid] != [e["val_top1"] for e in a.grid]  # another validation split


def test_linear_probe_float32_path_agrees_with_float64(monkeypatch):
    x, y = clusters(60, seed=0, spread=2.0)
    xt, yt = clusters(60, seed=1, spread=2.0)
    wide = linear_probe(x, y, xt, yt)
    monkeypatch.setattr(probes, "_FLOAT64_MAX_ELEMENTS", 0)
    narrow = linear_probe(x, y, xt, yt)
    assert narrow.chosen == wide.chosen
    assert (narrow.predictions == wide.predictions).double().mean() >= 0.99


def test_probes_keep_sparse_label_ids_and_num_classes():
    x, y = clusters(30, seed=0)
    xt, yt = clusters(10, seed=1)
    ids = torch.tensor([1, 5, 7, 9])
    y, yt = ids[y], ids[yt]
    for r in (linear_probe(x, y, xt, yt), knn_probe(x, y, xt, yt, k=5)):
        assert r.confusion.shape == (10, 10)  # default: max label + 1
        assert set(r.predictions.unique().tolist()) <= {1, 5, 7, 9}
        assert r.top1 >= 0.95
    r = linear_probe(x, y, xt[:3], yt[:3], num_classes=12)  # a test subset lacking classes is fine
    assert r.confusion.shape == (12, 12) and int(r.confusion.sum()) == 3


# -------------------------------------------------------------------------------------------- k-NN


def test_knn_with_k1_recovers_the_training_labels_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 32, generator=g)
    y = torch.randint(0, 10, (300,), generator=g)  # random labels: only the point itself can tell
    r = knn_probe(x, y, x.clone(), y, k=1)
    assert r.top1 == 1.0 and torch.equal(r.predictions, y)
    assert r.kind == "knn" and r.val_top1 is None and r.train_top1 is None
    assert r.chosen == {"k": 1, "temperature": 0.07}
    # With many neighbours and a flat temperature the random labels wash out (the self-vote no longer
    # dominates): the k=1 result above is not an artefact of the probe returning the input labels.
    assert knn_probe(x, y, x, y, k=20, temperature=1.0).top1 < 0.6


def test_knn_on_clusters_survives_a_tiny_temperature_and_small_chunks(monkeypatch):
    x, y = clusters(50, seed=0)
    xt, yt = clusters(25, seed=1)
    ref = knn_probe(x, y, xt, yt, k=10)
    assert ref.top1 >= 0.98
    monkeypatch.setattr(probes, "_KNN_SIM_ELEMENTS", 7 * x.shape[0])  # 7 test rows per chunk
    chunked = knn_probe(x, y, xt, yt, k=10)
    assert torch.equal(chunked.predictions, ref.predictions) and chunked.top5 == ref.top5
    cold = knn_probe(x, y, xt, yt, k=10, temperature=1e-4)  # exp(sim / T) alone would overflow
    assert cold.top1 >= 0.98


def test_knn_tiny_temperature_neither_overflows_nor_underflows_the_votes():
    def at(*angles):
        a = torch.tensor(angles)
        return torch.stack([a.cos(), a.sin()], 1)

    train_y = torch.tensor([1, 0])
    # exp(sim / 1e-4) is inf for both neighbours (a tie); the nearer one, class 1, must still win.
    r = knn_probe(at(0.10, 0.25), train_y, at(0.12), torch.tensor([1]), k=2, temperature=1e-4)
    assert r.predictions.tolist() == [1]
    # Far from both (sims 0.5 and 0.3): exp((sim - 1) / 1e-3) underflows to 0 for both; class 1 must win.
    far = at(torch.tensor(0.5).acos().item(), -torch.tensor(0.3).acos().item())
    r = knn_probe(far, train_y, at(0.0), torch.tensor([1]), k=2, temperature=1e-3)
    assert r.predictions.tolist() == [1]


# --------------------------------------------------------------------------------------- attentive


def test_attentive_probe_reads_the_marked_token_where_mean_pooling_fails():
    x, y = marked_tokens(512, seed=0)
    xt, yt = marked_tokens(256, seed=1)
    mean_pooled = linear_probe(x.mean(1), y, xt.mean(1), yt)
    assert mean_pooled.top1 < 0.4  # chance is 0.25
    state = torch.get_rng_state()
    r = attentive_probe(x, y, xt, yt, lrs=(1e-5, 1e-2), epochs=20, batch_size=64)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert r.kind == "attentive"
    assert r.top1 >= 0.95 and r.train_top1 >= 0.95
    assert [(e["lr"], e["weight_decay"]) for e in r.grid] == [(1e-5, 0.05), (1e-2, 0.05)]
    assert r.chosen == {"lr": 1e-2, "weight_decay": 0.05}  # the head that learned wins on val
    assert r.grid[0]["val_top1"] < r.grid[1]["val_top1"] == r.val_top1


def test_attentive_probe_is_deterministic_for_a_seed():
    x, y = marked_tokens(128, seed=0)
    xt, yt = marked_tokens(64, seed=1)
    a = attentive_probe(x, y, xt, yt, lrs=(3e-3,), epochs=3, batch_size=32, seed=1)
    b = attentive_probe(x, y, xt, yt, lrs=(3e-3,), epochs=3, batch_size=32, seed=1)
    assert a.grid == b.grid and a.top1 == b.top1 and torch.equal(a.predictions, b.predictions)
    c = attentive_probe(x, y, xt, yt, lrs=(3e-3,), epochs=3, batch_size=32, seed=2)
    assert c.grid != a.grid


def test_attentive_probe_bf16_runs():
    x, y = marked_tokens(64, seed=0)
    r = attentive_probe(x, y, x, y, lrs=(1e-2,), epochs=2, batch_size=32, bf16=True)
    assert 0.0 <= r.top1 <= 1.0 and r.predictions.shape == (64,)


# ------------------------------------------------------------------------------------------ errors


def call(kind: str, train_x, train_y, test_x, test_y, **kw):
    """Run a probe; 2-D features are given a token axis for the attentive probe."""
    if kind == "attentive":
        def lift(t):
            return t[:, None, :].expand(-1, 2, -1) if t.ndim == 2 else t

        return attentive_probe(lift(train_x), train_y, lift(test_x), test_y, epochs=1, **kw)
    return {"linear": linear_probe, "knn": knn_probe}[kind](train_x, train_y, test_x, test_y, **kw)


KINDS = ["linear", "knn", "attentive"]


@pytest.fixture
def data():
    x, y = clusters(10, seed=0)
    return x, y, x.clone(), y.clone()


@pytest.mark.parametrize("kind", KINDS)
def test_test_label_missing_from_train_is_one_clear_line(kind, data):
    x, y, xt, yt = data
    yt = yt.clone()
    yt[3] = 7
    with pytest.raises(JepaError) as e:
        call(kind, x, y, xt, yt)
    assert str(e.value) == "test set has label 7, which the training set lacks"


@pytest.mark.parametrize("kind", KINDS)
def test_empty_sets_are_rejected(kind, data):
    x, y, xt, yt = data
    with pytest.raises(JepaError) as e:
        call(kind, x[:0], y[:0], xt, yt)
    assert_one_line_error(e, "training set is empty")
    with pytest.raises(JepaError) as e:
        call(kind, x, y, xt[:0], yt[:0])
    assert_one_line_error(e, "test set is empty")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_rejected(kind, bad, data):
    x, y, xt, yt = data
    x2 = x.clone()
    x2[2, 1] = bad
    with pytest.raises(JepaError) as e:
        call(kind, x2, y, xt, yt)
    assert_one_line_error(e, "train features", "NaN or Inf")
    xt2 = xt.clone()
    xt2[0, 0] = -bad
    with pytest.raises(JepaError) as e:
        call(kind, x, y, xt2, yt)
    assert_one_line_error(e, "test features", "NaN or Inf")


@pytest.mark.parametrize("kind", KINDS)
def test_shape_disagreements_are_rejected(kind, data):
    x, y, xt, yt = data
    with pytest.raises(JepaError) as e:
        call(kind, x, y[:-1], xt, yt)
    assert_one_line_error(e, "train features have 40 rows but train labels have 39")
    with pytest.raises(JepaError) as e:
        call(kind, x, y, xt[:, :5], yt)
    assert_one_line_error(e, "width")
    with pytest.raises(JepaError) as e:
        call(kind, x, y[:, None], xt, yt)
    assert_one_line_error(e, "train labels must be 1-D")
    with pytest.raises(JepaError) as e:
        call(kind, x, y, xt, yt, num_classes=3)
    assert_one_line_error(e, "num_classes is 3")


def test_feature_rank_mismatch_is_rejected(data):
    x, y, xt, yt = data
    with pytest.raises(JepaError) as e:
        attentive_probe(x, y, xt, yt)
    assert_one_line_error(e, "[n, N, d]")
    with pytest.raises(JepaError) as e:
        linear_probe(x[:, None], y, xt[:, None], yt)
    assert_one_line_error(e, "[n, d]")
    with pytest.raises(JepaError) as e:
        attentive_probe(x[:, None].expand(-1, 2, -1), y, xt[:, None].expand(-1, 2, -1), yt, num_heads=3)
    assert_one_line_error(e, "num_heads must divide")
