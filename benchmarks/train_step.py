"""Time full I-JEPA training steps of a recipe on synthetic inputs.

One timed step is everything the trainer does per optimizer step except reading and decoding data:

* mask sampling: the recipe's masker is called once per sample with a per-sample seeded
  ``random.Random`` and the samples are collated by ``jepa.data.pipeline.Collate(data.mask_collate)``,
  exactly as the data pipeline does (in the trainer this runs in DataLoader workers);
* the batch moved to the device; target-encoder forward, context-encoder forward, predictor, loss
  (under ``torch.autocast(device, bfloat16)`` for bf16), backward;
* gradient clipping if the recipe asks for it, ``set_hparams`` with the schedule's values,
  ``optimizer.step`` (``build_optimizer``), ``zero_grad`` and the EMA update of the target encoder,
  behind the trainer's non-finite guard (``jepa.train.guards``; ``--no-guard`` leaves it out).

Inputs are random-normal tensors of the source's sample shape. The per-device batch is
``data.batch_size / (dist.world_size * train.grad_accum)``; a step runs ``grad_accum`` micro-batches.
Warm-up steps are not timed; the MEDIAN of the timed steps is the headline number.

FLOPs are counted, not guessed: ``FlopCounterMode`` over the model's real forward and backward on the
meta device (plain matmul attention, so attention matmuls count), for the index-set shapes of every
timed batch; the optimizer and the EMA update are not counted. The machine's dense-matmul peak in the
same precision is measured in the same run (``torch.matmul`` of 2048x2048 matrices, best of several
repeats), so ``mfu = achieved_gflops / peak_gflops`` compares like with like.

Output: human-readable lines on stderr; the LAST stdout line is one JSON object (with ``--json``,
stdout is exactly that one line).

    python benchmarks/train_step.py benchmarks/recipes/reference_vit_tiny_224.toml --precision bf16
    python benchmarks/train_step.py quickstart --set model.depth=12 --steps 20 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from jepa.config import load_recipe
from jepa.data.pipeline import Collate, derive_seed, per_device_batch
from jepa.model import build_jepa, ema_update, set_attention
from jepa.model.cost import estimate
from jepa.train.guards import NonFiniteGuard, guarded_ema_update, trainable
from jepa.train.host import apply_cpu_allocator
from jepa.train.optim import build_optimizer, set_hparams
from jepa.train.schedules import build_schedules, training_length
from jepa.train.trainer import apply_train_options, pick_attention, pick_device, pick_precision


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- peak matmul throughput
def matmul_peak_gflops(precision: str, device: torch.device, n: int = 2048, repeats: int = 8,
                       warmup: int = 2) -> float:
    """Best-of-``repeats`` dense ``n x n @ n x n`` matmul rate in the step's precision (GFLOP/s)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


# --------------------------------------------------------------------------- FLOPs of one micro-batch
class FlopCounter:
    """Forward + backward FLOPs of the model on the meta device, per distinct index-set shape."""

    def __init__(self, resolved, sample_shape: tuple[int, ...], batch: int):
        r = resolved.recipe
        tok_cls, tok_cfg = resolved.component("tokenizer")
        self.model = build_jepa(r.model, r.loss, tok_cls, tok_cfg, device="meta")
        set_attention(self.model, "math")
        self.x = torch.empty(batch, *sample_shape, device="meta")
        self.cache: dict[tuple, int] = {}

    def __call__(self, b) -> int:
        def shape(t):
            return None if t is None else tuple(t.shape)

        key = (shape(b.context_idx), shape(b.target_idx), shape(b.context_valid), shape(b.target_valid))
        if key not in self.cache:
            def meta(t):
                return None if t is None else torch.zeros(t.shape, dtype=t.dtype, device="meta")

            with FlopCounterMode(display=False) as counter:
                loss, _ = self.model(self.x, meta(b.context_idx), meta(b.target_idx), meta(b.context_valid),
                                     meta(b.target_valid))
                loss.backward()
            self.model.zero_grad(set_to_none=True)
            self.cache[key] = counter.get_total_flops()
        return self.cache[key]


# --------------------------------------------------------------------------- profiling
PHASE = "step::"


def phase(name: str):
    """A profiler label for one part of the step (negligible cost when no profiler runs)."""
    return torch.profiler.record_function(PHASE + name)


