"""Property and fuzz tests (hypothesis): maskers, recipe loading, source decoders — through the registry,
so every installed plugin's components are held to the same contract."""

from __future__ import annotations

import random

import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from jepa import JepaError, MaskConfigError, RecipeError, SampleError
from jepa.config import load_recipe
from jepa.plugins import get_plugins

from .conftest import QUICK_TRAIN, read_members

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
REGISTRY = get_plugins().registry


def build(kind: str, name: str, **cfg):
    entry = REGISTRY.get(kind, name)
    return entry.cls(entry.cls.Config(**cfg))


# --------------------------------------------------------------------------- maskers
def assert_valid_mask(mask, grid: tuple[int, ...], num_targets: int) -> None:
    n = 1
    for g in grid:
        n *= g
    sets = [mask.context, *mask.targets]
    for s in sets:
        assert s.dtype == torch.int64 and s.ndim == 1 and len(s) > 0
        assert int(s.min()) >= 0 and int(s.max()) < n
        assert bool((s[1:] > s[:-1]).all()), "index sets are sorted and unique"
    assert len(mask.targets) == num_targets
    target_tokens = set(torch.cat(mask.targets).tolist())
    assert not target_tokens & set(mask.context.tolist()), "the context never contains a target token"


@pytest.mark.parametrize("name", REGISTRY.names("masker"))
@FAST
@given(rows=st.integers(2, 24), cols=st.integers(2, 24), seed=st.integers(0, 2**32))
def test_every_registered_masker_draws_valid_masks_or_refuses_up_front(name, rows, cols, seed):
    masker = build("masker", name)
    grid = (rows, cols)
    try:
        masker.check(grid)
    except MaskConfigError:
        return  # infeasible on this grid: refused before training, with a message
    mask = masker(grid, random.Random(seed))
    assert_valid_mask(mask, grid, masker.num_targets)
    again = masker(grid, random.Random(seed))
    assert torch.equal(mask.context, again.context) and all(map(torch.equal, mask.targets, again.targets))


scale = st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(sorted).map(tuple)
aspect = st.tuples(st.floats(0.2, 5.0), st.floats(0.2, 5.0)).map(sorted).map(tuple)


@FAST
@given(rows=st.integers(2, 20), cols=st.integers(2, 20), num_targets=st.integers(1, 6), target_scale=scale,
       target_aspect=aspect, context_scale=scale, min_keep=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_multiblock_over_random_configurations(rows, cols, num_targets, target_scale, target_aspect, context_scale,
                                               min_keep, seed):
    masker = build("masker", "multiblock", num_targets=num_targets, target_scale=target_scale,
                   target_aspect=target_aspect, context_scale=context_scale, min_keep=min_keep)
    try:
        masker.check((rows, cols))
    except MaskConfigError as e:
        assert str(e).strip()
        return
    rng = random.Random(seed)
    for _ in range(5):
        mask = masker((rows, cols), rng)
        assert_valid_mask(mask, (rows, cols), num_targets)
        assert len(mask.context) >= min_keep


# --------------------------------------------------------------------------- recipes
toml_scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.booleans(),
                         st.text(max_size=12), st.lists(st.integers(-5, 500), max_size=3))
sections = st.sampled_from(["run", "model", "tokenizer", "masker", "source", "data", "optim", "schedule", "ema",
                            "loss", "train", "checkpoint", "monitor", "health", "log", "bogus"])
fields = st.sampled_from(["name", "seed", "size", "lr", "steps", "batch_size", "train", "crop_size", "patch_size",
                          "momentum", "every_steps", "kind", "num_targets", "min_rank", "x"])
recipes = st.dictionaries(sections, st.one_of(toml_scalars, st.dictionaries(fields, toml_scalars, max_size=5)),
                          max_size=8)


def load_or_recipe_error(spec, overrides=None):
    try:
        load_recipe(spec, overrides)
    except RecipeError as e:
        assert str(e).strip() and all(line.strip() for line in str(e).splitlines())


@FAST
@given(data=recipes)
def test_random_recipes_load_or_fail_with_a_recipe_error(tmp_path, data):
    path = tmp_path / "r.toml"
    path.write_text(tomli_w.dumps(data))
    load_or_recipe_error(str(path))


@FAST
@given(text=st.text(max_size=200))
def test_random_text_is_a_recipe_error(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    load_or_recipe_error(str(path))


@FAST
@example(keys=[""], values=["\x1e\x1e", "", ""])  # found in CI: str.splitlines() breaks on \x1e
@example(keys=["optim.lr"], values=["1\n2", "", ""])
@given(keys=st.lists(st.text(st.sampled_from("abcdeilmnoprstx._"), max_size=20), min_size=1, max_size=3),
       values=st.lists(st.text(max_size=20), min_size=3, max_size=3))
def test_random_overrides_are_applied_or_fail_with_a_recipe_error(keys, values):
    load_or_recipe_error("quickstart", [f"{k}={v}" for k, v in zip(keys, values, strict=False)])


# --------------------------------------------------------------------------- source decoders
def sources():
    out = []
    for name in REGISTRY.names("source"):
        try:
            out.append((name, build("source", name)))
        except (ValidationError, JepaError):  # needs settings only a recipe can give
            continue
    return out


JPEG = read_members(QUICK_TRAIN, 1)[0][1]


@pytest.mark.parametrize(("name", "source"), sources(), ids=lambda v: v if isinstance(v, str) else "")
@FAST
@given(data=st.one_of(st.binary(max_size=600), st.builds(lambda cut, flip: bytes(
    b ^ 0xFF if i == flip else b for i, b in enumerate(JPEG[:cut])), st.integers(0, len(JPEG)),
    st.integers(0, len(JPEG)))), train=st.booleans(), pick=st.integers(0, 20))
def test_random_bytes_never_crash_a_decoder(name, source, data, train, pick):
    ext = source.extensions[pick % len(source.extensions)] if source.extensions else "bin"
    try:
        x = source.decode({ext: data, "cls": b"1"}, random.Random(pick), train=train)
    except SampleError as e:
        assert e.reason and e.reason.replace("_", "").isalnum()
        return
    assert isinstance(x, torch.Tensor) and torch.isfinite(x).all()
    if train:
        assert tuple(x.shape) == tuple(source.sample_shape())
