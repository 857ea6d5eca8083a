"""What keeps a long run honest: non-finite steps skipped on the device, a collapse alarm, and a
clean stop on SIGTERM / SIGINT.

Non-finite steps. Knowing whether a step's loss and gradients are finite needs their values on the
host, and a per-step ``.item()`` would stall a GPU pipeline every step. So the decision stays on the
device: a 0-d ``ok`` flag (finite loss and finite gradient norm) is folded into the update. The fused
AdamW kernel takes it as ``found_inf`` (the hook ``torch.amp.GradScaler`` uses) and leaves weights,
moments and its step count untouched when set; the EMA weight becomes ``(1 - momentum) * ok``, which
makes the target update an exact no-op. Counters (total skipped, the current run of skipped steps, the
step at which the run reached the limit) are device tensors too, read once per log interval together
with the loss. Only the non-fused optimizer fallback reads the flag each step (one sync).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable

import torch
from rich.console import Console
from torch import nn

from ..model.ema import local_tensors


class NonFiniteGuard:
    """Skips steps with a non-finite loss or gradient and counts them, without a host sync.

    Args:
        optimizer: the training optimizer; fused AdamW skips through ``found_inf``.
        limit: this many skipped steps in a row stop the run (see :meth:`poll`).
        device: where the counters live.
        state: counters from a checkpoint.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, limit: int, device: torch.device,
                 state: dict | None = None):
        self.optimizer, self.limit = optimizer, limit
        self.fused = bool(optimizer.defaults.get("fused"))
        state = state or {}
        self.total = torch.tensor(float(state.get("total", 0)), device=device)
        self.run = torch.tensor(float(state.get("run", 0)), device=device)
        self.hit = torch.tensor(-1.0, device=device)  # step at which the run reached the limit

    def check(self, params: list[nn.Parameter], loss: torch.Tensor, grad_norm: torch.Tensor | None,
              step: int) -> torch.Tensor:
        """The step's 0-d ``ok`` flag; arms the optimizer to skip when it is false."""
        if grad_norm is None:
            grads = [p.grad for p in params if p.grad is not None]
            # A sum of norms is finite exactly when every gradient is (barring overflow, also a failure).
            grad_norm = torch.stack(torch._foreach_norm(grads)).sum() if grads else torch.zeros((), device=loss.device)
        ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
        bad = (~ok).float()
        if self.fused:
            self.optimizer.found_inf = bad  # read by the fused AdamW kernel: skip when 1
            self.optimizer.grad_scale = None
        self.total += bad
        self.run.mul_(bad).add_(bad)  # consecutive skipped steps, reset by a good one
        reached = (self.run >= self.limit) & (self.hit < 0)
        self.hit.copy_(torch.where(reached, torch.full_like(self.hit, step + 1), self.hit))
        return ok

    def step(self, ok: torch.Tensor) -> None:
        """``optimizer.step()``, skipped when ``ok`` is false."""
        if self.fused or bool(ok):  # the non-fused fallback has no found_inf: it pays one sync
            self.optimizer.step()

    def state_dict(self) -> dict:
        return {"total": int(self.total.item()), "run": int(self.run.item())}


@torch.no_grad()
def guarded_ema_update(target: nn.Module, online: nn.Module, momentum: float, ok: torch.Tensor) -> None:
    """``target = momentum * target + (1 - momentum) * online`` when ``ok``, else no change (exactly:
    ``lerp`` with weight 0 returns the target unchanged), as one fused foreach op."""
    if momentum < 1.0:
        weight = ok.float() * (1.0 - momentum)
        torch._foreach_lerp_(local_tensors(target.parameters()), local_tensors(online.parameters()), weight)
    for tb, ob in zip(target.buffers(), online.buffers(), strict=True):
        tb.copy_(ob)


class CollapseAlarm:
    """Watches the feature statistics of each log interval; fires once per episode below a threshold.

    Collapse means the target encoder maps every input to (nearly) the same point, or to a few
    directions: the loss can still fall, since constant targets are easy to predict.
    """

    def __init__(self, cfg, state: dict | None = None):
        self.cfg = cfg
        self.below = 0
        self.fired_at: list[int] = []
        self.peak_rank = float((state or {}).get("peak_rank", 0.0))  # highest rank seen, kept across resumes

    def state_dict(self) -> dict:
        return {"peak_rank": self.peak_rank}

    def update(self, step: int, stats: dict[str, float]) -> str | None:
        """A warning line when the alarm fires at ``step``, else None."""
        cfg = self.cfg
        if cfg.collapse == "off" or step < cfg.collapse_after_steps or "target_std" not in stats:
            return None
        low = []
        rank = stats.get("rank", float("nan"))
        if stats["target_std"] < cfg.min_target_std:
            low.append(f"target feature std {stats['target_std']:.2g} < {cfg.min_target_std:g}")
        if rank < cfg.min_rank:
            low.append(f"effective rank {rank:.2f} < {cfg.min_rank:g}")
        elif rank < cfg.min_rank_fraction * self.peak_rank:  # dimensional collapse: a few directions left
            low.append(f"effective rank {rank:.2f} < {cfg.min_rank_fraction:g} x this run's peak {self.peak_rank:.1f}")
        if rank == rank:  # not NaN
            self.peak_rank = max(self.peak_rank, rank)
        self.below = self.below + 1 if low else 0
        if self.below != cfg.collapse_patience:
            return None
        self.fired_at.append(step)
        return (f"collapse alarm at step {step}: {' and '.join(low)} for {self.below} log intervals; "
                "see docs/reliability.md")


def pooled_rank(pooled: torch.Tensor) -> float:
    """RankMe of a batch of pooled features; NaN when they are not finite (that step is skipped anyway)."""
    from ..eval.probes import effective_rank

    if pooled.shape[0] < 2 or not bool(torch.isfinite(pooled).all()):
        return float("nan")
    return effective_rank(pooled)


class StopOnSignal:
    """While active, SIGTERM and SIGINT only set :attr:`signum`; the loop checks it at each step
    boundary, writes a checkpoint and stops. A second signal gets the previous handler (a second
    Ctrl-C aborts at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, console: Console):
        self.console = console
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        self.console.print(f"[yellow]{signal.Signals(signum).name}:[/] stopping after this step with a checkpoint "
                           "(send it again to abort at once)", highlight=False)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def trainable(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]
