"""What a recipe costs, computed on the meta device: nothing is allocated, so ViT-H/14 is instant.

* parameters of the encoder and predictor;
* tokens per sample (the tokenizer's grid for the source's sample shape);
* FLOPs of one optimizer step, counted by ``FlopCounterMode`` over the real forward and backward
  (target forward, context forward/backward, predictor forward/backward), with plain matmul
  attention so attention matmuls are counted too;
* an estimate of peak memory per device: fp32 weights, gradients and AdamW moments, plus
  activations saved for backward (per block, about ``34 * L * D`` bytes in 16-bit precision, the
  estimate of Korthikanti et al. 2022, doubled in fp32; plus ``5 * heads * L^2`` for stored attention
  maps when ``model.attention = "math"``: fused SDPA keeps none);
* expected wall time per step, per epoch and for the run on A100 and H100 GPUs, from those FLOPs, the
  GPUs' dense bf16 peaks and a model-FLOP utilisation (MFU). The default MFU is what the paper's own
  ViT-H/14 run achieved by this count: 300 epochs (4.38e20 FLOP) in under 1,200 A100-hours (16 GPUs,
  under 72 h) is at least 0.34 of 312 TFLOP/s. ``benchmarks/gpu.sh`` measures it on a real GPU.
"""

from __future__ import annotations

import random

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config.load import Resolved
from ..data.pipeline import per_device_batch
from ..train.schedules import training_length
from .jepa import build_jepa, resolve_arch, training_grid
from .vit import set_attention

#: Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts, without sparsity), FLOP/s.
GPU_PEAKS = {"A100": 312e12, "H100": 989e12}
#: MFU of the paper's ViT-H/14 run (see the module docstring): the default of :func:`expected_time`.
PAPER_MFU = 0.34


def expected_time(cost: dict, mfu: float = PAPER_MFU) -> dict:
    """Seconds per step and hours per epoch / per run on each GPU of :data:`GPU_PEAKS`, at ``mfu``.

    ``cost`` is :func:`estimate`'s result: the per-device FLOPs of one optimizer step set the pace,
    since every device runs its share of the global batch in parallel.
    """
    if not 0.0 < mfu <= 1.0:
        raise ValueError(f"--mfu: a fraction of the peak in (0, 1], got {mfu:g}")
    steps_per_epoch = cost.get("steps_per_epoch")
    out = {"mfu": mfu, "gpus": {}}
    for name, peak in GPU_PEAKS.items():
        step_s = cost["flops_per_device_step"] / (peak * mfu)
        out["gpus"][name] = {
            "peak_tflops": peak / 1e12,
            "step_s": step_s,
            "epoch_h": step_s * steps_per_epoch / 3600 if steps_per_epoch else None,
            "run_h": step_s * cost["total_steps"] / 3600 if cost.get("total_steps") else None,
        }
    return out


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def example_masks(resolved: Resolved, batch: int, seed: int = 0):
    """Index tensors of a typical batch (masks drawn from the recipe's masker, padded)."""
    from ..data.pipeline import Collate

    source_cls, source_cfg = resolved.component("source")
    masker_cls, masker_cfg = resolved.component("masker")
    shape = source_cls(source_cfg).sample_shape()
    grid = training_grid(resolved)
    masker = masker_cls(masker_cfg)
    masker.check(grid)
    items = [(torch.zeros(0), masker(grid, random.Random(seed + i)), -1, i) for i in range(batch)]
    collated = Collate(resolved.recipe.data.mask_collate)(items)
    return shape, grid, collated


def _count_flops(resolved: Resolved, shape, grid, b, per_device: int, depth: int, predictor_depth: int) -> int:
    """FLOPs of one forward + backward of a model with the given depths (meta device, math attention)."""
    r = resolved.recipe
    tok_cls, tok_cfg = resolved.component("tokenizer")
    cfg = r.model.model_copy(update={"depth": depth, "predictor_depth": predictor_depth})
    model = build_jepa(cfg, r.loss, tok_cls, tok_cfg, device="meta", grid=grid)
    set_attention(model, "math")
    x = torch.empty(per_device, *shape, device="meta")

    def to_meta(t):
        return None if t is None else t.to("meta")

    with FlopCounterMode(display=False) as counter:
        loss, _ = model(x, to_meta(b.context_idx), to_meta(b.target_idx), to_meta(b.context_valid),
                        to_meta(b.target_valid))
        loss.backward()
    return counter.get_total_flops()


