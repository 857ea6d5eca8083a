"""``jepa viz curves``: loss, learning rate, EMA momentum, feature spread and effective rank against
the step, from ``RUN/metrics.jsonl``; collapse alarms are marked."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import JepaError
from .common import pyplot, save

PANELS = (
    ("loss", ("loss",), "linear"),
    ("learning rate / weight decay", ("lr", "wd"), "log"),
    ("EMA momentum", ("momentum",), "linear"),
    ("feature std (collapse: -> 0)", ("target_std", "pred_std"), "log"),
    ("effective rank of pooled target features", ("rank",), "linear"),
    ("k-NN top-1 (monitor)", ("knn_top1",), "linear"),
)


def read_metrics(run: str | Path) -> list[dict]:
    """Records of a run directory's (or a given) ``metrics.jsonl``; a line cut short by a crash is skipped."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise JepaError(f"viz curves: no metrics.jsonl in {run}")
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    if not records:
        raise JepaError(f"viz curves: {path} holds no records yet")
    return records


def draw_curves(run: str | Path, out: str | Path) -> Path:
    plt = pyplot()
    records = read_metrics(run)
    panels = [(title, [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)], scale)
              for title, keys, scale in PANELS]
    panels = [p for p in panels if p[1]]
    alarms = [r["step"] for r in records if r.get("collapse_alarm")]
    ncols = 2
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 2.8 * nrows), squeeze=False)
    for ax, (title, keys, scale) in zip(axes.flat, panels, strict=False):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            positive = all(v > 0 for _, v in pts)
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=key, marker="." if len(pts) < 30 else None)
            ax.set_yscale(scale if positive else "linear")
        for step in alarms:
            ax.axvline(step, color="red", alpha=0.4, linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    note = f"; red lines: collapse alarms at {alarms[:5]}" if alarms else ""
    fig.suptitle(f"{run}{note}", fontsize=9)
    fig.tight_layout()
    return save(fig, out)
