"""Side by side with the reference I-JEPA implementation: one process, same machine, same setting.

Times full training steps of the reference code (facebookresearch/ijepa, ``src/train.py``) and of this
framework alternately, step by step, in ONE run, so both see the same machine state, and reports the
ratio (ours / reference): of the medians, and the median of the per-pair ratios. Also times the reference's mask collator against this framework's mask sampling +
collation for the same batch. The reference is NOT part of this repository: pass a checkout of it
with ``--ijepa PATH`` (or ``$IJEPA_REPO``); its modules are imported from there at run time.

The setting is ``benchmarks/recipes/reference_vit_tiny_224.toml`` (the reference's small setting):
ViT-Tiny/16 at 224 px, batch 16, predictor depth 6 width 96, multi-block masks (1 context block of
85-100%, 4 targets of 15-20%, aspect 0.75-1.5, ``min_keep`` 10) cut to the batch minimum, smooth-L1 on
layer-normed targets, AdamW with the reference's lr / wd / EMA schedules, fp32.

One reference step is what the body of the reference's ``train_step`` does, built from its own
functions (``src.helper.init_model`` / ``init_opt``, ``src.masks.multiblock.MaskCollator``,
``src.masks.utils.apply_masks``, ``src.utils.tensors.repeat_interleave_batch``,
``src.utils.logging.grad_logger``): collate 16 samples with the mask collator, lr / wd scheduler
steps, target forward (no grad) + layer norm + target selection, context encoder + predictor,
smooth-L1, backward, ``optimizer.step()``, its per-parameter gradient statistics (a host sync per
weight matrix, part of its step as shipped; timed separately as ``ref_grad_stats_ms``),
``zero_grad``, EMA loop and ``float(loss)``. Without ``torch.distributed`` initialised the
reference's DDP wrappers and ``AllReduce`` are left out (one process). One step of ours is
``benchmarks/train_step.py``'s (the trainer's step, masks included). Inputs are random-normal
images for both; data decoding is excluded for both.

FLOPs of both steps are counted with ``FlopCounterMode`` on one real step each, so "the same work"
is checked rather than assumed. The last stdout line is one JSON object.

    git clone https://github.com/facebookresearch/ijepa /tmp/ijepa    # wherever you have it
    python benchmarks/reference.py --ijepa /tmp/ijepa --json
    python benchmarks/reference.py --ijepa /tmp/ijepa --precision bf16   # ours in bf16, the reference under CPU autocast
    python benchmarks/reference.py --ijepa /tmp/ijepa --precision bf16 --ref-precision fp32   # ours bf16 vs its fp32
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ours_bench  # noqa: E402  (benchmarks/ is not a package)

RECIPE = str(Path(__file__).resolve().parent / "recipes" / "reference_vit_tiny_224.toml")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def import_reference(path: str):
    """The reference's modules, imported from a checkout at ``path`` (its top-level package is ``src``)."""
    root = Path(path).expanduser().resolve()
    if not (root / "src" / "helper.py").is_file() or not (root / "src" / "masks" / "multiblock.py").is_file():
        raise SystemExit(f"--ijepa {path}: not a checkout of facebookresearch/ijepa (no src/helper.py or "
                         "src/masks/multiblock.py there)")
    sys.path.insert(0, str(root))
    import logging

    logging.disable(logging.INFO)  # init_model logs the whole module tree at INFO
    from src.helper import init_model, init_opt
    from src.masks.multiblock import MaskCollator
    from src.masks.utils import apply_masks
    from src.utils.logging import grad_logger
    from src.utils.tensors import repeat_interleave_batch

    return dict(init_model=init_model, init_opt=init_opt, MaskCollator=MaskCollator, apply_masks=apply_masks,
                grad_logger=grad_logger, repeat_interleave_batch=repeat_interleave_batch)


