"""Tokenized training samples for `SemHiTokLM` from cached image codes, their per-stage mixture, and the collator.

Sources (torch Datasets; an item is an `LMSample`, or a `semhitok.runtime.BadItem` whose `reason` is one of
SKIP_REASONS for a sample that cannot be used: `collate_lm` drops and counts those, nothing ever raises mid-epoch):
    ConversationDataset   understanding: LLaVA conversations; `<image>` becomes the image's `<boi> ids <eoi>`
    CaptionDataset        understanding: "<image>\\n<brief-description instruction>" -> a caption (LLaVA 558K recipe)
    TextToImageDataset    generation: prompt(caption) -> `<boi> ids <eoi>`; caption dropped with p = 0.1 for CFG
    MixtureDataset        several sources mixed with fixed ratios, deterministic given (seed, epoch)
Every source has `sample(index, epoch)`; `__getitem__` uses the epoch given to `set_epoch` (as with
DistributedSampler: call it before each epoch; non-persistent DataLoader workers see it). Random choices (which caption,
which instruction, caption dropout) are seeded by (seed, epoch, index), so a sample is the same in every run.

Layouts (`SampleBuilder` is the one place they are assembled; ids from the text tokenizer extended by VisualVocab):
    understanding  template(conversation) with `<image>` expanded by `VisualVocab.expand_placeholders`;
                   labels = the assistant tokens (+ their end-of-turn token) only
    generation     (choice) the chat template's user turn GENERATION_PROMPT.format(caption) + assistant prefix
                   (`mllm.conversation.generation_prompt_ids`), then `<boi> ids <eoi>`; labels = the image ids +
                   `<eoi>` (`<boi>` is given: the sampler appends it). The unconditional prompt is the same with
                   caption "" (`generation_prompt_ids(""...)`). With `data.t2i_box_weight` the image targets in
                   the grid cells a record's boxes overlap get that weight in the weighted image means
                   (`LMSample.weights`, `collate_lm`'s label_weights); with `data.t2i_onset_weight` each box's
                   first cell in raster order (`onset_cells`: where a raster generator decides to start the object,
                   the one target of it its earlier ids do not predict) gets that weight.
Over-long samples: text is cut from the end to `max_length` and counted (`LMSample.num_truncated`), unless the cut
would remove any image token (a partial image, or an image whose answer is cut anyway): then the sample is skipped
(IMAGE_CUT), as is one with no label left (NO_TARGETS).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mllm.codes import CodeCache
from mllm.constants import GENERATION_PROMPT, IGNORE_INDEX, IMAGE_PLACEHOLDER, Box
from mllm.conversation import (
    ConversationError,
    Template,
    conversation_template,
    generation_prompt_ids,
    tokenize_conversation,
)
from mllm.data.llava import LlavaSample, load_llava
from mllm.vocab import VisualVocab, VocabError
from semhitok.runtime import BadItem, read_jsonl

UNDERSTANDING, GENERATION = "understanding", "generation"
BRIEF_INSTRUCTIONS = (  # LLaVA's brief-description instructions (pre-training on captions)
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
# Why a sample is skipped (BadItem.reason).
NO_PLACEHOLDER = f"image but no {IMAGE_PLACEHOLDER} placeholder"
MANY_PLACEHOLDERS = f"several {IMAGE_PLACEHOLDER} placeholders for one image"
PLACEHOLDER_NO_IMAGE = f"{IMAGE_PLACEHOLDER} placeholder but no image"
MISSING_IMAGE = "image not in the code cache"
IMAGE_CUT = "max_length would cut an image"
NO_TARGETS = "no label left after truncation"
BAD_CONVERSATION = "conversation the template cannot render"
SKIP_REASONS = (NO_PLACEHOLDER, MANY_PLACEHOLDERS, PLACEHOLDER_NO_IMAGE, MISSING_IMAGE, IMAGE_CUT, NO_TARGETS,
                BAD_CONVERSATION)  # fmt: skip
# Stage presets: source name -> share of the samples (DESIGN §4 stages).
STAGE_MIXES: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "pretrain": MappingProxyType({"caption": 1.0}),  # adapter pre-training: short caption answers (LLaVA 558K)
    "instruct": MappingProxyType({"conversation": 1.0}),  # instruction tuning (LLaVA 665K)
    "t2i": MappingProxyType({"t2i": 1.0}),  # text-to-image
    "joint": MappingProxyType({"conversation": 0.5, "t2i": 0.5}),
})  # fmt: skip
SOURCE_FILES = MappingProxyType(
    {"conversation": "conversations", "caption": "captions", "t2i": "captions"}
)  # DataConfig


@dataclass(frozen=True)
class LMSample:
    """One training sequence, image ids inline.
    input_ids, labels: (L,) int64; labels IGNORE_INDEX where nothing is learned (labels[t] is predicted at t - 1)
    direction:         UNDERSTANDING | GENERATION
    num_truncated:     text tokens cut from the end to fit max_length (0 when it fit)
    weights:           (L,) float32 weight of each label in the loss's weighted image means (None: all 1)"""

    input_ids: Tensor
    labels: Tensor
    direction: str
    num_truncated: int = 0
    weights: Tensor | None = None


