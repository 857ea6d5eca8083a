"""The recipe schema: core sections, validated in pass one.

Component sections (``tokenizer``, ``masker``, ``source``) carry a ``name`` plus the component's
own settings; those settings are validated in pass two against the component's ``Config``.
Every field has a default except what only the user can know (the data path, the length of training).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(Section):
    """Identity and placement of a run."""

    name: str = Field("jepa", description="Run name, used for the default run directory `runs/<name>`.")
    seed: int = Field(0, description="Seeds weights, crops and masks. Masks and crops depend on (seed, epoch, sample index) only.")
    device: str = Field("auto", description="`auto` (CUDA if present, else CPU), `cpu`, `cuda` or `cuda:N`.")


class ModelConfig(Section):
    """Context encoder (ViT trunk over the tokenizer's tokens), EMA target encoder and predictor."""

    size: Literal["vit_test", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant"] = Field(
        "vit_tiny", description="Preset width/depth/heads; the explicit fields below override it.")
    embed_dim: int | None = Field(None, gt=0, description="Encoder width (overrides `size`).")
    depth: int | None = Field(None, gt=0, description="Encoder depth (overrides `size`).")
    num_heads: int | None = Field(None, gt=0, description="Encoder attention heads (overrides `size`).")
    mlp_ratio: float | None = Field(None, gt=0, description="MLP hidden width / embed_dim (overrides `size`).")
    qkv_bias: bool = Field(True, description="Bias on the q, k, v projections (the reference uses it).")
    attention: Literal["auto", "sdpa", "math"] = Field(
        "auto", description="Attention kernel: fused SDPA or plain matmul-softmax. `auto` picks the faster one "
        "measured for the device and precision (SDPA on CUDA and CPU fp32, math on CPU bf16).")
    predictor_embed_dim: int | None = Field(None, gt=0, description="Predictor width (default by size: 384 from base up).")
    predictor_depth: int | None = Field(None, gt=0, description="Predictor depth (default by size: B 6, L/H 12, G 16).")
    predictor_num_heads: int | None = Field(None, gt=0, description="Predictor heads (default: the encoder's).")
    predictor_mlp_ratio: float = Field(4.0, gt=0, description="Predictor MLP hidden width / predictor width (the "
                                       "reference uses 4 for every size, ViT-g included).")
    predictor_joint: bool = Field(
        False, description="Predict every target block of a sample in one predictor sequence (context tokens + all "
        "blocks' mask tokens) instead of one sequence per block as the reference does: the context passes the "
        "predictor once, not once per block. Mask tokens of different blocks then attend to each other; they carry "
        "only positions and context-derived values, never target content.")
    pos_embed: Literal["sincos", "learned"] = Field(
        "sincos", description="Fixed sin-cos position embeddings from token coordinates (I-JEPA), or learned ones "
        "(stored for `pos_grid`, interpolated for other grids; used for imported weights that are not sin-cos).")
    pos_grid: list[int] | None = Field(None, description="Grid of learned position embeddings (default: the training grid).")
    init: str | None = Field(None, description="Checkpoint to initialise the networks from (continue pretraining).")


class ComponentSection(BaseModel):
    """`name` selects a registered component; every other key is that component's own setting."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(description="Registered name, or `plugin.name` to be explicit.")


class DataConfig(Section):
    """Where samples come from and how they are batched."""

    train: str | None = Field(None, description="Training DATA: shard path, brace pattern, several joined with `::`, "
                              "a folder of `.tar` shards, or an image folder (relative to the recipe's folder); "
                              "or streamed shards: `pipe:COMMAND` or URLs (http, s3 via pipe:, gs), brace patterns "
                              "allowed (needs num_samples).")
    batch_size: int = Field(64, gt=0, description="GLOBAL batch size: per device = batch_size / (world size x grad_accum).")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes (decoding, cropping and masking run there).")
    num_samples: int | None = Field(None, gt=0, description="Dataset size, for converting `epochs` to steps without reading the data.")
    mask_collate: Literal["pad", "truncate"] = Field(
        "pad", description="`pad`: every sample keeps its own context and targets (padding + attention mask). "
        "`truncate`: the reference code's behaviour, cut every context/target to the shortest in the per-device batch.")
    shuffle: bool = Field(True, description="Shuffle samples every epoch (a seeded permutation).")
    shuffle_buffer: int = Field(1000, ge=0, description="Streamed DATA (`pipe:` or URLs) only: samples held per "
                                "worker and emitted in seeded random order (0: shard order).")


class OptimConfig(Section):
    """AdamW; biases and 1-D parameters (LayerNorm weights) get no weight decay, as in the reference."""

    name: Literal["adamw"] = Field("adamw", description="Optimizer (AdamW, fused where available).")
    lr: float = Field(1e-3, ge=0, description="Peak learning rate, reached at the end of warm-up.")
    start_lr: float = Field(2e-4, ge=0, description="Learning rate at step 0 (linear warm-up to `lr`).")
    final_lr: float = Field(1e-6, ge=0, description="Learning rate at the end of the cosine decay.")
    weight_decay: float = Field(0.04, ge=0, description="Weight decay at step 0.")
    final_weight_decay: float = Field(0.4, ge=0, description="Weight decay at the end (cosine-shaped ramp, as in the reference code).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    clip_grad: float | None = Field(None, gt=0, description="Clip the global gradient norm to this value.")


class ScheduleConfig(Section):
    """Learning-rate, weight-decay and EMA schedules: pure functions of the global step."""

    warmup_steps: int | None = Field(None, ge=0, description="Linear learning-rate warm-up length in steps.")
    warmup_epochs: float | None = Field(None, ge=0, description="Warm-up in epochs (needs the dataset size).")
    horizon_scale: float = Field(1.0, ge=1.0, description="Stretch the decay schedules over this multiple of the training "
                                 "length (the reference code uses 1.25, so lr/wd/EMA never reach their final values).")

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError("give warmup_steps or warmup_epochs, not both")
        return self


class EMAConfig(Section):
    """Target encoder = exponential moving average of the context encoder."""

    momentum: float = Field(0.996, ge=0, le=1, description="EMA momentum at step 0.")
    final_momentum: float = Field(1.0, ge=0, le=1, description="EMA momentum at the end (linear ramp).")


class LossConfig(Section):
    """Regression loss between predictions and target features."""

    kind: Literal["l2", "smooth_l1", "lp"] = Field(
        "l2", description="`l2`: mean squared error (the paper). `smooth_l1`: the reference code (beta 1; equals half "
        "the L2 loss while errors are below beta). `lp`: mean |error|^p.")
    p: float = Field(2.0, gt=0, description="Exponent for `kind = \"lp\"`.")
    beta: float = Field(1.0, gt=0, description="Transition point of smooth-L1.")
    target_norm: bool = Field(True, description="Layer-normalise target features (no affine) before the loss, as the reference does.")
    target_batch_norm: bool = Field(
        False, description="Then standardise each target channel at each token position over the (per-device) batch: "
        "what position alone predicts is removed, so the loss is the fraction of target variance the predictor "
        "misses (1.0 for a content-blind predictor). Not in the paper; meant for small grids (CIFAR 8x8), where "
        "targets become mostly a function of position, but it did not raise CIFAR-10 probe accuracy at our budgets "
        "(docs/results.md). Needs a per-device batch of 2 or more.")
    variance_weight: float = Field(
        0.0, ge=0, description="Weight of a VICReg variance hinge on the context encoder's per-sample pooled "
        "output: each channel's standard deviation over the (per-device) batch is pushed up to 1, so samples "
        "cannot share one embedding. 0 (the paper) turns it off. Needs a per-device batch of 2 or more.")
    covariance_weight: float = Field(
        0.0, ge=0, description="Weight of VICReg's covariance penalty on the same pooled output (squared "
        "off-diagonal covariances / width): spreads the embedding over channels, against dimensional collapse "
        "(low effective rank). 0 turns it off.")
    global_weight: float = Field(
        0.0, ge=0, description="Weight of a global term: the mean squared distance between the context encoder's "
        "pooled output and the target encoder's pooled output of the whole input (no gradient), so the visible "
        "part must already say what the whole holds. Not in the paper; only informative when the context block "
        "is well short of the whole input (`masker.context_scale`): on CIFAR-10, with a 40-60% context block, weight 1 "
        "lifted the last-block linear probe from 43.2% to 49.4% (docs/results.md). 0 turns it off.")


class TrainConfig(Section):
    """Length, precision and step mechanics."""

    steps: int | None = Field(None, gt=0, description="Total optimizer steps.")
    epochs: float | None = Field(None, gt=0, description="Convenience: total length in epochs (converted to steps).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="`bf16` autocast (weights stay fp32) on CPU or CUDA; `auto` = bf16 where the hardware "
        "has fast bf16 matrix units, else fp32.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    compile: bool = Field(False, description="Wrap the networks in torch.compile.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each transformer block's activations in the backward pass instead of "
        "storing them (context encoder and predictor): less memory, about one more forward of compute.")
    cpu_allocator: Literal["tuned", "system"] = Field(
        "tuned", description="On CPU, `tuned` keeps freed memory mapped for reuse (glibc `mallopt`), so the "
        "step's activations do not pay for page faults every step. Resident memory then stays at its "
        "peak. `system` leaves glibc's defaults. Process-wide: once tuned, the process stays tuned. "
        "No effect off CPU or glibc.")

    @model_validator(mode="after")
    def _one_length(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self


class CheckpointConfig(Section):
    """Atomic checkpoints under `RUN/checkpoints/`."""

    every_steps: int = Field(1000, gt=0, description="Write a checkpoint every N steps (and at the end).")
    keep_last: int = Field(3, ge=1, description="How many checkpoints to keep.")


class DistConfig(Section):
    """Distribution is applied from outside (torchrun); these are estimates for `recipe check`."""

    world_size: int = Field(1, ge=1, description="Devices assumed by `jepa recipe check` (torchrun sets the real one).")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: `ddp` replicates the networks on every rank; `fsdp` shards them "
        "(FSDP2 `fully_shard` per block, then per network) and checkpoints every rank's shard with "
        "torch.distributed.checkpoint. One process trains unsharded either way.")


class MonitorConfig(Section):
    """Online k-NN monitor: representation quality during pretraining, logged like the loss (off by default)."""

    every_steps: int | None = Field(None, gt=0, description="Run a k-NN evaluation every N steps (unset: never).")
    train: str | None = Field(None, description="Labelled DATA for the k-NN memory bank (relative to the recipe).")
    test: str | None = Field(None, description="Labelled DATA to classify.")
    max_train: int = Field(5000, gt=0, description="Evenly spread subset of `train` (decoded once, kept in memory).")
    max_test: int = Field(1000, gt=0, description="Evenly spread subset of `test`.")
    k: int = Field(20, gt=0, description="Neighbours (cosine similarity, votes weighted by exp(sim / 0.07)).")
    precision: Literal["fp32", "train"] = Field(
        "fp32", description="Feature extraction: `fp32` (default, like `jepa eval`: bf16 rounds away weak feature "
        "directions, so its figures would not match the final probes) or `train` (the training precision: "
        "cheaper on bf16 hardware).")

    @model_validator(mode="after")
    def _data_given(self):
        if self.every_steps and not (self.train and self.test):
            raise ValueError("every_steps needs train and test data")
        return self


class LogConfig(Section):
    """Console, `metrics.jsonl` and TensorBoard."""

    every_steps: int = Field(10, gt=0, description="Log (and synchronise with the device) every N steps.")
    tensorboard: bool = Field(True, description="Write TensorBoard events under `RUN/tb/`.")
    progress: bool = Field(True, description="Show a Rich progress bar.")


class HealthConfig(Section):
    """Guards against silent failure: non-finite steps and representation collapse (docs/reliability.md)."""

    max_nonfinite_in_a_row: int = Field(
        10, ge=1, description="A step whose loss or gradients are NaN/Inf is skipped (no optimizer step, no EMA "
        "update) and counted; this many in a row stop the run. Checked at log and checkpoint steps.")
    collapse: Literal["warn", "stop", "off"] = Field(
        "warn", description="What the collapse alarm does when the feature statistics stay below the thresholds.")
    min_target_std: float = Field(
        0.01, ge=0, description="Alarm threshold: std across the batch of the mean-pooled target features.")
    min_rank: float = Field(
        1.5, ge=0, description="Alarm threshold: effective rank (RankMe) of the pooled target features of a batch.")
    min_rank_fraction: float = Field(
        0.25, ge=0, le=1, description="Alarm threshold: effective rank below this fraction of the run's highest "
        "so far (dimensional collapse; 0 turns this test off).")
    collapse_patience: int = Field(3, ge=1, description="Consecutive log intervals below a threshold before the alarm.")
    collapse_after_steps: int = Field(0, ge=0, description="No alarm before this step (a warm-up may look collapsed).")


COMPONENT_SECTIONS = ("tokenizer", "masker", "source")


class Recipe(Section):
    """A whole recipe. `requires` lists plugins the recipe needs (for a clear install hint)."""

    requires: list[str] = Field(default_factory=list)
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    tokenizer: ComponentSection
    masker: ComponentSection
    source: ComponentSection
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    ema: EMAConfig = EMAConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    dist: DistConfig = DistConfig()
    monitor: MonitorConfig = MonitorConfig()
    health: HealthConfig = HealthConfig()
    log: LogConfig = LogConfig()


def _submodel_names() -> dict[str, type[BaseModel]]:
    """Section name -> its model class (for the generated reference)."""
    return {name: f.annotation for name, f in Recipe.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
