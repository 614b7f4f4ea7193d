"""`SemHiTokLM`: any Hugging Face causal LM wrapped (never forked) with SemHiTok's visual vocabulary (DESIGN §4).

Parts around the LLM, all in this file:
    DualMLPAdapter   (emb_sem, emb_pix) code vectors -> one LLM embedding per patch; the SAME adapter embeds image ids
                     for understanding (expanded `<image>` placeholders) and generation (ids inside `<boi> … <eoi>`)
    FlatImageHead / FactorizedImageHead   hidden -> K*m image logits (flat), or i over K then j over m given i
    SpecialRows      trainable embedding / output rows of `<boi>`, `<eoi>`, `<image>` that override the LLM's rows,
                     so the new tokens train even when the LLM is frozen or LoRA-adapted
    image_embedding  (`image_input: embedding | both`, an option; the adapter alone is the default, the paper's design)
                     an own trainable input row per image id, instead of / added to the adapter's output
    image_position   (`image_position: true`, an option) a trainable row per grid cell (H*W x D, starts at 0) added to
                     every image id's input embedding: which cell of the raster a token fills (1-D RoPE only says
                     how far apart two tokens are, not in which column or row they sit)
The code vectors of all K*m image ids are copied once from the SemHiTok checkpoint into frozen buffers: training never
runs the tokenizer. Text ids use the LLM's own embedding and lm_head; image ids are inline in `input_ids`
(`VisualVocab`), so one masked scatter places every image embedding. Losses are computed on the labelled positions
only, in checkpointed chunks, so (B, L, K*m) logits never exist.

The LLM is only touched through generic HF APIs (`get_input_embeddings`, `get_output_embeddings`, `get_decoder`,
`resize_token_embeddings`, `gradient_checkpointing_enable`), so Llama/Vicuna, Qwen2/2.5 and SmolLM2 share every line.
(Models that post-process logits after lm_head, e.g. Gemma-2 soft-capping, are not special-cased.)

Checkpoint folder (`save_pretrained`): mllm_config.json, vocab.json, mllm_parts.safetensors (adapter, head, special
rows, image rows), lora/ (PEFT adapter, when LoRA trains) or llm/ (whole HF model and its text tokenizer, when the LLM trains
fully). The base LLM and the SemHiTok checkpoint are referenced by path, not copied; relative paths in a saved
mllm_config.json are relative to its folder. `export_merged` writes a plain HF folder (LoRA merged, special rows
written in, extended tokenizer) plus our parts.

Remote code: `MLLMConfig.trust_remote_code` is a training option (`from_config`). A loaded checkpoint's own field never
turns it on: `from_pretrained` runs code shipped with a checkpoint only when its caller passes trust_remote_code=True
(the scripts' --trust-remote-code), and refuses a checkpoint that asks for it without that opt-in.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutputWithPast

from mllm.assets import resolve_reference
from mllm.constants import IGNORE_INDEX
from mllm.kernels import FusedDecoder, can_pack, fusion_blocker, pack_linears
from mllm.text_tokenizer import load_text_tokenizer
from mllm.vocab import VisualVocab, VocabError
from semhitok import SemHiTok, TokenGrid
from semhitok.runtime import ConfigError, atomic_folder, from_dict, save_config, to_dict

CONFIG_NAME, VOCAB_NAME, PARTS_NAME = "mllm_config.json", "vocab.json", "mllm_parts.safetensors"
LORA_DIR, LORA_WEIGHTS, LLM_DIR = "lora", "adapter_model.safetensors", "llm"  # LORA_WEIGHTS: PEFT's file name


# ---------------------------------------------------------------------------------------------------- config


class RemoteCodeError(ValueError):
    """A checkpoint asks to run its own Python code (trust_remote_code) and the caller did not opt in."""


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA on the LLM (used when `train_llm == "lora"`)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"  # PEFT's "all-linear" skips the output layer


@dataclass(frozen=True)
class MLLMConfig:
    """The wrapped model: which LLM and tokenizer checkpoint, adapter and head shapes, and what trains.

    image_input: what embeds an image id. "adapter" (default, the paper's design): the dual-MLP adapter on its frozen
    code vectors. "embedding": an own trainable row per image id (K*m x hidden parameters, e.g. 0.8 B for 196,608 ids
    at 4096), initialised to the adapter's output on the code table; the adapter then does not train. "both": the
    adapter's output + an own row initialised to 0. The rows train with `train_adapter` whatever `train_llm` is
    (frozen, lora, full) and are saved with the other parts (mllm_parts.safetensors, also in export_merged).
    system_prompt: the system prompt every conversation is rendered with, in training (the data) and inference (chat,
    generate, lmms-eval, GenEval): "" none (a default the chat template injects is removed), null the template's own
    default (what checkpoints saved before this key were trained with), other text that prompt.
    image_position: add a trainable embedding of the token's grid cell (row-major place in its image, H*W rows of D)
    to each image id's input embedding, in understanding and generation alike; it trains with `train_adapter`.
    image_position_init: where those rows start: "zeros" (a model gaining them starts as it was) or "sincos" (a 2D
    sine-cosine code of (row, column), `grid_sincos`, each row of norm 1: the cell is readable from the first step).
    Only a model that gains the rows uses it; saved rows load over it."""

    llm: str  # local HF folder of the base causal LM
    semhitok: str  # SemHiTok checkpoint folder (config.json + model.safetensors)
    image_grid: tuple[int, int] | None = None  # (h, w) token grid of that SemHiTok; None: taken from it when built
    text_tokenizer: str = ""  # local tokenizer folder; "" = the llm folder
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False  # training: let transformers run the base LLM's own code (never read on load)
    adapter_width_sem: int = 256  # width of mlp_sem
    adapter_width_pix: int = 64  # width of mlp_pix
    head: Literal["flat", "factorized"] = "flat"
    head_width: int = 0  # factorized: width of the texture branch; 0 = the LLM's hidden size
    loss_chunk_size: int = 1024  # labelled positions per checkpointed loss chunk
    wrap_understanding_images: bool = True  # understanding images are `<boi> ids <eoi>` too (else bare ids)
    image_input: Literal["adapter", "embedding", "both"] = "adapter"  # what embeds image ids (see the class doc)
    system_prompt: str | None = ""  # of every conversation, training and inference: "" none, null the template's own
    image_position: bool = False  # + a trainable embedding of each image id's grid cell (see the class doc)
    image_position_init: Literal["zeros", "sincos"] = "zeros"  # where those rows start (see the class doc)
    train_adapter: bool = True
    train_head: bool = True
    train_special_tokens: bool = True
    train_llm: Literal["frozen", "full", "lora"] = "frozen"
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.loss_chunk_size < 1 or self.head_width < 0:
            got = f"{self.loss_chunk_size}, {self.head_width}"
            raise ValueError(f"loss_chunk_size must be >= 1 and head_width >= 0, got {got}")
        if self.image_grid is not None and (len(self.image_grid) != 2 or min(self.image_grid) < 1):
            raise ValueError(f"image_grid must be (h, w) with h, w >= 1, got {self.image_grid}")


ADDED_KEYS = ("image_grid",)  # newer than some saved checkpoints: filled from their SemHiTok when they load
# Keys newer than some saved checkpoints, with what those checkpoints were trained with (not today's default): the
# image ids went through the adapter only (no grid-cell rows), and conversations carried the template's default system
# prompt.
LEGACY_VALUES: Mapping[str, object] = MappingProxyType({"image_input": "adapter", "system_prompt": None,
                                                        "image_position": False, "image_position_init": "zeros"})  # fmt: skip


def read_config(path: Path) -> MLLMConfig:
    """Strict load of a saved mllm_config.json: unknown, missing or mistyped keys raise ConfigError naming them
    (keys a checkpoint predates get its LEGACY_VALUES)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    data = json.loads(path.read_text())
    data = {**LEGACY_VALUES, **data} if isinstance(data, dict) else data
    config = from_dict(MLLMConfig, data)
    missing = [k for k in _missing_keys(to_dict(config), data) if k not in ADDED_KEYS]
    if missing:  # a default silently filling a saved key would change the model
        raise ConfigError(f"{path}: missing key(s) {missing}")
    return config


def _missing_keys(full: Mapping, data: Mapping, where: str = "") -> list[str]:
    missing = []
    for key, value in full.items():
        if key not in data:
            missing.append(where + key)
        elif isinstance(value, Mapping) and isinstance(data[key], Mapping):
            missing += _missing_keys(value, data[key], f"{where}{key}.")
    return missing


def _paths(config: MLLMConfig, resolve: Callable[[str], str]) -> MLLMConfig:
    """Apply `resolve` to every non-empty path field."""
    fields = ("llm", "semhitok", "text_tokenizer")
    return replace(config, **{f: resolve(getattr(config, f)) for f in fields if getattr(config, f)})


def _absolute(config: MLLMConfig) -> MLLMConfig:
    return _paths(config, lambda p: str(Path(p).resolve()))


# ---------------------------------------------------------------------------------------------------- parts


def _mlp(d_in: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, width))


