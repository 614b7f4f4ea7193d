"""Conversation templates and label masks, with real tokenizers of both families.

ChatML: Qwen2.5's tokenizer (built here from qwen.tiktoken) and SmolLM2-135M-Instruct's. Vicuna v1: a SentencePiece
BPE model trained here (no Llama tokenizer can be downloaded) wrapped in transformers' LlamaTokenizer, in the legacy
mode Vicuna uses and the non-legacy one that breaks LLaVA's per-round arithmetic ("tokenization mismatch").
The labelled tokens must decode to exactly the assistant responses plus their end-of-turn token, in order.
"""

import copy
import random
import unicodedata
from itertools import groupby

import pytest
import torch

from mllm.constants import IGNORE_INDEX
from mllm.conversation import (
    VICUNA_SYSTEM,
    ChatTemplate,
    ConversationError,
    Turn,
    check_turns,
    conversation_template,
    get_template,
    tokenize_conversation,
    tokenize_prompt,
    vicuna_v1,
)
from mllm.text_tokenizer import (
    QWEN2_ADDED_TOKENS,
    QWEN2_FIRST_ADDED_ID,
    QWEN2_PATTERN,
    build_qwen2_tokenizer,
    ensure_qwen2_tokenizer,
    load_text_tokenizer,
    qwen2_tokenizer_path,
    qwen_tiktoken_path,
)
from semhitok.runtime import AssetError

IMAGE = "<image>"
CONV = [
    {"from": "human", "value": "<image>\nWhat color is the sky in this picture?"},
    {"from": "gpt", "value": "The sky is blue, with two white clouds."},
    {"from": "human", "value": "And the cat?"},
    {"from": "gpt", "value": "The cat is red: it sits on the mat!"},
    {"from": "human", "value": "Count to 3, please."},
    {"from": "gpt", "value": "1, 2, 3."},
]
ANSWERS = [t["value"] for t in CONV[1::2]]
QUESTIONS = [t["value"] for t in CONV[::2]]
WORDS = (
    "the a cat dog sky sun mat red blue white green two three it is are sits on in with and what color count please "
    "picture image clouds The USER ASSISTANT A chat human assistant helpful detailed polite answers questions "
)