class Skip(Exception):
    """Raised by SampleBuilder for a sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class SampleBuilder:
    """Builds `LMSample`s from (conversation | caption, image key) with the image's codes from the cache.
    `tokenizer` is extended (idempotently) with the vocabulary's specials and checked against it. Conversations are
    rendered by `template` with the system prompt `system` ("" none, None the template's default:
    `mllm.conversation.conversation_template`; training passes `MLLMConfig.system_prompt`)."""

    tokenizer: Any
    vocab: VisualVocab
    codes: CodeCache
    template: str = "chat_template"
    max_length: int = 2048
    prompt: str = GENERATION_PROMPT
    system: str | None = ""

    def __post_init__(self) -> None:
        self.vocab.extend_tokenizer(self.tokenizer)
        if (self.codes.K, self.codes.m) != (self.vocab.K, self.vocab.m):
            raise VocabError(
                f"the code cache {self.codes.directory} has K, m = {self.codes.K}, {self.codes.m} but the "
                f"visual vocabulary {self.vocab.K}, {self.vocab.m}: they come from different tokenizers"
            )
        if "{caption}" not in self.prompt:
            raise ValueError(f"the generation prompt {self.prompt!r} has no {{caption}} field")
        conversation_template(self.template, self.system)  # an unknown template name fails here, not per sample

    @property
    def conversation(self) -> Template:
        """The template with its system prompt, as every sample is rendered."""
        return conversation_template(self.template, self.system)

    def image_ids(self, key: str) -> Tensor:
        """(1, h*w) image ids of one cached image; Skip(MISSING_IMAGE) if it has no codes."""
        if key not in self.codes:
            raise Skip(MISSING_IMAGE)
        return self.vocab.to_ids(self.codes.grid(key))

    def understanding(self, turns: Sequence, image: str | None) -> LMSample:
        """LLaVA turns (human first, gpt last) about `image` (None: text only) -> sample labelled on the answers."""
        try:
            tok = tokenize_conversation(turns, self.tokenizer, self.conversation, max_length=sys.maxsize)
        except ConversationError:
            raise Skip(BAD_CONVERSATION) from None
        if tok.num_images != (image is not None):
            raise Skip(
                PLACEHOLDER_NO_IMAGE if image is None else MANY_PLACEHOLDERS if tok.num_images else NO_PLACEHOLDER
            )
        ids, labels = tok.input_ids, tok.labels
        if image is not None:
            ids, labels = self.vocab.expand_placeholders(ids, labels, self.image_ids(image))
        return self._fit(ids, labels, UNDERSTANDING)

    def generation(self, caption: str, image: str, boxes: Sequence[Box] = (), box_weight: float = 1.0,
                   onset_weight: float = 1.0) -> LMSample:  # fmt: skip
        """caption ("" = unconditional) -> prompt + `<boi> ids <eoi>`, labelled on the ids and `<eoi>`. With
        box_weight != 1, the image targets in grid cells that one of `boxes` overlaps get that loss weight
        (`box_cells`); with onset_weight != 1, each box's first cell in raster order gets that one (`onset_cells`);
        the others 1."""
        segment = self.vocab.segment(self.image_ids(image))[0]  # (h*w + 2,)
        prompt = generation_prompt_ids(caption, self.tokenizer, self.conversation, self.prompt)
        labels = torch.cat([torch.full((len(prompt) + 1,), IGNORE_INDEX), segment[1:]])  # <boi> is given
        weights = None
        if (box_weight != 1.0 or onset_weight != 1.0) and boxes:
            h, w = self.codes.grid(image).semantic.shape[-2:]
            weights = torch.ones(len(labels))
            cells = weights[len(prompt) + 1 : len(prompt) + 1 + h * w]  # a view: the image targets' weights
            cells[torch.from_numpy(box_cells(boxes, h, w))] = box_weight
            if onset_weight != 1.0:
                cells[torch.from_numpy(onset_cells(boxes, h, w))] = onset_weight
        return self._fit(torch.cat([prompt, segment]), labels, GENERATION, weights)

    def _fit(self, ids: Tensor, labels: Tensor, direction: str, weights: Tensor | None = None) -> LMSample:
        """Cut to max_length from the end; Skip if that would drop an image token or leave no label."""
        keep = self.max_length
        v = self.vocab
        in_image = v.is_image_id(ids) | (ids == v.boi_id) | (ids == v.eoi_id)  # (L,)
        if in_image[keep:].any():
            raise Skip(IMAGE_CUT)
        if (labels[:keep] == IGNORE_INDEX).all():
            raise Skip(NO_TARGETS)
        return LMSample(ids[:keep], labels[:keep], direction, num_truncated=max(len(ids) - keep, 0),
                        weights=None if weights is None else weights[:keep])  # fmt: skip


def box_cells(boxes: Sequence[Box], h: int, w: int) -> np.ndarray:
    """(h*w,) bool in raster order (the image ids' order): the cells of an h x w grid that one of `boxes`
    ((x0, y0, x1, y1), normalised to [0, 1]) overlaps with positive area."""
    mask = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        cols = [c for c in range(w) if min(x1, (c + 1) / w) > max(x0, c / w)]
        rows = [r for r in range(h) if min(y1, (r + 1) / h) > max(y0, r / h)]
        mask[np.ix_(rows, cols)] = True
    return mask.reshape(-1)


def onset_cells(boxes: Sequence[Box], h: int, w: int) -> np.ndarray:
    """(h*w,) bool in raster order: for each of `boxes`, the first cell (raster order) it overlaps, where a raster
    generator meets the object first. The rest of an object is mostly predictable from the ids drawn before it;
    whether and where an object starts is what a layout ("at the top left") decides."""
    mask = np.zeros(h * w, dtype=bool)
    for box in boxes:
        cells = np.flatnonzero(box_cells([box], h, w))
        if len(cells):
            mask[cells[0]] = True
    return mask


def _build(index: int, key: str, make: Callable[[], LMSample]) -> LMSample | BadItem:
    try:
        return make()
    except Skip as skip:
        return BadItem(index, key, skip.reason)


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


# ---------------------------------------------------------------------------------------------------- sources


class _Source(torch.utils.data.Dataset):
    """Items are `sample(index, self.epoch)`; `length_hint(index, epoch)` ranks them by length without building them
    (characters of text, + IMAGE_HINT for an image): what `train.group_by_length` sorts batches by."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> LMSample | BadItem:
        return self.sample(index, self.epoch)

    def sample(self, index: int, epoch: int) -> LMSample | BadItem:
        raise NotImplementedError

    def length_hint(self, index: int, epoch: int) -> int:
        raise NotImplementedError


IMAGE_HINT = 256  # an image's share of a length hint: about what its ids take as text characters (64 ids x ~4)


class ConversationDataset(_Source):
    """Understanding samples from LLaVA conversations (a .json/.jsonl path or parsed `LlavaSample`s)."""

    def __init__(self, samples: Sequence[LlavaSample] | str | Path, builder: SampleBuilder):
        self.samples = load_llava(samples) if isinstance(samples, (str, Path)) else list(samples)
        self.builder = builder

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, index: int, epoch: int) -> LMSample | BadItem:
        s = self.samples[index]
        return _build(index, s.image or s.id, lambda: self.builder.understanding(s.turns, s.image))

    def length_hint(self, index: int, epoch: int) -> int:
        s = self.samples[index]
        return sum(len(t.text) for t in s.turns) + (IMAGE_HINT if s.image else 0)


