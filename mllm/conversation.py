"""Conversation templates, and tokenization whose label masks line up with the tokens by construction.

A template renders a whole conversation to ONE string and records the character spans the model must learn to
produce: what it generates after each generation prompt ("ASSISTANT:", "<|im_start|>assistant\n"), i.e. the response
and the marker that ends its turn (`</s>`, `<|im_end|>`), so it learns to stop.
`tokenize_conversation` tokenizes that string once, with offsets, and labels exactly the tokens whose characters
overlap those spans. There is no per-round length arithmetic, so LLaVA's "tokenization mismatch" (a BOS, a
SentencePiece dummy prefix or a merge across a turn boundary shifting every later label) cannot happen.

Templates:
    vicuna_v1      LLaVA-1.5's conv_vicuna_v1: "{system} USER: {q} ASSISTANT: {a}</s>USER: {q} ASSISTANT: {a}</s>"
    chat_template  the tokenizer's own Jinja chat template (Qwen2.5 and SmolLM2: ChatML, `<|im_end|>` ends a turn)

System prompt (`conversation_template(name, system)`; training and inference take it from `MLLMConfig.system_prompt`):
"" = none, None = the template's own default, other text = that prompt. "" truly removes the system turn of chat
templates that inject a default one when no system message is given (SmolLM2: "You are a helpful AI assistant named
SmolLM, ...", Qwen2.5: "You are Qwen, ..."): the template renders with its default and the injected system turn is
cut out again (`ChatTemplate`); a template whose injected turn cannot be located is a ConversationError.

Turns are LLaVA's: dicts {"from": "human" | "gpt", "value": str} (or `Turn`), alternating, human first.
A token that straddles template text and a response (e.g. SentencePiece's "▁The" after "ASSISTANT:") is labelled:
the model has to produce it to say the response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Protocol

import torch

from mllm.constants import GENERATION_PROMPT, IGNORE_INDEX, IMAGE_PLACEHOLDER, ROLES

HUMAN, GPT = ROLES
CHAT_ROLES = {HUMAN: "user", GPT: "assistant"}
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class ConversationError(ValueError):
    """A conversation, template or tokenizer that cannot give correct labels; the message names the problem."""


@dataclass(frozen=True)
class Turn:
    role: str  # "human" | "gpt"
    text: str


@dataclass(frozen=True)
class Rendered:
    """A conversation rendered to text.
    text:    the string the tokenizer sees
    targets: sorted, disjoint [start, end) character spans to learn: each response + its end-of-turn marker"""

    text: str
    targets: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TokenizedSample:
    """One tokenized training conversation.
    input_ids:     (L,) int64, L <= max_length
    labels:        (L,) int64, = input_ids on assistant responses and their end-of-turn token, IGNORE_INDEX elsewhere
    num_images:    image placeholder tokens kept in input_ids (compare with the sample's images: truncation drops some)
    num_truncated: tokens cut from the end to fit max_length (0 when it fit)"""

    input_ids: torch.Tensor
    labels: torch.Tensor
    num_images: int
    num_truncated: int

    @property
    def num_targets(self) -> int:
        """Tokens with a label; 0 means truncation cut every response."""
        return int((self.labels != IGNORE_INDEX).sum())


class Template(Protocol):
    """Renders checked (role, text) turns; says which marker ends an assistant turn and whether BOS/EOS are added."""

    name: str
    add_special_tokens: bool  # let the tokenizer add its BOS/EOS (Vicuna: yes; chat templates write their own)

    def render(self, turns: Sequence[tuple[str, str]], tokenizer, add_generation_prompt: bool = False) -> Rendered: ...

    def end_of_turn(self, tokenizer) -> str: ...


def _assemble(segments: Sequence[tuple[str, bool]]) -> Rendered:
    """Concatenate (text, is_target) segments; adjacent target segments form one span."""
    targets: list[tuple[int, int]] = []
    pos = 0
    for piece, is_target in segments:
        if is_target and piece:
            if targets and targets[-1][1] == pos:
                targets[-1] = (targets[-1][0], pos + len(piece))
            else:
                targets.append((pos, pos + len(piece)))
        pos += len(piece)
    return Rendered("".join(piece for piece, _ in segments), tuple(targets))


@dataclass(frozen=True)
class SeparatorTemplate:
    """LLaVA's SeparatorStyle.TWO: system + sep, then "ROLE: text" + sep after human turns, + sep2 after gpt turns.
    Targets: " " + response + sep2 (the generation prompt ends with "ASSISTANT:").
    system: None = `default_system`; "" = no system prompt (the conversation starts at "USER:")."""

    name: str
    default_system: str
    system: str | None = None
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    add_special_tokens: bool = True

    def render(self, turns: Sequence[tuple[str, str]], tokenizer, add_generation_prompt: bool = False) -> Rendered:
        system = self.default_system if self.system is None else self.system
        segments = [(system + self.sep, False)] if system else []
        for role, text in turns:
            gpt = role == GPT  # the prompt ends at "ASSISTANT:", so the model also says the space after it
            segments += [(self.roles[gpt] + ":", False), (" " + text, gpt), (self.sep2 if gpt else self.sep, gpt)]
        if add_generation_prompt:
            segments.append((self.roles[1] + ":", False))
        return _assemble(segments)

    def end_of_turn(self, tokenizer) -> str:
        return self.sep2


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own Jinja chat template, rendered by `tokenizer.apply_chat_template`.

    system:             system prompt; None keeps the template's default (Qwen2.5: "You are Qwen, ..."); "" renders
                        none: a default system turn the template injects is cut out (`_strip_default_system`)
    end_of_turn_marker: text that ends assistant turns; None means tokenizer.eos_token (`<|im_end|>` for both ChatML
                        LLMs here)

    Spans come from rendering the conversation once with sentinel contents; the result is checked to equal the
    template's rendering of the real contents, so a template that edits contents (e.g. strips them) is an error.
    """

    name: str = "chat_template"
    system: str | None = None
    end_of_turn_marker: str | None = None
    add_special_tokens: bool = False

    def render(self, turns: Sequence[tuple[str, str]], tokenizer, add_generation_prompt: bool = False) -> Rendered:
        roles = [role for role, _ in turns]
        sentinels = [f"\ue000{k}\ue001" for k in range(len(turns))]
        pieces = _split_on(self._apply(tokenizer, roles, sentinels, add_generation_prompt), sentinels)
        eot = self.end_of_turn(tokenizer)
        segments = [(pieces[0], False)]
        for (role, text), piece in zip(turns, pieces[1:], strict=True):
            gpt = role == GPT
            if gpt and not piece.startswith(eot):
                raise ConversationError(f"the chat template does not end assistant turns with {eot!r}: {piece[:40]!r}")
            cut = len(eot) if gpt else 0
            segments += [(text, gpt), (piece[:cut], gpt), (piece[cut:], False)]
        rendered = _assemble(segments)
        if rendered.text != self._apply(tokenizer, roles, [text for _, text in turns], add_generation_prompt):
            raise ConversationError("the chat template edits message contents (e.g. strips them); spans can't be found")
        return rendered

    def end_of_turn(self, tokenizer) -> str:
        marker = self.end_of_turn_marker or tokenizer.eos_token
        if not marker:
            raise ConversationError("the tokenizer has no eos_token; set ChatTemplate(end_of_turn_marker=...)")
        return marker

    def _apply(self, tokenizer, roles: Sequence[str], contents: Sequence[str], add_generation_prompt: bool) -> str:
        messages = [{"role": CHAT_ROLES[r], "content": c} for r, c in zip(roles, contents, strict=True)]
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        text = _chat(tokenizer, messages, add_generation_prompt)
        return _strip_default_system(tokenizer, text) if self.system == "" else text


def _chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConversationError(f"{type(tokenizer).__name__} has no chat template; use the vicuna_v1 template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _strip_default_system(tokenizer, text: str) -> str:
    """`text` (a chat rendering that starts with a user message) without the system turn the template injected.

    Located with sentinel contents: without a system message the text before the first user content is `injected`;
    with an explicit system message S it is pre + S + mid. The template injects a system turn when `injected` is
    pre + (its default) + mid. pre ends with the system role header and mid with the user role header, both the
    generation prompt (the assistant header, ChatML "<|im_start|>assistant\n") with the role name replaced; without a
    system turn the text starts with pre minus the system header, then the user header."""
    user, system = "\ue000u\ue001", "\ue000s\ue001"
    plain = _chat(tokenizer, [{"role": "user", "content": user}])
    injected = plain[: plain.index(user)]
    explicit = _chat(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": user}])
    pre, found, rest = explicit.partition(system)
    mid = rest[: rest.find(user)]
    if not found or user not in rest or not (injected.startswith(pre) and injected[len(pre) :].endswith(mid)):
        return text  # the template injects no system turn
    prompt = _chat(tokenizer, [{"role": "user", "content": user}], add_generation_prompt=True)[len(plain) :]
    sys_header, user_header = (prompt.replace(CHAT_ROLES[GPT], role) for role in ("system", CHAT_ROLES[HUMAN]))
    if CHAT_ROLES[GPT] not in prompt or not (pre.endswith(sys_header) and mid.endswith(user_header)):
        raise ConversationError("cannot locate the default system turn of this chat template to remove it; set "
                                "model.system_prompt to a text (or null to keep the template's default)")  # fmt: skip
    if not text.startswith(injected):
        raise ConversationError("the chat template's default system turn is not where it renders for one user turn")
    return pre[: len(pre) - len(sys_header)] + user_header + text[len(injected) :]


def _split_on(text: str, sentinels: Sequence[str]) -> list[str]:
    """Split `text` at each sentinel (each must occur once, in order): len(sentinels) + 1 pieces."""
    pieces, pos = [], 0
    for s in sentinels:
        at = text.find(s, pos)
        if at < 0 or s in text[at + len(s) :]:
            raise ConversationError("the chat template does not render each message content once, in order")
        pieces.append(text[pos:at])
        pos = at + len(s)
    return [*pieces, text[pos:]]


vicuna_v1 = SeparatorTemplate(name="vicuna_v1", default_system=VICUNA_SYSTEM)
chat_template = ChatTemplate()
TEMPLATES: Mapping[str, Template] = MappingProxyType({t.name: t for t in (vicuna_v1, chat_template)})


def get_template(name: str) -> Template:
    """The named template preset (see TEMPLATES), with the template's own default system prompt."""
    if name not in TEMPLATES:
        raise ConversationError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def conversation_template(name: str, system: str | None = "") -> Template:
    """The named template with a system prompt: "" none (an injected default is removed), None the template's own
    default (vicuna_v1: LLaVA's; chat templates: whatever they inject), other text that prompt."""
    return replace(get_template(name), system=system)


def check_turns(turns: Sequence[Mapping[str, Any] | Turn], last: str = GPT) -> list[tuple[str, str]]:
    """Validate LLaVA turns and return [(role, text)]: non-empty text, roles alternating human/gpt from human,
    ending with `last`. Raises ConversationError naming the turn and the problem."""
    if not turns:
        raise ConversationError("the conversation is empty")
    checked = [_as_pair(t, k) for k, t in enumerate(turns)]
    for k, (role, _) in enumerate(checked):
        expected = ROLES[k % 2]
        if role != expected:
            first = "a conversation must start with a 'human' turn; " if k == 0 else ""
            raise ConversationError(f"{first}turn {k} is from {role!r} but {expected!r} was expected (turns alternate)")
    if checked[-1][0] != last:
        raise ConversationError(f"the last turn is from {checked[-1][0]!r}; expected it to be from {last!r}")
    return checked


def _as_pair(turn: Mapping[str, Any] | Turn, k: int) -> tuple[str, str]:
    if isinstance(turn, Turn):
        role, text = turn.role, turn.text
    elif isinstance(turn, Mapping) and "from" in turn and "value" in turn:
        role, text = turn["from"], turn["value"]
    else:
        raise ConversationError(f"turn {k} must be a dict with 'from' and 'value', got {turn!r:.80}")
    if role not in ROLES:
        raise ConversationError(f"turn {k} has unknown role {role!r} (expected one of {ROLES})")
    if not isinstance(text, str):
        raise ConversationError(f"turn {k} ({role!r}) 'value' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ConversationError(f"turn {k} ({role!r}) is empty")
    return role, text


def _single_token_id(tokenizer, text: str, what: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConversationError(
            f"the {what} {text!r} is {len(ids)} tokens for {type(tokenizer).__name__}, not one; register it with "
            f"tokenizer.add_tokens([{text!r}], special_tokens=True) (or pick a template that matches this tokenizer)"
        )
    return ids[0]


def _encode(tokenizer, text: str, add_special_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (L,) int64 and character offsets (L, 2) int64 of `text`."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConversationError(f"{type(tokenizer).__name__} gives no character offsets; use a fast (tokenizers) one")
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    return ids, torch.tensor(enc["offset_mapping"], dtype=torch.long).view(-1, 2)


def _target_mask(offsets: torch.Tensor, targets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(L,) bool: token overlaps a target span. A zero-width token at c counts as covering [c, c+1)."""
    if not targets:
        return torch.zeros(len(offsets), dtype=torch.bool)
    start, end = offsets[:, 0:1], torch.maximum(offsets[:, 1:2], offsets[:, 0:1] + 1)  # (L, 1)
    spans = torch.tensor(targets, dtype=torch.long)  # (T, 2)
    return ((start < spans[:, 1]) & (end > spans[:, 0])).any(dim=1)


def tokenize_conversation(
    turns: Sequence[Mapping[str, Any] | Turn],
    tokenizer,
    template: Template | str,
    max_length: int,
    *,
    image_token: str = IMAGE_PLACEHOLDER,
) -> TokenizedSample:
    """Tokenize a training conversation (human first, gpt last) and label only what the assistant says.

    `image_token` must already be ONE added token of `tokenizer` when the text contains it. Over-long
    conversations are cut to `max_length` tokens and the cut is counted, never raised.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    template = get_template(template) if isinstance(template, str) else template
    checked = check_turns(turns, last=GPT)
    rendered = template.render(checked, tokenizer)
    _single_token_id(tokenizer, template.end_of_turn(tokenizer), "end-of-turn marker")  # one token stops the model
    has_images = any(image_token in text for _, text in checked)
    image_id = _single_token_id(tokenizer, image_token, "image placeholder") if has_images else None
    ids, offsets = _encode(tokenizer, rendered.text, template.add_special_tokens)
    labels = torch.where(_target_mask(offsets, rendered.targets), ids, IGNORE_INDEX)
    ids, labels = ids[:max_length], labels[:max_length]
    num_images = 0 if image_id is None else int((ids == image_id).sum())
    return TokenizedSample(ids, labels, num_images, num_truncated=len(offsets) - len(ids))


def tokenize_prompt(turns: Sequence[Mapping[str, Any] | Turn], tokenizer, template: Template | str) -> torch.Tensor:
    """(L,) int64 ids of a conversation ending with a human turn plus the assistant prefix, ready to generate."""
    template = get_template(template) if isinstance(template, str) else template
    rendered = template.render(check_turns(turns, last=HUMAN), tokenizer, add_generation_prompt=True)
    return _encode(tokenizer, rendered.text, template.add_special_tokens)[0]


def generation_prompt_ids(caption: str, tokenizer, template: Template | str, prompt: str = GENERATION_PROMPT) -> torch.Tensor:
    """(L,) int64: the text-to-image prompt ending with the assistant prefix; caption "" = the unconditional prompt.
    Training appends `<boi> ids <eoi>`; sampling appends `<boi>` and generates."""
    text = prompt.format(caption=caption).strip()
    return tokenize_prompt([{"from": HUMAN, "value": text}], tokenizer, template)
