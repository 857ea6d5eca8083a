"""Metrics sinks: ``RUN/metrics.jsonl`` (one JSON object per log step) and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .checkpoint import write_text_atomic


def _step(line: str) -> int | None:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


class MetricsLogger:
    """Appends to ``metrics.jsonl``. ``step`` counts completed steps; on resume at step ``s``, entries
    logged after ``s`` (by the interrupted run, past its last checkpoint) are dropped first, so the
    file reads as one uninterrupted run. Disabled (on ranks other than 0), it writes nothing."""

    def __init__(self, run_dir: Path, start_step: int, tensorboard: bool, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self._f = self.tb = None
        if not enabled:
            return
        if start_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) is not None
                    and _step(line) <= start_step]  # a line cut short by a crash is dropped
            # Atomic: a kill during this rewrite must not lose the history of the steps that are kept.
            write_text_atomic(self.path, "".join(k + "\n" for k in kept))
        elif start_step == 0:
            self.path.write_text("")
        self._f = open(self.path, "a", buffering=1)  # noqa: SIM115 - line-buffered for tail -f
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        if self._f is None:
            return
        # NaN/Inf are not JSON: a statistic that could not be computed is written as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self.tb is not None:
            self.tb.close()