@dataclass(frozen=True)
class CaptionPair:
    image: str  # image key in the code cache
    captions: tuple[str, ...]  # one or more captions of the image
    weights: tuple[float, ...] | None = None  # probability of drawing each caption; None = uniform
    boxes: tuple[Box, ...] = ()  # the objects' boxes (x0, y0, x1, y1), normalised, where the record has them

    def draw(self, rng: np.random.Generator) -> str:
        if self.weights is None:
            return self.captions[rng.integers(len(self.captions))]
        return self.captions[rng.choice(len(self.captions), p=self.weights)]


def _field(rec: Mapping[str, Any], key: str) -> Any:
    """rec[key], where a dotted key ("geneval.prompt") reads into nested objects; None when absent or null."""
    value: Any = rec
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _texts(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return tuple(c for c in items if isinstance(c, str) and c.strip())


def load_captions(path: str | Path, image_key: str = "image", caption_key: str = "captions",
                  sources: Mapping[str, float] | None = None, boxes_key: str = "",
                  repeat: Mapping[str, Mapping[str, int]] | None = None) -> list[CaptionPair]:  # fmt: skip
    """(image, captions) pairs from JSON lines (synthetic scenes.jsonl, COCO annotations.jsonl, any JSONL with an image
    path and a caption string or list). Records without a caption are left out.

    sources: caption fields (dotted keys read nested objects, e.g. "geneval.prompt") -> weight. A pair then draws a
    field by weight among the fields its record has, and a caption of that field uniformly: {captions: 1, geneval.prompt:
    1} draws a scene's GenEval-style prompt half the time, where it has one. None: `caption_key` alone, uniformly.
    boxes_key: a field holding the image's object boxes as [x0, y0, x1, y1] lists normalised to [0, 1] of the image as
    the code cache sees it (the centre square `load_image` crops; synthetic scenes are square: "boxes"); records
    without it have none; a malformed one is a ValueError naming the line.
    repeat: field (dotted) -> {value: n}: a record whose field holds that value appears n times in the list (each copy
    draws its own caption), e.g. {geneval.tag: {counting: 3, position: 3}} oversamples two kinds of scene 3x; several
    fields multiply; ValueError for a count that is not a positive integer or a value no record has."""
    repeat = {k: dict(v) for k, v in (repeat or {}).items()}
    bad_n = {k: v for k, v in repeat.items() if not v or any(not isinstance(n, int) or n < 1 for n in v.values())}
    if bad_n:
        raise ValueError(f"caption repeats need positive integer counts per value, got {bad_n}")
    unseen = {(k, value) for k, v in repeat.items() for value in v}
    if sources is not None:
        bad = {k: w for k, w in sources.items() if not (isinstance(w, int | float) and w > 0)}
        if not sources or bad:
            raise ValueError(f"caption sources need positive weights, got {dict(sources)}")
    fields = dict(sources) if sources else {caption_key: 1.0}
    pairs = []
    for lineno, rec in read_jsonl(path):
        if image_key not in rec or not any(k.split(".")[0] in rec for k in fields):
            raise ValueError(
                f"{path}:{lineno}: missing {image_key!r} or {' / '.join(map(repr, fields))} (the record has {sorted(rec)})"
            )
        found = {k: _texts(_field(rec, k)) for k in fields}
        found = {k: v for k, v in found.items() if v}
        if not found:
            continue
        captions = tuple(c for v in found.values() for c in v)
        total = sum(fields[k] for k in found)
        weights = tuple(fields[k] / total / len(v) for k, v in found.items() for _ in v) if sources else None
        pair = CaptionPair(rec[image_key], captions, weights, _boxes(rec, boxes_key, f"{path}:{lineno}"))
        times = 1
        for key, counts in repeat.items():
            value = _field(rec, key)
            if isinstance(value, str | int | float) and str(value) in counts:
                times *= counts[str(value)]
                unseen.discard((key, str(value)))
        pairs.extend([pair] * times)
    if unseen:
        raise ValueError(f"{path}: no record with a caption has {' / '.join(f'{k} = {v!r}' for k, v in sorted(unseen))}"
                         " (a repeat that matches nothing)")  # fmt: skip
    return pairs


def _boxes(rec: Mapping[str, Any], key: str, where: str) -> tuple[Box, ...]:
    """The record's boxes, clipped to [0, 1]; ValueError naming `where` for anything but finite [x0, y0, x1, y1]
    lists with x0 <= x1 and y0 <= y1."""
    value = _field(rec, key) if key else None
    if value is None:
        return ()
    ok = isinstance(value, list) and all(
        isinstance(b, list) and len(b) == 4 and all(isinstance(v, int | float) and math.isfinite(v) for v in b)
        and b[0] <= b[2] and b[1] <= b[3] for b in value
    )  # fmt: skip
    if not ok:
        raise ValueError(f"{where}: {key!r} must be a list of [x0, y0, x1, y1] boxes (x0 <= x1, y0 <= y1), got "
                         f"{value!r:.80}")  # fmt: skip
    return tuple(tuple(min(max(float(v), 0.0), 1.0) for v in b) for b in value)


class CaptionDataset(_Source):
    """Understanding samples from captions: "<image>\\n<instruction>" -> one caption (both drawn per (epoch, index))."""

    def __init__(self, pairs: Sequence[CaptionPair], builder: SampleBuilder, seed: int = 0,
                 instructions: Sequence[str] = BRIEF_INSTRUCTIONS):  # fmt: skip
        self.pairs, self.builder, self.seed, self.instructions = list(pairs), builder, seed, tuple(instructions)

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, index: int, epoch: int) -> LMSample | BadItem:
        p, rng = self.pairs[index], _rng(self.seed, epoch, index)
        caption = p.draw(rng)
        instruction = self.instructions[rng.integers(len(self.instructions))]
        turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{instruction}"}, {"from": "gpt", "value": caption}]
        return _build(index, p.image, lambda: self.builder.understanding(turns, p.image))

    def length_hint(self, index: int, epoch: int) -> int:  # the mean caption and instruction: no draw needed
        captions = self.pairs[index].captions
        return sum(map(len, captions)) // len(captions) + len(self.instructions[0]) + IMAGE_HINT


