"""Bookkeeping of samples that could not be used: per reason, per shard, with example keys.

A source raises :class:`jepa.errors.SampleError` with a short reason (``corrupt``, ``truncated``,
``empty``, ``wrong_format``, ``too_large``, ``no_image``, or any reason a plugin chooses); the core
counts draws, never interprets the reason. A bad sample drawn in two epochs is counted twice; it is
listed once among the examples.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass
class Skipped:
    """One sample the pipeline dropped (returned by the dataset instead of a sample)."""

    reason: str
    key: str
    shard: str = ""
    detail: str = ""


class SkipLog:
    """Counts skipped draws and keeps up to ``max_examples`` distinct examples (shard, key, reason)."""

    def __init__(self, max_examples: int = 100, state: dict | None = None):
        self.max_examples = max_examples
        state = state or {}
        self.by_reason: Counter = Counter(state.get("by_reason", state.get("skipped", {})))
        self.by_shard: dict[str, Counter] = {s: Counter(c) for s, c in state.get("by_shard", {}).items()}
        self.examples: list[dict] = list(state.get("examples", []))
        self._seen = {(e["shard"], e["key"], e["reason"]) for e in self.examples}
        self.new: list[dict] = []  # this log interval's first occurrences, for metrics.jsonl

    def add(self, items: list[Skipped]) -> None:
        for s in items:
            self.by_reason[s.reason] += 1
            self.by_shard.setdefault(s.shard, Counter())[s.reason] += 1
            ident = (s.shard, s.key, s.reason)
            if ident not in self._seen and len(self.examples) < self.max_examples:
                self._seen.add(ident)
                example = {"reason": s.reason, "shard": s.shard, "key": s.key, "detail": s.detail[:200]}
                self.examples.append(example)
                if len(self.new) < 20:
                    self.new.append(example)

    def total(self) -> int:
        return sum(self.by_reason.values())

    def take_new(self) -> list[dict]:
        new, self.new = self.new, []
        return new

    def state_dict(self) -> dict:
        """Plain containers only: the checkpoint's ``state.pt`` loads with ``weights_only=True``."""
        return {"by_reason": dict(self.by_reason), "by_shard": {s: dict(c) for s, c in self.by_shard.items()},
                "examples": [dict(e) for e in self.examples]}

    def summary(self) -> dict:
        return {"skipped": dict(sorted(self.by_reason.items())),
                "skipped_by_shard": {s: dict(sorted(c.items())) for s, c in sorted(self.by_shard.items())},
                "skipped_examples": [f"{e['reason']}: {e['shard']}:{e['key']}" for e in self.examples[:20]],
                "skipped_samples": self.examples}
