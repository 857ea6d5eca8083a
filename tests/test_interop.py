"""Weights in and out with numeric parity: reference I-JEPA checkpoints, Hugging Face, timm, safetensors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jepa_image.interop import to_reference
from safetensors.torch import load_file

import jepa
from jepa import CheckpointError, JepaError
from jepa.api import run_pretrain
from jepa.components import grid_coords
from jepa.interop import export_checkpoint, import_checkpoint
from jepa.model import sincos_pos_embed

from .conftest import tiny_recipe

FIXTURE = Path(__file__).parent / "data" / "ijepa_reference"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A vit_tiny-width model (heads known from the width) after two training steps."""
    run = tmp_path_factory.mktemp("trained") / "run"
    recipe = tiny_recipe(steps=2, model={"size": "vit_tiny", "depth": 2, "predictor_depth": 1,
                                         "predictor_embed_dim": 48})
    run_pretrain(recipe, run)
    return run


def test_checkpoint_written_by_the_reference_code_imports_with_parity(tmp_path, jepa_cli):
    code, out, err = jepa_cli("import", str(FIXTURE / "ijepa_tiny.pth.tar"), "--out", str(tmp_path / "ck"),
                              "--num-heads", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["networks"] == ["encoder", "predictor", "target_encoder"]
    e = load_file(str(FIXTURE / "expected.safetensors"))
    m = jepa.load(tmp_path / "ck")
    torch.testing.assert_close(m.encode(e["x"]), e["target_full"], atol=1e-5, rtol=0)
    torch.testing.assert_close(m.encode(e["x"], "context"), e["encoder_full"], atol=1e-5, rtol=0)
    ctx = m.encode(e["x"], "context", keep=e["context_idx"])
    torch.testing.assert_close(ctx, e["encoder_context"], atol=1e-5, rtol=0)
    torch.testing.assert_close(m.predict(ctx, e["context_idx"], e["target_idx"]), e["predictions"], atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "ck" / "meta.json").read_text())["source_epoch"] == 3


def test_round_trip_through_the_reference_format(trained, tmp_path):
    ours = jepa.load(trained)
    ref = to_reference(ours)
    assert set(ref) >= {"encoder", "predictor", "target_encoder", "opt", "epoch"}
    assert all(k.startswith("module.") for k in ref["encoder"]) and "module.pos_embed" in ref["encoder"]
    torch.save(ref, tmp_path / "ref.pth.tar")
    import_checkpoint(tmp_path / "ref.pth.tar", tmp_path / "ck")
    back = jepa.load(tmp_path / "ck")
    x = torch.randn(3, 3, 32, 32)
    keep = torch.tensor([[0, 3, 9, 20, 63]] * 3)
    for which in ("target", "context"):
        torch.testing.assert_close(back.encode(x, which), ours.encode(x, which), atol=1e-5, rtol=0)
        torch.testing.assert_close(back.encode(x, which, keep=keep), ours.encode(x, which, keep=keep), atol=1e-5, rtol=0)
    ctx = ours.encode(x, "context", keep=keep)
    tgt = torch.tensor([[[10, 11]] * 3, [[40, 41]] * 3])
    torch.testing.assert_close(back.predict(ctx, keep, tgt), ours.predict(ctx, keep, tgt), atol=1e-5, rtol=0)


def test_imported_encoder_runs_at_other_resolutions_and_aspect_ratios(tmp_path):
    import_checkpoint(FIXTURE / "ijepa_tiny.pth.tar", tmp_path / "ck", num_heads=3)
    m = jepa.load(tmp_path / "ck")
    assert m.encode(torch.randn(1, 3, 128, 128)).shape == (1, 64, 96)
    assert m.encode(torch.randn(1, 3, 48, 112)).shape == (1, 21, 96)
    with pytest.raises(JepaError, match="not divisible by the patch size 16x16"):
        m.encode(torch.randn(1, 3, 50, 64))


def test_learned_position_tables_are_kept_and_interpolated(tmp_path):
    state = torch.load(FIXTURE / "ijepa_tiny.pth.tar", weights_only=True)
    table = state["encoder"]["module.pos_embed"]
    for net in ("encoder", "target_encoder"):
        state[net]["module.pos_embed"] = table + 0.05 * torch.randn_like(table)
    torch.save(state, tmp_path / "learned.pth.tar")
    import_checkpoint(tmp_path / "learned.pth.tar", tmp_path / "ck", num_heads=3)
    m = jepa.load(tmp_path / "ck")
    assert m.resolved.recipe.model.pos_embed == "learned"
    torch.testing.assert_close(m.encoder.pos_embed((4, 4), torch.device("cpu")), state["encoder"]["module.pos_embed"][0])
    assert m.encode(torch.randn(1, 3, 96, 128), "context").shape == (1, 48, 96)