class TextToImageDataset(_Source):
    """Generation samples: a caption drawn per (epoch, index), replaced by "" with probability `cfg_dropout`."""

    def __init__(self, pairs: Sequence[CaptionPair], builder: SampleBuilder, cfg_dropout: float = 0.1, seed: int = 0,
                 box_weight: float = 1.0, onset_weight: float = 1.0):  # fmt: skip
        if not 0.0 <= cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {cfg_dropout}")
        for name, value in (("box_weight", box_weight), ("onset_weight", onset_weight)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        self.pairs, self.builder, self.cfg_dropout, self.seed = list(pairs), builder, cfg_dropout, seed
        self.box_weight, self.onset_weight = box_weight, onset_weight

    def __len__(self) -> int:
        return len(self.pairs)

    def caption(self, index: int, epoch: int) -> str:
        """The caption sample (index, epoch) is conditioned on; "" when dropped for classifier-free guidance."""
        p, rng = self.pairs[index], _rng(self.seed, epoch, index)
        caption = p.draw(rng)
        return "" if rng.random() < self.cfg_dropout else caption

    def sample(self, index: int, epoch: int) -> LMSample | BadItem:
        """The generation sample; its object cells weighted by `box_weight` and their onsets by `onset_weight` unless
        the caption was dropped (the weighting points the loss at what a caption says)."""
        p, caption = self.pairs[index], self.caption(index, epoch)
        boxes = p.boxes if caption else ()
        return _build(index, p.image, lambda: self.builder.generation(caption, p.image, boxes, self.box_weight,
                                                                      self.onset_weight))  # fmt: skip

    def length_hint(self, index: int, epoch: int) -> int:
        return len(self.builder.prompt) + len(self.caption(index, epoch)) + IMAGE_HINT


# ---------------------------------------------------------------------------------------------------- mixture


class MixtureDataset(_Source):
    """Sources mixed with fixed shares: per epoch, source s fills round(weight_s * len) of the `len` positions
    (largest remainder), in a seeded random order. Each source is read as an endless stream of seeded permutations
    (cycle c = its c-th pass), so an over-sampled source repeats items as evenly as possible and an under-sampled one
    continues through its items across epochs. Item (index, epoch) is sources[s].sample(j, c): deterministic.

    `len` = `num_samples`, default the sum of the sources' lengths."""

    def __init__(self, sources: Mapping[str, Any], weights: Mapping[str, float], num_samples: int | None = None,
                 seed: int = 0):  # fmt: skip
        if set(sources) != set(weights) or any(w <= 0 for w in weights.values()):
            raise ValueError(f"need one positive weight per source: sources {sorted(sources)}, weights {dict(weights)}")
        empty = [name for name, s in sources.items() if len(s) == 0]
        if empty:
            raise ValueError(f"sources {empty} are empty")
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        self.length = num_samples or sum(len(s) for s in self.sources)
        self.counts = _apportion([weights[n] for n in self.names], self.length)
        self.seed = seed
        self._plan: tuple[int, np.ndarray] | None = None  # (epoch, (3, len) source/item/cycle) of the last epoch used

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int, epoch: int) -> LMSample | BadItem:
        s, j, c = self.plan(epoch)[:, index]
        return self.sources[s].sample(int(j), int(c))

    def length_hint(self, index: int, epoch: int) -> int:
        s, j, c = self.plan(epoch)[:, index]
        return self.sources[s].length_hint(int(j), int(c))

    def plan(self, epoch: int) -> np.ndarray:
        """(3, len) int64: source, item index and cycle of every position of `epoch`."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self._make_plan(epoch))
        return self._plan[1]

    def _make_plan(self, epoch: int) -> np.ndarray:
        labels = np.repeat(np.arange(len(self.counts)), self.counts)  # (len,) source of each position, unshuffled
        source = np.random.default_rng([self.seed, epoch]).permutation(labels)
        plan = np.stack([source, np.zeros_like(source), np.zeros_like(source)])  # (3, len)
        for s, (n, size) in enumerate(zip(self.counts, map(len, self.sources), strict=True)):
            pos = epoch * n + np.arange(n)  # positions in the source's endless stream
            cycle = pos // size
            item = np.empty_like(pos)
            for c in np.unique(cycle):
                at = cycle == c
                item[at] = np.random.default_rng([self.seed, s, c]).permutation(size)[pos[at] % size]
            plan[1:, source == s] = item, cycle
        return plan


def _apportion(weights: Sequence[float], total: int) -> list[int]:
    """Integer shares of `total` proportional to `weights` (largest remainder; ties to the earlier source)."""
    exact = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts.tolist()


# ---------------------------------------------------------------------------------------------------- batches


def collate_lm(batch: Sequence[LMSample | BadItem], pad_id: int) -> dict[str, Any]:
    """Right-pad samples into a batch, dropping BadItems.

    Returns input_ids (B, L) int64 (pad_id on pads), attention_mask (B, L) int64 (0 on pads), labels (B, L) int64
    (IGNORE_INDEX on pads), label_weights (B, L) float32 (`LMSample.weights`, 1 where a sample has none),
    direction (list of B str), batch_size B, num_truncated (samples that were cut),
    num_skipped and skipped (the BadItems: `semhitok.runtime.SkipCounter.update` sums them). All skipped: B = L = 0."""
    good = [b for b in batch if isinstance(b, LMSample)]
    skipped = [b for b in batch if isinstance(b, BadItem)]
    length = max((len(b.input_ids) for b in good), default=0)
    ids = torch.full((len(good), length), pad_id, dtype=torch.long)
    labels = torch.full((len(good), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(good), length), dtype=torch.long)
    weights = torch.ones((len(good), length), dtype=torch.float32)
    for row, b in enumerate(good):
        n = len(b.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = b.input_ids, b.labels, 1
        if b.weights is not None:
            weights[row, :n] = b.weights
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "label_weights": weights,
            "direction": [b.direction for b in good],
            "batch_size": len(good), "num_truncated": sum(b.num_truncated > 0 for b in good),
            "num_skipped": len(skipped), "skipped": skipped}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class DataConfig:
    """Where a stage's data comes from and how it is tokenized (e.g. the `data:` section of an MLLM run config)."""

    codes: str  # code cache folder (scripts/extract_codes.py) holding every image below
    stage: str = "joint"  # a STAGE_MIXES preset
    mix: Mapping[str, float] = field(default_factory=dict)  # overrides the stage mix, e.g. {conversation: 1.0} to
    # pre-train on LLaVA-558K (a LLaVA json of caption conversations)
    conversations: str = ""  # LLaVA .json/.jsonl: source "conversation"
    captions: str = ""  # JSONL with image + captions: sources "caption" and "t2i"
    caption_key: str = "captions"
    t2i_captions: Mapping[str, float] = field(default_factory=dict)  # source "t2i" draws captions from these fields
    # by weight (`load_captions(sources=...)`), e.g. {captions: 1, geneval.prompt: 1}; {} = caption_key uniformly
    t2i_boxes: str = ""  # field of the captions records holding the objects' boxes (synthetic scenes: "boxes")
    t2i_box_weight: float = 1.0  # loss weight of the image targets in cells those boxes overlap (1: no weighting)
    t2i_onset_weight: float = 1.0  # loss weight of each box's first cell in raster order (`onset_cells`; 1: none)
    t2i_repeat: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # oversample kinds of record for "t2i":
    # field -> {value: times}, e.g. {geneval.tag: {counting: 3, position: 3}} (`load_captions(repeat=...)`)
    template: str = "chat_template"
    max_length: int = 2048
    prompt: str = GENERATION_PROMPT
    cfg_dropout: float = 0.1
    num_samples: int = 0  # per epoch; 0 = the sum of the sources' lengths
    seed: int = 0


