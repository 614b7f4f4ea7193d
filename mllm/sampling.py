"""Sampling from a `SemHiTokLM` (DESIGN §4 "Sampling"): text-to-image ids, and text answers about an image.

    generate_images(model, prompts, cfg)   prompts -> TokenGrid; `semhitok.decode(grid)` gives the pixels
    sample_image_ids(model, rows, ...)     the same from prompt ids, in one call (generate_images calls it)
    images_per_call(model, ...)            how many images one call holds within the memory budget
    generate_text(model, prompt_ids, cfg)  greedy or sampled continuation, stopping at eos / end-of-turn
    generate_texts(model, prompts, cfg)    the same for a left-padded batch of prompts (generate_text = one row)
    ChatSession                            a conversation about one image, history kept
    load_for_inference(folder)             model + text tokenizer + SemHiTok, with one-line errors

User text is plain text: a `<boi>`, `<eoi>` or `<image>` typed in a caption or question is tokenized as its characters
(`plain_specials`), never as the control token; only the `<image>` placeholder ChatSession writes itself is one.

Image generation: every prompt row is left-padded into one batch (attention mask 0 on pads, position ids counted
from each row's first real token), `<boi>` is forced, the prompts are prefilled once, then ONE token per step runs
through the KV cache. Inside the image only the image head is evaluated (`head.sample`: K·m classes, or the
factorized head's i over K then j over m given i), so no text id can ever be sampled there; exactly h·w image ids are
produced and `<eoi>` is implied (never sampled). Classifier-free guidance keeps a conditional and an unconditional
row (the empty-caption prompt) per image in the same batch, both fed the id sampled for the image, and mixes
`cond + (s - 1)(cond - uncond)` (exactly `cond` at s = 1) before temperature / top-k / top-p. Randomness: image r of
a call (prompt-major: r = p·N + n) draws from its own `torch.Generator` seeded `seed + r`, so an image does not depend
on the batch it is sampled in, and one seed reproduces a call exactly. Temperature 0 is greedy.

Batching: `generate_images` decodes its P·N images in as few calls as memory allows (`images_per_call`: the KV cache,
logits and activations of a row, against `SamplingConfig.memory_budget_gib` or half the memory the device has
free, at most `max_batch` images); decoding streams every weight once per step whatever the number of rows, so more
rows per call cost little more per step (`python bench/generate.py`). The per-image seeds make the images the same
in any batch. The image decoding loop reads nothing back to the host until it ends (no `.item()`, no boolean
indexing, no check of a tensor's values, HF's attention mask passed built), so a GPU never waits on the Python.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mllm.assets import resolve_reference
from mllm.constants import EXPANSION_PROMPT, GENERATION_PROMPT, IMAGE_PLACEHOLDER
from mllm.conversation import (
    GPT,
    HUMAN,
    Template,
    conversation_template,
    generation_prompt_ids,
    get_template,
    tokenize_prompt,
)
from mllm.model import CONFIG_NAME, SemHiTokLM, read_config
from mllm.vocab import VisualVocab
from semhitok import SemHiTok, TokenGrid
from semhitok.runtime import ResolvedPrecision, load_image, resolve_precision, to_tensor

Progress = Callable[[Iterable[int]], Iterable[int]]  # e.g. tqdm: wraps the loop over image positions


class InferenceError(ValueError):
    """A checkpoint, prompt or image that cannot be sampled from; the message is one line that names the fix."""


@dataclass(frozen=True)
class SamplingConfig:
    """How ids are drawn. temperature 0 = greedy; top_k 0 and top_p 1 = off; cfg_scale 1 = no guidance (no
    unconditional rows are run). cfg_schedule "linear" ramps the scale from 1 at the first image position to
    cfg_scale at the last. max_new_tokens bounds text answers. use_cache False recomputes the whole sequence at
    every step (the reference the KV cache is tested against). max_batch (images per decoding call, 0 = no cap) and
    memory_budget_gib (what one call may take, 0 = MEMORY_FRACTION of the device's free memory) size the calls of
    `generate_images` (`images_per_call`); they never change the images."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 3.0
    cfg_schedule: Literal["constant", "linear"] = "constant"
    seed: int = 0
    num_images: int = 1
    max_new_tokens: int = 256
    use_cache: bool = True
    max_batch: int = 0
    memory_budget_gib: float = 0.0

    def __post_init__(self) -> None:
        checks = {"temperature >= 0": self.temperature >= 0, "top_k >= 0": self.top_k >= 0,
                  "0 < top_p <= 1": 0 < self.top_p <= 1, "cfg_scale >= 0": self.cfg_scale >= 0,
                  "num_images >= 1": self.num_images >= 1, "max_new_tokens >= 1": self.max_new_tokens >= 1,
                  "cfg_schedule in (constant, linear)": self.cfg_schedule in ("constant", "linear"),
                  "max_batch >= 0": self.max_batch >= 0, "memory_budget_gib >= 0": self.memory_budget_gib >= 0}  # fmt: skip
        bad = [rule for rule, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"SamplingConfig needs {', '.join(bad)}: got {self}")

    def scale_at(self, t: int, n: int) -> float:
        """Guidance scale at image position t of n."""
        if self.cfg_schedule == "constant" or n == 1:
            return self.cfg_scale
        return 1.0 + (self.cfg_scale - 1.0) * t / (n - 1)


# ---------------------------------------------------------------------------------------------------- drawing ids


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(R, V) float -> the same with -inf outside the top_k largest and outside the smallest set whose probability
    reaches top_p (the most likely id is always kept)."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # (R, V) mass of the more likely ids
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(before >= top_p, float("-inf")))
    return logits


