"""Plugin discovery, the registry's uniqueness rule, allow/block lists and hook validation."""

from __future__ import annotations

import types

import pytest

from jepa import Masker, PluginError, RecipeError, Tokenizer, hookimpl
from jepa.plugins import from_modules, get_plugins, load_entry_points, new_manager


def _plugin(**components):
    """A plugin module registering the given {kind: {name: cls}}."""
    mod = types.ModuleType("fake_plugin")
    for kind, table in components.items():
        def hook(register, table=table):
            for name, cls in table.items():
                register(name, cls)
        setattr(mod, f"jepa_register_{kind}s", hookimpl(hook))
    return mod


class MyTokenizer(Tokenizer):
    pass


class MyMasker(Masker):
    pass


def test_image_plugin_found_through_entry_points():
    listing = {p["name"]: p for p in get_plugins().listing()}
    image = listing["image"]
    assert image["builtin"] is True
    assert image["distribution"] == "jepa-forge"
    assert image["components"] == {"tokenizer": ["patch"], "masker": ["multiblock"], "source": ["image"]}
    assert "jepa_register_maskers" in image["hooks"]


def test_duplicate_names_name_both_plugins():
    with pytest.raises(PluginError, match="'first'.*'second'"):
        from_modules(("first", _plugin(tokenizer={"patch": MyTokenizer})),
                     ("second", _plugin(tokenizer={"patch": MyTokenizer})))


def test_same_name_in_different_kinds_is_fine_and_qualified_names_resolve():
    plugins = from_modules(("a", _plugin(tokenizer={"x": MyTokenizer})), ("b", _plugin(masker={"x": MyMasker})))
    assert plugins.registry.get("tokenizer", "a.x").cls is MyTokenizer
    assert plugins.registry.get("masker", "b.x").plugin == "b"
    with pytest.raises(RecipeError, match="unknown tokenizer 'b.x'"):
        plugins.registry.get("tokenizer", "b.x")


def test_registering_a_non_component_is_an_error():
    with pytest.raises(PluginError, match="not a subclass of jepa.Tokenizer"):
        from_modules(("bad", _plugin(tokenizer={"x": MyMasker})))


def test_misspelled_hook_is_rejected_at_registration():
    mod = types.ModuleType("typo")
    mod.jepa_register_tokenizer = hookimpl(lambda register: None)  # missing the final "s"
    with pytest.raises(PluginError, match="plugin 'typo' is invalid"):
        from_modules(("typo", mod))


def test_allow_and_block_lists(monkeypatch):
    monkeypatch.setenv("JEPA_DISABLE_PLUGINS", "image")
    assert "image" not in load_entry_points(new_manager())
    monkeypatch.delenv("JEPA_DISABLE_PLUGINS")
    monkeypatch.setenv("JEPA_PLUGINS", "nothing-else")
    assert load_entry_points(new_manager()) == {}
    monkeypatch.setenv("JEPA_PLUGINS", "image")
    assert set(load_entry_points(new_manager())) == {"image"}


def test_unknown_component_suggests_and_names_providers():
    import jepa_image.plugin

    reg = from_modules(("image", jepa_image.plugin)).registry  # as if the audio plugin were not installed
    with pytest.raises(RecipeError, match=r"available: multiblock \(image\); did you mean 'multiblock'"):
        reg.get("masker", "multiblok")
    with pytest.raises(RecipeError, match="provided by the 'audio' plugin.*pip install"):
        reg.get("tokenizer", "spectrogram")


def test_cli_lists_plugins_as_json(jepa_cli):
    import json

    code, out, err = jepa_cli("plugins", "list", "--json")
    assert code == 0, err
    listing = json.loads(out)
    assert {"name", "distribution", "version", "builtin", "hooks", "components"} <= set(listing[0])
    assert any(p["name"] == "image" and "multiblock" in p["components"]["masker"] for p in listing)


def test_the_pinned_torch_triple_loads_together():
    """torchaudio's native library must load next to this torch (a mismatched wheel fails here)."""
    import torch
    import torchaudio.compliance.kaldi as kaldi

    feats = kaldi.fbank(torch.randn(1, 8000), sample_frequency=8000, num_mel_bins=64)
    assert feats.shape == (98, 64)
