"""Evaluation heads over cached features: linear, attentive and k-NN probes, plus RankMe.

Everything here is pure tensor code: features come in as tensors (``[n, d]`` pooled features for the
linear and k-NN probes, ``[n, N, d]`` patch tokens for the attentive probe), labels as integer
tensors ``[n]``. No data loading, no I/O, no global RNG: every random choice (validation split,
minibatch order, head initialisation) comes from a local ``torch.Generator`` or a forked RNG seeded
with ``seed``, so a fixed seed gives bit-identical results.

Hyper-parameters are chosen on a stratified validation split carved from the training set
(:func:`split_train_val`), never on the test set. Ties in validation accuracy (common on small or
easy validation sets) are broken by the lower validation cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import JepaError

# Below this many feature elements (n * d) the linear probe runs in float64, where LBFGS reaches
# tolerance_grad=1e-6 exactly; above it float32, whose GEMMs were ~3x faster on a 2-core CPU
# (27k x 192 x 5 heads) and whose probe accuracies match float64 (LBFGS then stops on
# tolerance_change, a few 1e-6 of gradient short). 2e6 is e.g. 10k samples x 192 channels.
_FLOAT64_MAX_ELEMENTS = 2_000_000
# Cap on the [test_chunk, n_train] similarity matrix of the k-NN probe (elements, ~256 MB in fp32).
_KNN_SIM_ELEMENTS = 1 << 26


@dataclass
class ProbeResult:
    """Outcome of one probe. Accuracies are fractions in [0, 1]; labels are in the caller's label space."""

    kind: str  # "linear" | "attentive" | "knn"
    top1: float  # test accuracy
    top5: float
    val_top1: float | None  # accuracy of the chosen config on the validation split (None for knn)
    train_top1: float | None  # accuracy on the data the final head was trained on (convergence check)
    chosen: dict  # the chosen hyper-parameters, e.g. {"weight_decay": 1e-4}
    grid: list[dict]  # every config tried with its val_top1 (and val_loss, the tie-break)
    confusion: torch.Tensor  # [C, C] int64 counts, rows = true class, cols = predicted (test set)
    predictions: torch.Tensor  # [n_test] predicted labels


# ---------------------------------------------------------------------------------------------------
# Splits and statistics