class DualMLPAdapter(nn.Module):
    """(emb_sem (…, d_sem), emb_pix (…, d_pix)) -> (…, hidden): concat(mlp_sem, mlp_pix) -> Linear to the LLM."""

    def __init__(self, d_sem: int, d_pix: int, width_sem: int, width_pix: int, hidden: int):
        super().__init__()
        self.mlp_sem, self.mlp_pix = _mlp(d_sem, width_sem), _mlp(d_pix, width_pix)
        self.proj = nn.Linear(width_sem + width_pix, hidden)

    def forward(self, emb_sem: Tensor, emb_pix: Tensor) -> Tensor:
        return self.proj(torch.cat([self.mlp_sem(emb_sem), self.mlp_pix(emb_pix)], dim=-1))


Choose = Callable[[Tensor], Tensor]  # class logits (G*R, C) -> (R,) int64 classes: the sampler's guide + draw


class ImageHead(Protocol):
    """What the model and the sampler use of an image head; its classes are flat code indices f in [0, K*m)."""

    def logits(self, hidden: Tensor) -> Tensor:
        """(…, D) -> (…, K*m) logits in flat index order."""

    def level_nll(self, hidden: Tensor, index: Tensor) -> Tensor:
        """(N, D) hidden states, flat code indices (N,) -> (N, 2) float32 per-token NLL split by level: -log p(i)
        (semantic code) and -log p(j | i) (texture code); their sum is the token's NLL."""

    def sample(self, hidden: Tensor, choose: Choose) -> Tensor:
        """hidden (G*R, D): G groups of rows continuing the same R images (e.g. conditional, then unconditional rows)
        -> flat code indices (R,) int64, every class decision made by `choose` on logits of all G*R rows."""