def label_forward(module: torch.nn.Module, name: str) -> list:
    """Hooks that wrap ``module``'s forward in a profiler label (returns the handles to remove)."""
    state = []

    def pre(_mod, _args):
        ctx = phase(name)
        ctx.__enter__()
        state.append(ctx)

    def post(_mod, _args, _out):
        state.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def profile_steps(train_step, model, first: int, n: int, rows: int, trace: str | None,
                  device: torch.device) -> None:
    """Run ``n`` more steps (after the timed ones, so timings are unaffected) under torch.profiler and
    print where the step's time goes (phases, then operators by self time) to stderr."""
    from torch.profiler import ProfilerActivity, profile

    handles = (label_forward(model.target_encoder, "forward/target_encoder")
               + label_forward(model.encoder, "forward/context_encoder")
               + label_forward(model.predictor, "forward/predictor"))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=acts, record_shapes=True) as prof:
            for i in range(n):
                with phase("total"):
                    train_step(first + i)
                sync(device)
    finally:
        for h in handles:
            h.remove()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    phases = {e.key[len(PHASE):]: e.cpu_time_total / n / 1e3 for e in averages if e.key.startswith(PHASE)}
    total = phases.get("total", float("nan"))
    log(f"profile of {n} step(s): wall time per step by phase (ms, profiler on; forward/* are inside forward):")
    for name in ("masks", "to_device", "forward", "forward/target_encoder", "forward/context_encoder",
                 "forward/predictor", "backward", "optimizer", "ema", "total"):
        if name in phases:
            log(f"  {name:26s} {phases[name]:8.1f}  {phases[name] / total:6.1%}")
    log(f"top {rows} operators by self time:")
    log(averages.table(sort_by=key, row_limit=rows))
    log("grouped by input shape:")
    log(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=rows))
    if trace:
        prof.export_chrome_trace(trace)
        log(f"chrome trace written to {trace}")