def _as_labels(labels: torch.Tensor, what: str = "labels") -> torch.Tensor:
    """Labels as a 1-D int64 CPU tensor, or a JepaError."""
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise JepaError(f"{what} must be 1-D [n], got shape {list(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise JepaError(f"{what} must be integer class ids, got dtype {labels.dtype}")
    labels = labels.detach().to("cpu", torch.int64)
    if labels.numel() and int(labels.min()) < 0:
        raise JepaError(f"{what} must be >= 0, got {int(labels.min())}")
    return labels


def split_train_val(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (per class) split of ``range(len(labels))`` into sorted (train, val) index tensors.

    Each class sends ``round(val_fraction * count)`` samples to val, clamped so that a class with at
    least 2 samples keeps at least one in train and, when ``val_fraction > 0``, gets at least one in
    val. A class with a single sample stays in train: the fitted head must see every class.
    """
    labels = _as_labels(labels)
    if not 0.0 <= val_fraction < 1.0:
        raise JepaError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():  # sorted, so the draw order is fixed
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        count = idx.numel()
        n_val = 0
        if val_fraction > 0 and count >= 2:
            n_val = min(max(1, round(val_fraction * count)), count - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    empty = torch.zeros(0, dtype=torch.int64)
    return (torch.sort(torch.cat(train)).values if train else empty,
            torch.sort(torch.cat(val)).values if val else empty)


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a class-balanced subset: ``max(1, round(fraction * count))`` per class, seeded.

    ``round`` is Python's (half to even). Used for low-shot probes (1% / 10% of the labels), where
    keeping every class represented matters more than the exact fraction.
    """
    labels = _as_labels(labels)
    if not 0.0 < fraction <= 1.0:
        raise JepaError(f"fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        n = min(idx.numel(), max(1, round(fraction * idx.numel())))
        keep.append(idx[torch.randperm(idx.numel(), generator=g)[:n]])
    if not keep:
        return torch.zeros(0, dtype=torch.int64)
    return torch.sort(torch.cat(keep)).values


@torch.no_grad()
def effective_rank(features: torch.Tensor) -> float:
    """RankMe (Garrido et al. 2023): ``exp(H(p))`` with ``p`` the L1-normalised singular values of the
    centred ``[n, d]`` features. Equals ``r`` for rank-``r`` data with equal singular values; 0.0 when
    the features have no variance at all.
    """
    if features.ndim != 2:
        raise JepaError(f"features must be 2-D [n, d], got shape {list(features.shape)}")
    if features.numel() == 0:
        raise JepaError("features are empty")
    x = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise JepaError("features contain NaN or Inf")
    s = torch.linalg.svdvals(x - x.mean(0))
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]  # 0 log 0 = 0; avoids the epsilon of the paper, so rank-r data gives exactly r
    return float(torch.exp(-(p * p.log()).sum()))


# ---------------------------------------------------------------------------------------------------
# Shared input checks and metrics


def _check_inputs(train_x, train_y, test_x, test_y, feature_ndim: int, num_classes: int | None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Validate a probe's inputs. Returns (train_y, test_y, classes present in train, num_classes)."""
    shape = "[n, d]" if feature_ndim == 2 else "[n, N, d]"
    for name, x in (("train", train_x), ("test", test_x)):
        if not isinstance(x, torch.Tensor):
            raise JepaError(f"{name} features must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != feature_ndim:
            raise JepaError(f"{name} features must be {shape}, got shape {list(x.shape)}")
    train_y, test_y = _as_labels(train_y, "train labels"), _as_labels(test_y, "test labels")
    if train_x.shape[0] != train_y.shape[0]:
        raise JepaError(f"train features have {train_x.shape[0]} rows but train labels have {train_y.shape[0]}")
    if test_x.shape[0] != test_y.shape[0]:
        raise JepaError(f"test features have {test_x.shape[0]} rows but test labels have {test_y.shape[0]}")
    if train_x.shape[0] == 0:
        raise JepaError("training set is empty")
    if test_x.shape[0] == 0:
        raise JepaError("test set is empty")
    # Token counts may differ between train and test for the attentive probe; the width may not.
    if train_x.shape[-1] != test_x.shape[-1]:
        raise JepaError(f"train features have width {train_x.shape[-1]} but test features have {test_x.shape[-1]}")
    if train_x.shape[-1] == 0 or (feature_ndim == 3 and (train_x.shape[1] == 0 or test_x.shape[1] == 0)):
        raise JepaError(f"features must be non-empty {shape}, got {list(train_x.shape)} and {list(test_x.shape)}")
    for name, x in (("train", train_x), ("test", test_x)):
        if not x.is_floating_point():
            raise JepaError(f"{name} features must be floating point, got dtype {x.dtype}")
        if not torch.isfinite(x).all():
            raise JepaError(f"{name} features contain NaN or Inf")
    classes = torch.unique(train_y)
    missing = test_y[~torch.isin(test_y, classes)]
    if missing.numel():
        raise JepaError(f"test set has label {int(missing.min())}, which the training set lacks")
    top = int(max(train_y.max(), test_y.max()))
    if num_classes is None:
        num_classes = top + 1
    elif top >= num_classes:
        raise JepaError(f"labels go up to {top} but num_classes is {num_classes}")
    return train_y, test_y, classes, num_classes


def _topk_hits(scores: torch.Tensor, target: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(top1, top5, argmax) of ``[n, K]`` scores against compact targets; top5 uses min(5, K)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    pred = top[:, 0]
    top1 = (pred == target).double().mean().item()
    top5 = (top == target[:, None]).any(1).double().mean().item()
    return top1, top5, pred


def _confusion(true: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts, rows = true class, cols = predicted."""
    flat = true.to(torch.int64) * num_classes + pred.to(torch.int64)
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _finish(kind: str, scores: torch.Tensor, test_y: torch.Tensor, classes: torch.Tensor, num_classes: int,
            **fields) -> ProbeResult:
    """Build the result from compact-class test scores (columns index ``classes``)."""
    compact_true = torch.searchsorted(classes, test_y)
    top1, top5, pred = _topk_hits(scores, compact_true)
    predictions = classes[pred.cpu()]
    return ProbeResult(kind=kind, top1=top1, top5=top5, confusion=_confusion(test_y, predictions, num_classes),
                       predictions=predictions, **fields)


def _pick(grid: list[dict]) -> int:
    """Index of the best config: highest val_top1, ties broken by lower val_loss, then grid order."""
    return min(range(len(grid)), key=lambda i: (-grid[i]["val_top1"], grid[i]["val_loss"], i))


# ---------------------------------------------------------------------------------------------------
# Linear probe


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (clamped). A feature constant on the fit set standardises to 0 there,
    so its weight gets no gradient and stays at its zero init: the clamp only has to avoid 0/0."""
    return x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decays: Sequence[float],
                max_iter: int, init: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``G = len(weight_decays)`` independent L2-penalised softmax regressions on standardised
    ``x`` at once. Returns W ``[G, d, C]`` and b ``[G, C]``; ``init`` warm-starts from such a pair.

    The objective is the sum over heads of ``mean CE + wd_g * ||W_g||^2``: heads share no
    parameters, so its minimiser is every head's own minimiser, and one full-batch LBFGS run on the
    stacked parameters costs one ``[n, d] @ [d, G*C]`` GEMM per evaluation instead of G runs.
    """
    n, d = x.shape
    g = len(weight_decays)
    if init is None:  # convex problem: zero init is as good as any, and needs no RNG
        w0, b0 = torch.zeros(g, d, num_classes, dtype=x.dtype), torch.zeros(g, num_classes, dtype=x.dtype)
    else:
        w0, b0 = (t.to(x.dtype) for t in init)
    # Stored [d, G, C] so the logits of all heads are a single GEMM against a [d, G*C] view.
    w = w0.permute(1, 0, 2).contiguous().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    wd = torch.tensor(list(weight_decays), dtype=x.dtype)
    target = y[:, None].expand(n, g)
    # history_size=100 (torch's default): the stacked problem mixes the curvature of G heads in one
    # memory, and a short history needed ~1.4x more iterations on 27k x 192 x 5 heads.
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = (x @ w.view(d, g * num_classes)).view(n, g, num_classes) + b
        # cross_entropy wants the class dim second: [n, C, G] against [n, G]; sum/n = sum of per-head means.
        loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="sum") / n
        loss = loss + (wd * w.square().sum((0, 2))).sum()  # bias not penalised
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().permute(1, 0, 2).contiguous(), b.detach()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int | None = None,
                 weight_decays: Sequence[float] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2), val_fraction: float = 0.1,
                 seed: int = 0, max_iter: int = 500) -> ProbeResult:
    """Multinomial logistic regression on standardised ``[n, d]`` features, L2 penalty chosen on val.

    All weight decays are fitted together (one stacked LBFGS run) on the train part of a stratified
    split, the best one on the validation part (ties: lower val cross-entropy) is refitted on the
    whole training set, and that head is scored on the test set. ``train_top1`` is the refitted
    head's accuracy on the whole training set: far below 1 on easy data means it under-fitted.
    The seed only affects the split (the problem is convex and starts from zeros).
    """
    train_y, test_y, classes, num_classes = _check_inputs(train_x, train_y, test_x, test_y, 2, num_classes)
    weight_decays = [float(v) for v in weight_decays]
    if not weight_decays or min(weight_decays) < 0:
        raise JepaError(f"weight_decays must be a non-empty list of values >= 0, got {weight_decays}")
    if max_iter < 1:
        raise JepaError(f"max_iter must be >= 1, got {max_iter}")
    n, d = train_x.shape
    dtype = torch.float64 if n * d < _FLOAT64_MAX_ELEMENTS else torch.float32
    x = train_x.detach().to("cpu", dtype)
    xt = test_x.detach().to("cpu", dtype)
    y = torch.searchsorted(classes, train_y)  # fit only the classes train has: absent ones cannot be learnt
    k = classes.numel()

    fit_idx, val_idx = split_train_val(train_y, val_fraction, seed)
    grid: list[dict] = []
    init = None
    mean, std = _moments(x)
    if val_idx.numel():
        # Standardise with the fit part's own moments: the validation rows stay truly held out.
        fit_mean, fit_std = _moments(x[fit_idx])
        w, b = _fit_logreg((x[fit_idx] - fit_mean) / fit_std, y[fit_idx], k, weight_decays, max_iter)
        with torch.no_grad():
            val_logits = torch.einsum("nd,gdc->gnc", (x[val_idx] - fit_mean) / fit_std, w) + b[:, None]
            for wd, logits in zip(weight_decays, val_logits, strict=True):
                grid.append({"weight_decay": wd, "val_top1": (logits.argmax(1) == y[val_idx]).double().mean().item(),
                             "val_loss": F.cross_entropy(logits, y[val_idx]).item()})
        best = _pick(grid)
        # Warm-start the refit from the chosen head, re-expressed exactly for the full set's moments:
        # ((x - m1) / s1) W + b == ((x - m2) / s2) (s2 / s1 * W) + (b + ((m2 - m1) / s1) W).
        w1 = w[best] / fit_std[:, None]
        init = ((std[:, None] * w1)[None], (b[best] + (mean - fit_mean) @ w1)[None])
    elif len(weight_decays) == 1:
        grid.append({"weight_decay": weight_decays[0], "val_top1": None, "val_loss": None})
        best = 0
    else:
        raise JepaError(f"cannot choose among {len(weight_decays)} weight decays without a validation split "
                        f"(val_fraction={val_fraction}, and every class needs >= 2 training samples)")

    chosen_wd = weight_decays[best]
    xs, xts = (x - mean) / std, (xt - mean) / std
    w, b = _fit_logreg(xs, y, k, [chosen_wd], max_iter, init)
    with torch.no_grad():
        train_top1 = ((xs @ w[0] + b[0]).argmax(1) == y).double().mean().item()
        scores = xts @ w[0] + b[0]
    return _finish("linear", scores, test_y, classes, num_classes, val_top1=grid[best]["val_top1"],
                   train_top1=train_top1, chosen={"weight_decay": chosen_wd}, grid=grid)


# ---------------------------------------------------------------------------------------------------
# Attentive probe


class _AttentiveHead(nn.Module):
    """timm's ``AttentionPoolLatent`` (one learned query cross-attending to the tokens, then a
    residual MLP behind a LayerNorm) followed by a linear classifier."""

    def __init__(self, dim: int, num_classes: int, num_heads: int):
        super().__init__()
        from timm.layers import AttentionPoolLatent

        self.pool = AttentionPoolLatent(dim, num_heads=num_heads, mlp_ratio=4, latent_len=1,
                                        norm_layer=nn.LayerNorm)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(tokens))


def _num_heads(dim: int, num_heads: int | None) -> int:
    if num_heads is None:
        # One head per 64 channels, lowered to a divisor of dim (AttentionPoolLatent asserts it).
        num_heads = max(1, dim // 64)
        while dim % num_heads:
            num_heads -= 1
    elif num_heads < 1 or dim % num_heads:
        raise JepaError(f"num_heads must divide the feature width {dim}, got {num_heads}")
    return num_heads


@torch.no_grad()
def _head_logits(head: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device, bf16: bool) -> torch.Tensor:
    head.eval()
    out = []
    for i in range(0, x.shape[0], batch_size):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out.append(head(x[i:i + batch_size].to(device, torch.float32)).float().cpu())
    return torch.cat(out)


def _train_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, num_heads: int, lr: float,
                weight_decay: float, epochs: int, batch_size: int, seed: int, device: torch.device,
                bf16: bool) -> nn.Module:
    """AdamW, linear warm-up then cosine decay per step, grad-norm clip 1.0, seeded minibatches."""
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG state
        torch.manual_seed(seed)
        head = _AttentiveHead(x.shape[-1], num_classes, num_heads)
    head.to(device)
    # No decay on biases, norms and other 1-D parameters (the usual ViT / V-JEPA probe convention).
    decay = [p for p in head.parameters() if p.ndim > 1]
    no_decay = [p for p in head.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)
    g = torch.Generator().manual_seed(seed)
    step = 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            if step < warmup:
                rate = lr * (step + 1) / warmup
            else:
                rate = lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in opt.param_groups:
                group["lr"] = rate
            idx = order[i:i + batch_size]
            xb, yb = x[idx].to(device, torch.float32), y[idx].to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                logits = head(xb)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            step += 1
    return head


def attentive_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                    num_classes: int | None = None, lrs: Sequence[float] = (1e-3,),
                    weight_decays: Sequence[float] = (0.05,), epochs: int = 20, batch_size: int = 256,
                    num_heads: int | None = None, val_fraction: float = 0.1, seed: int = 0,
                    device: str | torch.device = "cpu", bf16: bool = False) -> ProbeResult:
    """Attentive probe on ``[n, N, d]`` patch tokens: attention pooling with one learned query + linear.

    One head per (lr, weight_decay) config is trained on the train part of a stratified split, all
    from the same seeded init and minibatch order; the config with the best validation top-1 (ties:
    lower val cross-entropy) is kept and scored on the test set. The chosen head is NOT refitted on
    the whole training set (SGD training is too costly to repeat), so ``train_top1`` is its accuracy
    on the train part it was trained on. With ``val_fraction=0`` and a single config, the head is
    trained on all of train and ``val_top1`` is None.
    """
    train_y, test_y, classes, num_classes = _check_inputs(train_x, train_y, test_x, test_y, 3, num_classes)
    configs = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    if not configs:
        raise JepaError("attentive_probe needs at least one lr and one weight decay")
    if epochs < 1 or batch_size < 1:
        raise JepaError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    heads = _num_heads(train_x.shape[-1], num_heads)
    device = torch.device(device)
    x = train_x.detach().cpu()  # stays on the host; minibatches move to the device
    y = torch.searchsorted(classes, train_y)
    k = classes.numel()

    fit_idx, val_idx = split_train_val(train_y, val_fraction, seed)
    if not val_idx.numel() and len(configs) > 1:
        raise JepaError(f"cannot choose among {len(configs)} configs without a validation split "
                        f"(val_fraction={val_fraction}, and every class needs >= 2 training samples)")
    fit_x, fit_y, val_x, val_y = x[fit_idx], y[fit_idx], x[val_idx], y[val_idx]  # gathered once, not per config
    grid: list[dict] = []
    best_head, best = None, 0
    for lr, wd in configs:
        head = _train_head(fit_x, fit_y, k, heads, lr, wd, epochs, batch_size, seed, device, bf16)
        entry = {"lr": lr, "weight_decay": wd, "val_top1": None, "val_loss": None}
        if val_idx.numel():
            logits = _head_logits(head, val_x, batch_size, device, bf16)
            entry["val_top1"] = (logits.argmax(1) == val_y).double().mean().item()
            entry["val_loss"] = F.cross_entropy(logits, val_y).item()
        grid.append(entry)
        if len(grid) == 1 or _pick(grid) == len(grid) - 1:
            best_head, best = head, len(grid) - 1  # keep only the best head alive, not the whole grid
    assert best_head is not None
    fit_logits = _head_logits(best_head, fit_x, batch_size, device, bf16)
    train_top1 = (fit_logits.argmax(1) == fit_y).double().mean().item()
    scores = _head_logits(best_head, test_x.detach().cpu(), batch_size, device, bf16)
    chosen = {"lr": grid[best]["lr"], "weight_decay": grid[best]["weight_decay"]}
    return _finish("attentive", scores, test_y, classes, num_classes, val_top1=grid[best]["val_top1"],
                   train_top1=train_top1, chosen=chosen, grid=grid)


# ---------------------------------------------------------------------------------------------------
# k-NN probe


@torch.no_grad()
def knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              num_classes: int | None = None, k: int = 20, temperature: float = 0.07) -> ProbeResult:
    """Weighted k-NN on cosine similarity (Wu et al. 2018 / DINO): each of the ``k`` nearest training
    samples votes for its label with weight ``exp(sim / temperature)``; top-1/top-5 rank the votes.
    No training and no hyper-parameter search, so ``val_top1`` and ``train_top1`` are None.
    """
    train_y, test_y, classes, num_classes = _check_inputs(train_x, train_y, test_x, test_y, 2, num_classes)
    if k < 1 or not temperature > 0:
        raise JepaError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(train_x.detach().cpu().float(), dim=1)
    test = F.normalize(test_x.detach().cpu().float(), dim=1)
    y = torch.searchsorted(classes, train_y)
    kk = min(k, train.shape[0])
    # Chunk the test set so the [chunk, n_train] similarity matrix stays bounded whatever n_train is.
    chunk = max(1, min(1024, _KNN_SIM_ELEMENTS // train.shape[0]))
    scores = []
    for i in range(0, test.shape[0], chunk):
        sim, idx = (test[i:i + chunk] @ train.T).topk(kk, dim=1)
        # exp((sim - row max) / T) is exp(sim / T) up to a common factor per row, which does not change
        # the ranking; it stays in (0, 1] with the nearest neighbour at exactly 1, so a small temperature
        # can neither overflow float32 nor underflow every vote of a row to 0.
        weight = torch.exp((sim - sim[:, :1]) / temperature)
        votes = torch.zeros(idx.shape[0], classes.numel()).scatter_add_(1, y[idx], weight)
        scores.append(votes)
    return _finish("knn", torch.cat(scores), test_y, classes, num_classes, val_top1=None, train_top1=None,
                   chosen={"k": k, "temperature": temperature},
                   grid=[{"k": k, "temperature": temperature, "val_top1": None}])