def test_export_timm_gives_identical_pooled_features(trained, tmp_path, jepa_cli):
    timm = pytest.importorskip("timm")
    code, _, err = jepa_cli("export", "--checkpoint", str(trained), "--format", "timm", "--out", str(tmp_path / "t"))
    assert code == 0, err
    ours = jepa.load(trained)
    x = torch.randn(2, 3, 32, 32)
    via_dir = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    via_name = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                                 pretrained_cfg_overlay={"file": str(tmp_path / "t" / "model.safetensors")}).eval()
    with torch.no_grad():
        for net in (via_dir, via_name):
            torch.testing.assert_close(net(x), ours.pooled(x), atol=1e-5, rtol=0)
            torch.testing.assert_close(net.forward_features(x), ours.encode(x), atol=1e-5, rtol=0)


def test_export_hf_loads_in_transformers_with_identical_features(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    export_checkpoint(trained, "hf", tmp_path / "hf", which="context")
    hf = transformers.IJepaModel.from_pretrained(tmp_path / "hf").eval()
    ours = jepa.load(trained)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).last_hidden_state, ours.encode(x, "context"), atol=1e-4, rtol=0)
    # ... and a Hugging Face folder imports back as an encoder-only checkpoint.
    import_checkpoint(tmp_path / "hf", tmp_path / "back")
    back = jepa.load(tmp_path / "back")
    assert back.present == ["encoder"]
    torch.testing.assert_close(back.encode(x, "context"), ours.encode(x, "context"), atol=1e-5, rtol=0)
    with pytest.raises(CheckpointError, match="has no target encoder.*use --which context"):
        back.encode(x)


@pytest.mark.parametrize("width, depth, heads", [
    (192, 2, 3),
    (384, 12, 8),  # vit_small's shape, whose preset has 6 heads: the checkpoint's 8 must win
])
def test_hf_folder_saved_by_transformers_imports(tmp_path, width, depth, heads):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.IJepaConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                                   intermediate_size=4 * width, image_size=32, patch_size=8, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.IJepaModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "ck")
    m = jepa.load(tmp_path / "ck")
    assert m.encoder.num_heads == heads
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.encode(x, "context"), hf(x).last_hidden_state, atol=1e-4, rtol=0)


def test_encoder_only_import_can_seed_pretraining(tmp_path):
    import_checkpoint(FIXTURE / "ijepa_tiny.pth.tar", tmp_path / "ck", num_heads=3)
    recipe = tiny_recipe(steps=1, tokenizer={"patch_size": 16}, source={"crop_size": 64},
                         masker={"min_keep": 4, "num_targets": 2},
                         model={"size": "vit_tiny", "embed_dim": 96, "depth": 2, "num_heads": 3,
                                "predictor_embed_dim": 48, "predictor_depth": 1, "init": str(tmp_path / "ck")})
    summary = run_pretrain(recipe, tmp_path / "run")
    assert summary["final_loss"] is not None
    bad = dict(recipe, tokenizer={"name": "patch", "patch_size": 8})
    with pytest.raises(CheckpointError, match=r"patch_embed.proj.weight has shape \[96, 3, 16, 16\] in the "
                                              r"checkpoint, \[96, 3, 8, 8\] here"):
        run_pretrain(bad, tmp_path / "run2")


def test_export_safetensors_sidecar(trained, tmp_path):
    files = export_checkpoint(trained, "safetensors", tmp_path / "s")
    sd = load_file(files[0])
    side = json.loads(Path(files[1]).read_text())
    assert side["network"] == "target" and side["grid"] == [8, 8] and sd["pos_embed"].shape == (1, 64, 192)
    assert "blocks.1.attn.qkv.weight" in sd