def draw(logits: Tensor, cfg: SamplingConfig, generators: Sequence[torch.Generator]) -> Tensor:
    """(R, V) logits -> (R,) int64 class indices: argmax at temperature 0, else row r sampled with generators[r]
    as `torch.multinomial` samples one class (argmax of p / E over exponential draws E = -log U), with the
    uniforms U drawn in one call per row and the rest batched: 4x faster per row at V = 8192 on a CPU, whose
    `exponential_` is slow. A class of probability 0 is never drawn. (Inverse-CDF sampling, one uniform per row,
    is faster still but flips far more draws under bf16 rounding noise: every class's CDF carries all earlier ones'.)"""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)  # (R, V)
    uniform = torch.stack([torch.rand(probs.shape[-1], generator=g, device=probs.device) for g in generators])
    return (probs / uniform.log_().neg_()).argmax(-1)


def guide(logits: Tensor, scale: float, guided: bool) -> Tensor:
    """(2R, V) cond rows then uncond rows -> (R, V) `cond + (scale - 1)(cond - uncond)`; (R, V) unchanged if not
    guided. float32."""
    if not guided:
        return logits.float()
    cond, uncond = logits.float().chunk(2)
    return cond + (scale - 1.0) * (cond - uncond)


def draw_image_index(model: SemHiTokLM, hidden: Tensor, scale: float, cfg: SamplingConfig,
                     generators: Sequence[torch.Generator], guided: bool) -> Tensor:  # fmt: skip
    """Hidden states (R or 2R, D) -> flat code indices (R,) in [0, K·m), from the image head only (`head.sample`:
    every class choice the head makes, e.g. the factorized head's i then j given i, is guided and drawn here)."""
    return model.head.sample(hidden, lambda logits: draw(guide(logits, scale, guided), cfg, generators))


def make_generators(seed: int, n: int, device: torch.device) -> list[torch.Generator]:
    """n generators seeded seed, seed + 1, ...: row r's draws never depend on the other rows."""
    return [torch.Generator(device=device).manual_seed(seed + r) for r in range(n)]


# ---------------------------------------------------------------------------------------------------- decoding state