def with_image_token(tokenizer):
    tokenizer.add_tokens([IMAGE], special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def qwen():
    return with_image_token(load_text_tokenizer(ensure_qwen2_tokenizer()))


@pytest.fixture(scope="module")
def smollm2():
    return with_image_token(load_text_tokenizer("smollm2"))


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """A tiny Llama-style SentencePiece BPE model (byte fallback, dummy prefix, <unk>/<s>/</s> = 0/1/2)."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = WORDS.split()
    lines = [" ".join(rng.choices(words, k=rng.randint(3, 12))) + rng.choice(".?!:,") for _ in range(400)]
    folder = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )  # fmt: skip
    return folder


def llama_tokenizer(folder, legacy: bool = True):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(folder, legacy=legacy, add_bos_token=True, add_eos_token=False)


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def llama(request, spm_folder):
    return with_image_token(llama_tokenizer(spm_folder, legacy=request.param))


def labelled_runs(sample) -> list[list[int]]:
    """Contiguous runs of labelled token ids; labels must equal input_ids wherever they are set."""
    mask = sample.labels != IGNORE_INDEX
    assert torch.equal(sample.labels[mask], sample.input_ids[mask])
    pairs = zip(sample.input_ids.tolist(), mask.tolist(), strict=True)
    return [[token for token, _ in run] for keep, run in groupby(pairs, key=lambda pair: pair[1]) if keep]


def squash(text: str) -> str:
    return "".join(text.split())


def check_masks(sample, tokenizer, template, end_of_turn: str, reference_ids: list[int]):
    ids, labelled = sample.input_ids.tolist(), (sample.labels != IGNORE_INDEX).tolist()
    assert ids == reference_ids  # the template's own tokenization, nothing re-derived
    for k in range(len(ANSWERS)):  # labels start right where the generation prompt for answer k ends
        prompt = tokenize_prompt(CONV[: 2 * k + 1], tokenizer, template).tolist()
        assert ids[: len(prompt)] == prompt and labelled[len(prompt)] and not labelled[len(prompt) - 1]
    assert [tokenizer.decode(run) for run in labelled_runs(sample)] == [a + end_of_turn for a in ANSWERS]
    # The prompt side (system, user text, <image>) is never learned. Whitespace is squashed: legacy SentencePiece
    # decodes the dummy "▁" it adds after each special token as a space.
    unlabelled = squash(tokenizer.decode(sample.input_ids[sample.labels == IGNORE_INDEX]))
    assert all(squash(q) in unlabelled for q in QUESTIONS) and not any(squash(a) in unlabelled for a in ANSWERS)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    assert sample.num_images == 1 and sample.input_ids.tolist().count(image_id) == 1
    assert sample.num_truncated == 0 and sample.input_ids.dtype == sample.labels.dtype == torch.long


# --- Qwen2.5 tokenizer built from qwen.tiktoken ------------------------------------------------------------------


def test_qwen2_ids_equal_tiktoken(qwen):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(qwen_tiktoken_path()))
    enc = tiktoken.Encoding("qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    sample = (
        "Hello world!  It's 2024-05-12; x=3.14159 I'VE they'll DON'T\n\n\tdef f(a, b):\n        return a**b  # ok\r\n"
        "café naïve cafe\u0301 Ångström 日本語のテキスト、中文文本。한국어 텍스트 Привет, мир! مرحبا بالعالم हिन्दी "
        "🙂🚀👩‍👩‍👧 ```python\nprint('hi')\n```   \n\n\n    trailing   \u00a0nbsp\u3000ideographic 1234567890 ½ ²"
    )
    rng = random.Random(0)  # plus text made of random Qwen tokens: rare merges, odd byte sequences
    texts = [sample] + [
        enc.decode([rng.randrange(enc.n_vocab) for _ in range(40)], errors="replace") for _ in range(50)
    ]
    for text in texts:
        assert qwen(text, add_special_tokens=False)["input_ids"] == enc.encode_ordinary(
            unicodedata.normalize("NFC", text)
        )
    assert qwen.decode(qwen(sample)["input_ids"]) == unicodedata.normalize("NFC", sample)


def test_qwen2_added_tokens_and_special_ids(qwen):
    for offset, (content, special) in enumerate(QWEN2_ADDED_TOKENS):
        token = qwen.added_tokens_decoder[QWEN2_FIRST_ADDED_ID + offset]
        assert (token.content, token.special) == (content, special)
    assert QWEN2_ADDED_TOKENS[-1][0] == "<|file_sep|>" and QWEN2_FIRST_ADDED_ID + len(QWEN2_ADDED_TOKENS) == 151665
    assert (qwen.eos_token, qwen.eos_token_id, qwen.pad_token, qwen.pad_token_id) == (
        "<|im_end|>",
        151645,
        "<|endoftext|>",
        151643,
    )
    assert qwen.bos_token is None and type(qwen).__name__ == "Qwen2Tokenizer"
    assert qwen("<|im_start|>user\nhi<|im_end|>")["input_ids"] == [151644, 872, 198, 6023, 151645]


def test_qwen2_chat_template_renders_chatml(qwen):
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ]
    assert qwen.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6.<|im_end|>\n"
    )
    system = [{"role": "system", "content": "Be brief."}, messages[0]]
    assert qwen.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen2_build_is_deterministic_and_verified(tmp_path, monkeypatch):
    import json

    cached = ensure_qwen2_tokenizer()
    built = build_qwen2_tokenizer(tmp_path / "qwen")
    files = json.loads((built / "manifest.json").read_text())["files"]
    assert files == json.loads((cached / "manifest.json").read_text())["files"]
    assert len(json.loads((built / "tokenizer.json").read_text())["model"]["merges"]) == 151643 - 256
    monkeypatch.setenv("SEMHITOK_CACHE", str(tmp_path / "empty"))
    with pytest.raises(AssetError, match="Qwen2.5 tokenizer not found.*make assets"):
        qwen2_tokenizer_path()


def test_load_text_tokenizer_missing_folder_is_clear(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"no tokenizer folder at .*nowhere.*known names: \['qwen2.5', 'smollm2'\]"
    ):
        load_text_tokenizer(tmp_path / "nowhere")


# --- label masks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen", "smollm2"])
def test_chat_template_masks_line_up(family, request):
    tokenizer = request.getfixturevalue(family)
    sample = tokenize_conversation(CONV, tokenizer, "chat_template", max_length=512)
    messages = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in CONV]
    reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    check_masks(sample, tokenizer, "chat_template", "<|im_end|>", reference)


def test_vicuna_v1_masks_line_up_on_sentencepiece(llama):
    sample = tokenize_conversation(CONV, llama, vicuna_v1, max_length=512)
    rounds = "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in zip(QUESTIONS, ANSWERS, strict=True))
    reference = llama(f"{VICUNA_SYSTEM} {rounds}")["input_ids"]  # LLaVA-1.5's conv_vicuna_v1.get_prompt()
    assert reference[0] == llama.bos_token_id
    check_masks(sample, llama, vicuna_v1, "</s>", reference)


def test_turn_objects_and_dicts_agree(qwen):
    turns = [Turn(role=t["from"], text=t["value"]) for t in CONV]
    a, b = (tokenize_conversation(c, qwen, "chat_template", 512) for c in (CONV, turns))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


def test_token_straddling_template_and_response_is_labelled(qwen):
    conv = [{"from": "human", "value": "List two."}, {"from": "gpt", "value": "\n- one\n- two"}]
    sample = tokenize_conversation(conv, qwen, "chat_template", 512)
    (run,) = labelled_runs(sample)
    assert qwen.decode(run) == "\n\n- one\n- two<|im_end|>"  # "assistant\n" + "\n" is one token: the model says it


def test_system_prompt_override(qwen):
    sample = tokenize_conversation(CONV[:2], qwen, ChatTemplate(system="Be brief."), 512)
    assert qwen.decode(sample.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


DEFAULT_SYSTEM = {"qwen": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                  "smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}  # fmt: skip


@pytest.mark.parametrize("family", ["qwen", "smollm2"])
def test_no_system_prompt_removes_the_injected_default_turn(request, family):
    """system "" (the training / inference default): the template's injected system turn is gone, token for token;
    the rest (labels too) is what the template renders; None keeps the default; prompts render the same way."""
    tokenizer = request.getfixturevalue(family)
    none, default = conversation_template("chat_template", ""), conversation_template("chat_template", None)
    bare, kept = (tokenize_conversation(CONV, tokenizer, t, 512) for t in (none, default))
    system_turn = f"<|im_start|>system\n{DEFAULT_SYSTEM[family]}<|im_end|>\n"
    n_system = len(tokenizer(system_turn, add_special_tokens=False)["input_ids"])
    assert tokenizer.decode(kept.input_ids).startswith(system_turn) and n_system > 10
    assert tokenizer.decode(bare.input_ids).startswith("<|im_start|>user\n<image>\nWhat color")
    assert "system" not in tokenizer.decode(bare.input_ids)
    assert torch.equal(bare.input_ids, kept.input_ids[n_system:]) and torch.equal(bare.labels, kept.labels[n_system:])
    prompt = tokenize_prompt(CONV[:3], tokenizer, none)
    assert torch.equal(prompt, bare.input_ids[: len(prompt)])
    assert tokenizer.decode(prompt).endswith("And the cat?<|im_end|>\n<|im_start|>assistant\n")


def test_no_system_prompt_with_templates_that_inject_none_or_cannot_be_read(qwen):
    """A template without a default system turn renders as it is; vicuna_v1 "" drops LLaVA's system line; a template
    whose injected turn cannot be located is a one-line error naming the fix."""
    plain = copy.copy(qwen)
    plain.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")  # fmt: skip
    rendered = conversation_template("chat_template", "").render([("human", "hi"), ("gpt", "yo")], plain)
    assert rendered.text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    vicuna = conversation_template("vicuna_v1", "").render([("human", "hi"), ("gpt", "yo")], plain)
    assert vicuna.text == "USER: hi ASSISTANT: yo</s>"
    assert conversation_template("vicuna_v1", None).render([("human", "hi")], plain).text.startswith(VICUNA_SYSTEM)
    odd = copy.copy(qwen)
    odd.chat_template = ("{% if messages[0]['role'] != 'system' %}[SYS]hello[/SYS]{% endif %}{% for m in messages %}"
                         "{% if m['role'] == 'system' %}[SYS]{{ m['content'] }}[/SYS]{% else %}<{{ m['role'] }}>"
                         "{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}{% if add_generation_prompt %}"
                         "<assistant>{% endif %}")  # fmt: skip
    assert conversation_template("chat_template", "Be kind.").render([("human", "hi")], odd).text.startswith("[SYS]Be")
    with pytest.raises(ConversationError, match=r"cannot locate the default system turn .* set model.system_prompt"):
        conversation_template("chat_template", "").render([("human", "hi")], odd)


def test_truncation_is_counted_never_raised(qwen):
    full = tokenize_conversation(CONV, qwen, "chat_template", 512)
    cut = tokenize_conversation(CONV, qwen, "chat_template", 40)
    assert len(cut.input_ids) == 40 and cut.num_truncated == len(full.input_ids) - 40
    assert torch.equal(cut.labels, full.labels[:40]) and cut.num_targets < full.num_targets
    tiny = tokenize_conversation(CONV, qwen, "chat_template", 5)
    assert tiny.num_targets == 0 and tiny.num_images == 0  # the image placeholder was cut: the caller sees it


def test_prompt_ends_with_assistant_prefix(qwen, llama):
    ids = tokenize_prompt(CONV[:3], qwen, "chat_template")
    messages = [
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": ANSWERS[0]},
        {"role": "user", "content": QUESTIONS[1]},
    ]
    assert ids.tolist() == qwen.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert llama.decode(tokenize_prompt(CONV[:1], llama, "vicuna_v1")).endswith("picture? ASSISTANT:")


# --- clear errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "turns, message",
    [
        ([], "conversation is empty"),
        ([{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}], r"turn 0 has unknown role 'system'"),
        ([{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}], r"turn 1 has unknown role 'bot'"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "must start with a 'human' turn"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "  \n"}], r"turn 1 \('gpt'\) is empty"),
        ([{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}], r"turn 0 \('human'\) is empty"),
        ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], r"turn 1 is from 'human' but 'gpt'"),
        ([{"from": "human", "value": "q"}], "last turn is from 'human'"),
        ([{"from": "human"}], "turn 0 must be a dict with 'from' and 'value'"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], "must be a string"),
    ],
)
def test_bad_conversations_name_the_problem(turns, message):
    with pytest.raises(ConversationError, match=message):
        check_turns(turns)


def test_bad_setups_name_the_problem(qwen, spm_folder):
    plain = llama_tokenizer(spm_folder)  # no <image> registered
    with pytest.raises(ConversationError, match=r"image placeholder '<image>' is \d+ tokens.*add_tokens"):
        tokenize_conversation(CONV, plain, vicuna_v1, 512)
    with pytest.raises(ConversationError, match=r"end-of-turn marker '</s>' is \d+ tokens"):
        tokenize_conversation(CONV, qwen, vicuna_v1, 512)  # Vicuna's </s> is text to Qwen
    with pytest.raises(ConversationError, match="has no chat template"):
        tokenize_conversation(CONV[2:4], plain, "chat_template", 512)
    with pytest.raises(ConversationError, match="unknown conversation template 'llama3'"):
        get_template("llama3")
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}</s>{% endfor %}"
    with pytest.raises(ConversationError, match="edits message contents"):
        tokenize_conversation(
            [{"from": "human", "value": "q "}, {"from": "gpt", "value": "a"}], plain, "chat_template", 512
        )
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConversationError, match="does not end assistant turns with '</s>'"):
        tokenize_conversation(CONV[2:4], plain, "chat_template", 512)