@pytest.mark.parametrize("case", ["truncated", "pickle_code", "unknown_arch", "not_a_checkpoint", "missing"])
def test_bad_imports_are_one_line_errors(case, tmp_path, jepa_cli):
    target = tmp_path / "in.pth.tar"
    if case == "truncated":
        target.write_bytes((FIXTURE / "ijepa_tiny.pth.tar").read_bytes()[:100_000])
        expect = "truncated or corrupt"
    elif case == "pickle_code":
        marker = tmp_path / "PWNED"
        evil = type("Evil", (), {"__reduce__": lambda self: (Path.touch, (marker,))})
        target.write_bytes(pickle.dumps({"encoder": evil()}))
        expect = "needs code to run when unpickled, which is never done"
    elif case == "unknown_arch":
        state = torch.load(FIXTURE / "ijepa_tiny.pth.tar", weights_only=True)
        torch.save(state, target)
        expect = "unknown architecture"  # width 96 without --num-heads
    elif case == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(3), "step": 1}, target)
        expect = "no installed plugin recognises"
    else:
        target = tmp_path / "nope.pth.tar"
        expect = "no such file or directory"
    code, out, err = jepa_cli("import", str(target), "--out", str(tmp_path / "ck"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and expect in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "ck").exists() and not (tmp_path / "PWNED").exists()


def test_import_holds_at_most_two_copies_of_the_weights(tmp_path):
    """A vit_small-shaped checkpoint with optimizer state: peak memory of the import stays under two copies."""
    script = f"""
import resource, sys, torch
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from tests.test_interop import make_reference_checkpoint
weights = make_reference_checkpoint({str(tmp_path / 'big.pth.tar')!r})
import gc; gc.collect()
from jepa.interop import import_checkpoint
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import_checkpoint({str(tmp_path / 'big.pth.tar')!r}, {str(tmp_path / 'ck')!r})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(weights, (peak - base) * 1024)
"""
    # Build the file in one process and import in a fresh one, so the builder's memory does not count.
    subprocess.run([sys.executable, "-c", script.replace("import_checkpoint(", "(lambda *a: None)(")], check=True,
                   capture_output=True)
    script = script.replace("weights = make_reference_checkpoint", "weights = weights_bytes")
    script = script.replace("from tests.test_interop import make_reference_checkpoint",
                            "from tests.test_interop import weights_bytes")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    weights, grown = map(int, out.split())
    assert (tmp_path / "big.pth.tar").stat().st_size > 1.8 * weights  # the optimizer state is really there
    assert grown < 2 * weights, f"import grew memory by {grown / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"


def weights_bytes(path: str) -> int:
    state = torch.load(path, weights_only=True, mmap=True)
    return sum(t.numel() * t.element_size() for n in ("encoder", "predictor", "target_encoder")
               for t in state[n].values())


def make_reference_checkpoint(path: str) -> int:
    """A reference-format vit_small/16 checkpoint (three networks + AdamW moments) written to ``path``."""
    from jepa.config import load_recipe
    from jepa.model import build_from_recipe

    r = load_recipe(tiny_recipe(model={"size": "vit_small", "predictor_depth": 2}, tokenizer={"patch_size": 16},
                                source={"crop_size": 224}))
    model = build_from_recipe(r)

    class View:  # what to_reference needs of a loaded checkpoint
        encoder, target_encoder, predictor, model_ = model.encoder, model.target_encoder, model.predictor, model
        grid = (14, 14)
        encoder_state = jepa.api.Pretrained.encoder_state

        def network(self, which):
            return model.target_encoder if which == "target" else model.encoder

    view = View()
    view.model = model
    ref = to_reference(view)
    params = [t for n in ("encoder", "predictor") for t in ref[n].values()]
    ref["opt"] = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(params)},
                  "param_groups": [{"lr": 1e-3, "params": list(range(len(params)))}]}
    torch.save(ref, path)
    return weights_bytes(path)


