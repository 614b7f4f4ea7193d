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