def build_dataset(config: DataConfig, tokenizer, vocab: VisualVocab, semhitok_dir: str | Path,
                  system: str | None = "") -> MixtureDataset:  # fmt: skip
    """The stage's MixtureDataset. The code cache must have been made with the SemHiTok checkpoint `semhitok_dir`;
    `system`: the system prompt of every conversation (`MLLMConfig.system_prompt`)."""
    mix = dict(config.mix) or dict(STAGE_MIXES.get(config.stage, {}))
    if not mix:
        raise ValueError(f"unknown stage {config.stage!r}; known: {sorted(STAGE_MIXES)} (or set data.mix)")
    unknown = sorted(set(mix) - set(SOURCE_FILES))
    if unknown:
        raise ValueError(f"unknown data sources {unknown}; known: {sorted(SOURCE_FILES)}")
    codes = CodeCache(config.codes, tokenizer=semhitok_dir)
    builder = SampleBuilder(tokenizer, vocab, codes, config.template, config.max_length, config.prompt, system)
    sources = {name: _make_source(name, config, builder) for name in mix}
    return MixtureDataset(sources, mix, config.num_samples or None, config.seed)


def _make_source(name: str, config: DataConfig, builder: SampleBuilder) -> _Source:
    path = getattr(config, SOURCE_FILES[name])
    if not path:
        raise ValueError(f"the data mix uses source {name!r}: set data.{SOURCE_FILES[name]}")
    if name == "conversation":
        return ConversationDataset(path, builder)
    if name == "caption":
        return CaptionDataset(load_captions(path, caption_key=config.caption_key), builder, config.seed)
    weighted = config.t2i_box_weight != 1.0 or config.t2i_onset_weight != 1.0
    if weighted and not config.t2i_boxes:
        raise ValueError("data.t2i_box_weight / t2i_onset_weight need data.t2i_boxes: the captions field that holds "
                         "the boxes")  # fmt: skip
    pairs = load_captions(path, caption_key=config.caption_key, sources=dict(config.t2i_captions) or None,
                          boxes_key=config.t2i_boxes, repeat=config.t2i_repeat)  # fmt: skip
    if weighted and not any(p.boxes for p in pairs):
        raise ValueError(f"data.t2i_boxes: no record of {path} has boxes in {config.t2i_boxes!r} (rendered before "
                         "scenes.jsonl recorded them? render the data again)")  # fmt: skip
    return TextToImageDataset(pairs, builder, config.cfg_dropout, config.seed, config.t2i_box_weight,
                              config.t2i_onset_weight)
