"""Learning curves of a training run: `log.jsonl` -> one PNG, a panel per group of metrics (DESIGN §9).

Both trainers write one JSON record per log step (`{"step": ..., "loss": ..., ...}`) and evaluation records with
prefixed keys (`holdout/psnr`, `probe/shape`, ...). Metrics are grouped by their prefix before the first "/" (no
prefix: "train"); counters and bookkeeping (lr, timings, skip counts, epoch) are left out. Each panel shares the step
axis. matplotlib draws without a display (Agg).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

SKIP = ("step", "epoch", "stage", "lr", "sec_per_step", "tokens_per_s", "num_skipped", "num_skipped_total",
        "num_truncated", "grad_norm", "disc_grad_norm")  # fmt: skip


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


def plot_curves(log: Path, out: Path, title: str = "") -> Path:
    """Draw every metric group of `log` into `out` (PNG); ValueError when the log holds no metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = read_curves(log)
    if not groups:
        raise ValueError(f"{log}: no metric records to plot")
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.6 * len(groups)), sharex=True, squeeze=False)
    for ax, (group, metrics) in zip(axes[:, 0], sorted(groups.items()), strict=True):
        for key, (steps, values) in sorted(metrics.items()):
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=key)
        ax.set_title(group, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title or str(log), fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
