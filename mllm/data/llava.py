"""LLaVA conversation data: read, validate and count `<image>` placeholders.

Format (a JSON list, or JSON lines when the file ends in .jsonl):
    [{"id": ..., "image": "relative/path.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                                 {"from": "gpt", "value": "..."}, ...]}]
"image" is optional (text-only samples). Turns alternate human, gpt, ..., and end with gpt.
Errors name the sample index and id. Samples whose placeholder count does not match their image are reported by
`placeholder_issues` (the training code skips and counts them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mllm.constants import IMAGE_PLACEHOLDER, ROLES
from mllm.conversation import Turn
from semhitok.runtime import DEFAULT_MAX_PIXELS, BadItem, ImageLoadError, load_image, read_json, read_jsonl, to_tensor

logger = logging.getLogger(__name__)


class LlavaFormatError(ValueError):
    """A sample that does not follow the LLaVA conversation format."""


@dataclass(frozen=True)
class LlavaSample:
    id: str
    image: str | None  # path relative to the image root; None for text-only samples
    turns: tuple[Turn, ...]

    @property
    def num_placeholders(self) -> int:
        return sum(t.text.count(IMAGE_PLACEHOLDER) for t in self.turns)


def parse_sample(raw: Any, index: int) -> LlavaSample:
    """Validate one raw sample. Raises LlavaFormatError naming the sample index and id."""
    where = f"sample {index}" + (f" (id {raw.get('id')!r})" if isinstance(raw, dict) and "id" in raw else "")
    if not isinstance(raw, dict):
        raise LlavaFormatError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for key in ("id", "conversations"):
        if key not in raw:
            raise LlavaFormatError(f"{where}: missing key {key!r} (has {sorted(raw)})")
    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise LlavaFormatError(f"{where}: 'image' must be a non-empty path string, got {image!r}")
    return LlavaSample(id=str(raw["id"]), image=image, turns=_parse_turns(raw["conversations"], where))


def _parse_turns(conv: Any, where: str) -> tuple[Turn, ...]:
    if not isinstance(conv, list) or not conv:
        raise LlavaFormatError(f"{where}: 'conversations' must be a non-empty list")
    turns = tuple(_parse_turn(t, k, where) for k, t in enumerate(conv))
    for k, turn in enumerate(turns):
        expected = ROLES[k % 2]
        if turn.role != expected:
            raise LlavaFormatError(
                f"{where}: turn {k} is from {turn.role!r} but {expected!r} was expected "
                "(turns must alternate human, gpt, human, ...)"
            )
    if turns[-1].role != "gpt":
        raise LlavaFormatError(f"{where}: the last turn is from 'human'; a sample must end with a 'gpt' answer")
    return turns


def _parse_turn(t: Any, k: int, where: str) -> Turn:
    if not isinstance(t, dict) or "from" not in t or "value" not in t:
        raise LlavaFormatError(f"{where}: turn {k} must be an object with 'from' and 'value', got {t!r:.80}")
    if t["from"] not in ROLES:
        raise LlavaFormatError(f"{where}: turn {k} has unknown role {t['from']!r} (expected one of {ROLES})")
    if not isinstance(t["value"], str):
        raise LlavaFormatError(f"{where}: turn {k} 'value' must be a string, got {type(t['value']).__name__}")
    return Turn(role=t["from"], text=t["value"])


def load_llava(path: str | os.PathLike) -> list[LlavaSample]:
    """Read and validate a LLaVA .json (list) or .jsonl file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        raw = [rec for _, rec in read_jsonl(path)]
    else:
        raw = read_json(path)
        if not isinstance(raw, list):
            raise LlavaFormatError(f"{path}: expected a JSON list of samples, got {type(raw).__name__}")
    try:
        return [parse_sample(s, i) for i, s in enumerate(raw)]
    except LlavaFormatError as e:
        raise LlavaFormatError(f"{path}: {e}") from None


@dataclass(frozen=True)
class PlaceholderIssue:
    index: int
    id: str
    image: str | None
    num_placeholders: int

    def __str__(self) -> str:
        kind = f"image {self.image!r}" if self.image else "no image"
        return (
            f"sample {self.index} (id {self.id!r}): {kind} but {self.num_placeholders} {IMAGE_PLACEHOLDER} placeholders"
        )


def placeholder_issues(samples: Sequence[LlavaSample]) -> list[PlaceholderIssue]:
    """Samples with an image but 0 or 2+ placeholders, or with no image but 1+ placeholders."""
    return [
        PlaceholderIssue(i, s.id, s.image, s.num_placeholders)
        for i, s in enumerate(samples)
        if s.num_placeholders != (1 if s.image else 0)
    ]


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA samples with their images loaded through `semhitok.runtime.load_image`.

    Items: {"id": str, "turns": tuple[Turn], "image": (3, size, size) float32 in [-1, 1] or None (text-only),
    "path": str or None}, or a `semhitok.runtime.BadItem` when the image fails to load (warning logged; drop it with
    `semhitok.runtime.collate_skip_bad` or the training collator).
    """

    def __init__(
        self,
        samples: Sequence[LlavaSample] | str | os.PathLike,
        image_root: str | os.PathLike,
        size: int | None,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.samples = load_llava(samples) if isinstance(samples, (str, os.PathLike)) else list(samples)
        self.image_root, self.size, self.max_pixels = Path(image_root), size, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | BadItem:
        s = self.samples[index]
        item = {"id": s.id, "turns": s.turns, "image": None, "path": None}
        if s.image is None:
            return item
        path = self.image_root / s.image
        try:
            image = to_tensor(load_image(path, self.size, max_pixels=self.max_pixels))
        except ImageLoadError as e:
            logger.warning("skipping sample %d (id %r): %s", index, s.id, e)
            return BadItem(index, str(path), e.reason)
        return {**item, "image": image, "path": str(path)}
