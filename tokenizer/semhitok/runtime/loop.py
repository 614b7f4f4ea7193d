"""Pieces of the training loop both trainers share: console lines beside the progress bar, the run's `log.jsonl`
(append; cut back to the resumed step), and the stop after too many batches without a usable sample."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from semhitok.runtime.configio import ConfigError
from semhitok.runtime.data import SkipCounter

MAX_EMPTY_BATCHES = 1000  # consecutive batches without a usable sample that stop a run (or one epoch, if fewer)


def console(text: str, bar: tqdm) -> None:
    """One line on stdout that does not break `bar`'s progress display."""
    if bar.disable:
        print(text, flush=True)
    else:
        bar.write(text)


def skipped_line(step: int, skipped: int, skips: SkipCounter) -> str:
    """The console line of a log step whose interval skipped samples: how many, and why (a few files and reasons)."""
    return f"step {step}: {skipped} sample(s) skipped since the last log; {skips.summary(max_files=3)}"


@dataclass
class EmptyBatches:
    """Counts consecutive batches without a usable sample (on some rank). `limit` of them in a row (both trainers:
    one epoch, at most MAX_EMPTY_BATCHES) mean the data cannot train: ConfigError saying how many samples were
    skipped and why, instead of drawing batches forever."""

    limit: int
    count: int = 0

    def update(self, usable: bool, skips: SkipCounter) -> None:
        self.count = 0 if usable else self.count + 1
        if self.count >= self.limit:
            raise ConfigError(f"no usable training sample in {self.count} consecutive batches: "
                              f"{skips.summary(max_files=3)}")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after `step` by a run killed after its last checkpoint (and a line cut by the kill)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