# --------------------------------------------------------------------------- the benchmark
def total_steps_of(r, timed: int) -> tuple[int, int | None]:
    """Schedule length and steps per epoch without reading data (as far as the recipe allows)."""
    spe = max(1, r.data.num_samples // r.data.batch_size) if r.data.num_samples else None
    return training_length(r, r.data.num_samples) or max(timed, 100), spe


def build(args: argparse.Namespace) -> SimpleNamespace:
    """Everything one timed step needs: the model, optimizer, masker and ``train_step(step)``, which
    runs one full optimizer step (see the module docstring) and returns ``(batches, t_after_masks)``.
    ``benchmarks/reference.py`` times this same step beside the reference implementation's."""
    overrides = list(args.set or [])
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.attention:
        overrides.append(f"model.attention={args.attention}")
    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = load_recipe(args.recipe, overrides)
    r = resolved.recipe

    device = pick_device(r.run.device)
    precision = pick_precision(r.train.precision, device)
    # as the trainer does; --set 'train.cpu_allocator="system"' times glibc's defaults
    cpu_allocator = apply_cpu_allocator(r.train.cpu_allocator, device.type)
    attention = pick_attention(r.model.attention, device, precision)
    accum = r.train.grad_accum
    per_device = per_device_batch(r.data.batch_size, r.dist.world_size, accum)

    source_cls, source_cfg = resolved.component("source")
    tok_cls, tok_cfg = resolved.component("tokenizer")
    masker_cls, masker_cfg = resolved.component("masker")
    sample_shape = tuple(source_cls(source_cfg).sample_shape())
    grid = tuple(tok_cls.grid_for(tok_cfg, sample_shape))
    masker = masker_cls(masker_cfg)
    masker.check(grid)
    collate = Collate(r.data.mask_collate)
    tokens = math.prod(grid)

    total, spe = total_steps_of(r, args.warmup + args.steps)
    try:
        schedules = build_schedules(r, total, spe)
    except ValueError:  # warmup_epochs without a dataset size: call an epoch the whole run
        schedules = build_schedules(r, total, total)

    torch.manual_seed(r.run.seed)
    model = build_jepa(r.model, r.loss, tok_cls, tok_cfg).to(device)
    set_attention(model, attention)
    apply_train_options(model, r.train)
    optimizer = build_optimizer(r.optim, model.encoder, model.predictor, device=device)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    # Synthetic samples (decoding excluded): a fixed pool of random-normal images, one per batch slot.
    g = torch.Generator().manual_seed(r.run.seed)
    pool = torch.randn(per_device * accum, *sample_shape, generator=g)
    samples = list(pool)  # one view per slot, made once: the timed step indexes a list, as a loader's would be

    log(f"recipe {args.recipe}: {r.model.size} grid {'x'.join(map(str, grid))} ({tokens} tokens), "
        f"batch {per_device}/device x accum {accum}, {precision}, attention {attention}, device {device}, "
        f"{torch.get_num_threads()} threads, mask_collate {r.data.mask_collate}")

    def micro_batches(step: int, samples: list[torch.Tensor] = samples):
        """The step's micro-batches: masks drawn per sample from seeded RNGs, then collated."""
        out = []
        for a in range(accum):
            items = []
            for j in range(per_device):
                pos = (step * accum + a) * per_device + j
                mask = masker(grid, random.Random(derive_seed(r.run.seed, 0, pos, "mask")))
                items.append((samples[a * per_device + j], mask, -1, pos))
            out.append(collate(items))
        return out

    loss_sum = torch.zeros((), device=device)
    params = trainable([model.encoder, model.predictor])
    guard = None if args.no_guard else NonFiniteGuard(optimizer, r.health.max_nonfinite_in_a_row, device)

    def train_step(step: int):
        """One full optimizer step, as jepa.train.trainer.Trainer.fit runs it (minus data decoding).
        The ``phase`` labels only show in ``--profile`` output."""
        with phase("masks"):
            batches = micro_batches(step)
        t_mask = time.perf_counter()
        hp = schedules(step)
        set_hparams(optimizer, hp["lr"], hp["wd"])
        for batch in batches:
            with phase("to_device"):
                batch = batch.to(device)
            with phase("forward"), autocast:
                loss, stats = model(batch.x, batch.context_idx, batch.target_idx, batch.context_valid,
                                    batch.target_valid)
            with phase("backward"):
                (loss / accum).backward()
            loss_sum.add_(loss.detach() / accum)
            loss_step = loss.detach()
        with phase("optimizer"):
            norm = torch.nn.utils.clip_grad_norm_(params, r.optim.clip_grad) if r.optim.clip_grad else None
            if guard is None:
                optimizer.step()
            else:  # the trainer's non-finite guard: a device-side flag, no host sync
                ok = guard.check(params, loss_step, norm, step)
                guard.step(ok)
            optimizer.zero_grad(set_to_none=True)
        with phase("ema"):
            if guard is None:
                ema_update(model.target_encoder, model.encoder, hp["momentum"])
            else:
                guarded_ema_update(model.target_encoder, model.encoder, hp["momentum"], ok)
        return batches, t_mask

    return SimpleNamespace(resolved=resolved, recipe=r, device=device, precision=precision, attention=attention,
                           cpu_allocator=cpu_allocator, accum=accum, per_device=per_device,
                           sample_shape=sample_shape, grid=grid, tokens=tokens, model=model, loss_sum=loss_sum,
                           micro_batches=micro_batches, pool=pool, samples=samples, train_step=train_step)


def run(args: argparse.Namespace) -> dict:
    b = build(args)
    resolved, device, precision, attention = b.resolved, b.device, b.precision, b.attention
    accum, per_device, sample_shape, tokens = b.accum, b.per_device, b.sample_shape, b.tokens
    model, loss_sum, train_step = b.model, b.loss_sum, b.train_step

    # Peak matmul rate measured before and after the steps; the best of the two is the peak (another
    # process on the same cores during one of them only lowers that one).
    peak_before = matmul_peak_gflops(precision, device)
    load_before = os.getloadavg()[0]

    times, cpu_times, mask_times, shapes = [], [], [], []
    n_steps = args.warmup + args.steps
    for step in range(n_steps):
        sync(device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        batches, t_mask = train_step(step)
        sync(device)
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0
        timed = step >= args.warmup
        if timed:
            times.append(dt)
            cpu_times.append(cpu)
            mask_times.append(t_mask - t0)
            shapes.append(batches)
        log(f"  step {step + 1:3d}/{n_steps} {'timed ' if timed else 'warmup'} {dt * 1e3:8.1f} ms "
            f"(masks {1e3 * (t_mask - t0):6.1f} ms, context {batches[0].context_idx.shape[1]}, "
            f"targets {'x'.join(map(str, batches[0].target_idx.shape[::2]))})")
    mean_loss = float(loss_sum) / n_steps
    if not math.isfinite(mean_loss):
        raise SystemExit(f"loss is {mean_loss}: the benchmarked step diverged")

    # FLOPs of the timed batches (forward + backward, counted on the meta device).
    counter = FlopCounter(resolved, sample_shape, per_device)
    step_flops = [sum(counter(b) for b in bs) for bs in shapes]
    flops = statistics.mean(step_flops)
    est = estimate(resolved)["flops_per_device_step"]
    ctx = statistics.mean(b.context_idx.shape[1] for bs in shapes for b in bs)

    load_after = os.getloadavg()[0]
    peak_after = matmul_peak_gflops(precision, device)
    peak = max(peak_before, peak_after)
    if args.profile:  # after every measurement, so profiling overhead affects none of them
        profile_steps(train_step, model, n_steps, args.profile, args.profile_rows, args.profile_trace, device)
    threads = torch.get_num_threads()
    # CPU seconds the process used per wall second per thread over the timed steps: ~1.0 when the
    # step has the cores to itself; well below 1 means other processes took the CPU (or idle threads).
    cpu_util = sum(cpu_times) / sum(times) / threads if device.type == "cpu" else None
    med, mean = statistics.median(times), statistics.mean(times)
    achieved = flops / med / 1e9
    result = {
        "recipe": str(args.recipe),
        "precision": precision,
        "attention": attention,
        "cpu_allocator": b.cpu_allocator,
        "device": str(device),
        "batch_size": per_device,
        "grad_accum": accum,
        "tokens_per_sample": tokens,
        "context_tokens": round(ctx, 1),
        "target_tokens": list(shapes[-1][0].target_idx.shape[::2]),
        "steps": args.steps,
        "warmup": args.warmup,
        "ms_per_step": round(med * 1e3, 2),
        "ms_per_step_mean": round(mean * 1e3, 2),
        "ms_per_step_min": round(min(times) * 1e3, 2),
        "ms_per_step_max": round(max(times) * 1e3, 2),
        "ms_masking": round(statistics.median(mask_times) * 1e3, 2),
        "samples_per_s": round(per_device * accum / med, 2),
        "gflops_per_step": round(flops / 1e9, 3),
        "gflops_per_step_estimate": round(est / 1e9, 3),
        "achieved_gflops": round(achieved, 1),
        "peak_gflops": round(peak, 1),
        "peak_gflops_before_after": [round(peak_before, 1), round(peak_after, 1)],
        "mfu": round(achieved / peak, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mb": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "compile": bool(b.recipe.train.compile),
        "mean_loss": round(mean_loss, 6),
        "nonfinite_guard": not args.no_guard,
        "threads": threads,
        "cpu_util": None if cpu_util is None else round(cpu_util, 3),
        "loadavg_1m_before_after": [round(load_before, 2), round(load_after, 2)],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    log(f"median {result['ms_per_step']} ms/step (mean {result['ms_per_step_mean']}, masking "
        f"{result['ms_masking']} ms), {result['samples_per_s']} samples/s, {result['gflops_per_step']} GFLOP/step "
        f"-> {result['achieved_gflops']} GFLOP/s of {result['peak_gflops']} peak ({precision} matmul), "
        f"MFU {result['mfu']:.1%}, peak RSS {result['peak_rss_mb']} MB, cpu_util {result['cpu_util']}, "
        f"load {result['loadavg_1m_before_after']}")
    if cpu_util is not None and cpu_util < 0.85:
        log(f"warning: cpu_util {cpu_util:.2f} < 0.85: other processes probably shared the cores; timings are inflated")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe path or installed recipe name")
    p.add_argument("--set", action="append", metavar="A.B=V", help="override a recipe field (repeatable)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="override train.precision")
    p.add_argument("--attention", choices=["auto", "sdpa", "math"],
                   help="override model.attention (auto: jepa.train.trainer.pick_attention)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps with torch.profiler (table on stderr)")
    p.add_argument("--profile-rows", type=int, default=25, help="rows of the profile table (default 25)")
    p.add_argument("--profile-trace", metavar="FILE", help="also write a Chrome trace of the profiled steps")
    p.add_argument("--no-guard", action="store_true",
                   help="leave out the trainer's non-finite step guard (to measure what it costs)")
    p.add_argument("--json", action="store_true", help="stdout is exactly one JSON object")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    if not args.json:
        print(f"{args.recipe}: {result['ms_per_step']} ms/step, {result['samples_per_s']} samples/s, "
              f"MFU {result['mfu']:.1%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
