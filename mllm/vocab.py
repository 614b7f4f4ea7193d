"""`VisualVocab`: the one mapping between SemHiTok codes and LLM ids, and the layout of image segments.

LLM id space (DESIGN §1, §4):

    [0, offset)                 text ids: the text tokenizer incl. its added tokens and our three specials
                                `<boi>`, `<eoi>`, `<image>` (+ any padding rows the LLM's embedding already had)
    [offset, offset + K*m)      image ids: id = offset + i*m + j for semantic code i in [0, K), texture j in [0, m)

Decision: image ids live OUTSIDE the text tokenizer. Only the three specials are added to it; adding K*m (196,608 in
the paper) added tokens would make the tokenizer slow to load and match, and nothing would use them: image ids are
never produced from text, their input embeddings come from the adapter and their logits from the image head, so the
LLM's embedding matrix only grows by the specials. `offset` is the first id past both the tokenizer and the LLM's
embedding rows, so no image id can ever alias a text row.

Image segments: generation targets are `<boi> ids <eoi>`; an `<image>` placeholder in an understanding prompt is
expanded to the same segment (or to the bare ids when `wrap_understanding` is False) by `expand_placeholders`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mllm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from semhitok import TokenGrid
from semhitok.runtime import from_dict, to_dict

BOI_TOKEN, EOI_TOKEN = "<boi>", "<eoi>"


class VocabError(ValueError):
    """Ids outside their range, or a tokenizer/model that does not match the saved vocabulary."""


@dataclass(frozen=True)
class VisualVocab:
    """K*m image ids past the text vocabulary, plus the ids of `<boi>`, `<eoi>` and the `<image>` placeholder.
    Build it with `create(tokenizer, K, m)`; save/load it with `save` / `load` (vocab.json). Every field is required."""

    K: int
    m: int
    offset: int  # first image id = number of text ids (rows of the LLM's resized embedding matrix)
    boi_token: str
    eoi_token: str
    image_token: str
    boi_id: int
    eoi_id: int
    image_token_id: int
    wrap_understanding: bool  # (choice) understanding images are `<boi> ids <eoi>` like generated ones

    def __post_init__(self) -> None:
        specials = (self.boi_id, self.eoi_id, self.image_token_id)
        if self.K < 1 or self.m < 1:
            raise VocabError(f"K and m must be >= 1, got K={self.K}, m={self.m}")
        if len(set(specials)) != 3 or not all(0 <= s < self.offset for s in specials):
            raise VocabError(f"special ids {specials} must be distinct text ids in [0, offset={self.offset})")

    # ---------------------------------------------------------------- building

    @classmethod
    def create(cls, tokenizer, K: int, m: int, min_offset: int = 0, wrap_understanding: bool = True) -> VisualVocab:
        """Add `<boi>`, `<eoi>`, `<image>` to `tokenizer` (in place, idempotent) and place the image ids after it.
        min_offset: the LLM's current embedding rows, so image ids start past them too."""
        tokens = (BOI_TOKEN, EOI_TOKEN, IMAGE_PLACEHOLDER)
        ids = _add_specials(tokenizer, tokens)
        return cls(K, m, max(len(tokenizer), min_offset), *tokens, *ids, wrap_understanding)

    def extend_tokenizer(self, tokenizer):
        """Add the specials to a freshly loaded text tokenizer and check it gives the saved ids. Returns it."""
        ids = _add_specials(tokenizer, (self.boi_token, self.eoi_token, self.image_token))
        if ids != (self.boi_id, self.eoi_id, self.image_token_id) or len(tokenizer) > self.offset:
            raise VocabError(
                f"tokenizer {type(tokenizer).__name__} gives special ids {ids} and {len(tokenizer)} tokens, but this "
                f"vocabulary has {(self.boi_id, self.eoi_id, self.image_token_id)} and offset {self.offset}: "
                "it is not the text tokenizer the model was built with"
            )
        return tokenizer

    def resize_model(self, model) -> None:
        """Resize an HF causal LM's input (and untied output) embeddings to exactly `offset` rows; new rows use
        HF's mean initialisation. Raises VocabError if the model already has more rows (built for another vocab)."""
        rows = model.get_input_embeddings().num_embeddings
        if rows > self.offset:
            raise VocabError(f"the LLM has {rows} embedding rows, more than this vocabulary's offset {self.offset}")
        if rows < self.offset:
            model.resize_token_embeddings(self.offset)
        out = model.get_output_embeddings()
        if out is not None and out.weight.shape[0] != self.offset:
            rows = out.weight.shape[0]
            raise VocabError(f"output embeddings have {rows} rows after resizing, expected {self.offset}")

    # ---------------------------------------------------------------- ids <-> codes

    @property
    def num_image_ids(self) -> int:
        return self.K * self.m

    @property
    def image_id_range(self) -> tuple[int, int]:
        """[start, stop) of image ids."""
        return self.offset, self.offset + self.num_image_ids

    @property
    def special_ids(self) -> tuple[int, int, int]:
        return self.boi_id, self.eoi_id, self.image_token_id

    def is_image_id(self, ids: Tensor) -> Tensor:
        """(…) int64 -> (…) bool: id is in the image range."""
        start, stop = self.image_id_range
        return (ids >= start) & (ids < stop)

    def ids_to_index(self, ids: Tensor) -> Tensor:
        """Image ids (…) -> flat code index f = i*m + j in [0, K*m) (…): the image head's class. Checked."""
        self._check_image_ids(ids)
        return ids - self.offset

    def index_to_ids(self, index: Tensor) -> Tensor:
        """Flat code index (…) in [0, K*m) -> image ids (…)."""
        if index.numel() and (index.min() < 0 or index.max() >= self.num_image_ids):
            got = f"[{int(index.min())}, {int(index.max())}]"
            raise VocabError(f"image code index out of [0, {self.num_image_ids}): {got}")
        return index + self.offset

    def split(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Image ids (…) -> (semantic i (…) in [0, K), texture j (…) in [0, m))."""
        return TokenGrid.split_index(self.ids_to_index(ids), self.m)

    def join(self, semantic: Tensor, texture: Tensor) -> Tensor:
        """(semantic i, texture j), same shape, int64 -> image ids."""
        for name, value, n in (("semantic", semantic, self.K), ("texture", texture, self.m)):
            if value.numel() and (value.min() < 0 or value.max() >= n):
                raise VocabError(f"{name} indices must be in [0, {n}), got [{int(value.min())}, {int(value.max())}]")
        return self.index_to_ids(TokenGrid.flat_index(semantic, texture, self.m))

    def to_ids(self, grid: TokenGrid) -> Tensor:
        """TokenGrid (B, h, w) -> image ids (B, h*w) int64 in raster order."""
        return self.join(grid.semantic, grid.texture).flatten(1)  # (B, h*w)

    def from_ids(self, ids: Tensor, h: int, w: int) -> TokenGrid:
        """Image ids (B, h*w) in raster order -> TokenGrid (B, h, w). VocabError names the valid range."""
        if ids.ndim != 2 or ids.shape[1] != h * w:
            raise VocabError(f"expected image ids of shape (B, {h * w}) for a {h}x{w} grid, got {tuple(ids.shape)}")
        return TokenGrid.from_flat(self.ids_to_index(ids.long()).view(-1, h, w), self.m)

    def _check_image_ids(self, ids: Tensor) -> None:
        bad = ~self.is_image_id(ids)
        if bad.any():
            start, stop = self.image_id_range
            raise VocabError(f"ids {ids[bad][:8].tolist()} are not image ids; valid image ids are [{start}, {stop})")

    # ---------------------------------------------------------------- sequence layout

    def segment(self, image_ids: Tensor) -> Tensor:
        """Image ids (n, P) -> `<boi> ids <eoi>` rows (n, P + 2)."""
        n = image_ids.shape[0]
        boi, eoi = (image_ids.new_full((n, 1), t) for t in (self.boi_id, self.eoi_id))
        return torch.cat([boi, image_ids, eoi], dim=1)

    def expand_placeholders(
        self, input_ids: Tensor, labels: Tensor | None, image_ids: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Replace each `<image>` placeholder of ONE sample by its image's segment (labels: IGNORE_INDEX there).

        input_ids, labels: (L,) int64; image_ids: (n, P) = `to_ids(grid)`, one row per placeholder in order.
        Returns (L + n*(S-1),) ids and labels, S = P + 2 if `wrap_understanding` else P."""
        is_placeholder = input_ids == self.image_token_id  # (L,)
        n = int(is_placeholder.sum())
        if n != image_ids.shape[0]:
            raise VocabError(f"{n} {self.image_token} placeholders but {image_ids.shape[0]} images")
        segments = self.segment(image_ids) if self.wrap_understanding else image_ids  # (n, S)
        counts = torch.where(is_placeholder, segments.shape[1], 1)  # (L,)
        spread = is_placeholder.repeat_interleave(counts)  # (L',) True where a segment goes
        ids = input_ids.repeat_interleave(counts).masked_scatter(spread, segments.flatten())
        if labels is not None:
            labels = labels.repeat_interleave(counts).masked_fill(spread, IGNORE_INDEX)
        return ids, labels

    # ---------------------------------------------------------------- serialisation

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(to_dict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> VisualVocab:
        """Strict: unknown or missing keys raise ConfigError naming them."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"missing {path.name} in {path.parent}")
        return from_dict(cls, json.loads(path.read_text()))


def _add_specials(tokenizer, tokens: tuple[str, ...]) -> tuple[int, ...]:
    """Add `tokens` as special added tokens (no-op for those present); each must then encode to one id."""
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in tokens)
    for token, token_id in zip(tokens, ids, strict=True):
        if tokenizer(token, add_special_tokens=False)["input_ids"] != [token_id]:
            raise VocabError(f"{token!r} does not encode to the single id {token_id} with {type(tokenizer).__name__}")
    return ids