class FlatImageHead(nn.Module):
    """hidden (…, D) -> logits over all K*m image codes, class = flat index f (`TokenGrid.flat_index`)."""

    def __init__(self, hidden: int, K: int, m: int):  # noqa: N803 (glossary names)
        super().__init__()
        self.K, self.m = K, m
        self.proj = nn.Linear(hidden, K * m, bias=False)

    def logits(self, hidden: Tensor) -> Tensor:
        """(…, D) -> (…, K*m)."""
        return self.proj(hidden)

    def level_nll(self, hidden: Tensor, index: Tensor) -> Tensor:
        """(N, 2) -log p(i), -log p(j | i) from the joint logits (see `ImageHead.level_nll`): with lse the
        log-normaliser over all K*m and lse_i over the m codes of row i, -log p(i) = lse - lse_i and
        -log p(j | i) = lse_i - logit(i, j) (nothing but the logits and (N, m) materialised)."""
        logits = self.logits(hidden).float()  # (N, K*m)
        i, _ = TokenGrid.split_index(index, self.m)
        rows = torch.arange(len(index), device=index.device)
        lse_i = logits.unflatten(-1, (self.K, self.m))[rows, i].logsumexp(-1)  # (N,)
        return torch.stack([logits.logsumexp(-1) - lse_i, lse_i - logits[rows, index]], dim=-1)

    def sample(self, hidden: Tensor, choose: Choose) -> Tensor:
        """One choice over all K*m codes (see `ImageHead.sample`)."""
        return choose(self.logits(hidden))


class FactorizedImageHead(nn.Module):
    """p(i, j | h) = p(i | h) p(j | h, i): i over K, then j over m from h + an embedding of i (head ≈ m× smaller)."""

    def __init__(self, hidden: int, K: int, m: int, width: int):  # noqa: N803
        super().__init__()
        self.m = m
        self.semantic = nn.Linear(hidden, K, bias=False)
        self.texture_in = nn.Linear(hidden, width)
        self.semantic_embed = nn.Embedding(K, width)
        self.texture_out = nn.Linear(width, m)

    def semantic_logits(self, hidden: Tensor) -> Tensor:
        """(…, D) -> (…, K)."""
        return self.semantic(hidden)

    def texture_logits(self, hidden: Tensor, semantic: Tensor) -> Tensor:
        """(…, D), semantic codes (…) int64 -> (…, m) logits of j given i."""
        return self.texture_out(F.gelu(self.texture_in(hidden) + self.semantic_embed(semantic)))

    def logits(self, hidden: Tensor) -> Tensor:
        """(…, D) -> (…, K*m) joint log-probabilities log p(i) + log p(j | i) (valid logits; memory O(K*width))."""
        every_i = torch.arange(self.semantic_embed.num_embeddings, device=hidden.device)
        log_j = self.texture_logits(hidden.unsqueeze(-2), every_i).log_softmax(-1)  # (…, K, m)
        log_i = self.semantic_logits(hidden).log_softmax(-1).unsqueeze(-1)  # (…, K, 1)
        return (log_i + log_j).flatten(-2)  # (…, K*m): (K, m) row-major is flat index order

    def level_nll(self, hidden: Tensor, index: Tensor) -> Tensor:
        """(N, 2) -log p(i), -log p(j | i): the two cross-entropies (see `ImageHead.level_nll`)."""
        i, j = TokenGrid.split_index(index, self.m)
        loss_i = F.cross_entropy(self.semantic_logits(hidden).float(), i, reduction="none")
        return torch.stack([loss_i, F.cross_entropy(self.texture_logits(hidden, i).float(), j, reduction="none")], -1)

    def sample(self, hidden: Tensor, choose: Choose) -> Tensor:
        """i chosen from the semantic logits, then j from the texture logits given that i (every group of rows is
        given the same i) -> flat indices (R,) (see `ImageHead.sample`)."""
        i = choose(self.semantic_logits(hidden))  # (R,)
        given = i.repeat(hidden.shape[0] // i.shape[0])  # (G*R,)
        return TokenGrid.flat_index(i, choose(self.texture_logits(hidden, given)), self.m)


IMAGE_HEADS: Mapping[str, Callable[..., ImageHead]] = MappingProxyType({
    "flat": lambda config, hidden, K, m: FlatImageHead(hidden, K, m),  # noqa: N803
    "factorized": lambda config, hidden, K, m: FactorizedImageHead(hidden, K, m, config.head_width or hidden),  # noqa: N803
})  # fmt: skip


def build_image_head(config: MLLMConfig, hidden: int, K: int, m: int) -> nn.Module:  # noqa: N803
    """The image head `config.head` names (`IMAGE_HEADS`); ConfigError for any other name."""
    if config.head not in IMAGE_HEADS:
        raise ConfigError(f"head: {config.head!r} is not one of {sorted(IMAGE_HEADS)}")
    return IMAGE_HEADS[config.head](config, hidden, K, m)


def chunked_loss(loss_sum: Callable[..., Tensor], hidden: Tensor, target: Tensor, chunk_size: int, *per_row: Tensor
                 ) -> Tensor:  # fmt: skip
    """Σ loss_sum(hidden_c, target_c, *per_row_c) over row chunks of hidden (N, D), target (N,) and any further
    (N, …) tensors -> float32 sum (a scalar, or whatever shape loss_sum returns, e.g. several sums at once).

    Each chunk is activation-checkpointed: its logits are recomputed in backward, so memory stays
    O(chunk_size × classes) instead of O(N × classes)."""
    total: Tensor | float = 0.0
    for chunk in zip(*(x.split(chunk_size) for x in (hidden, target, *per_row)), strict=True):  # no rows: 1 empty chunk
        out = checkpoint(loss_sum, *chunk, use_reentrant=False) if torch.is_grad_enabled() else loss_sum(*chunk)
        total = total + out.float()
    return total


class SpecialRows(nn.Module):
    """Own input/output rows for the special ids, overriding the LLM's rows for them (one matrix when it ties them).
    Initialised from the LLM's (resized) rows, so the model is unchanged until they train."""

    def __init__(self, ids: tuple[int, ...], embedding: nn.Embedding, output: nn.Module | None):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, device=embedding.weight.device), persistent=False)
        self.embed = nn.Parameter(embedding.weight.detach()[self.ids].clone())  # (n, D)
        tied = output is None or output.weight is embedding.weight
        self.head = None if tied else nn.Parameter(output.weight.detach()[self.ids].clone())  # (n, D)

    def into_embeds(self, input_ids: Tensor, embeds: Tensor) -> Tensor:
        """Replace the embeddings (B, L, D) at special ids (B, L)."""
        match = input_ids.unsqueeze(-1) == self.ids  # (B, L, n)
        return torch.where(match.any(-1, keepdim=True), match.to(embeds.dtype) @ self.embed, embeds)

    def into_logits(self, hidden: Tensor, logits: Tensor, bias: Tensor | None) -> Tensor:
        """Replace the special columns of text logits (…, V) computed from hidden (…, D); `bias`: lm_head's."""
        special = hidden @ (self.embed if self.head is None else self.head).T  # (…, n)
        special = special if bias is None else special + bias[self.ids]
        return logits.index_copy(-1, self.ids, special.to(logits.dtype))

    @torch.no_grad()
    def write_into(self, embedding: nn.Embedding, output: nn.Module | None) -> None:
        """Copy the rows into an LLM's own matrices (for a plain exported model)."""
        embedding.weight[self.ids] = self.embed.to(embedding.weight.dtype)
        if self.head is not None:
            output.weight[self.ids] = self.head.to(output.weight.dtype)


