"""Recipe loading: two-pass validation, one-line errors with suggestions, overrides, paths."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from jepa import RecipeError
from jepa.config import list_recipes, load_recipe, parse_override
from jepa.config.load import apply_overrides, expand_vars

from .conftest import QUICK_TRAIN, tiny_recipe


def image_only():
    """The plugins a user has who installed only the core distribution (no audio, no third parties)."""
    import jepa_image.plugin

    from jepa.plugins import from_modules

    return from_modules(("image", jepa_image.plugin))


def problems(recipe: dict, overrides=(), plugins=None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, list(overrides), plugins=plugins)
    return info.value.problems


def test_tiny_recipe_resolves_with_every_default_filled():
    resolved = load_recipe(tiny_recipe())
    d = resolved.to_dict()
    assert d["masker"]["name"] == "image.multiblock"
    assert d["masker"]["num_targets"] == 4 and d["masker"]["target_scale"] == [0.15, 0.2]
    assert d["ema"] == {"momentum": 0.996, "final_momentum": 1.0}
    assert d["loss"]["kind"] == "l2"
    # The resolved recipe is itself a valid recipe that resolves to the same thing.
    again = load_recipe(tomllib.loads(resolved.to_toml()))
    assert again.to_dict() == d and again.digest() == resolved.digest()


def test_typo_in_core_field_names_field_and_suggests():
    assert problems(tiny_recipe(optim={"lrr": 1e-3})) == ["optim.lrr: unknown field; did you mean 'lr'?"]
    # A real field in the wrong section points to the section that has it.
    assert problems(tiny_recipe(schedule={"momentum": 0.99})) == [
        "schedule.momentum: unknown field; did you mean 'ema.momentum'?"]


def test_typo_in_section_name():
    r = tiny_recipe()
    r["optimm"] = {"lr": 1.0}
    assert problems(r) == ["optimm: unknown field; did you mean 'optim'?"]


def test_typo_in_component_field_is_checked_in_pass_two():
    assert problems(tiny_recipe(masker={"num_target": 3})) == [
        "masker.num_target: unknown field; did you mean 'num_targets'?"]


def test_wrong_type_names_field_and_value():
    [line] = problems(tiny_recipe(optim={"lr": "fast"}))
    assert line.startswith("optim.lr: Input should be a valid number") and "'fast'" in line


def test_wrong_literal_suggests():
    [line] = problems(tiny_recipe(loss={"kind": "smoothl1"}))
    assert line.startswith("loss.kind:") and "did you mean 'smooth_l1'" in line


def test_every_problem_is_reported_at_once():
    lines = problems(tiny_recipe(optim={"lr": "x"}, train={"stepz": 3}))
    assert len(lines) == 2 and {line.split(":")[0] for line in lines} == {"optim.lr", "train.stepz"}


def test_unknown_component_lists_available():
    [line] = problems(tiny_recipe(source={"name": "imag"}), plugins=image_only())
    assert line == "source.name: unknown source 'imag'; available: image (image); did you mean 'image'?"


def test_requires_missing_plugin_gives_install_hint():
    r = tiny_recipe()
    r["requires"] = ["image", "audio"]
    [line] = problems(r, plugins=image_only())
    assert line.startswith("requires: plugin 'audio' is not installed") and "pip install" in line


def test_conflicting_length_settings():
    [line] = problems(tiny_recipe(train={"steps": 3, "epochs": 1.0}))
    assert line == "train: give steps or epochs, not both"


@pytest.mark.parametrize("text, value", [
    ("optim.lr=3e-4", 3e-4), ("train.steps=7", 7), ("masker.target_scale=[0.1, 0.2]", [0.1, 0.2]),
    ("run.name=foo", "foo"), ('run.name="a b"', "a b"), ("log.tensorboard=false", False),
])
def test_override_values_are_toml_literals(text, value):
    path, parsed = parse_override(text)
    assert parsed == value and path == text.split("=")[0].split(".")


def test_overrides_apply_and_bad_ones_are_clear():
    resolved = load_recipe(tiny_recipe(), ["optim.lr=0.5", "masker.num_targets=2"])
    assert resolved.recipe.optim.lr == 0.5 and resolved.components["masker"][1].num_targets == 2
    with pytest.raises(RecipeError, match="expected section.field=value"):
        apply_overrides({}, ["optim.lr"])


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    recipe = tmp_path / "sub" / "r.toml"
    recipe.parent.mkdir()
    recipe.write_text('[tokenizer]\nname="patch"\n[masker]\nname="multiblock"\n[source]\nname="image"\n'
                      '[data]\ntrain = "shards/train-{000..001}.tar::/abs/x.tar"\n')
    resolved = load_recipe(recipe)
    assert resolved.recipe.data.train == f"{tmp_path}/sub/shards/train-{{000..001}}.tar::/abs/x.tar"


def test_env_vars_expand(monkeypatch):
    monkeypatch.setenv("JEPA_TEST_ROOT", "/data")
    assert expand_vars({"a": ["${JEPA_TEST_ROOT}/x", "${JEPA_TEST_UNSET:-/d}/y", "${JEPA_TEST_UNSET}"]}) == {
        "a": ["/data/x", "/d/y", "${JEPA_TEST_UNSET}"]}


def test_installed_recipes_all_validate():
    from jepa.cli.eval_cmd import settings
    from jepa.cli.recipe_cmd import is_probe_recipe

    names = {p.stem for p in list_recipes()}
    assert {"quickstart", "image_vith14", "image_vitb16", "image_cifar10_cpu", "probe_quickstart"} <= names
    for p in list_recipes():
        if is_probe_recipe(p):
            assert settings(str(p)).train.endswith(".tar")
        else:
            load_recipe(p)


def test_recipe_by_name_and_typo_in_name():
    assert load_recipe("quickstart").recipe.data.train == str(QUICK_TRAIN.resolve())
    with pytest.raises(RecipeError, match="did you mean 'quickstart'"):
        load_recipe("quickstrat")


def test_invalid_toml_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname=1")
    with pytest.raises(RecipeError, match="bad.toml: not valid TOML"):
        load_recipe(Path(bad))


def test_override_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resolved = load_recipe("quickstart", ["data.train=mine/train.tar"])
    assert resolved.recipe.data.train == str(tmp_path / "mine" / "train.tar")
    monkeypatch.setenv("JEPA_DATA_ROOT", "rel")
    resolved = load_recipe("image_cifar10_cpu")
    assert resolved.recipe.data.train == f"{tmp_path}/rel/cifar10/train-{{000000..000009}}.tar"
    monkeypatch.setenv("JEPA_DATA_ROOT", "")  # empty counts as unset, as in the shell
    assert load_recipe("image_cifar10_cpu").recipe.data.train.endswith("shared/data/cifar10/train-{000000..000009}.tar")


def test_grid_level_problems_are_recipe_errors():
    from jepa.model.cost import estimate

    with pytest.raises(RecipeError, match=r"tokenizer.patch_size: image size 32x32 is not divisible by the patch size 5x5"):
        estimate(load_recipe(tiny_recipe(tokenizer={"patch_size": 5})))
    with pytest.raises(RecipeError, match="masker.min_keep: 100 context tokens cannot be kept on a 8x8 grid"):
        estimate(load_recipe(tiny_recipe(masker={"min_keep": 100})))
    with pytest.raises(RecipeError, match="data.batch_size: global batch 8 is not divisible by world size 3 x train.grad_accum 1"):
        estimate(load_recipe(tiny_recipe(dist={"world_size": 3})))


@pytest.mark.parametrize("depths", [(3, 2), (5, 4)])
def test_flops_extrapolated_from_shallow_models_equal_the_full_count(depths):
    """recipe check counts FLOPs on 1- and 2-block models and extrapolates; that must be exact."""
    from jepa.model.cost import _count_flops, example_masks, step_flops

    depth, pred_depth = depths
    resolved = load_recipe(tiny_recipe(model={"size": "vit_test", "depth": depth, "predictor_depth": pred_depth}))
    shape, grid, batch = example_masks(resolved, 4)
    full = _count_flops(resolved, shape, grid, batch, 4, depth, pred_depth)
    assert full > 0
    assert step_flops(resolved, shape, grid, batch, 4) == full


@pytest.mark.parametrize("path", [p for p in list_recipes() if not p.name.startswith("probe_")], ids=lambda p: p.stem)
def test_every_shipped_pretraining_recipe_gets_a_cost_estimate(path):
    """`jepa recipe check` counts FLOPs on meta tensors. Every op of every recipe's step must run there:
    torch.cov (aten::equal, no meta kernel) once crashed the check of image_cifar10_cpu."""
    from jepa.model.cost import estimate

    report = estimate(load_recipe(path))
    assert report["flops_per_step"] > 0 and report["memory_gb"] > 0


def test_the_variance_and_covariance_terms_are_counted_in_the_step_flops():
    from jepa.model.cost import _count_flops, example_masks

    def flops(**loss):
        resolved = load_recipe(tiny_recipe(loss=loss))
        shape, grid, batch = example_masks(resolved, 4)
        return _count_flops(resolved, shape, grid, batch, 4, 1, 1)

    plain, with_terms = flops(), flops(variance_weight=1.0, covariance_weight=0.04)
    assert with_terms > plain, (plain, with_terms)  # the [D, D] covariance matmul, forward and backward