class ReferenceStep:
    """The reference's training step in the reference setting (see the module docstring)."""

    def __init__(self, ref: dict, resolved, precision: str, total_steps: int):
        r = resolved.recipe
        m, o = r.model, r.optim
        mk, tok, src = (resolved.component(k)[1] for k in ("masker", "tokenizer", "source"))
        torch.manual_seed(r.run.seed)
        self.ref = ref
        self.encoder, self.predictor = ref["init_model"](
            device=torch.device("cpu"), patch_size=tok.patch_size, crop_size=src.crop_size,
            pred_depth=m.predictor_depth, pred_emb_dim=m.predictor_embed_dim, model_name=m.size)
        self.target = copy.deepcopy(self.encoder)
        for p in self.target.parameters():
            p.requires_grad = False
        # One "epoch" = the whole benchmark; warm-up 0 epochs (the schedules' values do not change the cost).
        self.optimizer, _, self.lr_sched, self.wd_sched = ref["init_opt"](
            encoder=self.encoder, predictor=self.predictor, iterations_per_epoch=total_steps, start_lr=o.start_lr,
            ref_lr=o.lr, warmup=0, num_epochs=1, wd=o.weight_decay, final_wd=o.final_weight_decay,
            final_lr=o.final_lr, ipe_scale=r.schedule.horizon_scale)
        self.collator = ref["MaskCollator"](
            input_size=src.crop_size, patch_size=tok.patch_size, enc_mask_scale=mk.context_scale,
            pred_mask_scale=mk.target_scale, aspect_ratio=mk.target_aspect, nenc=1, npred=mk.num_targets,
            min_keep=mk.min_keep, allow_overlap=False)
        g = torch.Generator().manual_seed(r.run.seed)
        self.samples = [(torch.randn(3, src.crop_size, src.crop_size, generator=g), 0)
                        for _ in range(r.data.batch_size)]
        self.ema = (r.ema.momentum, r.ema.final_momentum)
        self.total = total_steps * r.schedule.horizon_scale
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        self.grad_stats_ms: list[float] = []
        self.context_tokens: list[int] = []

    def __call__(self, step: int):
        ref = self.ref
        (imgs, _), masks_enc, masks_pred = self.collator(self.samples)
        self.context_tokens.append(int(masks_enc[0].shape[1]))
        self.lr_sched.step()
        self.wd_sched.step()
        with self.autocast:
            with torch.no_grad():
                h = self.target(imgs)
                h = F.layer_norm(h, (h.size(-1),))
                h = ref["apply_masks"](h, masks_pred)
                h = ref["repeat_interleave_batch"](h, len(imgs), repeat=len(masks_enc))
            z = self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)
            loss = F.smooth_l1_loss(z, h)
        loss.backward()
        self.optimizer.step()
        t = time.perf_counter()
        ref["grad_logger"](self.encoder.named_parameters())
        self.grad_stats_ms.append(1e3 * (time.perf_counter() - t))
        self.optimizer.zero_grad()
        with torch.no_grad():
            m = self.ema[0] + step * (self.ema[1] - self.ema[0]) / self.total
            for q, k in zip(self.encoder.parameters(), self.target.parameters(), strict=True):
                k.data.mul_(m).add_((1.0 - m) * q.detach().data)
        return float(loss.detach())


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def time_masks(ref_step: ReferenceStep, ours, n: int) -> dict:
    """Per batch: the reference collator vs ours (the masker once per sample, then ``Collate``), both with
    the step's 224 px images (stacking included) and with 1-element placeholder samples (masks alone),
    single-threaded as in a DataLoader worker."""
    out = {"batch": len(ref_step.samples), "threads": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    tiny_ref = [(torch.zeros(1), 0) for _ in ref_step.samples]
    for kind, ref_items, samples in (("images", ref_step.samples, ours.samples),
                                     ("masks_only", tiny_ref, list(torch.zeros(len(ours.pool), 1)))):
        ref_ms, our_ms = [], []
        for i in range(n):
            t = time.perf_counter()
            ref_step.collator(ref_items)
            ref_ms.append(1e3 * (time.perf_counter() - t))
            t = time.perf_counter()
            ours.micro_batches(i, samples)
            our_ms.append(1e3 * (time.perf_counter() - t))
        ref_med, our_med = statistics.median(ref_ms), statistics.median(our_ms)
        out[kind] = {"ref_ms_per_batch": round(ref_med, 3), "ours_ms_per_batch": round(our_med, 3),
                     "ref_samples_per_s": round(out["batch"] / ref_med * 1e3),
                     "ours_samples_per_s": round(out["batch"] / our_med * 1e3), "speedup": round(ref_med / our_med, 2)}
    torch.set_num_threads(threads)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ijepa", default=os.environ.get("IJEPA_REPO"),
                   help="checkout of facebookresearch/ijepa (default: $IJEPA_REPO)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--ref-precision", choices=["fp32", "bf16"],
                   help="the reference's precision, if not --precision: `--precision bf16 --ref-precision fp32` "
                   "times our bf16 step against the reference's fp32 step in one run")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each, alternating (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first (default 2)")
    p.add_argument("--mask-batches", type=int, default=300, help="batches for the mask timing (default 300)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--set", action="append", metavar="A.B=V", help="override a field of the shared recipe")
    p.add_argument("--json", action="store_true", help="stdout is exactly one JSON object")
    args = p.parse_args(argv)
    if not args.ijepa:
        p.error("--ijepa PATH (a checkout of facebookresearch/ijepa) or $IJEPA_REPO is required")
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = import_reference(args.ijepa)
    ref_precision = args.ref_precision or args.precision

    schedule_steps = args.warmup + args.steps + 1  # the schedules' length (values do not change the cost)
    ours = ours_bench.build(argparse.Namespace(recipe=RECIPE, set=args.set, precision=args.precision, attention=None,
                                               threads=None, no_guard=False, warmup=0, steps=schedule_steps))
    r = ours.recipe
    if ours.accum != 1 or r.dist.world_size != 1 or r.data.mask_collate != "truncate":
        raise SystemExit("the reference comparison needs grad_accum 1, world_size 1 and truncate collation")
    reference = ReferenceStep(ref, ours.resolved, ref_precision, schedule_steps + 2)
    log(f"reference setting: {r.model.size}, grid {'x'.join(map(str, ours.grid))}, batch "
        f"{r.data.batch_size}, predictor {r.model.predictor_depth}x{r.model.predictor_embed_dim}, ours {args.precision}, "
        f"reference {ref_precision}, "
        f"ours attention {ours.attention}, {torch.get_num_threads()} threads")

    # Same work? FLOPs of one real step of each (forward + backward; counted, not estimated).
    ref_flops = count_flops(lambda: reference(0))
    # ours: the same counter as train_step.py (meta device, matmul attention, so attention counts too)
    our_flops = ours_bench.FlopCounter(ours.resolved, ours.sample_shape, ours.per_device)(ours.micro_batches(0)[0])
    # trainable only: the reference stores its fixed sin-cos tables as frozen parameters, ours as buffers
    ref_params = sum(p.numel() for p in [*reference.encoder.parameters(), *reference.predictor.parameters()]
                     if p.requires_grad)
    our_params = sum(p.numel() for p in [*ours.model.encoder.parameters(), *ours.model.predictor.parameters()]
                     if p.requires_grad)

    precisions = sorted({args.precision, ref_precision})
    peak_before = {p: ours_bench.matmul_peak_gflops(p, ours.device) for p in precisions}
    c0, w0 = time.process_time(), time.perf_counter()
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    run = {"reference": reference, "ours": ours.train_step}
    for i in range(args.warmup + args.steps):  # alternate step by step: slow drifts hit both alike
        for name in ("reference", "ours"):
            t = time.perf_counter()
            run[name](i + 1)
            dt = time.perf_counter() - t
            if i >= args.warmup:
                times[name].append(dt)
        if i >= args.warmup:
            log(f"  step {i + 1 - args.warmup:3d}/{args.steps}: reference {1e3 * times['reference'][-1]:7.1f} ms, "
                f"ours {1e3 * times['ours'][-1]:7.1f} ms")
    cpu_util = (time.process_time() - c0) / (time.perf_counter() - w0) / torch.get_num_threads()
    peak = {p: max(peak_before[p], ours_bench.matmul_peak_gflops(p, ours.device)) for p in precisions}
    masks = time_masks(reference, ours, args.mask_batches)

    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = sorted(o / r for o, r in zip(times["ours"], times["reference"], strict=True))
    result = {
        "setting": RECIPE, "overrides": args.set or [], "precision": args.precision, "ref_precision": ref_precision,
        "ours_attention": ours.attention, "batch_size": r.data.batch_size,
        "ref_ms_per_step": round(med["reference"] * 1e3, 1), "ours_ms_per_step": round(med["ours"] * 1e3, 1),
        "ratio_ours_over_ref": round(med["ours"] / med["reference"], 3),
        "ratio_of_pairs_median": round(statistics.median(pairs), 3),
        "ratio_of_pairs_quartiles": [round(pairs[len(pairs) // 4], 3), round(pairs[(3 * len(pairs)) // 4], 3)],
        "ref_grad_stats_ms": round(statistics.median(reference.grad_stats_ms), 2),
        "ref_gflops_per_step": round(ref_flops / 1e9, 2), "ours_gflops_per_step": round(our_flops / 1e9, 2),
        "ref_params": ref_params, "ours_params": our_params,
        "ref_context_tokens": round(statistics.mean(reference.context_tokens), 1),
        "peak_gflops": round(peak[args.precision], 1), "ref_peak_gflops": round(peak[ref_precision], 1),
        "ref_mfu": round(ref_flops / med["reference"] / 1e9 / peak[ref_precision], 3),
        "ours_mfu": round(our_flops / med["ours"] / 1e9 / peak[args.precision], 3),
        "masks": masks, "cpu_util": round(cpu_util, 3),
        "steps": args.steps, "warmup": args.warmup,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }
    log(f"reference {result['ref_ms_per_step']} ms/step ({result['ref_gflops_per_step']} GFLOP, MFU "
        f"{result['ref_mfu']:.0%}), ours {result['ours_ms_per_step']} ms/step ({result['ours_gflops_per_step']} GFLOP, "
        f"MFU {result['ours_mfu']:.0%}): ours/reference = {result['ratio_ours_over_ref']} (step pairs: "
        f"median {result['ratio_of_pairs_median']}, quartiles {result['ratio_of_pairs_quartiles']}); masks per batch of {masks['batch']} (alone): reference "
        f"{masks['masks_only']['ref_ms_per_batch']} ms, ours {masks['masks_only']['ours_ms_per_batch']} ms "
        f"({masks['masks_only']['speedup']}x); cpu_util {result['cpu_util']}")
    if cpu_util < 0.85:
        log(f"warning: cpu_util {cpu_util:.2f} < 0.85: other processes shared the cores")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
