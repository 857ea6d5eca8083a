"""Reference I-JEPA and Hugging Face I-JEPA checkpoints in; timm and Hugging Face out.

Our parameter names are the reference's (``patch_embed.proj``, ``blocks.{i}.attn.qkv``, ``norm``;
``predictor_embed``, ``mask_token``, ``predictor_blocks``, ...), so the reference format needs only the
DDP ``module.`` prefix removed and the fixed sin-cos tables (``pos_embed``, ``predictor_pos_embed``)
checked and dropped: our networks compute them from token coordinates for any grid. A table that is
not sin-cos (a fine-tuned port) is kept as a learned embedding and interpolated for other grids.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from jepa import JepaError
from jepa.components import grid_coords
from jepa.interop import Converted
from jepa.model.pos_embed import sincos_pos_embed

#: attention heads by encoder width in the reference model zoo (not stored in checkpoints)
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
SIZE_BY_SHAPE = {(192, 12): "vit_tiny", (384, 12): "vit_small", (768, 12): "vit_base", (1024, 24): "vit_large",
                 (1280, 32): "vit_huge", (1408, 40): "vit_giant"}
#: timm architectures of the released I-JEPA weights, keyed by everything that defines them:
#: (width, depth, heads, mlp ratio, patch, image size) -> name. Other shapes have no timm name of their own.
TIMM_NAMES = {(1280, 32, 16, 4.0, 14, 224): "vit_huge_patch14_gap_224",
              (1280, 32, 16, 4.0, 16, 448): "vit_huge_patch16_gap_448",
              (1408, 40, 16, round(48 / 11, 6), 16, 224): "vit_giant_patch16_gap_224"}
TIMM_GENERIC = "vit_base_patch16_224"  # any ViT: every architecture argument comes from model_args


def _strip(sd: dict) -> dict:
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def _depth(sd: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _is_sincos(table: torch.Tensor, grid: tuple[int, int]) -> bool:
    """Is ``table`` the fixed sin-cos table of ``grid`` (up to the rounding of its dtype: fp16/bf16 saves)?"""
    ref = sincos_pos_embed(grid_coords(grid), table.shape[-1])
    tol = max(1e-4, 2 * torch.finfo(table.dtype).eps) if table.is_floating_point() else 1e-4
    return table.shape[-2] == ref.shape[0] and torch.allclose(table.reshape(ref.shape).float(), ref, atol=tol)


def _square_grid(n: int, what: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise JepaError(f"import: {what} has {n} positions, not a square grid; the reference format is square")
    return (side, side)


def encoder_arch(sd: dict, what: str, num_heads: int | None = None) -> dict:
    """Architecture of a reference-format encoder state dict (no ``module.`` prefix).

    Checkpoints do not store the number of attention heads: it comes from the reference model zoo's
    width, or from ``num_heads`` for other widths."""
    if "patch_embed.proj.weight" not in sd:
        raise JepaError(f"import: {what} has no patch_embed.proj.weight; found keys like {sorted(sd)[:5]}")
    width, chans, ph, pw = sd["patch_embed.proj.weight"].shape
    depth = _depth(sd, "blocks")
    heads = num_heads or HEADS_BY_WIDTH.get(width)
    if heads is None or depth == 0 or width % heads:
        raise JepaError(f"import: unknown architecture in {what}: width {width}, depth {depth}; the reference "
                        f"I-JEPA widths are {sorted(HEADS_BY_WIDTH)} (pass --num-heads for another width)")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / width
    return {"embed_dim": width, "depth": depth, "num_heads": heads, "mlp_ratio": mlp_ratio,
            "in_chans": chans, "patch": (ph, pw)}


def _encoder_weights(sd: dict, grid: tuple[int, int], what: str) -> tuple[dict, bool]:
    """Our encoder state dict; True if the position table is learned (kept) rather than sin-cos."""
    sd = dict(sd)
    table = sd.pop("pos_embed", None)
    learned = table is not None and not _is_sincos(table, grid)
    if learned:
        sd["pos_embed_learned"] = table.reshape(1, -1, table.shape[-1])
    return sd, learned


def _model_section(arch: dict, pred: dict | None, learned: bool, grid, qkv_bias: bool = True) -> dict:
    """Every architecture number explicitly (a size preset alone would impose its head count)."""
    model = {"size": SIZE_BY_SHAPE.get((arch["embed_dim"], arch["depth"]), "vit_tiny"),
             "embed_dim": arch["embed_dim"], "depth": arch["depth"], "num_heads": arch["num_heads"],
             "mlp_ratio": arch["mlp_ratio"], "qkv_bias": qkv_bias}
    if pred is None:  # no predictor in the checkpoint: a valid placeholder shape (the reference's width)
        width = 384 if 384 % arch["num_heads"] == 0 else 32 * arch["num_heads"]
        pred = {"predictor_embed_dim": width, "predictor_depth": 1, "predictor_num_heads": arch["num_heads"]}
    model.update(pred)
    if learned:
        model.update({"pos_embed": "learned", "pos_grid": list(grid)})
    return model


def _recipe(arch: dict, model: dict, grid) -> dict:
    ph, pw = arch["patch"]
    return {"requires": ["image"], "model": model,
            "tokenizer": {"name": "patch", "patch_size": [ph, pw] if ph != pw else ph, "in_chans": arch["in_chans"]},
            "masker": {"name": "multiblock"},
            "source": {"name": "image", "crop_size": [grid[0] * ph, grid[1] * pw]},
            "loss": {"kind": "smooth_l1"}}


def from_reference(state, source: str, options: dict | None = None) -> Converted | None:
    """A reference I-JEPA training checkpoint (``encoder``, ``predictor``, ``target_encoder``, ...)."""
    if not isinstance(state, dict) or not ({"encoder", "target_encoder"} & set(state)):
        return None
    nets = {n: _strip(state[n]) for n in ("encoder", "predictor", "target_encoder") if isinstance(state.get(n), dict)}
    heads = (options or {}).get("num_heads")
    if not ({"encoder", "target_encoder"} & set(nets)):
        raise JepaError(f"import: {source} has neither an encoder nor a target_encoder state dict")
    main = nets.get("target_encoder") or nets["encoder"]
    arch = encoder_arch(main, f"{source} (target_encoder)" if "target_encoder" in nets else source, heads)
    tables = [n["pos_embed"] for n in nets.values() if "pos_embed" in n]
    if not tables:
        raise JepaError(f"import: {source} has no pos_embed in any encoder, so its training resolution is unknown")
    grid = _square_grid(tables[0].shape[-2], "pos_embed")
    out = {}
    for name in ("encoder", "target_encoder"):
        if name in nets:
            if encoder_arch(nets[name], name, heads) != arch:
                raise JepaError(f"import: {source}: encoder and target_encoder have different architectures")
            out[name], _ = _encoder_weights(nets[name], grid, name)
    learned = any("pos_embed_learned" in sd for sd in out.values())
    if learned:  # one encoder's table is not sin-cos: both keep their own table (or the sin-cos one) as learned
        for name, sd in out.items():
            if "pos_embed_learned" not in sd:
                table = nets[name].get("pos_embed")
                sd["pos_embed_learned"] = (table if table is not None else
                                           sincos_pos_embed(grid_coords(grid), arch["embed_dim"])).reshape(1, -1, arch["embed_dim"])
    pred_cfg = None
    if "predictor" in nets:
        p = dict(nets["predictor"])
        table = p.pop("predictor_pos_embed", None)
        if table is not None and not _is_sincos(table, grid):
            raise JepaError(f"import: {source}: predictor_pos_embed is not the sin-cos table of a {grid[0]}x{grid[1]} "
                            "grid; learned predictor positions are not supported")
        width = p["predictor_embed.weight"].shape[0]
        pred_cfg = {"predictor_embed_dim": width, "predictor_depth": _depth(p, "predictor_blocks"),
                    "predictor_num_heads": arch["num_heads"],
                    "predictor_mlp_ratio": p["predictor_blocks.0.mlp.fc1.weight"].shape[0] / width}
        out["predictor"] = p
    info = {"source_epoch": int(state["epoch"])} if isinstance(state.get("epoch"), int) else {}
    extra = {"reference_optimizer": state["opt"]} if isinstance(state.get("opt"), dict) else {}
    recipe = _recipe(arch, _model_section(arch, pred_cfg, learned, grid), grid)
    return Converted(recipe, out, "ijepa-reference", info, extra)


_HF_V5 = {"attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
          "layernorm_before": "norm1", "layernorm_after": "norm2"}
_HF_V4 = {"attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
          "layernorm_before": "norm1", "layernorm_after": "norm2"}


def from_hf(state, source: str, options: dict | None = None) -> Converted | None:
    """A Hugging Face I-JEPA folder (``config.json`` with ``model_type = "ijepa"`` + ``model.safetensors``).

    The Hugging Face ports hold one encoder (the reference's context ``encoder``); the predictor is absent.
    """
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict)
            and state["config"].get("model_type") == "ijepa"):
        return None
    cfg, w = state["config"], {k.removeprefix("ijepa."): v for k, v in state["weights"].items()}
    v4 = any(k.startswith("encoder.layer.") for k in w)
    layer = "encoder.layer" if v4 else "layers"
    names = _HF_V4 if v4 else _HF_V5
    qkv = (("attention.attention.query", "attention.attention.key", "attention.attention.value") if v4 else
           ("attention.q_proj", "attention.k_proj", "attention.v_proj"))
    qkv_bias = bool(cfg.get("qkv_bias", True))
    sd = {"patch_embed.proj.weight": w.pop("embeddings.patch_embeddings.projection.weight"),
          "patch_embed.proj.bias": w.pop("embeddings.patch_embeddings.projection.bias"),
          "norm.weight": w.pop("layernorm.weight"), "norm.bias": w.pop("layernorm.bias")}
    table = w.pop("embeddings.position_embeddings")
    for i in range(cfg["num_hidden_layers"]):
        pre = f"{layer}.{i}."
        for kind in ("weight", "bias"):
            if kind == "weight" or qkv_bias:
                sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([w.pop(f"{pre}{q}.{kind}") for q in qkv])
            for theirs, ours in names.items():
                sd[f"blocks.{i}.{ours}.{kind}"] = w.pop(f"{pre}{theirs}.{kind}")
    leftover = [k for k in w if not k.startswith("pooler.")]
    if leftover:
        raise JepaError(f"import: {source}: unexpected Hugging Face keys {leftover[:5]}")
    arch = encoder_arch(sd, source, cfg["num_attention_heads"])
    grid = _square_grid(table.shape[-2], "embeddings.position_embeddings")
    sd["pos_embed"] = table
    enc, learned = _encoder_weights(sd, grid, "encoder")
    recipe = _recipe(arch, _model_section(arch, None, learned, grid, qkv_bias), grid)
    return Converted(recipe, {"encoder": enc}, "hf-ijepa", {"hf_layout": "v4" if v4 else "v5"})


# --------------------------------------------------------------------------- export
def to_reference(model, epoch: int = 0) -> dict:
    """A reference-format training checkpoint (``module.`` prefixes, fixed position tables) of ``model``."""
    out = {}
    for which, name in (("context", "encoder"), ("target", "target_encoder")):
        if getattr(model, name) is not None:
            out[name] = {f"module.{k}": v for k, v in model.encoder_state(which).items()}
    if model.predictor is not None:
        pred = {k: v.detach().clone() for k, v in model.predictor.state_dict().items()}
        pos = model.predictor.pos(model.model.encoder.patch_embed.coords, model.grid, torch.device("cpu"))
        pred["predictor_pos_embed"] = pos.unsqueeze(0).clone()
        out["predictor"] = {f"module.{k}": v for k, v in pred.items()}
    return {**out, "opt": None, "scaler": None, "epoch": epoch, "loss": 0.0, "batch_size": 0, "world_size": 1,
            "lr": 0.0}


def _arch_of(model, which: str) -> dict:
    net = model.network(which)
    tok = model.resolved.components["tokenizer"][1]
    ph, pw = tok.patch_hw
    return {"embed_dim": net.embed_dim, "depth": len(net.blocks), "num_heads": net.num_heads,
            "qkv_bias": net.blocks[0].attn.qkv.bias is not None,
            "mlp_ratio": net.blocks[0].mlp.fc1.out_features / net.embed_dim, "patch": (ph, pw),
            "in_chans": tok.in_chans, "img": (model.grid[0] * ph, model.grid[1] * pw)}


def timm_architecture(a: dict) -> tuple[str, dict]:
    """The timm model name and arguments for an encoder architecture (see :func:`_arch_of`)."""
    square = a["patch"][0] == a["patch"][1] and a["img"][0] == a["img"][1]
    key = (a["embed_dim"], a["depth"], a["num_heads"], round(a["mlp_ratio"], 6), a["patch"][0], a["img"][0])
    name = TIMM_NAMES.get(key, TIMM_GENERIC) if square and a["in_chans"] == 3 else TIMM_GENERIC
    model_args = {"img_size": list(a["img"]), "patch_size": a["patch"][0] if a["patch"][0] == a["patch"][1]
                  else list(a["patch"]), "embed_dim": a["embed_dim"], "depth": a["depth"],
                  "num_heads": a["num_heads"], "mlp_ratio": a["mlp_ratio"], "in_chans": a["in_chans"],
                  "qkv_bias": a.get("qkv_bias", True), "class_token": False, "global_pool": "avg", "fc_norm": False,
                  "num_classes": 0}
    return name, model_args


def export_timm(model, out: Path, which: str) -> list[str]:
    """timm ``VisionTransformer`` weights (no class token, average pooling, final norm) + ``config.json``.

    Loads with ``timm.create_model("local-dir:OUT", pretrained=True)`` for any shape. The released
    I-JEPA shapes (:data:`TIMM_NAMES`) also load by their timm name alone, e.g.
    ``timm.create_model("vit_huge_patch14_gap_224", pretrained=True, num_classes=0,
    pretrained_cfg_overlay=dict(file="OUT/model.safetensors"))``; other shapes are named
    :data:`TIMM_GENERIC` and need ``**config["model_args"]`` to load by name.
    """
    a = _arch_of(model, which)
    sd = model.encoder_state(which)
    name, model_args = timm_architecture(a)
    src = model.resolved.components["source"][1]
    config = {"architecture": name, "num_classes": 0, "num_features": a["embed_dim"], "global_pool": "avg",
              "model_args": model_args,
              "pretrained_cfg": {"tag": f"jepa_{which}", "input_size": [a["in_chans"], *a["img"]],
                                 "fixed_input_size": True, "mean": list(src.mean), "std": list(src.std),
                                 "crop_pct": src.eval_crop_ratio, "interpolation": src.interpolation,
                                 "num_classes": 0, "license": "see the training data's licence"}}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return [str(out / "model.safetensors"), str(out / "config.json")]


def export_hf(model, out: Path, which: str) -> list[str]:
    """A folder that ``transformers.IJepaModel.from_pretrained`` loads (the hub's key layout)."""
    a = _arch_of(model, which)
    if a["patch"][0] != a["patch"][1] or a["img"][0] != a["img"][1]:
        raise JepaError("export: Hugging Face I-JEPA needs square images and patches; use --format timm or safetensors")
    sd = model.encoder_state(which)
    d = a["embed_dim"]
    w = {"embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
         "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
         "embeddings.position_embeddings": sd["pos_embed"],
         "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    for i in range(a["depth"]):
        pre = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            if f"blocks.{i}.attn.qkv.{kind}" in sd:  # no q/k/v bias when qkv_bias is off
                q, k, v = sd[f"blocks.{i}.attn.qkv.{kind}"].split(d)
                for part, t in (("query", q), ("key", k), ("value", v)):
                    w[f"{pre}attention.attention.{part}.{kind}"] = t.contiguous()
            for theirs, ours in _HF_V4.items():
                w[f"{pre}{theirs}.{kind}"] = sd[f"blocks.{i}.{ours}.{kind}"]
    config = {"model_type": "ijepa", "architectures": ["IJepaModel"], "hidden_size": d,
              "num_hidden_layers": a["depth"], "num_attention_heads": a["num_heads"],
              "intermediate_size": int(round(a["mlp_ratio"] * d)), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": 1e-6,
              "image_size": a["img"][0], "patch_size": a["patch"][0], "num_channels": a["in_chans"], "qkv_bias": a["qkv_bias"],
              "pooler_output_size": d, "pooler_act": "tanh"}
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return [str(out / "model.safetensors"), str(out / "config.json")]


def export(model, fmt: str, out: str, which: str) -> list[str] | None:
    from .tokenizer import PatchTokenizer

    if fmt not in ("timm", "hf") or not isinstance(model.model.encoder.patch_embed, PatchTokenizer):
        return None
    return (export_timm if fmt == "timm" else export_hf)(model, Path(out), which)
