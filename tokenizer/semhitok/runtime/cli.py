"""Shared command-line plumbing for the entry points: one-line errors, bounded integers, clean failure.

Every script turns a user mistake into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (`prog: error: ...`), without the usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (hi=None: no upper bound)."""

    def parse(text: str) -> int:
        ok = text.lstrip("-").isdigit() and int(text) >= lo and (hi is None or int(text) <= hi)
        if not ok:
            bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}")
        return int(text)

    return parse


positive_int = int_in(1)


def fail(prog: str, message: str, code: int = 2) -> None:
    """Print `prog: error: message` and exit with `code`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def gate(text: str) -> tuple[str, float]:
    """argparse type of `--gate KEY=MIN`: a dotted key into a script's results (e.g. student.shape) and its minimum."""
    key, sep, value = text.partition("=")
    try:
        if sep and key.strip():
            return key.strip(), float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected KEY=MIN (e.g. student.shape=0.85), got {text!r}")


def check_gates(prog: str, results: dict, gates: list[tuple[str, float]]) -> None:
    """Every gate's dotted key must reach its minimum in `results` (nested dicts); otherwise one line naming each
    miss and exit code 1 (a measured shortfall, not a usage error). An unknown key is a usage error (exit 2)."""
    misses = []
    for key, minimum in gates:
        value = results
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                fail(prog, f"--gate {key}: no such result (results have {sorted(results)})")
            value = value[part]
        if not value >= minimum:
            misses.append(f"{key} {value:.3f} < {minimum:g}")
    if misses:
        fail(prog, "gate not met: " + "; ".join(misses), code=1)
    if gates:
        print("gates met: " + ", ".join(f"{k} >= {m:g}" for k, m in gates))
