"""The training loop: one device, read top to bottom. Distribution is applied from outside.

State that a checkpoint restores: the three networks, the optimizer, and the step. Everything else
(learning rate, weight decay, EMA momentum, which samples and masks come next) is a pure function of
the step, so ``2 steps + resume + 2 steps`` equals ``4 steps`` bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console

from ..config.load import Resolved
from ..data import PretrainDataset, StepBatchSampler, build_index, build_loader
from ..data.pipeline import per_device_batch
from ..errors import CheckpointError, JepaError
from ..model import JEPA, build_jepa, ema_update, set_attention, training_grid
from .checkpoint import (
    NETWORKS,
    list_checkpoints,
    load_networks,
    load_state,
    present_networks,
    resolve_checkpoint,
    save_checkpoint,
)
from .metrics import MetricsLogger
from .optim import build_optimizer, set_hparams
from .schedules import build_schedules, training_length


# --------------------------------------------------------------------------- device choices
def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise JepaError(f"run.device: '{spec}' requested but CUDA is not available; use device = \"auto\" or \"cpu\"")
    return device


def cpu_has_fast_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: bf16 matmuls several times faster than fp32 (about 4x on this project's CPU)."""
    cpu = getattr(torch._C, "_cpu", None)
    for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        if cpu is not None and hasattr(cpu, check) and getattr(cpu, check)():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(spec: str, device: torch.device) -> str:
    if spec != "auto":
        return spec
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def pick_attention(spec: str, device: torch.device, precision: str) -> str:
    """Measured (benchmarks/train_step.py): fused SDPA wins on CUDA and ties in CPU fp32; on CPU with
    bf16, plain matmul-softmax attention is about 1.4-1.6x faster per block than SDPA."""
    if spec != "auto":
        return spec
    return "math" if device.type == "cpu" and precision == "bf16" else "sdpa"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def recipe_changes(old: dict, new: dict, ignore: tuple[str, ...] = ("checkpoint.", "log.", "model.init")) -> list[str]:
    fo, fn = flatten(old), flatten(new)
    keys = sorted(set(fo) | set(fn))
    return [k for k in keys if fo.get(k) != fn.get(k) and not k.startswith(ignore)]


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """Builds everything a run needs from a resolved recipe, then :meth:`fit` trains.

    Args:
        resolved: a validated recipe.
        run_dir: the run directory (recipe, metrics, TensorBoard, checkpoints).
        resume: continue from the run directory's latest checkpoint.
        allow_changes: recipe fields that may differ from the checkpoint's when resuming.
        versions: plugin versions, saved with every checkpoint.
        stop_at: stop after this global step, with a checkpoint (time-limited jobs; continue with resume).
    """

    def __init__(self, resolved: Resolved, run_dir: str | Path, resume: bool = False,
                 allow_changes: tuple[str, ...] = (), versions: dict | None = None, console: Console | None = None,
                 stop_at: int | None = None):
        self.resolved, self.recipe = resolved, resolved.recipe
        self.run_dir = Path(run_dir)
        self.console = console or Console(stderr=True)
        self.versions = versions or {}
        r = self.recipe
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise JepaError("distributed training under torchrun is not supported by this version yet; "
                            "run one process (it uses every core or the one GPU)")
        if not r.data.train:
            raise JepaError("data.train: no training data given; set it in the recipe or with --set data.train=PATH")
        self.device = pick_device(r.run.device)
        self.precision = pick_precision(r.train.precision, self.device)
        self.attention = pick_attention(r.model.attention, self.device, self.precision)

        # Data: index once; the grid comes from the tokenizer for the source's sample shape.
        source_cls, source_cfg = resolved.component("source")
        tok_cls, tok_cfg = resolved.component("tokenizer")
        masker_cls, masker_cfg = resolved.component("masker")
        self.source = source_cls(source_cfg)
        self.masker = masker_cls(masker_cfg)
        self.grid = training_grid(resolved)
        self.masker.check(self.grid)
        self.index = build_index(r.data.train)
        for bad in self.index.bad_shards:
            self.console.print(f"[yellow]warning:[/] skipped a shard that cannot be read: {bad}", highlight=False)
        num_samples = r.data.num_samples or len(self.index)
        self.steps_per_epoch = max(1, num_samples // r.data.batch_size)
        self.total_steps = training_length(r, num_samples)
        if self.total_steps is None:
            raise JepaError("train.steps: give the training length as train.steps or train.epochs")
        self.schedules = build_schedules(r, self.total_steps, self.steps_per_epoch)
        per_device_batch(r.data.batch_size, 1, r.train.grad_accum)  # before anything is written
        self.end_step = min(self.total_steps, stop_at) if stop_at else self.total_steps

        # Model and optimizer. Seeded, so a fresh run is reproducible.
        torch.manual_seed(r.run.seed)
        self.model: JEPA = build_jepa(r.model, r.loss, tok_cls, tok_cfg, grid=self.grid).to(self.device)
        set_attention(self.model, self.attention)
        if r.train.compile:
            for net in (self.model.encoder, self.model.predictor, self.model.target_encoder):
                net.compile(dynamic=True)  # in place: parameter names (and checkpoints) stay the same
        self.optimizer = build_optimizer(r.optim, self.model.encoder, self.model.predictor, device=self.device)
        self.start_step = 0
        self._prepare_run_dir(resume, allow_changes)
        if r.model.init and self.start_step == 0:
            self._init_from(resolve_checkpoint(r.model.init))
        self.skipped: Counter = Counter()
        self.skipped_examples: list[str] = []
        self.monitor = None
        if r.monitor.every_steps:
            from ..eval.monitor import KnnMonitor

            self.monitor = KnnMonitor(r.monitor, self.source, self.device, self.precision == "bf16")
        # Every check has passed: only now does the run directory change.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.toml").write_text(self.recipe_header() + self.resolved.to_toml())

    def _init_from(self, ckpt: Path) -> None:
        """Initialise from a checkpoint; an encoder-only checkpoint seeds both encoders (the target
        starts as a copy, as in a fresh run) and leaves the predictor freshly initialised."""
        present = present_networks(ckpt)
        if not present:
            raise CheckpointError(f"model.init: {ckpt} holds no network weights")
        load_networks(ckpt, {n: getattr(self.model, n) for n in present})
        notes = []
        have = [n for n in ("encoder", "target_encoder") if n in present]
        if len(have) == 1:
            dst = "target_encoder" if have[0] == "encoder" else "encoder"
            getattr(self.model, dst).load_state_dict(getattr(self.model, have[0]).state_dict())
            notes.append(f"the {dst} starts as a copy of the {have[0]}")
        if "predictor" not in present:
            notes.append("the predictor starts fresh")
        note = f" ({'; '.join(notes)})" if notes else ""
        self.console.print(f"initialised networks from {ckpt}{note}", highlight=False)

    def networks(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self.model, name) for name in NETWORKS}

    # ----------------------------------------------------------------------- run directory
    def _prepare_run_dir(self, resume: bool, allow_changes: tuple[str, ...]) -> None:
        ckpt_root = self.run_dir / "checkpoints"
        recipe_file = self.run_dir / "recipe.toml"
        if resume:
            ckpt = resolve_checkpoint(self.run_dir)
            saved = _read_toml(ckpt / "recipe.toml")
            changed = [c for c in recipe_changes(saved, self.resolved.to_dict()) if not _allowed(c, allow_changes)]
            if changed:
                raise CheckpointError(f"--resume: the recipe differs from the checkpoint's in {', '.join(changed)}; "
                                      f"pass --allow-changes {','.join(changed)} if that is intended")
            load_networks(ckpt, self.networks())
            state = load_state(ckpt)
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_step = int(state["step"])
            self.skipped_prev = state.get("skipped", {})
            self.console.print(f"resuming from {ckpt} at step {self.start_step}")
        else:
            if list_checkpoints(ckpt_root) or recipe_file.exists():
                raise JepaError(f"run directory {self.run_dir} already holds a run; pass --resume to continue it "
                                "or choose another --run-dir")
            self.skipped_prev = {}


    def recipe_header(self) -> str:
        lines = [f"# {k} {v}" for k, v in sorted(self.versions.items())]
        return "# resolved recipe written by jepa; plugin versions:\n" + "\n".join(lines) + "\n\n"

    # ----------------------------------------------------------------------- checkpoints
    def save(self, step: int) -> Path:
        meta = {"recipe_hash": self.resolved.digest(), "versions": self.versions, "total_steps": self.total_steps,
                "precision": self.precision, "grid": list(self.grid)}
        state = {"optimizer": self.optimizer.state_dict(), "step": step,
                 "data_position": step * self.recipe.data.batch_size,
                 "skipped": dict(self.skipped + Counter(self.skipped_prev))}
        return save_checkpoint(self.run_dir / "checkpoints", step, self.networks(), state, meta,
                               self.resolved.to_toml(), self.recipe.checkpoint.keep_last)

    # ----------------------------------------------------------------------- the loop
    def loader(self):
        r = self.recipe
        dataset = PretrainDataset(self.index, self.source, self.grid, self.masker, r.run.seed, r.data.shuffle)
        sampler = StepBatchSampler(r.data.batch_size, 0, 1, r.train.grad_accum, self.start_step, self.end_step)
        return build_loader(dataset, sampler, r.data.num_workers, r.data.mask_collate,
                            pin_memory=self.device.type == "cuda")

    def fit(self) -> dict:
        r = self.recipe
        log_every, ckpt_every, accum = r.log.every_steps, r.checkpoint.every_steps, r.train.grad_accum
        logger = MetricsLogger(self.run_dir, self.start_step, r.log.tensorboard)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        batches = iter(self.loader())
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        first_loss = last_loss = None
        interval_steps, interval_samples = 0, 0
        t_interval = t_start = time.perf_counter()
        last_ckpt = None
        progress = _Progress(self.console, r.log.progress, self.start_step, self.total_steps)
        try:
            for step in range(self.start_step, self.end_step):
                hp = self.schedules(step)
                set_hparams(self.optimizer, hp["lr"], hp["wd"])
                log_step = (step + 1) % log_every == 0 or step + 1 == self.end_step
                for micro in range(accum):
                    batch = next(batches)
                    self._count_skipped(batch.skipped)
                    batch = batch.to(self.device)
                    with autocast:
                        loss, stats = self.model(batch.x, batch.context_idx, batch.target_idx, batch.context_valid,
                                                 batch.target_valid, with_stats=log_step and micro == accum - 1)
                    (loss / accum).backward()
                    loss_sum += loss.detach() / accum
                    interval_samples += len(batch)
                if r.optim.clip_grad:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.optim.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                ema_update(self.model.target_encoder, self.model.encoder, hp["momentum"])
                done = step + 1
                interval_steps += 1
                if log_step:
                    # The only host synchronisation of the loop: once per log interval.
                    elapsed = time.perf_counter() - t_interval
                    last_loss = loss_sum.item() / interval_steps
                    first_loss = last_loss if first_loss is None else first_loss
                    record = {"step": done, "epoch": done * r.data.batch_size / len(self.index), "loss": last_loss,
                              **hp, "samples_per_s": interval_samples / max(elapsed, 1e-9),
                              **{k: float(v) for k, v in stats.items()},
                              "skipped": sum(self.skipped.values()) + sum(self.skipped_prev.values()),
                              "rank": 0}
                    logger.log(record)
                    progress.update(done, record)
                    loss_sum.zero_()
                    interval_steps, interval_samples, t_interval = 0, 0, time.perf_counter()
                    if not math.isfinite(last_loss):
                        raise JepaError(f"loss is {last_loss} at step {done}; last good checkpoint: {last_ckpt}")
                if self.monitor is not None and (done % r.monitor.every_steps == 0 or done == self.end_step):
                    quality = {"step": done, **self.monitor(self.model.target_encoder)}
                    logger.log(quality)
                    progress.note(f"step {done}: k-NN top-1 {100 * quality['knn_top1']:.1f}%")
                if done % ckpt_every == 0 or done == self.end_step:
                    last_ckpt = self.save(done)
        finally:
            progress.close()
            logger.close()
        summary = {
            "run_dir": str(self.run_dir), "steps": self.end_step, "total_steps": self.total_steps,
            "start_step": self.start_step,
            "first_loss": first_loss, "final_loss": last_loss, "seconds": time.perf_counter() - t_start,
            "checkpoint": str(last_ckpt) if last_ckpt else None, "precision": self.precision,
            "attention": self.attention, "device": str(self.device), "samples": len(self.index),
            "skipped": dict(self.skipped + Counter(self.skipped_prev)), "skipped_examples": self.skipped_examples[:20],
            "bad_shards": self.index.bad_shards,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _count_skipped(self, skipped) -> None:
        for s in skipped:
            self.skipped[s.reason] += 1
            if len(self.skipped_examples) < 100:
                self.skipped_examples.append(f"{s.reason}: {s.key}")


def _allowed(field: str, allow: tuple[str, ...]) -> bool:
    return any(field == a or field.startswith(a + ".") for a in allow)


def _read_toml(path: Path) -> dict:
    import tomllib

    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CheckpointError(f"checkpoint: cannot read {path}: {e}") from None


class _Progress:
    """Rich progress bar on a terminal; one plain line per log step elsewhere (CI logs)."""

    def __init__(self, console: Console, enabled: bool, start: int, total: int):
        self.console, self.total = console, total
        self.bar = None
        if enabled and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()
        self.enabled = enabled

    def update(self, step: int, rec: dict) -> None:
        info = f"loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  {rec['samples_per_s']:.0f} samples/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.enabled:
            self.console.print(f"step {step}/{self.total}  {info}", highlight=False)

    def note(self, text: str) -> None:
        if self.enabled:
            (self.bar.console if self.bar is not None else self.console).print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