def step_flops(resolved: Resolved, shape, grid, b, per_device: int) -> int:
    """FLOPs of one micro-batch step at the recipe's depths.

    Blocks of one trunk are identical, so FLOPs are exactly affine in each depth:
    ``F(D, P) = F0 + D * Fe + P * Fp``. Three counts on one- and two-block models give the three
    terms, which keeps ``recipe check`` of a 32-block ViT-H/14 to a fraction of a second of counting.
    """
    arch = resolve_arch(resolved.recipe.model)
    f11 = _count_flops(resolved, shape, grid, b, per_device, 1, 1)
    f21 = _count_flops(resolved, shape, grid, b, per_device, 2, 1)
    f12 = _count_flops(resolved, shape, grid, b, per_device, 1, 2)
    fe, fp = f21 - f11, f12 - f11
    return f11 + (arch["depth"] - 1) * fe + (arch["predictor_depth"] - 1) * fp


def estimate(resolved: Resolved, world_size: int | None = None) -> dict:
    r = resolved.recipe
    world = world_size or r.dist.world_size
    per_device = per_device_batch(r.data.batch_size, world, r.train.grad_accum)
    tok_cls, tok_cfg = resolved.component("tokenizer")
    shape, grid, b = example_masks(resolved, per_device)
    model = build_jepa(r.model, r.loss, tok_cls, tok_cfg, device="meta", grid=grid)
    micro_flops = step_flops(resolved, shape, grid, b, per_device)
    arch = resolve_arch(r.model)
    tokens = 1
    for g in grid:
        tokens *= g
    m, _, kt = b.target_idx.shape
    nc = b.context_idx.shape[1]
    act_bytes = 2 if r.train.precision in ("bf16", "auto") else 4
    scale = act_bytes / 2

    maps = 5 if r.model.attention == "math" else 0

    def block_act(batch, length, dim, heads):
        return scale * (34 * batch * length * dim + maps * heads * batch * length * length)

    enc_act = arch["depth"] * block_act(per_device, nc, arch["embed_dim"], arch["num_heads"])
    rows, length = (per_device, nc + m * kt) if r.model.predictor_joint else (m * per_device, nc + kt)
    pred_act = arch["predictor_depth"] * block_act(rows, length, arch["predictor_embed_dim"],
                                                    arch["predictor_num_heads"])
    target_act = block_act(per_device, tokens, arch["embed_dim"], arch["num_heads"])  # transient, one block
    n_enc, n_pred = _count(model.encoder), _count(model.predictor)
    state_bytes = 4 * (n_enc + n_pred) * 4 + 4 * n_enc  # weights + grads + 2 Adam moments, + target weights
    memory = state_bytes + enc_act + pred_act + target_act
    flops_step = micro_flops * r.train.grad_accum * world
    steps = training_length(r, r.data.num_samples)
    steps_per_epoch = r.data.num_samples / r.data.batch_size if r.data.num_samples else None
    return {
        "total_steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "epochs": steps / steps_per_epoch if steps and steps_per_epoch else None,
        "total_flops": flops_step * steps if steps else None,
        "params": {"encoder": n_enc, "predictor": n_pred, "target_encoder": _count(model.target_encoder)},
        "arch": arch,
        "grid": list(grid),
        "tokens_per_sample": tokens,
        "context_tokens": nc,
        "target_tokens": [int(m), int(kt)],
        "per_device_batch": per_device,
        "world_size": world,
        "flops_per_step": flops_step,
        "flops_per_device_step": micro_flops * r.train.grad_accum,
        "flops_per_sample": flops_step / r.data.batch_size,
        "memory_gb": memory / 1e9,
    }