def grid_sincos(h: int, w: int, dim: int, norm: float = 1.0) -> Tensor:
    """(h*w, dim) float32, row-major: a 2D sine-cosine code of each cell's (row, column), a quarter of the dims each
    for sin / cos of the row and of the column (any remainder 0), at angular frequencies from pi (period 2 cells) down
    to pi / (2 max(h, w)) (period 4 max(h, w): monotone across the grid), geometric; every row has norm `norm`."""
    quarter = dim // 4
    if quarter < 1:
        raise ValueError(f"grid_sincos needs dim >= 4, got {dim}")
    n = max(h, w)
    omega = math.pi * (1 / (2 * n)) ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    r, c = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega  # (h*w, quarter)
    code = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=-1) * (norm / math.sqrt(2 * quarter))
    return F.pad(code, (0, dim - 4 * quarter)).float()


def image_cells(image: Tensor) -> Tensor:
    """Image-id mask (B, L) bool -> (B, L) int64: each image id's place in its run of consecutive image ids (0 at the
    run's first; an image's ids are one run between `<boi>` and `<eoi>`), 0 at other positions."""
    place = torch.arange(image.shape[-1], device=image.device).expand_as(image)
    starts = image & ~F.pad(image[:, :-1], (1, 0), value=False)
    return torch.where(image, place - torch.where(starts, place, 0).cummax(-1).values, 0)


def check_codes(vocab: VisualVocab, semhitok: SemHiTok, semhitok_dir: str, where: str) -> None:
    """The image ids/head of `where` and the SemHiTok checkpoint must agree on K and m."""
    K, m = semhitok.config.K, semhitok.config.m  # noqa: N806
    if (vocab.K, vocab.m) != (K, m):
        raise VocabError(
            f"{where} has K*m = {vocab.K}*{vocab.m} = {vocab.num_image_ids} image codes, but the SemHiTok checkpoint "
            f"{semhitok_dir} has K*m = {K}*{m} = {K * m}: the image ids and head were built for another tokenizer"
        )


def with_image_grid(config: MLLMConfig, semhitok: SemHiTok) -> MLLMConfig:
    """`config` with image_grid = the (h, w) token grid of `semhitok`; VocabError if it already names another one."""
    grid = (semhitok.config.grid, semhitok.config.grid)
    if config.image_grid is not None and tuple(config.image_grid) != grid:
        raise VocabError(f"the model was built for a {config.image_grid} token grid, but the SemHiTok checkpoint "
                         f"{config.semhitok} has a {grid} grid: it is another tokenizer")  # fmt: skip
    return replace(config, image_grid=grid)


# ---------------------------------------------------------------------------------------------------- model


