"""Learning curves of a training run: `log.jsonl` -> one PNG, a panel per group of metrics (DESIGN §9).

Both trainers write one JSON record per log step (`{"step": ..., "loss": ..., ...}`) and evaluation records with
prefixed keys (`holdout/psnr`, `probe/shape`, ...). Metrics are grouped by their prefix before the first "/" (no
prefix: "train"); counters and bookkeeping (lr, timings, skip counts, epoch) are left out. Each panel shares the step
axis; the logs of a staged recipe (align -> instruct -> ...) can be drawn one after another on it. matplotlib draws
without a display (Agg).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

SKIP = ("step", "epoch", "stage", "lr", "sec_per_step", "tokens_per_s", "num_skipped", "num_skipped_total",
        "num_truncated", "grad_norm", "disc_grad_norm", "sec", "samples", "understanding", "generation")  # fmt: skip


def read_curves(log: Path) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """log.jsonl -> {group: {metric: (steps, values)}}; lines that are not JSON records with a step are skipped."""
    groups: dict[str, dict[str, tuple[list[float], list[float]]]] = defaultdict(dict)
    for line in Path(log).read_text().splitlines():
        try:
            record = json.loads(line)
            step = float(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        for key, value in record.items():
            if key in SKIP or not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            group = key.split("/", 1)[0] if "/" in key else "train"
            steps, values = groups[group].setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    return dict(groups)


def stage_offsets(stages: Sequence[dict[str, dict[str, tuple[list[float], list[float]]]]]) -> list[float]:
    """Where each stage of a staged recipe starts on the shared step axis: after the last step of the ones before."""
    offsets, at = [], 0.0
    for curves in stages:
        offsets.append(at)
        at += max((max(steps) for metrics in curves.values() for steps, _ in metrics.values() if steps), default=0.0)
    return offsets


def plot_curves(log: Path | Sequence[Path], out: Path, title: str = "", groups: Sequence[str] = ()) -> Path:
    """Draw every metric group of `log` (or only `groups`) into `out` (PNG). Several logs are the stages of a staged
    recipe, drawn one after another on one step axis (each starts where the one before ended; a line and the run
    folder's name mark where), a metric in the same colour throughout. ValueError when nothing is left to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [Path(log)] if isinstance(log, (str, Path)) else [Path(p) for p in log]
    stages = [read_curves(p) for p in logs]
    names = sorted({g for curves in stages for g in curves if not groups or g in groups})
    if not names:
        wanted = f" in groups {', '.join(groups)}" if groups else ""
        raise ValueError(f"{', '.join(map(str, logs))}: no metric records{wanted} to plot")
    keys = sorted({k for curves in stages for g in names for k in curves.get(g, {})})
    colour = {k: f"C{i % 10}" for i, k in enumerate(keys)}
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.6 * len(names)), sharex=True, squeeze=False)
    offsets = stage_offsets(stages)
    for path, curves, offset in zip(logs, stages, offsets, strict=True):
        for ax, group in zip(axes[:, 0], names, strict=True):
            for key, (steps, values) in sorted(curves.get(group, {}).items()):
                labelled = key in ax.get_legend_handles_labels()[1]
                ax.plot([offset + s for s in steps], values, color=colour[key], marker="o" if len(steps) < 20 else None,
                        markersize=3, label=None if labelled else key)  # fmt: skip
            if len(logs) > 1:
                ax.axvline(offset, color="grey", lw=0.6)
                ax.text(offset, 1.0, f" {path.parent.name}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
    for ax, group in zip(axes[:, 0], names, strict=True):
        ax.set_title(group, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("step" if len(logs) == 1 else "step (stages one after another)")
    fig.suptitle(title or " -> ".join(str(p) for p in logs), fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