class DecodingRows:
    """Rows decoded together: the attention mask (0 on left pads), position ids and the KV cache.
    With use_cache False it keeps the input embeddings and re-runs the whole sequence at every step instead.
    The cache is HF's own (grown by `cat` each step), or the fused decoder's preallocated `KVCache` where
    `prepare_for_decoding` built one (`mllm.kernels.FusedDecoder`, a CPU with a Llama-family LLM)."""

    def __init__(self, model: SemHiTokLM, use_cache: bool = True):
        self.model, self.use_cache = model, use_cache
        self.embeds = self.mask = self.cache = None
        config = model.causal_lm.config
        # HF builds a one-position mask from the 2D one with a host sync (`padding_mask.all()`); for SDPA over full
        # attention that mask is the 2D one as (R, 1, 1, T) bool (True = attend), so cached steps pass it built
        self.built_mask = use_cache and config._attn_implementation == "sdpa" and "sliding_attention" not in (
            getattr(config, "layer_types", None) or ()) and model.fused_decoder is None  # fmt: skip

    def start(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Prefill left-padded ids (R, L) with mask (R, L) -> hidden state of the last position (R, D)."""
        self.embeds, self.mask = None, mask[:, :0]
        return self._forward(self.model.embed(ids), mask)

    def step(self, ids: Tensor) -> Tensor:
        """Append one id per row (R,) -> its hidden state (R, D)."""
        return self.step_embeds(self.model.embed(ids[:, None])[:, 0])

    def step_embeds(self, embeds: Tensor) -> Tensor:
        """Append one input embedding per row (R, D), e.g. `model.index_embeds` of drawn codes -> hidden (R, D)."""
        return self._forward(embeds[:, None], self.mask.new_ones(len(embeds), 1))

    def keep(self, rows: Tensor) -> None:
        """Keep only `rows` (R',) int64 of the batch (mask, embeddings, cache), e.g. the ones still decoding."""
        self.mask = self.mask[rows]
        if self.embeds is not None:
            self.embeds = self.embeds[rows]
        if self.cache is not None:
            self.cache.batch_select_indices(rows)

    def _forward(self, embeds: Tensor, mask: Tensor) -> Tensor:
        self.mask = torch.cat([self.mask, mask], 1)  # (R, T)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (R, T): 0 at each row's first real token
        if not self.use_cache:
            self.embeds = embeds = embeds if self.embeds is None else torch.cat([self.embeds, embeds], 1)
        q = embeds.shape[1]
        attention = self.mask[:, None, None, :].bool() if self.built_mask and q == 1 else self.mask
        out = self.model.backbone(embeds, attention, positions[:, -q:], past_key_values=self.cache,
                                  use_cache=self.use_cache)  # fmt: skip
        self.cache = out.past_key_values if self.use_cache else None
        return out.last_hidden_state[:, -1]


def left_pad(rows: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Id rows (L_r,) -> ids (R, L) int64 padded on the left with pad_id, attention mask (R, L) int64 (0 on pads)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, r in enumerate(rows):
        ids[k, length - len(r) :], mask[k, length - len(r) :] = r, 1
    return ids, mask


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode (no dropout, LoRA dropout included) and no grad for the block; the previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def context_length(model: SemHiTokLM) -> int | None:
    """The LLM's maximum sequence length (max_position_embeddings), None if its config does not say."""
    return getattr(model.causal_lm.config, "max_position_embeddings", None)


def check_length(model: SemHiTokLM, prompt_len: int, extra: int, what: str) -> None:
    """InferenceError unless prompt_len + extra tokens fit the LLM's context (when its config states one)."""
    limit = context_length(model)
    if limit is not None and prompt_len + extra > limit:
        raise InferenceError(f"{what} is {prompt_len} tokens; with {extra} more it exceeds the model's context of "
                             f"{limit} tokens (at most {limit - extra} prompt tokens): shorten it")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- batching

MEMORY_FRACTION = 0.5  # of the device's free memory one decoding call may take when memory_budget_gib is 0
LOGIT_COPIES = 6  # fp32 (rows, classes) tensors a sampling step holds at once: logits, guided, scaled, top-p's sort
# (values and int64 order) and the probabilities


def available_memory(device: torch.device) -> int:
    """Bytes still free on `device`: CUDA's free memory, or the OS's MemAvailable (free physical pages where there
    is no /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024  # kB
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_cache_bytes(config, length: int, dtype: torch.dtype) -> int:
    """Bytes of one row's KV cache at `length` positions for an HF decoder config: 2 (keys, values) · layers · KV
    heads · head_dim · length · the dtype's size."""
    c = config.get_text_config()
    heads = c.num_attention_heads
    kv_heads, head_dim = getattr(c, "num_key_value_heads", None) or heads, getattr(c, "head_dim", None)
    per_position = 2 * c.num_hidden_layers * kv_heads * (head_dim or c.hidden_size // heads)
    return per_position * length * torch.empty((), dtype=dtype).element_size()


def row_bytes(model: SemHiTokLM, length: int) -> int:
    """Memory one image-decoding row takes at `length` positions: its KV cache, the image head's fp32 logits with
    the sampler's LOGIT_COPIES (K·m classes: an upper bound for the factorized head) and the activations of a forward
    over all `length` positions (an upper bound for the prefill, a step's are length times smaller)."""
    config, dtype = model.causal_lm.config.get_text_config(), model.causal_lm.get_input_embeddings().weight.dtype
    size = torch.empty((), dtype=dtype).element_size()
    activations = length * (4 * config.hidden_size + 3 * config.intermediate_size) * size  # residual, q/k/v/out, MLP
    return kv_cache_bytes(config, length, dtype) + LOGIT_COPIES * 4 * model.vocab.num_image_ids + activations


def images_per_call(model: SemHiTokLM, prompt_len: int, num_tokens: int, cfg: SamplingConfig,
                    guided: bool = True) -> int:  # fmt: skip
    """Images one `sample_image_ids` call decodes for prompts of up to `prompt_len` ids (`<boi>` included): as many
    as fit in cfg.memory_budget_gib (0: MEMORY_FRACTION of the device's free memory), each 2 rows with guidance
    (`row_bytes` at prompt_len + num_tokens), at most cfg.max_batch when set, at least 1."""
    device = model.code_sem.device
    budget = cfg.memory_budget_gib * 2**30 or MEMORY_FRACTION * available_memory(device)
    fit = int(budget // (row_bytes(model, prompt_len + num_tokens) * (2 if guided else 1)))
    return max(1, min(fit, cfg.max_batch) if cfg.max_batch else fit)


# ---------------------------------------------------------------------------------------------------- images


def sample_image_ids(model: SemHiTokLM, prompts: Sequence[Tensor], uncond: Tensor | None, num_tokens: int,
                     cfg: SamplingConfig, progress: Progress | None = None) -> Tensor:  # fmt: skip
    """Prompt ids (P rows (L_p,) int64, each ending with the assistant prefix; `<boi>` is appended here) and the
    unconditional prompt (None: no guidance rows) -> image ids (P·N, num_tokens) int64, N = cfg.num_images, image n
    of prompt p at row p·N + n. With `uncond`, 2·P·N rows run; at scale 1 the result equals `uncond=None`.
    All rows are decoded in this one call (`generate_images` splits its images into calls that fit memory)."""
    images = [p for p in prompts for _ in range(cfg.num_images)]  # (P·N) cond rows, then as many uncond rows
    guided = uncond is not None
    boi = torch.tensor([model.vocab.boi_id])
    device = model.code_sem.device
    prompt_rows = [torch.cat([r.cpu(), boi]) for r in images + ([uncond] * len(images) if guided else [])]
    ids, mask = (t.to(device) for t in left_pad(prompt_rows, model.vocab.boi_id))
    generators = make_generators(cfg.seed, len(images), device)
    rows = DecodingRows(model, cfg.use_cache)
    out = torch.empty(len(images), num_tokens, dtype=torch.long, device=device)
    with eval_mode(model):
        hidden = rows.start(ids, mask)
        for t in (progress or iter)(range(num_tokens)):
            scale = cfg.scale_at(t, num_tokens)
            out[:, t] = draw_image_index(model, hidden, scale, cfg, generators, guided)
            if t + 1 < num_tokens:  # `<eoi>` is forced after the last one: nothing left to predict
                embeds = model.index_embeds(out[:, t], t).to(hidden.dtype)  # (P·N, D), the same for the uncond rows
                hidden = rows.step_embeds(embeds.repeat(2, 1) if guided else embeds)
    return model.vocab.index_to_ids(out)


def generate_images(model: SemHiTokLM, prompts: Sequence[str], cfg: SamplingConfig, *, tokenizer=None,
                    template: str = "auto", prompt_format: str = GENERATION_PROMPT, grid: int | None = None,
                    progress: Progress | None = None) -> TokenGrid:  # fmt: skip
    """Captions (P,) -> TokenGrid (P·N, h, w) of sampled codes (row p·N + n = image n of prompt p), decoded in calls
    of `images_per_call` images (the same images in any split: image r is seeded cfg.seed + r).

    tokenizer: the model's text tokenizer (default `model.load_text_tokenizer()`); template / prompt_format: how the
    model was trained (DataConfig.template / .prompt; "auto" = the tokenizer's chat template, else vicuna_v1; the
    system prompt is the model's `config.system_prompt`);
    grid: token grid side (default: the model's `config.image_grid`). InferenceError for an empty prompt or one
    that does not fit the context with the image."""
    tokenizer = tokenizer if tokenizer is not None else model.load_text_tokenizer()
    h, w = (grid, grid) if grid else model.config.image_grid
    cond, uncond = generation_prompts(model, prompts, cfg, tokenizer, template, prompt_format, h * w)
    images = [c for c in cond for _ in range(cfg.num_images)]
    step = images_per_call(model, prompt_length(cond, uncond), h * w, cfg, uncond is not None)
    ids = [sample_image_ids(model, images[r : r + step], uncond, h * w, replace(cfg, seed=cfg.seed + r, num_images=1),
                            progress) for r in range(0, len(images), step)]  # fmt: skip
    return model.vocab.from_ids(torch.cat(ids).cpu(), h, w)


def generation_prompts(model: SemHiTokLM, captions: Sequence[str], cfg: SamplingConfig, tokenizer,
                       template: str = "auto", prompt_format: str = GENERATION_PROMPT,
                       num_tokens: int | None = None) -> tuple[list[Tensor], Tensor | None]:  # fmt: skip
    """Captions (P,) -> their prompt ids (P rows (L_p,) int64) and the unconditional prompt's (None at cfg_scale 1),
    as `generate_images` renders them (arguments as there; num_tokens: image ids per image, default the model's
    grid). InferenceError for no captions, an empty one, or one that does not fit the context with the image."""
    if not captions:
        raise InferenceError("no prompts given")
    num_tokens = num_tokens or model.config.image_grid[0] * model.config.image_grid[1]
    template = model_template(model, template, tokenizer)
    cond = [_generation_prompt(model, c, k, tokenizer, template, prompt_format, num_tokens)
            for k, c in enumerate(captions)]  # fmt: skip
    uncond = generation_prompt_ids("", tokenizer, template, prompt_format) if cfg.cfg_scale != 1.0 else None
    return cond, uncond


def prompt_length(cond: Sequence[Tensor], uncond: Tensor | None) -> int:
    """Ids per decoding row before the image: the longest prompt (`generation_prompts`) + `<boi>`."""
    return max(len(r) for r in [*cond, *([] if uncond is None else [uncond])]) + 1


def _generation_prompt(model: SemHiTokLM, caption: str, k: int, tokenizer, template: Template, prompt_format: str,
                       num_tokens: int) -> Tensor:  # fmt: skip
    if not caption.strip():
        raise InferenceError(f"prompt {k} is empty: give a caption (the empty prompt is the unconditional one)")
    ids = plain_specials(generation_prompt_ids(caption, tokenizer, template, prompt_format), tokenizer, model.vocab)
    check_length(model, len(ids), num_tokens + 2, f"prompt {k} ({caption[:40]!r}...)")  # + <boi>, <eoi>
    return ids


def plain_specials(ids: Tensor, tokenizer, vocab: VisualVocab, placeholders: int = 0) -> Tensor:
    """Prompt ids (L,) int64 -> the same with every `<boi>`, `<eoi>`, `<image>` id replaced by the ids of its characters
    as plain text (split_special_tokens), so text a user typed never becomes a control token. The first `placeholders`
    `<image>` ids are the caller's own placeholders and are kept."""
    typed = (ids.unsqueeze(-1) == torch.tensor(vocab.special_ids)).any(-1)  # (L,)
    typed[(ids == vocab.image_token_id).nonzero()[:placeholders, 0]] = False
    if not typed.any():
        return ids
    rows = [_plain_ids(tokenizer, i) if t else [i] for i, t in zip(ids.tolist(), typed.tolist(), strict=True)]
    return torch.tensor([i for row in rows for i in row], dtype=torch.long)


def _plain_ids(tokenizer, token_id: int) -> list[int]:
    text = tokenizer.convert_ids_to_tokens(token_id)
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def resolve_template(name: str, tokenizer) -> str:
    """The template name: `auto` -> chat_template if the tokenizer has one, else vicuna_v1; others checked."""
    if name != "auto":
        return get_template(name).name
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"


def model_template(model: SemHiTokLM, name: str, tokenizer) -> Template:
    """The template `name` (`resolve_template`) with the system prompt the model was trained with
    (`MLLMConfig.system_prompt`), so inference renders prompts as its training data was rendered."""
    return conversation_template(resolve_template(name, tokenizer), model.config.system_prompt)


# ---------------------------------------------------------------------------------------------------- text


def generate_text(model: SemHiTokLM, prompt_ids: Tensor, cfg: SamplingConfig, stop_ids: Sequence[int] = (),
                  allowed: Tensor | None = None) -> Tensor:  # fmt: skip
    """Continue one prompt (L,) int64 (text and inline image ids) -> new text ids (n,) int64, n <= max_new_tokens and
    the context, without the stop id that ended it. Only text ids can be drawn, never `<boi>`, `<eoi>`, `<image>`;
    `allowed` (offset,) bool restricts them further (e.g. to ids the tokenizer knows). Uses cfg.seed (one row)."""
    return generate_texts(model, [prompt_ids], cfg, stop_ids, allowed)[0]


def generate_texts(model: SemHiTokLM, prompts: Sequence[Tensor], cfg: SamplingConfig, stop_ids: Sequence[int] = (),
                   allowed: Tensor | None = None, done: Callable[[int, list[int]], bool] | None = None) -> list[Tensor]:  # fmt: skip
    """Continue P prompts (rows (L_p,) int64) as one left-padded batch -> new text ids per prompt, as generate_text.
    Row p draws with its own generator seeded cfg.seed + p and leaves the batch (KV cache rows dropped) when it draws
    a stop id, reaches its budget (max_new_tokens or the context) or `done(p, ids_so_far)` is true (e.g. a stop
    string was written; the ids that completed it are kept)."""
    limit = context_length(model)
    for p, ids in enumerate(prompts):
        check_length(model, len(ids), 1, "the prompt" if len(prompts) == 1 else f"prompt {p}")
    budgets = [min(cfg.max_new_tokens, limit - len(ids)) if limit else cfg.max_new_tokens for ids in prompts]
    device = model.code_sem.device
    banned = torch.zeros(model.vocab.offset, dtype=torch.bool, device=device)
    banned[list(model.vocab.special_ids)] = True
    if allowed is not None:
        banned |= ~allowed.to(device)
    generators, stop = make_generators(cfg.seed, len(prompts), device), set(stop_ids)
    new: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # the prompt of each batch row
    rows = DecodingRows(model, cfg.use_cache)
    with eval_mode(model):
        hidden = rows.start(*(t.to(device) for t in left_pad([p.cpu() for p in prompts], model.vocab.boi_id)))
        while True:
            logits = model.text_logits(hidden).float().masked_fill(banned, float("-inf"))  # (R, offset)
            tokens = draw(logits, cfg, [generators[p] for p in live])  # (R,)
            going = []
            for k, (p, token) in enumerate(zip(live, tokens.tolist(), strict=True)):
                if token in stop:
                    continue
                new[p].append(token)
                if len(new[p]) < budgets[p] and not (done is not None and done(p, new[p])):
                    going.append(k)
            if not going:
                break
            if len(going) < len(live):
                keep = torch.tensor(going, device=device)
                rows.keep(keep)
                tokens, live = tokens[keep], [live[k] for k in going]
            hidden = rows.step(tokens)
    return [torch.tensor(ids, dtype=torch.long) for ids in new]


@dataclass
class ChatSession:
    """A conversation about one image (or none): each `ask` renders the whole history with the template, the image
    as `<image>` in the first question (expanded to its ids), and answers it. Exchanges with an empty answer are not
    kept (a template cannot render an empty turn)."""

    model: SemHiTokLM
    tokenizer: Any
    image_ids: Tensor | None  # (1, h·w) image ids (`VisualVocab.to_ids(semhitok.encode(image))`), or None
    cfg: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    template: str = "auto"
    history: list[tuple[str, str]] = field(default_factory=list)

    def prompt_ids(self, question: str) -> Tensor:
        """(L,) int64 prompt for `question` after the history, placeholder expanded; `<boi>`, `<eoi>`, `<image>` typed
        in the questions are plain text."""
        if not question.strip():
            raise InferenceError("the question is empty")
        exchanges = [*self.history, (question, None)]
        turns = []
        for k, (q, a) in enumerate(exchanges):
            q = f"{IMAGE_PLACEHOLDER}\n{q}" if k == 0 and self.image_ids is not None else q
            turns += [{"from": HUMAN, "value": q}] + ([{"from": GPT, "value": a}] if a is not None else [])
        ids = tokenize_prompt(turns, self.tokenizer, model_template(self.model, self.template, self.tokenizer))
        # our placeholder opens the first question, and only template text (no `<image>`) comes before it
        ids = plain_specials(ids, self.tokenizer, self.model.vocab, placeholders=int(self.image_ids is not None))
        if self.image_ids is None:
            return ids
        return self.model.vocab.expand_placeholders(ids, None, self.image_ids.cpu())[0]

    def stop_ids(self) -> list[int]:
        """eos and the template's end-of-turn token (when it is one token)."""
        template = get_template(resolve_template(self.template, self.tokenizer))
        end = self.tokenizer(template.end_of_turn(self.tokenizer), add_special_tokens=False)["input_ids"]
        return sorted({self.tokenizer.eos_token_id, *(end if len(end) == 1 else [])} - {None})

    def known_ids(self) -> Tensor:
        """(offset,) bool: the text ids the tokenizer can decode (an answer draws only these)."""
        return torch.arange(self.model.vocab.offset) < len(self.tokenizer)

    def ask(self, question: str) -> str:
        """The model's answer to `question` (decoded, special tokens skipped); the exchange joins the history."""
        ids = generate_text(self.model, self.prompt_ids(question), self.cfg, self.stop_ids(), self.known_ids())
        answer = self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()
        if answer:
            self.history.append((question, answer))
        return answer


def expand_captions(model: SemHiTokLM, tokenizer, captions: Sequence[str], batch: int = 16,
                    max_new_tokens: int = 96) -> list[str]:  # fmt: skip
    """Prompt expansion: each caption -> the model's own detailed description of a scene that fits it (the text-only
    answer to `EXPANSION_PROMPT`, greedy), to generate the image from instead (the caption itself where the answer
    is empty). A model learns it from caption -> region-description conversations
    (`scripts/experiments/expansion_data.py`); `batch` prompts are decoded together."""
    session, out = ChatSession(model, tokenizer, None), []
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    stop, known = session.stop_ids(), session.known_ids()
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        ids = [session.prompt_ids(EXPANSION_PROMPT.format(caption=c)) for c in chunk]
        answers = generate_texts(model, ids, cfg, stop, known)
        out += [tokenizer.decode(a.tolist(), skip_special_tokens=True).strip() or c
                for a, c in zip(answers, chunk, strict=True)]  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------- loading


@dataclass
class Inference:
    """What sampling needs from a checkpoint: the model (eval mode, prepared for decoding: LoRA merged, and on a CPU
    its linear weights packed, so it samples but cannot train or be saved), its text tokenizer, its SemHiTok, and the
    precision the model runs in (bf16: the MLLM's weights are bf16; the tokenizer stays fp32)."""

    model: SemHiTokLM
    tokenizer: Any
    semhitok: SemHiTok
    precision: ResolvedPrecision | None = None
    origin: str = ""  # `checkpoint_fingerprint` of the folders it was loaded from, and the precision; "" = unknown

    def encode_image(self, path: str | Path) -> Tensor:
        """Image file -> (1, h·w) image ids. ImageLoadError (one line) for a missing or unreadable file."""
        image = to_tensor(load_image(path, self.semhitok.config.image_size))[None]  # (1, 3, H, W) in [-1, 1]
        grid = self.semhitok.encode(image.to(self.model.code_sem.device))
        return self.model.vocab.to_ids(grid)

    def decode(self, grid: TokenGrid) -> Tensor:
        """TokenGrid (B, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        return self.semhitok.decode(grid)


def load_for_inference(directory: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False,
                       precision: str = "fp32") -> Inference:  # fmt: skip
    """Load a `SemHiTokLM.save_pretrained` / `export_merged` folder for sampling. InferenceError (one line) for a
    missing folder or a folder that is not an MLLM checkpoint (e.g. a SemHiTok tokenizer folder). Code shipped with
    the checkpoint runs only with trust_remote_code (see `SemHiTokLM.from_pretrained`). `precision` auto | bf16 | fp32
    (`semhitok.runtime.resolve_precision`): bf16 casts the MLLM's weights to bf16 (decoding streams half the bytes;
    logits are sampled in fp32); the tokenizer stays fp32. The model is prepared for decoding
    (`SemHiTokLM.prepare_for_decoding`: LoRA merged, linear weights packed on a CPU)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise InferenceError(f"checkpoint folder not found: {folder}")
    if not (folder / CONFIG_NAME).is_file():
        kind = "a SemHiTok tokenizer checkpoint" if (folder / "config.json").is_file() else "not a checkpoint"
        raise InferenceError(f"{folder} is {kind}, not an MLLM checkpoint (no {CONFIG_NAME}): pass the folder "
                             "SemHiTokLM.save_pretrained wrote, e.g. <train.out_dir>/model")  # fmt: skip
    model, semhitok = SemHiTokLM.from_pretrained_with_semhitok(folder, trust_remote_code=trust_remote_code)
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    model.prepare_for_decoding(device, torch.bfloat16 if resolved.bf16 else None)
    origin = f"{checkpoint_fingerprint(folder)} {'bf16' if resolved.bf16 else 'fp32'}"
    return Inference(model, model.load_text_tokenizer(), semhitok.to(device).eval(), resolved, origin)


def checkpoint_fingerprint(folder: str | Path) -> str:
    """A short hash of what an MLLM checkpoint folder and its SemHiTok folder hold (every file's relative path, size and
    modification time: cheap for any model size, and new whenever a file is rewritten), so that outputs made from one
    checkpoint are never taken for another's."""
    folder = Path(folder)
    digest = hashlib.sha1()
    for root in (folder, Path(resolve_reference(read_config(folder / CONFIG_NAME).semhitok, folder))):
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(root)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