# --------------------------------------------------------------------------- review findings, pinned down
def test_released_shapes_map_to_their_timm_names_with_identical_architecture():
    timm = pytest.importorskip("timm")
    from jepa_image.interop import TIMM_GENERIC, timm_architecture

    from jepa.config import load_recipe
    from jepa.model import build_from_recipe

    cases = [("vit_huge", 14, 224, "vit_huge_patch14_gap_224"), ("vit_huge", 16, 448, "vit_huge_patch16_gap_448"),
             ("vit_giant", 16, 224, "vit_giant_patch16_gap_224"), ("vit_huge", 16, 224, TIMM_GENERIC),
             ("vit_base", 16, 224, TIMM_GENERIC)]  # timm's vit_base gap model has 16 heads, I-JEPA's B/16 12
    for size, patch, img, expected in cases:
        r = load_recipe(tiny_recipe(model={"size": size}, tokenizer={"patch_size": patch}, source={"crop_size": img}))
        enc = build_from_recipe(r, device="meta").encoder
        arch = {"embed_dim": enc.embed_dim, "depth": len(enc.blocks), "num_heads": enc.num_heads,
                "mlp_ratio": enc.blocks[0].mlp.fc1.out_features / enc.embed_dim, "patch": (patch, patch),
                "in_chans": 3, "img": (img, img)}
        name, args = timm_architecture(arch)
        assert name == expected, (size, patch, img)
        if name == TIMM_GENERIC:
            continue
        with torch.device("meta"):  # by name alone (no model_args): same tensors, same shapes
            theirs = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
        ours = {k: v.shape for k, v in enc.state_dict().items()} | {"pos_embed": (1, (img // patch) ** 2, enc.embed_dim)}
        assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v) for k, v in ours.items()}
        assert theirs["blocks.0.attn.qkv.weight"].shape[0] == 3 * enc.embed_dim and enc.num_heads == 16


def test_giant_mlp_ratio_predictor_uses_the_reference_ratio(tmp_path):
    """ViT-g's encoder MLP ratio is 48/11 but the reference predictor's is 4."""
    from jepa.config import load_recipe
    from jepa.model import build_from_recipe

    model = build_from_recipe(load_recipe(tiny_recipe(model={"size": "vit_tiny", "depth": 1, "mlp_ratio": 48 / 11,
                                                             "predictor_depth": 1, "predictor_embed_dim": 48})))
    assert model.predictor.predictor_blocks[0].mlp.fc1.out_features == 4 * 48
    assert model.encoder.blocks[0].mlp.fc1.out_features == int(192 * 48 / 11)


def test_half_precision_checkpoints_keep_sincos_positions(tmp_path):
    state = torch.load(FIXTURE / "ijepa_tiny.pth.tar", weights_only=True)
    for net in ("encoder", "predictor", "target_encoder"):
        state[net] = {k: v.half() for k, v in state[net].items()}
    torch.save(state, tmp_path / "fp16.pth.tar")
    import_checkpoint(tmp_path / "fp16.pth.tar", tmp_path / "ck", num_heads=3)
    assert jepa.load(tmp_path / "ck").resolved.recipe.model.pos_embed == "sincos"


@pytest.mark.parametrize("case", ["no_encoders", "predictor_parts_missing", "out_is_a_file"])
def test_malformed_imports_are_one_line_errors(case, tmp_path, jepa_cli):
    state = torch.load(FIXTURE / "ijepa_tiny.pth.tar", weights_only=True)
    out = tmp_path / "ck"
    if case == "no_encoders":
        state = {"target_encoder": None, "predictor": state["predictor"]}
    elif case == "predictor_parts_missing":
        state["predictor"] = {k: v for k, v in state["predictor"].items() if "predictor_embed" not in k}
    else:
        out.write_text("not a folder")
    torch.save(state, tmp_path / "in.pth.tar")
    code, _, err = jepa_cli("import", str(tmp_path / "in.pth.tar"), "--out", str(out), "--num-heads", "3")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_on_failure(trained, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(JepaError, match="not an empty folder"):
        export_checkpoint(trained, "timm", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(JepaError, match="no installed plugin writes format 'onnx'"):
        export_checkpoint(trained, "onnx", tmp_path / "none")
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".tmp-*"))


def test_encoder_only_checkpoint_seeds_both_encoders_and_a_fresh_predictor(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.IJepaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                   image_size=32, patch_size=4, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.IJepaModel(cfg)
    with torch.no_grad():  # released ports carry the fixed sin-cos table
        hf.embeddings.position_embeddings.copy_(sincos_pos_embed(grid_coords((8, 8)), 64)[None])
    hf.save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "ck")
    frozen = {"lr": 0.0, "start_lr": 0.0, "final_lr": 0.0, "weight_decay": 0.0, "final_weight_decay": 0.0}
    recipe = tiny_recipe(steps=1, optim=frozen, ema={"momentum": 1.0},
                         model={"size": "vit_test", "init": str(tmp_path / "ck")})
    run_pretrain(recipe, tmp_path / "run")
    m, src = jepa.load(tmp_path / "run"), jepa.load(tmp_path / "ck")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m.encode(x, "target"), src.encode(x, "context"))
    torch.testing.assert_close(m.encode(x, "context"), src.encode(x, "context"))
    assert m.predictor is not None
