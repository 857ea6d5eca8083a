"""The training loop, read top to bottom: one device per process, data-parallel under ``torchrun``
(``distributed.py`` holds what that adds: loss weighting, agreement between ranks, one writer).

State that a checkpoint restores: the three networks, the optimizer, and the step. Everything else
(learning rate, weight decay, EMA momentum, which samples and masks come next) is a pure function of
the step, so ``2 steps + resume + 2 steps`` equals ``4 steps`` bit for bit.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from ..config.load import Resolved
from ..data import Index, PretrainDataset, StepBatchSampler, build_index, build_loader
from ..data.pipeline import per_device_batch
from ..data.shards import check_decodable
from ..data.skips import SkipLog
from ..data.stream import (
    StreamingPretrainDataset,
    build_stream_loader,
    check_split,
    expand_urls,
    is_streaming,
)
from ..errors import CheckpointError, JepaError, RecipeError, TrainingStopped
from ..model import JEPA, build_jepa, set_attention, training_grid
from .checkpoint import (
    NETWORKS,
    failure_reason,
    list_checkpoints,
    load_networks,
    load_state,
    present_networks,
    resolve_checkpoint,
    save_checkpoint,
    temporary_checkpoint_dir,
    write_text_atomic,
)
from .distributed import full_tensor, init_distributed, shard_fsdp, wrap_ddp
from .guards import CollapseAlarm, NonFiniteGuard, StopOnSignal, guarded_ema_update, pooled_rank, trainable
from .host import apply_cpu_allocator
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


def core_defaults() -> dict:
    """Default values of every core-section field, flattened (``health.min_rank`` -> 1.5)."""
    from ..config.schema import COMPONENT_SECTIONS, _submodel_names

    return flatten({name: cls().model_dump(mode="json", exclude_none=True)
                    for name, cls in _submodel_names().items() if name not in COMPONENT_SECTIONS})


def recipe_changes(old: dict, new: dict, ignore: tuple[str, ...] = ("checkpoint.", "log.", "model.init", "dist.",
                                                                   "train.activation_checkpointing",
                                                                   "train.cpu_allocator")) -> list[str]:
    """Fields whose values differ. A field the checkpoint's recipe lacks (added by a newer version)
    and that is at its default now is not a change, so upgrading does not block a resume."""
    fo, fn, defaults = flatten(old), flatten(new), core_defaults()
    keys = sorted(set(fo) | set(fn))
    return [k for k in keys if fo.get(k) != fn.get(k) and not k.startswith(ignore)
            and not (k not in fo and k in defaults and fn.get(k) == defaults[k])]


def next_batch(batches):
    """``next(batches)``; a JepaError raised in a DataLoader worker (a stream with no readable shard)
    comes back as the one-line error it was, not wrapped in the worker's traceback."""
    try:
        return next(batches)
    except JepaError as e:
        text = str(e)
        if "Original Traceback" not in text:
            raise
        last = text.strip().splitlines()[-1]
        raise type(e)(last.split(": ", 1)[1] if ": " in last else last) from None