class SemHiTokLM(nn.Module):
    """An HF causal LM + dual-MLP adapter + image head + special rows over one id space (`VisualVocab`).

    Build with `from_config(config)` (fresh parts) or `from_pretrained(folder)`. `llm` is the HF model, or a PEFT
    model around it when LoRA trains; `causal_lm` is always the HF model."""

    def __init__(self, config: MLLMConfig, llm: nn.Module, vocab: VisualVocab, semhitok: SemHiTok):
        super().__init__()
        check_codes(vocab, semhitok, config.semhitok, "the visual vocabulary")
        if vocab.wrap_understanding != config.wrap_understanding_images:
            raise VocabError("vocab.wrap_understanding and config.wrap_understanding_images differ")
        self.config, self.vocab = with_image_grid(config, semhitok), vocab
        vocab.resize_model(llm)
        dtype, hidden = getattr(torch, config.dtype), llm.get_input_embeddings().embedding_dim
        emb_sem, emb_pix = semhitok.code_table()  # code vectors of every image id, in flat index order
        self.register_buffer("code_sem", emb_sem.to("cpu", dtype), persistent=False)  # (K*m, d_sem), frozen
        self.register_buffer("code_pix", emb_pix.to("cpu", dtype), persistent=False)  # (K*m, d_pix), frozen
        d_sem, d_pix = emb_sem.shape[1], emb_pix.shape[1]
        self.adapter = DualMLPAdapter(d_sem, d_pix, config.adapter_width_sem, config.adapter_width_pix, hidden)
        self.head = build_image_head(config, hidden, vocab.K, vocab.m)
        self.special = SpecialRows(vocab.special_ids, llm.get_input_embeddings(), llm.get_output_embeddings())
        rows = config.image_input != "adapter"
        self.image_embedding = nn.Embedding(vocab.num_image_ids, hidden) if rows else None  # (K*m, D) image_input
        cells = self.config.image_grid[0] * self.config.image_grid[1]
        self.image_position = nn.Embedding(cells, hidden) if config.image_position else None  # (H*W, D)
        if self.image_position is not None:
            with torch.no_grad():
                self.image_position.weight.copy_(grid_sincos(*self.config.image_grid, hidden)
                                                 if config.image_position_init == "sincos" else 0)  # fmt: skip
        trains = {"adapter": config.train_adapter and config.image_input != "embedding", "head": config.train_head,
                  "special": config.train_special_tokens, "image_embedding": config.train_adapter,
                  "image_position": config.train_adapter}  # fmt: skip
        for name, part in self.parts().items():
            part.to(dtype).requires_grad_(trains[name])
        self.init_image_embedding()
        self.llm = self._prepare_llm(llm)
        self.fused_decoder: FusedDecoder | None = None  # set by prepare_for_decoding where it applies

    def _prepare_llm(self, llm: nn.Module) -> nn.Module:
        c = self.config
        if c.gradient_checkpointing:
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        llm.requires_grad_(c.train_llm == "full")
        if c.train_llm != "lora":
            return llm
        targets = c.lora.target_modules if isinstance(c.lora.target_modules, str) else list(c.lora.target_modules)
        lora = LoraConfig(r=c.lora.r, lora_alpha=c.lora.alpha, lora_dropout=c.lora.dropout, target_modules=targets,
                          task_type="CAUSAL_LM")  # fmt: skip
        with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(llm, lora)

    def parts(self) -> nn.ModuleDict:
        """Our trained parts (saved in mllm_parts.safetensors), keyed by their prefix there."""
        rows = {"image_embedding": self.image_embedding} if self.image_embedding is not None else {}
        cells = {"image_position": self.image_position} if self.image_position is not None else {}
        return nn.ModuleDict({"adapter": self.adapter, "head": self.head, "special": self.special, **rows, **cells})

    @torch.no_grad()
    def init_image_embedding(self, chunk: int = 4096) -> None:
        """Start the image rows where the adapter is: `embedding` rows = the adapter's output on the code table,
        `both` rows (added to it) = 0. A no-op without image rows (`image_input: adapter`)."""
        if self.image_embedding is None:
            return
        rows = self.image_embedding.weight  # (K*m, D)
        if self.config.image_input == "both":
            rows.zero_()
            return
        for start in range(0, len(rows), chunk):
            part = slice(start, start + chunk)
            rows[part] = self.adapter(self.code_sem[part].to(rows.device), self.code_pix[part].to(rows.device))

    @torch.no_grad()
    def prepare_for_decoding(self, device: torch.device, dtype: torch.dtype | None = None, fuse: bool = True) -> int:
        """Inference only (`load_for_inference`): LoRA is merged into the LLM's weights in their loaded precision
        (PEFT `merge_adapter`: one matmul per linear instead of three; the adapters stay, so the checkpoint would save
        as before), the model moves to `device` / `dtype` in eval mode and, on a CPU, every linear layer decoding runs
        is packed for oneDNN (`mllm.kernels`), the decoder body's into a `FusedDecoder` (Llama-family LLMs; `fuse`
        False keeps HF's layers, packed). Returns how many linear layers were packed (a fused layer's q, k, v, o,
        gate, up, down count 7); a packed model cannot train or be saved."""
        if isinstance(self.llm, PeftModel):
            self.llm.merge_adapter()
        self.to(device, dtype=dtype).eval()
        if not can_pack(device, self.causal_lm.get_input_embeddings().weight.dtype):
            return 0
        decoder, fused = self.causal_lm.get_decoder(), 0
        if fuse and fusion_blocker(decoder) is None:
            self.fused_decoder = FusedDecoder(decoder)
            fused = 7 * self.fused_decoder.move_weights(decoder)
        lora = [m for layer in self.modules() if isinstance(layer, LoraLayer) for m in (layer.lora_A, layer.lora_B)]
        return fused + pack_linears(self, skip=[m for branch in lora for m in branch.modules()])

    @property
    def causal_lm(self) -> nn.Module:
        """The HF causal LM (inside the PEFT wrapper when LoRA trains; LoRA layers are injected in place)."""
        return self.llm.get_base_model() if isinstance(self.llm, PeftModel) else self.llm

    # ---------------------------------------------------------------- building blocks (also for sampling)

    def embed(self, input_ids: Tensor) -> Tensor:
        """ids (B, L) int64, text or image -> inputs_embeds (B, L, D). Image ids go through the adapter on their
        code vectors and are placed by one masked scatter; special ids use the special rows."""
        self._check_input_ids(input_ids)
        image = self.vocab.is_image_id(input_ids)  # (B, L)
        embeds = self.causal_lm.get_input_embeddings()(input_ids.masked_fill(image, 0))  # (B, L, D)
        embeds = self.special.into_embeds(input_ids, embeds)
        cells = image_cells(image)[image] if self.image_position is not None else None
        feats = self.image_embeds(input_ids[image], cells)  # (N, D), row-major order of the True positions
        return embeds.masked_scatter(image.unsqueeze(-1), feats.to(embeds.dtype))

    def image_embeds(self, image_ids: Tensor, cells: Tensor | int | None = None) -> Tensor:
        """Image ids (…) -> embeddings (…, D) (`index_embeds` of their flat code indices; the ids are checked)."""
        return self.index_embeds(self.vocab.ids_to_index(image_ids), cells)

    def index_embeds(self, index: Tensor, cells: Tensor | int | None = None) -> Tensor:
        """Flat code indices (…) int64 in [0, K*m) -> embeddings (…, D): the adapter on their code vectors, their own
        rows (`image_input: embedding`), or both added; + the rows of their grid `cells` (… or one int: row-major
        places, taken modulo H*W) with `image_position`. Unchecked, so no host sync: the sampler feeds what it drew."""
        if self.image_embedding is not None and self.config.image_input == "embedding":
            feats = self.image_embedding(index)
        else:
            feats = self.adapter(self.code_sem[index], self.code_pix[index])
            feats = feats if self.image_embedding is None else feats + self.image_embedding(index)
        if self.image_position is None:
            return feats
        if cells is None:
            raise ValueError("image_position: index_embeds needs the grid cells of the image ids")
        weight = self.image_position.weight
        return feats + weight[cells % len(weight)]  # an int picks one row (no copy to the device per decoding step)

    def backbone(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                 past_key_values=None, use_cache: bool = False):  # fmt: skip
        """The LLM's decoder body -> HF BaseModelOutputWithPast: last_hidden_state (B, L, D) after the final norm,
        past_key_values (the cache when `use_cache`). After `prepare_for_decoding` on a CPU the fused decoder runs it
        (`mllm.kernels.FusedDecoder`: attention_mask then 2D, its own `KVCache`)."""
        if self.fused_decoder is not None:
            hidden, cache = self.fused_decoder(inputs_embeds, attention_mask, position_ids, past_key_values,
                                               extra_capacity=256 if use_cache else -1)  # fmt: skip
            return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)
        return self.causal_lm.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache,
        )  # fmt: skip

    def text_logits(self, hidden: Tensor) -> Tensor:
        """(…, D) -> (…, offset) logits over text ids, from the LLM's lm_head (special columns from SpecialRows)."""
        lm_head = self.causal_lm.get_output_embeddings()
        return self.special.into_logits(hidden, lm_head(hidden), getattr(lm_head, "bias", None))

    def image_logits(self, hidden: Tensor) -> Tensor:
        """(…, D) -> (…, K*m) image logits in flat index order (`vocab.index_to_ids` maps them to ids).
        Sampling draws through `head.sample` (`ImageHead`), which the factorized head does in two stages."""
        return self.head.logits(hidden)

    # ---------------------------------------------------------------- training

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                label_weights: Tensor | None = None) -> dict[str, Tensor]:  # fmt: skip
        """Training step, both directions. input_ids, labels (B, L) int64 with image ids inline (placeholders expanded,
        `VisualVocab.expand_placeholders` / `segment`); labels IGNORE_INDEX where nothing is learned, and labels[:, t]
        is predicted at t - 1 (HF convention); attention_mask (B, L) or None; label_weights (B, L) float, the weight
        of each image target in the weighted image means (None: all 1; `collate_lm`, e.g. object cells).
        Returns {"loss", "loss_text", "loss_image"}: token-mean CE over all / text / image targets (0 if none,
        unweighted), "loss_image_texture": the part of loss_image that is -log p(j | i) (texture given semantic code),
        {"n_text", "n_image"}: how many targets each mean is over (float scalars), and {"image_semantic",
        "image_texture"}: the label_weights-weighted means of -log p(i) and -log p(j | i) over the image targets (they
        sum to loss_image when the weights are equal; the objective weights them)."""
        hidden, target, text, image = self._teacher_forced(input_ids, attention_mask, labels)
        chunk = self.config.loss_chunk_size
        sum_text = chunked_loss(self._text_loss_sum, hidden[text], target[text], chunk)
        weights = (torch.ones_like(target, dtype=torch.float32) if label_weights is None
                   else label_weights[:, 1:].float())[image]  # fmt: skip
        index = self.vocab.ids_to_index(target[image])
        sem, tex, w_sem, w_tex = chunked_loss(self._image_loss_sums, hidden[image], index, chunk, weights)
        n_text, n_image, w_sum = text.sum(), image.sum(), weights.sum().clamp(min=1e-12)
        return {
            "loss": (sum_text + sem + tex) / (n_text + n_image).clamp(min=1),
            "loss_text": sum_text / n_text.clamp(min=1),
            "loss_image": (sem + tex) / n_image.clamp(min=1),
            "loss_image_texture": tex / n_image.clamp(min=1),
            "n_text": n_text.float(),
            "n_image": n_image.float(),
            "image_semantic": w_sem / w_sum,
            "image_texture": w_tex / w_sum,
        }

    def _image_loss_sums(self, hidden: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """(4,) Σ -log p(i), Σ -log p(j | i), and the same weighted by `weights` (N,) over the rows."""
        nll = self.head.level_nll(hidden, index)  # (N, 2)
        return torch.cat([nll.sum(0), (weights[:, None] * nll).sum(0)])

    @torch.no_grad()
    def sequence_nll(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor) -> dict[str, Tensor]:
        """Teacher-forced NLL per row (diagnostics, scoring answers): inputs as in `forward` -> {"text", "image"}: (B,)
        float32 NLL summed over each row's text / image targets, {"n_text", "n_image"}: (B,) int64 their counts.
        Rows are independent: a row scores the same alone or right-padded in a batch."""
        hidden, target, text, image = self._teacher_forced(input_ids, attention_mask, labels)
        rows = torch.arange(len(target), device=target.device)[:, None].expand_as(target)  # (B, L-1)
        per_token = F.cross_entropy(self.text_logits(hidden[text]).float(), target[text], reduction="none")  # (N,)
        text_nll = torch.zeros(len(target), device=target.device).index_add_(0, rows[text], per_token)
        image_nll = torch.stack([self.head.level_nll(h[m], self.vocab.ids_to_index(t[m])).sum()
                                 for h, t, m in zip(hidden, target, image, strict=True)])  # fmt: skip
        return {"text": text_nll, "n_text": text.sum(1), "image": image_nll, "n_image": image.sum(1)}

    @torch.no_grad()
    def image_token_nll(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor) -> list[Tensor]:
        """Teacher-forced NLL of every image target, split by level (diagnostics): inputs as in `forward` -> per row
        a (n_image, 2) float32 tensor in target order: -log p(i) (semantic code) and -log p(j | i) (texture code),
        whose sum is the token's NLL (`ImageHead.level_nll`)."""
        hidden, target, _, image = self._teacher_forced(input_ids, attention_mask, labels)
        return [self.head.level_nll(h[m], self.vocab.ids_to_index(t[m])) for h, t, m in zip(hidden, target, image, strict=True)]

    def _teacher_forced(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor) -> tuple[Tensor, ...]:
        """One pass of the decoder -> hidden (B, L-1, D) at positions t, their targets labels[:, t + 1] (B, L-1) and
        the (text, image) target masks (HF convention: position t predicts label t + 1)."""
        hidden = self.backbone(self.embed(input_ids), attention_mask).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        return (hidden, target, *self._target_masks(target))

    def _text_loss_sum(self, hidden: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self.text_logits(hidden).float(), target, reduction="sum")

    def _target_masks(self, target: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) labels -> (text, image) bool masks; any other non-ignored label is an error."""
        text, image = (target >= 0) & (target < self.vocab.offset), self.vocab.is_image_id(target)
        bad = ~(text | image | (target == IGNORE_INDEX))
        if bad.any():
            raise VocabError(f"labels {target[bad][:8].tolist()} are neither IGNORE_INDEX, text ids "
                             f"[0, {self.vocab.offset}) nor image ids {list(self.vocab.image_id_range)}")  # fmt: skip
        return text, image

    def _check_input_ids(self, input_ids: Tensor) -> None:
        start, stop = self.vocab.image_id_range
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= stop):
            got = f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            raise VocabError(f"input ids must be text ids [0, {start}) or image ids [{start}, {stop}), got {got}")
        if (input_ids == self.vocab.image_token_id).any():
            raise VocabError(f"input ids contain the {self.vocab.image_token} placeholder: expand it first with "
                             "VisualVocab.expand_placeholders")  # fmt: skip

    # ---------------------------------------------------------------- building and checkpoints

    @classmethod
    def from_config(cls, config: MLLMConfig, text_tokenizer=None, semhitok: SemHiTok | None = None) -> SemHiTokLM:
        """Fresh adapter/head around the base LLM. `text_tokenizer` (default: loaded from config.text_tokenizer or
        config.llm) is extended in place with `<boi>`, `<eoi>`, `<image>`; `semhitok` defaults to config.semhitok."""
        if semhitok is None:
            semhitok = SemHiTok.from_pretrained(config.semhitok)
        if text_tokenizer is None:
            text_tokenizer = load_text_tokenizer(config.text_tokenizer or config.llm)
        llm, (K, m) = _load_llm(config, config.trust_remote_code), (semhitok.config.K, semhitok.config.m)  # noqa: N806
        rows = llm.get_input_embeddings().num_embeddings
        vocab = VisualVocab.create(text_tokenizer, K, m, rows, config.wrap_understanding_images)
        return cls(config, llm, vocab, semhitok)

    @classmethod
    def from_pretrained(cls, directory: str | Path, semhitok: str | Path | None = None,
                        trust_remote_code: bool = False) -> SemHiTokLM:  # fmt: skip
        """Strict load of a `save_pretrained` / `export_merged` folder. `semhitok` overrides the tokenizer path.
        trust_remote_code: let transformers run Python code shipped with the checkpoint's LLM; the checkpoint's own
        field never does, and RemoteCodeError refuses a checkpoint whose field is true without this opt-in.
        Missing files, unknown/missing keys, K*m or grid mismatches and shape mismatches raise errors naming them.
        A checkpoint saved before mllm_config.json held `image_grid` gets it from its SemHiTok."""
        return cls.from_pretrained_with_semhitok(directory, semhitok, trust_remote_code)[0]

    @classmethod
    def from_pretrained_with_semhitok(cls, directory: str | Path, semhitok: str | Path | None = None,
                                      trust_remote_code: bool = False) -> tuple[SemHiTokLM, SemHiTok]:  # fmt: skip
        """`from_pretrained`, also returning the SemHiTok it loaded (to encode / decode images): loaded once."""
        folder = Path(directory)
        if not folder.is_dir():
            raise FileNotFoundError(f"SemHiTokLM checkpoint folder not found: {folder}")
        config = _paths(read_config(folder / CONFIG_NAME), lambda p: resolve_reference(p, folder))
        if config.trust_remote_code and not trust_remote_code:
            raise RemoteCodeError(f"{folder / CONFIG_NAME} asks to run Python code shipped with the checkpoint "
                                  "(trust_remote_code: true); refused: if you trust its source, pass "
                                  "--trust-remote-code (trust_remote_code=True in Python and lmms-eval "
                                  "model_args)")  # fmt: skip
        config = replace(config, semhitok=str(semhitok)) if semhitok is not None else config
        lora_file = [f"{LORA_DIR}/{LORA_WEIGHTS}"] if config.train_llm == "lora" else []
        for name in (VOCAB_NAME, PARTS_NAME, *lora_file):  # fail before loading anything large
            if not (folder / name).is_file():
                raise FileNotFoundError(f"missing {name} in {folder}")
        vocab = VisualVocab.load(folder / VOCAB_NAME)
        tok = SemHiTok.from_pretrained(config.semhitok)
        check_codes(vocab, tok, config.semhitok, f"the checkpoint {folder} (vocab.json, image head)")  # before the LLM
        config = with_image_grid(config, tok)
        model = cls(config, _load_llm(config, trust_remote_code), vocab, tok)
        model._load_parts(folder / PARTS_NAME)
        if config.train_llm == "lora":
            model._load_lora(folder / LORA_DIR)
        return model, tok

    def save_pretrained(self, directory: str | Path) -> None:
        """Atomically write the checkpoint folder (see module docstring); replaces `directory`. A fully trained LLM is
        written with its text tokenizer (extended), so the folder loads without the base LLM's."""
        config = _absolute(self.config)
        with atomic_folder(directory) as tmp:
            if config.train_llm == "full":
                self.causal_lm.save_pretrained(tmp / LLM_DIR)
                self.load_text_tokenizer().save_pretrained(tmp / LLM_DIR)
                config = replace(config, llm=LLM_DIR, text_tokenizer=LLM_DIR)
            elif config.train_llm == "lora":
                self.llm.save_pretrained(tmp / LORA_DIR, save_embedding_layers=False)
            self._write_parts(tmp, config)

    def export_merged(self, directory: str | Path) -> None:
        """Write a plain HF folder (LoRA merged, special rows written into the embeddings, the extended text tokenizer)
        plus our parts: `AutoModelForCausalLM.from_pretrained(directory)` and `SemHiTokLM.from_pretrained(directory)`
        both load it without PEFT or DeepSpeed. Holds a second copy of the LLM in memory while exporting."""
        llm = copy.deepcopy(self.llm)
        llm = llm.merge_and_unload() if isinstance(llm, PeftModel) else llm
        self.special.write_into(llm.get_input_embeddings(), llm.get_output_embeddings())
        tokenizer = self.load_text_tokenizer()
        config = replace(_absolute(self.config), llm=".", text_tokenizer=".", train_llm="frozen")
        with atomic_folder(directory) as tmp:
            llm.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            self._write_parts(tmp, config)

    def load_text_tokenizer(self):
        """The base LLM's text tokenizer with the specials added and their ids checked against vocab.json."""
        return self.vocab.extend_tokenizer(load_text_tokenizer(self.config.text_tokenizer or self.config.llm))

    def _write_parts(self, folder: Path, config: MLLMConfig) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.parts().state_dict().items()}
        save_file(state, str(folder / PARTS_NAME), metadata={"format": "pt"})
        self.vocab.save(folder / VOCAB_NAME)
        save_config(config, folder / CONFIG_NAME)

    def _load_parts(self, path: Path) -> None:
        state, parts = _read_safetensors(path), self.parts()
        expected = parts.state_dict()
        shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]  # fmt: skip
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected or shapes:
            raise ValueError(f"{path} does not match mllm_config.json (head={self.config.head}): missing {missing}, "
                             f"unexpected {unexpected}, shape mismatches {shapes}")  # fmt: skip
        parts.load_state_dict(state, strict=True)

    def _load_lora(self, folder: Path) -> None:
        path = folder / LORA_WEIGHTS
        result = set_peft_model_state_dict(self.llm, _read_safetensors(path))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"{path} does not match the LoRA of mllm_config.json: missing {missing[:8]}, "
                             f"unexpected {result.unexpected_keys[:8]}")  # fmt: skip


def _load_llm(config: MLLMConfig, trust_remote_code: bool) -> nn.Module:
    """The base causal LM from a local folder; its own code runs only if `trust_remote_code` (the caller's choice)."""
    from transformers import AutoModelForCausalLM

    if not Path(config.llm).is_dir():
        raise FileNotFoundError(f"base LLM folder not found: {config.llm} (MLLMConfig.llm; nothing is downloaded)")
    dtype = getattr(torch, config.dtype)
    return AutoModelForCausalLM.from_pretrained(
        config.llm, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True
    )


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises several types for truncated or garbage files
        raise ValueError(f"corrupt {path}: cannot read safetensors ({err})") from None