def apply_train_options(model: JEPA, train) -> None:
    """``train.activation_checkpointing`` and ``train.compile`` on the networks, in place (parameter
    names, and so checkpoints, stay the same). ``benchmarks/train_step.py`` times the same networks."""
    if train.activation_checkpointing:
        model.encoder.grad_checkpointing = model.predictor.grad_checkpointing = True
    if train.compile:
        for net in (model.encoder, model.predictor, model.target_encoder):
            net.compile(dynamic=True)  # dynamic shapes: context and target lengths vary with the masks


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
        if not r.data.train:
            raise JepaError("data.train: no training data given; set it in the recipe or with --set data.train=PATH")
        self.dist, self.device = init_distributed(pick_device(r.run.device))
        if not self.dist.is_main:  # rank 0 reports for the job
            self.console = Console(stderr=True, quiet=True)
        self.precision = pick_precision(r.train.precision, self.device)
        self.cpu_allocator = apply_cpu_allocator(r.train.cpu_allocator, self.device.type)
        self.attention = pick_attention(r.model.attention, self.device, self.precision)

        # Data: index once; the grid comes from the tokenizer for the source's sample shape.
        source_cls, source_cfg = resolved.component("source")
        tok_cls, tok_cfg = resolved.component("tokenizer")
        masker_cls, masker_cfg = resolved.component("masker")
        self.source = source_cls(source_cfg)
        self.masker = masker_cls(masker_cfg)
        self.grid = training_grid(resolved)
        self.masker.check(self.grid)
        self.streaming = is_streaming(r.data.train or "")
        if self.streaming:  # pipe: commands and URLs are read in order (jepa.data.stream), not indexed
            if not r.data.num_samples:
                raise RecipeError("data.num_samples: streamed DATA (pipe: or URLs) cannot be counted without "
                                  "reading it; give the dataset size as data.num_samples")
            self.urls, self.index = expand_urls(r.data.train), Index([])
            check_split(len(self.urls), self.dist.world_size, r.data.num_workers)  # before anything is written
        else:
            self.index = build_index(r.data.train)
            check_decodable(self.index, tuple(getattr(self.source, "extensions", ())), r.data.train)
        for bad in self.index.bad_shards:
            self.console.print(f"[yellow]warning:[/] shard {bad}", highlight=False)
        num_samples = self.num_samples = r.data.num_samples or len(self.index)
        self.steps_per_epoch = max(1, num_samples // r.data.batch_size)
        self.total_steps = training_length(r, num_samples)
        if self.total_steps is None:
            raise JepaError("train.steps: give the training length as train.steps or train.epochs")
        self.schedules = build_schedules(r, self.total_steps, self.steps_per_epoch)
        per_device_batch(r.data.batch_size, self.dist.world_size, r.train.grad_accum)  # before anything is written
        self.end_step = min(self.total_steps, stop_at) if stop_at else self.total_steps

        # Model and optimizer. Seeded, so a fresh run is reproducible.
        torch.manual_seed(r.run.seed)
        self.model: JEPA = build_jepa(r.model, r.loss, tok_cls, tok_cfg, grid=self.grid).to(self.device)
        set_attention(self.model, self.attention)
        apply_train_options(self.model, r.train)
        self.fsdp = r.dist.strategy == "fsdp" and self.dist.enabled  # one process trains unsharded
        if self.fsdp:
            shard_fsdp(self.model, self.dist, self.device, self.precision)
        self.optimizer = build_optimizer(r.optim, self.model.encoder, self.model.predictor, device=self.device)
        # DDP around the model, or the model itself: on one rank, and with FSDP (the shards reduce themselves)
        self.forward = self.model if self.fsdp else wrap_ddp(self.model, self.dist, self.device)
        self.start_step = 0
        self._prepare_run_dir(resume, allow_changes)
        if r.model.init and self.start_step == 0:
            self._init_from(resolve_checkpoint(r.model.init))
        self.monitor = None
        # Sharded networks forward on every rank together, so with FSDP every rank runs the monitor.
        if r.monitor.every_steps and (self.dist.is_main or self.fsdp):
            from ..eval.monitor import KnnMonitor

            bf16 = r.monitor.precision == "train" and self.precision == "bf16"
            self.monitor = KnnMonitor(r.monitor, self.source, self.device, bf16)
        # Every check has passed (on every rank): only now does the run directory change.
        self.dist.barrier()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "recipe.toml", self.recipe_header() + self.resolved.to_toml())

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
        self.skips, self.guard_state, self.resumed_from = SkipLog(), {}, None
        self._pending_skips: list = []
        self.alarm_state: dict = {}
        started = bool(list_checkpoints(ckpt_root)) or (ckpt_root / "latest").exists()
        if resume and recipe_file.is_file() and not started:
            # Killed before its first checkpoint: there is nothing to resume, so start over, loudly.
            self._refuse_changes(_read_toml(recipe_file), allow_changes)
            self.console.print(f"[yellow]warning:[/] {self.run_dir} has no checkpoint yet (it stopped before the "
                               "first one): starting from step 0", highlight=False)
        elif resume:
            ckpt = resolve_checkpoint(self.run_dir)
            self._refuse_changes(_read_toml(ckpt / "recipe.toml"), allow_changes)
            state = load_state(ckpt)
            if (ckpt / "dcp").is_dir():
                self._load_sharded(ckpt)
            else:
                load_networks(ckpt, self.networks())
            try:
                if "optimizer" in state:
                    self._load_optimizer(state["optimizer"])
                self.start_step = int(state["step"])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint: {ckpt / 'state.pt'} does not match this run: {e}") from None
            self.skips = SkipLog(state=state.get("skips") or {"by_reason": state.get("skipped", {})})
            self.guard_state, self.resumed_from = state.get("nonfinite", {}), ckpt
            self.alarm_state = state.get("collapse", {})
            split = {"world_size": self.dist.world_size, "num_workers": self.recipe.data.num_workers}
            if self.streaming and state.get("stream", split) != split:
                self.console.print(f"[yellow]warning:[/] the checkpoint streamed its shards as {state['stream']} "
                                   f"and this run uses {split}: the shard split changes, so samples of the current "
                                   "epoch may be seen again or skipped", highlight=False)
            self.console.print(f"resuming from {ckpt} at step {self.start_step}")
        elif started or recipe_file.exists():
            raise JepaError(f"run directory {self.run_dir} already holds a run; pass --resume to continue it "
                            "or choose another --run-dir")

    def _refuse_changes(self, saved: dict, allow_changes: tuple[str, ...]) -> None:
        changed = [c for c in recipe_changes(saved, self.resolved.to_dict()) if not _allowed(c, allow_changes)]
        if changed:
            raise CheckpointError(f"--resume: the recipe differs from the checkpoint's in {', '.join(changed)}; "
                                  f"pass --allow-changes {','.join(changed)} if that is intended")

    def recipe_header(self) -> str:
        lines = [f"# {k} {v}" for k, v in sorted(self.versions.items())]
        return "# resolved recipe written by jepa; plugin versions:\n" + "\n".join(lines) + "\n\n"

    # ----------------------------------------------------------------------- checkpoints
    def save(self, step: int, guard: NonFiniteGuard) -> Path:
        meta = {"recipe_hash": self.resolved.digest(), "versions": self.versions, "total_steps": self.total_steps,
                "precision": self.precision, "grid": list(self.grid)}
        if self.fsdp:
            return self._save_sharded(step, guard, meta)
        if not self.dist.is_main:  # rank 0 writes; the weights are the same on every rank
            self._agree_written(step, None)
            self.last_ckpt = self.run_dir / "checkpoints" / f"step_{step:06d}"
            return self.last_ckpt
        state = {"optimizer": self.optimizer.state_dict(), **self._run_state(step, guard)}
        error = None
        try:
            path = save_checkpoint(self.run_dir / "checkpoints", step, self.networks(), state, meta,
                                   self.resolved.to_toml(), self.recipe.checkpoint.keep_last)
        except CheckpointError as e:
            error = CheckpointError(f"{e}; the last complete checkpoint is {self.last_ckpt or 'none'}")
        self._agree_written(step, error)  # raises on every rank if the write failed
        self.last_ckpt = path
        return path

    def _agree_written(self, step: int, error: CheckpointError | None) -> None:
        """After rank 0's write: a barrier that rank 0 reaches whether or not its write failed (under gloo a
        barrier also waits for the ranks' outstanding collectives, e.g. FSDP's, before anyone moves on),
        then every rank learns whether it failed and raises, instead of waiting for a rank that stopped."""
        self.dist.barrier()
        if self.dist.any_flag(int(error is not None)) == 0:
            return
        raise error or CheckpointError(f"rank 0 could not write the checkpoint of step {step} (its error says why); "
                                       f"the last complete checkpoint is {self.last_ckpt or 'none'}")

    def _run_state(self, step: int, guard: NonFiniteGuard) -> dict:
        skips = self.skips.state_dict()
        state = {"step": step, "data_position": step * self.recipe.data.batch_size, "skipped": skips["by_reason"],
                 "skips": skips, "nonfinite": guard.state_dict(), "collapse": self.alarm.state_dict()}
        if self.streaming:  # the split of streamed shards depends on these (jepa.data.stream)
            state["stream"] = {"world_size": self.dist.world_size, "num_workers": self.recipe.data.num_workers}
        return state

    def _save_sharded(self, step: int, guard: NonFiniteGuard, meta: dict) -> Path:
        """FSDP checkpoint: every rank writes its shards of the weights and AdamW state through
        ``torch.distributed.checkpoint`` into ``dcp/``; rank 0 adds the full weights (safetensors, for
        evaluation and export), ``state.pt`` without the optimizer, and renames the directory into place."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
        )

        root = self.run_dir / "checkpoints"
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only
        weights = {name: get_model_state_dict(net, options=full) for name, net in self.networks().items()}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        tmp = [str(temporary_checkpoint_dir(root / f"step_{step:06d}")) if self.dist.is_main else None]
        dist.broadcast_object_list(tmp, src=0, group=self.dist.ctrl)
        tmp_dir = Path(tmp[0])
        try:
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp_dir / "dcp"))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank sees it; the previous one stays
            if self.dist.is_main:  # the collective save has ended on every rank: nobody writes there any more
                shutil.rmtree(tmp_dir, ignore_errors=True)
            raise CheckpointError(f"could not write the sharded checkpoint of step {step} ({failure_reason(e)}); "
                                  f"the last complete checkpoint is {self.last_ckpt or 'none'}") from None
        error, path = None, root / f"step_{step:06d}"
        if self.dist.is_main:
            state = {**self._run_state(step, guard), "sharded": "dcp"}
            try:
                path = save_checkpoint(root, step, weights, state, {**meta, "strategy": "fsdp"},
                                       self.resolved.to_toml(), self.recipe.checkpoint.keep_last, tmp=tmp_dir)
            except CheckpointError as e:
                error = CheckpointError(f"{e}; the last complete checkpoint is {self.last_ckpt or 'none'}")
        self._agree_written(step, error)
        self.last_ckpt = path
        return path

    def _load_sharded(self, ckpt: Path) -> None:
        """Weights and AdamW state from a checkpoint's ``dcp/`` shards, resharded for this job (any world
        size, FSDP or not, one process included)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        sd = {"model": model_sd, "optimizer": optim_sd}
        try:
            dcp.load(sd, checkpoint_id=str(ckpt / "dcp"))
            set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - never a silent restart from step 0
            raise CheckpointError(f"checkpoint: cannot load the sharded state in {ckpt / 'dcp'}: "
                                  f"{failure_reason(e)}") from None

    def _load_optimizer(self, saved: dict) -> None:
        """A full (unsharded) ``optimizer.state_dict()``; into FSDP shards through parameter names."""
        if not self.fsdp:
            self.optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(p): n for n, p in self.model.named_parameters()}
        order = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        by_name = {"state": {order[i]: v for i, v in saved["state"].items()},
                   "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    # ----------------------------------------------------------------------- the loop
    def loader(self):
        r = self.recipe
        if self.streaming:
            micro = per_device_batch(r.data.batch_size, self.dist.world_size, r.train.grad_accum)
            stream = StreamingPretrainDataset(self.urls, self.source, self.grid, self.masker, r.run.seed,
                                              self.dist.rank, self.dist.world_size, r.data.num_workers, micro,
                                              self.start_step * r.train.grad_accum, r.data.shuffle_buffer)
            return build_stream_loader(stream, r.data.num_workers, r.data.mask_collate,
                                       pin_memory=self.device.type == "cuda")
        dataset = PretrainDataset(self.index, self.source, self.grid, self.masker, r.run.seed, r.data.shuffle)
        sampler = StepBatchSampler(r.data.batch_size, self.dist.rank, self.dist.world_size, r.train.grad_accum,
                                   self.start_step, self.end_step)
        return build_loader(dataset, sampler, r.data.num_workers, r.data.mask_collate,
                            pin_memory=self.device.type == "cuda")

    def fit(self) -> dict:
        """Train from ``start_step`` to ``end_step``; returns (and writes) the run summary.

        Raises :class:`TrainingStopped` after a signal (with a checkpoint), after too many non-finite
        steps in a row, or on a collapse alarm set to stop; the summary is written in every case.
        """
        self.last_ckpt, self.t_start = self.resumed_from, time.perf_counter()
        self.losses: list[float] = []
        self.alarm = CollapseAlarm(self.recipe.health, self.alarm_state)
        guard = NonFiniteGuard(self.optimizer, self.recipe.health.max_nonfinite_in_a_row, self.device,
                               self.guard_state)
        self.guard = guard
        logger = MetricsLogger(self.run_dir, self.start_step, self.recipe.log.tensorboard, enabled=self.dist.is_main)
        progress = _Progress(self.console, self.recipe.log.progress and self.dist.is_main, self.start_step,
                             self.total_steps)
        stopped = None
        try:
            with StopOnSignal(self.console) as stop:
                self._loop(guard, logger, progress, stop)
        except BaseException as e:
            stopped = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise
        finally:
            progress.close()
            logger.close()
            summary = self._summary(stopped)
            if self.dist.is_main:
                write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            if stopped is None:
                self.dist.close()  # after an error, the process exits and torchrun ends the job
        return summary

    def _loop(self, guard: NonFiniteGuard, logger: MetricsLogger, progress: _Progress, stop: StopOnSignal) -> None:
        r = self.recipe
        log_every, ckpt_every, accum = r.log.every_steps, r.checkpoint.every_steps, r.train.grad_accum
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        params = trainable([self.model.encoder, self.model.predictor])
        batches = iter(self.loader())
        try:
            self.model.train()
            loss_sum = torch.zeros((), device=self.device)
            good_steps = torch.zeros((), device=self.device)
            interval = {"steps": 0, "samples": 0, "data_s": 0.0, "t": time.perf_counter(), "first": True}
            for step in range(self.start_step, self.end_step):
                hp = self.schedules(step)
                set_hparams(self.optimizer, hp["lr"], hp["wd"])
                log_step = (step + 1) % log_every == 0 or step + 1 == self.end_step
                step_loss = torch.zeros((), device=self.device)
                for micro in range(accum):
                    t_wait = time.perf_counter()
                    batch = next_batch(batches)  # time blocked here = the loader not keeping up
                    interval["data_s"] += time.perf_counter() - t_wait
                    if self.dist.enabled:  # gathered from every rank at log and checkpoint steps
                        self._pending_skips += batch.skipped
                    else:
                        self.skips.add(batch.skipped)
                    batch = batch.to(self.device)
                    # This rank's share of the global token mean; one process needs no weight.
                    weight = self.dist.token_weight(_target_tokens(batch)) if self.dist.enabled else 1.0
                    with self.dist.no_sync(self.forward, micro == accum - 1):
                        with autocast:
                            loss, stats = self.forward(batch.x, batch.context_idx, batch.target_idx,
                                                       batch.context_valid, batch.target_valid,
                                                       with_stats=log_step and micro == accum - 1)
                        (loss * weight / accum).backward()
                    step_loss += loss.detach() * weight / accum
                    interval["samples"] += len(batch) * self.dist.world_size
                self.dist.mean(step_loss)  # the global loss: every rank takes the same skip decision
                norm = torch.nn.utils.clip_grad_norm_(params, r.optim.clip_grad) if r.optim.clip_grad else None
                if self.fsdp and norm is None:  # each rank holds a shard: the verdict needs the global norm
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                ok = guard.check(params, step_loss, full_tensor(norm), step)
                guard.step(ok)
                self.optimizer.zero_grad(set_to_none=True)
                guarded_ema_update(self.model.target_encoder, self.model.encoder, hp["momentum"], ok)
                loss_sum += torch.where(ok, step_loss, torch.zeros_like(step_loss))
                good_steps += ok.float()
                done = step + 1
                interval["steps"] += 1
                if log_step:
                    self._log(done, hp, stats, loss_sum, good_steps, interval, logger, progress)
                if self.monitor is not None and (done % r.monitor.every_steps == 0 or done == self.end_step):
                    quality = {"step": done, **self.monitor(self.model.target_encoder)}
                    logger.log(quality)
                    progress.note(f"step {done}: k-NN top-1 {100 * quality['knn_top1']:.1f}%")
                ckpt_step = done % ckpt_every == 0 or done == self.end_step
                signum = self.dist.any_flag(stop.signum or 0)  # a signal to any rank stops all, at this step
                if ckpt_step:
                    self._check_nonfinite(guard)
                if ckpt_step or signum:
                    self._sync_skips()
                    self.save(done, guard)
                if signum:
                    raise TrainingStopped(f"stopped by {_signal_name(signum)} after step {done}; checkpoint "
                                          f"{self.last_ckpt}; continue with --resume", exit_code=128 + signum)
        finally:
            # Stop the DataLoader workers now, not at interpreter exit: they ignore SIGTERM (the main
            # process owns preemption), so multiprocessing's exit-time terminate() would wait forever.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _log(self, done: int, hp: dict, stats: dict, loss_sum: torch.Tensor, good_steps: torch.Tensor,
             interval: dict, logger: MetricsLogger, progress: _Progress) -> None:
        """One metrics record. The loop's only host synchronisation: one combined read per interval."""
        r = self.recipe
        pooled = stats.pop("target_pooled", None)
        if self.dist.enabled:  # statistics of the global batch, identical on every rank
            if pooled is not None:
                pooled = self.dist.cat(pooled)
                stats["target_std"] = pooled.std(dim=0).mean()
            for k in ("pred_std", "loss_var", "loss_cov", "loss_global"):
                if k in stats:
                    stats[k] = self.dist.mean(stats[k].float().clone())
        self._sync_skips()
        names = ["loss_sum", "good", "nonfinite", "hit", *stats]
        values = torch.stack([loss_sum, good_steps, self.guard.total, self.guard.hit,
                              *(v.float() for v in stats.values())]).tolist()
        got = dict(zip(names, values, strict=True))
        elapsed = time.perf_counter() - interval["t"]
        loss = got["loss_sum"] / got["good"] if got["good"] else None
        feature = {k: got[k] for k in stats}
        if pooled is not None:
            feature["rank"] = pooled_rank(pooled)
        record = {"step": done, "epoch": done * r.data.batch_size / self.num_samples, "loss": loss, **hp,
                  "samples_per_s": interval["samples"] / max(elapsed, 1e-9),
                  "data_wait_fraction": interval["data_s"] / max(elapsed, 1e-9), **feature,
                  "nonfinite_steps": int(got["nonfinite"]), "skipped": self.skips.total(),
                  "skipped_reasons": dict(self.skips.by_reason)}
        new = self.skips.take_new()
        if new:
            record["skipped_new"] = new
        if interval["first"] and self.index.bad_shards:
            record["bad_shards"] = self.index.bad_shards
        warning = self.alarm.update(done, feature)
        if warning:
            record["collapse_alarm"] = True
        logger.log(record)
        if loss is not None:
            self.losses.append(loss)
        progress.update(done, record)
        loss_sum.zero_()
        good_steps.zero_()
        interval.update(steps=0, samples=0, data_s=0.0, t=time.perf_counter(), first=False)
        self._check_nonfinite(self.guard, int(got["hit"]))
        if warning:
            self.console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
            if r.health.collapse == "stop":
                raise TrainingStopped(f"{warning}; stopped (health.collapse = \"stop\"); last checkpoint: "
                                      f"{self.last_ckpt or 'none'}")

    def _sync_skips(self) -> None:
        """Fold the samples skipped since the last call, on every rank, into every rank's count."""
        for part in self.dist.objects(self._pending_skips):
            self.skips.add(part)
        self._pending_skips = []

    def _check_nonfinite(self, guard: NonFiniteGuard, hit: int | None = None) -> None:
        hit = int(guard.hit.item()) if hit is None else hit
        if hit >= 0:
            n = guard.limit
            raise TrainingStopped(f"{n} steps in a row had a non-finite loss or gradient (steps {hit - n + 1}-{hit}, "
                                  f"all skipped); stopped; the last good checkpoint is {self.last_ckpt or 'none'}")

    def _summary(self, stopped: str | None) -> dict:
        return {
            "run_dir": str(self.run_dir), "steps": self.end_step, "total_steps": self.total_steps,
            "start_step": self.start_step,
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": self.losses[-1] if self.losses else None,
            "seconds": time.perf_counter() - self.t_start,
            "checkpoint": str(self.last_ckpt) if self.last_ckpt else None, "precision": self.precision,
            "attention": self.attention, "device": str(self.device), "world_size": self.dist.world_size,
            "strategy": "fsdp" if self.fsdp else ("ddp" if self.dist.enabled else "single"),
            "rank": self.dist.rank, "samples": self.num_samples, "cpu_allocator": self.cpu_allocator,
            **self.skips.summary(), "bad_shards": self.index.bad_shards,
            "nonfinite_steps": int(self.guard.total.item()), "collapse_alarms": self.alarm.fired_at,
            "stopped": stopped,
        }


def _target_tokens(batch) -> torch.Tensor:
    """Real (unpadded) target tokens in a batch: the loss's denominator."""
    if batch.target_valid is not None:
        return batch.target_valid.sum()
    return torch.tensor(float(batch.target_idx.numel()), device=batch.target_idx.device)


def _signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


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
        loss = "n/a" if rec["loss"] is None else f"{rec['loss']:.4f}"
        info = f"loss {loss}  lr {rec['lr']:.2e}  {rec['samples_per_s']:.0f} samples/s"
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
