"""VisualVocab and SemHiTokLM on tiny random configs of real classes: Llama (untied embeddings) and Qwen2 (tied), with
a word-level PreTrainedTokenizerFast (~100 ids) and the tiny SemHiTok preset (K = 32, m = 4, 4x4 grid). The same
wrapper code runs both families."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mllm.constants import GENERATION_PROMPT, IGNORE_INDEX
from mllm.conversation import VICUNA_SYSTEM
from mllm.data.mixture import SampleBuilder
from mllm.model import (
    CONFIG_NAME,
    PARTS_NAME,
    LoraSettings,
    MLLMConfig,
    SemHiTokLM,
    build_image_head,
    chunked_loss,
    grid_sincos,
)
from mllm.text_tokenizer import load_text_tokenizer
from mllm.vocab import VisualVocab, VocabError
from semhitok import PRESETS, SemHiTok, TokenGrid
from semhitok.runtime import ConfigError

WORDS = (
    "a an the cat dog bird fish cow red blue green white black pink big small one two three is are on in under "
    "what color shape draw show me picture image of and with sky mat box ball circle square triangle star left right "
    "top bottom yes no it there how many this that see here please answer question describe scene object background "
    "striped dotted plain near far above below next to has have very quite some"
).split()
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig, {"tie_word_embeddings": False}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {"tie_word_embeddings": True}),
}
GRID = 4  # semhitok-tiny: 4x4 grid, K = 32, m = 4


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Folders: a tiny LLM (+ tokenizer) per family, the tiny SemHiTok, and a SemHiTok with K = 64."""
    root, tokenizer = tmp_path_factory.mktemp("mllm"), word_tokenizer()
    torch.manual_seed(0)
    for family, (model_cls, config_cls, extra) in FAMILIES.items():
        config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, **extra)  # fmt: skip
        model_cls(config).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    SemHiTok(PRESETS["semhitok-tiny"]).save_pretrained(root / "semhitok")
    tiny = PRESETS["semhitok-tiny"]
    SemHiTok(dataclasses.replace(tiny, semantic=dataclasses.replace(tiny.semantic, codebook_size=64))).save_pretrained(
        root / "semhitok-k64"
    )
    SemHiTok(dataclasses.replace(tiny, image_size=64, grid=8), init_from_teacher=False).save_pretrained(
        root / "semhitok-grid8"  # same K and m, another token grid
    )
    return root


def build(assets, family="llama", **overrides) -> tuple[SemHiTokLM, PreTrainedTokenizerFast]:
    torch.manual_seed(0)
    fields = {"adapter_width_sem": 16, "adapter_width_pix": 8, "loss_chunk_size": 5,
              "lora": LoraSettings(r=4, alpha=8, dropout=0.0), **overrides}  # fmt: skip
    config = MLLMConfig(llm=str(assets / family), semhitok=str(assets / "semhitok"), **fields)
    tokenizer = load_text_tokenizer(assets / family)
    return SemHiTokLM.from_config(config, tokenizer), tokenizer


def random_grid(batch: int, seed: int = 0) -> TokenGrid:
    g = torch.Generator().manual_seed(seed)
    K, m = PRESETS["semhitok-tiny"].K, PRESETS["semhitok-tiny"].m  # noqa: N806
    shape = (batch, GRID, GRID)
    return TokenGrid(torch.randint(0, K, shape, generator=g), torch.randint(0, m, shape, generator=g))


def words(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def understanding(tokenizer, vocab, image_ids, question: str, answer: str):
    """`<image> question` -> `answer </s>`, placeholder expanded; labels on the answer only."""
    prompt, reply = words(tokenizer, f"<image> {question}"), words(tokenizer, f"{answer} </s>")
    ids = torch.cat([prompt, reply])
    labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), reply])
    return vocab.expand_placeholders(ids, labels, image_ids[None])


def generation(tokenizer, vocab, image_ids, prompt: str):
    """`prompt` -> `<boi> ids <eoi>`; labels on the segment."""
    prompt, segment = words(tokenizer, prompt), vocab.segment(image_ids[None])[0]
    return torch.cat([prompt, segment]), torch.cat([torch.full_like(prompt, IGNORE_INDEX), segment])


def collate(samples, pad_id: int):
    """Right-pad (ids, labels) pairs -> input_ids, attention_mask, labels (B, L)."""
    length = max(len(ids) for ids, _ in samples)
    ids = torch.full((len(samples), length), pad_id)
    labels, mask = torch.full_like(ids, IGNORE_INDEX), torch.zeros_like(ids)
    for row, (i, lab) in enumerate(samples):
        ids[row, : len(i)], labels[row, : len(i)], mask[row, : len(i)] = i, lab, 1
    return ids, mask, labels


def mixed_batch(model, tokenizer, seed: int = 0):
    """One understanding and one generation sample."""
    image_ids = model.vocab.to_ids(random_grid(2, seed))
    samples = [understanding(tokenizer, model.vocab, image_ids[0], "what color is the cat", "red"),
               generation(tokenizer, model.vocab, image_ids[1], "draw a blue dog")]  # fmt: skip
    return collate(samples, tokenizer.pad_token_id)


def train(model, batch, steps: int, lr: float = 3e-3) -> dict:
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = model(*batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        return {k: float(v) for k, v in model.eval()(*batch).items()}


@torch.no_grad()
def logits(model, ids, mask):
    hidden = model.backbone(model.embed(ids), mask).last_hidden_state
    return model.text_logits(hidden), model.image_logits(hidden)


# ---------------------------------------------------------------------------------------------------- vocab


def test_vocab_round_trip_ranges_and_json(assets, tmp_path):
    vocab = VisualVocab.create(word_tokenizer(), K=32, m=4)
    grid = random_grid(3)
    ids = vocab.to_ids(grid)
    assert ids.shape == (3, 16) and ids.dtype == torch.int64 and vocab.is_image_id(ids).all()
    back = vocab.from_ids(ids, GRID, GRID)
    assert torch.equal(back.semantic, grid.semantic) and torch.equal(back.texture, grid.texture)
    assert vocab.image_id_range == (vocab.offset, vocab.offset + 128)
    assert int(vocab.to_ids(TokenGrid(torch.full((1, 1, 1), 5), torch.full((1, 1, 1), 3)))) == vocab.offset + 5 * 4 + 3
    start, stop = vocab.image_id_range
    for bad in (start - 1, stop):
        with pytest.raises(VocabError, match=rf"valid image ids are \[{start}, {stop}\)"):
            vocab.from_ids(torch.full((1, 16), bad), GRID, GRID)
    with pytest.raises(VocabError, match=r"shape \(B, 16\)"):
        vocab.from_ids(ids[:, :5], GRID, GRID)
    vocab.save(tmp_path / "vocab.json")
    assert VisualVocab.load(tmp_path / "vocab.json") == vocab
    data = json.loads((tmp_path / "vocab.json").read_text())
    without_m = {k: v for k, v in data.items() if k != "m"}
    for broken, match in (({**data, "extra": 1}, "unknown key"), (without_m, "missing")):
        (tmp_path / "bad.json").write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=match):
            VisualVocab.load(tmp_path / "bad.json")


def test_expand_placeholders_and_segments():
    tokenizer = word_tokenizer()
    vocab = VisualVocab.create(tokenizer, K=32, m=4)
    image_ids = vocab.to_ids(random_grid(2))
    ids, labels = understanding(tokenizer, vocab, image_ids[0], "what color", "red")
    assert torch.equal(ids[:18], torch.cat([torch.tensor([vocab.boi_id]), image_ids[0], torch.tensor([vocab.eoi_id])]))
    assert (labels[:20] == IGNORE_INDEX).all() and labels[-1] == tokenizer.eos_token_id
    bare = dataclasses.replace(vocab, wrap_understanding=False)
    two = torch.cat([words(tokenizer, "<image> and <image> what"), torch.tensor([vocab.image_token_id])])
    ids, none = bare.expand_placeholders(two, None, torch.cat([image_ids, image_ids[:1]]))
    assert none is None and len(ids) == 3 * 16 + 2 and torch.equal(ids[17:33], image_ids[1])
    with pytest.raises(VocabError, match="3 <image> placeholders but 2 images"):
        vocab.expand_placeholders(two, None, image_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_specials_added_and_embeddings_resized_consistently(assets, family):
    model, tokenizer = build(assets, family)
    vocab, lm = model.vocab, model.causal_lm
    for token, token_id in (("<boi>", vocab.boi_id), ("<eoi>", vocab.eoi_id), ("<image>", vocab.image_token_id)):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
    assert len(tokenizer) == vocab.offset == lm.get_input_embeddings().num_embeddings == lm.config.vocab_size
    assert lm.get_output_embeddings().weight.shape[0] == vocab.offset
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert tied == (family == "qwen2") and (model.special.head is None) == tied
    # special rows start as the LLM's rows: the wrapper's text logits are the plain model's
    ids = torch.cat([words(tokenizer, "draw a cat"), torch.tensor([vocab.boi_id, vocab.eoi_id])])[None]
    with torch.no_grad():
        assert torch.allclose(logits(model, ids, None)[0], lm(ids).logits, atol=1e-5)
    assert vocab.extend_tokenizer(load_text_tokenizer(assets / family)).convert_tokens_to_ids("<eoi>") == vocab.eoi_id
    other = load_text_tokenizer(assets / family)
    other.add_tokens(["<other>"], special_tokens=True)
    with pytest.raises(VocabError, match="not the text tokenizer"):
        vocab.extend_tokenizer(other)


# ---------------------------------------------------------------------------------------------------- model parts


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_scatter_puts_adapter_outputs_at_image_positions(assets, family):
    model, tokenizer = build(assets, family)
    ids, _, _ = mixed_batch(model, tokenizer)
    with torch.no_grad():
        got = model.embed(ids)
        table = model.causal_lm.get_input_embeddings().weight
        special = dict(zip(model.vocab.special_ids, model.special.embed, strict=True))
        for b, t in torch.cartesian_prod(torch.arange(ids.shape[0]), torch.arange(ids.shape[1])).tolist():
            i = int(ids[b, t])
            if model.vocab.is_image_id(ids[b, t]):
                k = i - model.vocab.offset
                want = model.adapter(model.code_sem[k], model.code_pix[k])
            else:
                want = special.get(i, table[i])
            assert torch.allclose(got[b, t], want, atol=1e-6), (b, t, i)


@pytest.mark.parametrize("kind", ["flat", "factorized"])
def test_chunked_loss_equals_full_cross_entropy_values_and_gradients(kind):
    torch.manual_seed(0)
    head = build_image_head(MLLMConfig(llm="", semhitok="", head=kind, head_width=16), hidden=24, K=32, m=4)
    hidden = torch.randn(13, 24, requires_grad=True)
    index = torch.randint(0, 128, (13,))

    def run(fn):
        head.zero_grad()
        hidden.grad = None
        loss = fn()
        loss.backward()
        return loss.detach(), [hidden.grad.clone(), *(p.grad.clone() for p in head.parameters())]

    loss_sum = lambda h, t: head.level_nll(h, t).sum()  # noqa: E731
    chunked, chunked_grads = run(lambda: chunked_loss(loss_sum, hidden, index, chunk_size=4))
    full, full_grads = run(lambda: F.cross_entropy(head.logits(hidden), index, reduction="sum"))
    assert torch.allclose(chunked, full, atol=1e-5)
    for a, b in zip(chunked_grads, full_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    saved = []  # what autograd keeps after the forward: never the (N, K*m) logits, only chunk inputs
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        chunked_loss(loss_sum, hidden, index, chunk_size=4)
    assert max(saved, default=0) <= 4 * 24


@pytest.mark.parametrize("kind", ["flat", "factorized"])
def test_chunked_weighted_level_sums_equal_the_unchunked_ones_values_and_gradients(kind):
    """The forward's image sums (`SemHiTokLM._image_loss_sums` through `chunked_loss` with per-row weights): several
    checkpointed chunks give the values and gradients of one pass, weights and all."""
    torch.manual_seed(0)
    head = build_image_head(MLLMConfig(llm="", semhitok="", head=kind, head_width=16), hidden=24, K=32, m=4)
    hidden = torch.randn(13, 24, requires_grad=True)
    index, weights = torch.randint(0, 128, (13,)), torch.rand(13) * 3

    def sums(h, t, w):  # (4,): the two levels' sums, plain and weighted
        nll = head.level_nll(h, t)
        return torch.cat([nll.sum(0), (w[:, None] * nll).sum(0)])

    def run(fn):
        head.zero_grad()
        hidden.grad = None
        out = fn()
        (out * torch.tensor([1.0, 0.5, 2.0, 0.25])).sum().backward()
        return out.detach(), [hidden.grad.clone(), *(p.grad.clone() for p in head.parameters())]

    chunked, chunked_grads = run(lambda: chunked_loss(sums, hidden, index, 4, weights))
    full, full_grads = run(lambda: sums(hidden, index, weights))
    assert chunked.shape == (4,) and torch.allclose(chunked, full, atol=1e-4)
    for a, b in zip(chunked_grads, full_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    empty = chunked_loss(sums, hidden[:0], index[:0], 4, weights[:0])  # no image targets: zeros of the same shape
    assert empty.shape == (4,) and not empty.any()


@pytest.mark.parametrize("kind", ["flat", "factorized"])
def test_level_nll_is_minus_log_p_of_the_semantic_code_and_of_the_texture_code_given_it(kind):
    torch.manual_seed(0)
    head = build_image_head(MLLMConfig(llm="", semhitok="", head=kind, head_width=16), hidden=24, K=32, m=4)
    hidden, index = torch.randn(13, 24), torch.randint(0, 128, (13,))
    with torch.no_grad():
        nll = head.level_nll(hidden, index)
        p = head.logits(hidden).double().softmax(-1).view(13, 32, 4)  # p(i, j)
    rows, (i, j) = torch.arange(13), TokenGrid.split_index(index, 4)
    p_i = p.sum(-1)[rows, i]
    assert torch.allclose(nll[:, 0].double(), -p_i.log(), atol=1e-5)
    assert torch.allclose(nll[:, 1].double(), -(p[rows, i, j] / p_i).log(), atol=1e-5)


def test_factorized_head_is_a_distribution_over_k_times_m():
    torch.manual_seed(0)
    head = build_image_head(MLLMConfig(llm="", semhitok="", head="factorized", head_width=16), hidden=24, K=32, m=4)
    hidden = torch.randn(5, 24)
    with torch.no_grad():
        joint = head.logits(hidden)  # (5, 128)
        assert torch.allclose(joint.exp().sum(-1), torch.ones(5), atol=1e-5)
        i = head.semantic_logits(hidden).argmax(-1)  # two-stage API agrees with the joint table
        log_j = head.texture_logits(hidden, i).log_softmax(-1)  # (5, m)
        log_i = head.semantic_logits(hidden).log_softmax(-1).gather(1, i[:, None])
        assert torch.allclose(joint.view(5, 32, 4)[torch.arange(5), i], log_i + log_j, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "factorized"])
def test_image_head_sample_makes_every_choice_through_the_sampler(kind):
    """`head.sample` is the one interface the sampler uses: greedy `choose` over the cond rows gives the argmax code."""
    torch.manual_seed(0)
    head = build_image_head(MLLMConfig(llm="", semhitok="", head=kind, head_width=16), hidden=24, K=32, m=4)
    hidden, seen = torch.randn(6, 24), []  # 2 groups (e.g. cond, uncond) of 3 images

    def choose(logits):
        seen.append(logits.shape)
        return logits[:3].argmax(-1)

    with torch.no_grad():
        index = head.sample(hidden, choose)
        assert index.shape == (3,) and int(index.max()) < 128
        if kind == "flat":
            assert seen == [(6, 128)] and torch.equal(index, head.logits(hidden[:3]).argmax(-1))
        else:
            i = head.semantic_logits(hidden[:3]).argmax(-1)
            j = head.texture_logits(hidden[:3], i).argmax(-1)
            assert seen == [(6, 32), (6, 4)] and torch.equal(index, i * 4 + j)


def test_unknown_head_is_named_not_defaulted():
    with pytest.raises(ConfigError, match=r"^head: 'flatt' is not one of \['factorized', 'flat'\]$"):
        build_image_head(MLLMConfig(llm="", semhitok="", head="flatt"), hidden=24, K=32, m=4)


STAGES = {
    "adapter": ({"train_head": False, "train_special_tokens": False}, ("adapter.",)),
    "lora": ({"train_llm": "lora"}, ("adapter.", "head.", "special.", "lora_")),
    "full": ({"train_llm": "full", "head": "factorized", "gradient_checkpointing": True},
             ("adapter.", "head.", "special.", "llm.")),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", STAGES)
def test_trainable_parameters_get_finite_gradients_and_frozen_ones_none(assets, family, stage):
    overrides, trained = STAGES[stage]
    model, tokenizer = build(assets, family, **overrides)
    model.train()
    model(*mixed_batch(model, tokenizer))["loss"].backward()
    names = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert any(part in name for part in trained), name
            names.add(next(part for part in trained if part in name))
        else:
            assert p.grad is None, name
    assert names == set(trained)


def test_understanding_overfits_one_batch(assets):
    model, tokenizer = build(assets, "qwen2", train_llm="full")
    image_ids = model.vocab.to_ids(random_grid(2, seed=1))
    batch = collate([understanding(tokenizer, model.vocab, image_ids[0], "what color is it", "red"),
                     understanding(tokenizer, model.vocab, image_ids[1], "what color is it", "blue")],  # fmt: skip
                    tokenizer.pad_token_id)
    losses = train(model, batch, steps=150)
    assert losses["loss_text"] < 0.02 and losses["loss_image"] == 0.0
    ids, mask, labels = batch
    text, _ = logits(model, ids, mask)
    learned = labels[:, 1:] != IGNORE_INDEX
    assert torch.equal(text[:, :-1].argmax(-1)[learned], labels[:, 1:][learned])  # the answer depends on the image


@torch.no_grad()
def greedy_image(model, prompt, n: int) -> torch.Tensor:
    """Greedy image ids (1, n) after `prompt` (1, L) (ending with <boi>), one step at a time with the KV cache."""
    out, ids = model.backbone(model.embed(prompt), use_cache=True), []
    for _ in range(n):
        ids.append(model.vocab.index_to_ids(model.image_logits(out.last_hidden_state[:, -1]).argmax(-1)))  # (1,)
        out = model.backbone(model.embed(ids[-1][:, None]), past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(ids, dim=1)


@pytest.mark.parametrize("head", ["flat", "factorized"])
def test_generation_overfits_and_greedy_decoding_reproduces_the_image_ids(assets, head):
    model, tokenizer = build(assets, "llama", train_llm="full", head=head)
    image_ids = model.vocab.to_ids(random_grid(2, seed=2))
    prompts = ["draw a red cat", "draw a blue dog"]
    batch = collate([generation(tokenizer, model.vocab, image_ids[k], p) for k, p in enumerate(prompts)],
                    tokenizer.pad_token_id)  # fmt: skip
    assert train(model, batch, steps=200, lr=1e-2)["loss_image"] < 0.05
    for k, p in enumerate(prompts):
        prompt = torch.cat([words(tokenizer, p), torch.tensor([model.vocab.boi_id])])[None]
        assert torch.equal(greedy_image(model, prompt, 16), image_ids[k : k + 1])


def test_kv_cache_steps_match_the_full_sequence(assets):
    model, tokenizer = build(assets, "qwen2")
    ids, _, _ = mixed_batch(model, tokenizer)
    ids = ids[1:, :12]
    with torch.no_grad():
        full = model.backbone(model.embed(ids)).last_hidden_state
        head = model.backbone(model.embed(ids[:, :8]), use_cache=True)
        tail = model.backbone(model.embed(ids[:, 8:]), past_key_values=head.past_key_values, use_cache=True)
    assert torch.allclose(torch.cat([head.last_hidden_state, tail.last_hidden_state], 1), full, atol=1e-5)


def test_bad_ids_and_labels_are_named(assets):
    model, tokenizer = build(assets)
    ids, mask, labels = mixed_batch(model, tokenizer)
    with pytest.raises(VocabError, match="expand it first"):
        model.embed(words(tokenizer, "<image> a cat")[None])
    with pytest.raises(VocabError, match="input ids must be"):
        model.embed(torch.full((1, 3), model.vocab.image_id_range[1]))
    with pytest.raises(VocabError, match="neither IGNORE_INDEX"):
        model(ids, mask, labels.masked_fill(labels == model.vocab.eoi_id, -5))


# ---------------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(("family", "overrides"), [("qwen2", {"train_llm": "lora", "head": "factorized"}),
                                                   ("llama", {"train_llm": "full"})])  # fmt: skip
def test_save_load_round_trip_gives_identical_logits(assets, tmp_path, family, overrides):
    model, tokenizer = build(assets, family, **overrides)
    batch = mixed_batch(model, tokenizer)
    train(model, batch, steps=3, lr=1e-2)  # LoRA B and the special rows move away from their init
    model.save_pretrained(tmp_path / "ckpt")
    loaded = SemHiTokLM.from_pretrained(tmp_path / "ckpt").eval()
    for a, b in zip(logits(model, *batch[:2]), logits(loaded, *batch[:2]), strict=True):
        assert torch.equal(a, b)
    assert loaded.config.train_llm == overrides["train_llm"] and loaded.vocab == model.vocab


def test_code_buffers_are_the_tokenizer_code_table(assets):
    model, _ = build(assets)
    tok = SemHiTok.from_pretrained(assets / "semhitok")
    table_sem, table_pix = tok.code_table()
    assert torch.equal(model.code_sem, table_sem) and torch.equal(model.code_pix, table_pix)
    grid = random_grid(2)
    index = model.vocab.ids_to_index(model.vocab.to_ids(grid)).view(2, GRID, GRID)  # through the LLM id space
    emb_sem, emb_pix = tok.code_embeddings(grid)
    assert torch.equal(model.code_sem[index], emb_sem) and torch.equal(model.code_pix[index], emb_pix)


def test_checkpoint_config_holds_the_token_grid_and_old_checkpoints_still_load(assets, tmp_path):
    model, _ = build(assets)
    assert model.config.image_grid == (GRID, GRID)
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert config["image_grid"] == [GRID, GRID]
    assert SemHiTokLM.from_pretrained(tmp_path / "ckpt").config.image_grid == (GRID, GRID)
    with pytest.raises(VocabError, match=r"built for a \(4, 4\) token grid, but .*semhitok-grid8 has a \(8, 8\) grid"):
        SemHiTokLM.from_pretrained(tmp_path / "ckpt", semhitok=assets / "semhitok-grid8")
    old = {k: v for k, v in config.items() if k != "image_grid"}  # written before the field existed
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(old))
    loaded = SemHiTokLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.image_grid == (GRID, GRID)


def test_load_errors_name_the_problem(assets, tmp_path):
    model, _ = build(assets)
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(VocabError, match=r"K\*m = 32\*4 = 128 .*semhitok-k64 has K\*m = 64\*4 = 256"):
        SemHiTokLM.from_pretrained(tmp_path / "ckpt", semhitok=assets / "semhitok-k64")
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    without_head = {k: v for k, v in config.items() if k != "head"}
    for broken, error, match in (({**config, "head": "factorized"}, ValueError, "missing .*head.semantic.weight"),
                                 ({**config, "typo": 1}, ConfigError, "unknown key"),
                                 (without_head, ConfigError, r"missing key\(s\) \['head'\]")):  # fmt: skip
        (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(broken))
        with pytest.raises(error, match=match):
            SemHiTokLM.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(config))
    (tmp_path / "ckpt" / PARTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=PARTS_NAME):
        SemHiTokLM.from_pretrained(tmp_path / "ckpt")


def test_merged_lora_export_loads_as_a_plain_model_with_the_same_logits(assets, tmp_path):
    model, tokenizer = build(assets, "llama", train_llm="lora")
    batch = mixed_batch(model, tokenizer)
    train(model, batch, steps=3, lr=1e-2)
    model.export_merged(tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    text_ids = words(tokenizer, "draw a red cat")[None]
    text_ids = torch.cat([text_ids, torch.tensor([[model.vocab.boi_id]])], 1)
    with torch.no_grad():
        assert torch.allclose(plain(text_ids).logits, logits(model, text_ids, None)[0], atol=1e-5)
    reloaded = SemHiTokLM.from_pretrained(tmp_path / "export")
    for a, b in zip(logits(model, *batch[:2]), logits(reloaded, *batch[:2]), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert load_text_tokenizer(tmp_path / "export").convert_tokens_to_ids("<boi>") == model.vocab.boi_id


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_smollm2_lora_step_save_load_and_export(assets, tmp_path, dtype):
    from mllm.assets import smollm2_path

    config = MLLMConfig(llm=str(smollm2_path()), semhitok=str(assets / "semhitok"), dtype=dtype, train_llm="lora",
                        head="factorized", gradient_checkpointing=True, lora=LoraSettings(r=4, alpha=8, dropout=0.0))  # fmt: skip
    tokenizer = load_text_tokenizer(smollm2_path())
    model = SemHiTokLM.from_config(config, tokenizer)
    assert model.vocab.offset == len(tokenizer) == 49152 + 3
    batch = mixed_batch(model, tokenizer)
    losses = train(model, batch, steps=2, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    model.save_pretrained(tmp_path / "ckpt")
    loaded = SemHiTokLM.from_pretrained(tmp_path / "ckpt").eval()
    for a, b in zip(logits(model, *batch[:2]), logits(loaded, *batch[:2]), strict=True):
        assert torch.equal(a, b)
    model.export_merged(tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=getattr(torch, dtype)).eval()
    text_ids = words(tokenizer, "draw a red cat <boi>")[None]
    with torch.no_grad():
        merged, wrapped = plain(text_ids).logits.float(), logits(model, text_ids, None)[0].float()
    if dtype == "float32":
        assert torch.allclose(merged, wrapped, atol=1e-4)
    else:  # W + BA is rounded to bf16 once merged (LoRA runs unmerged in fp32): ~1% off through 30 layers
        assert (merged - wrapped).abs().mean() < 0.03 * wrapped.abs().mean()


# ---------------------------------------------------------------------------------------------------- image rows


@pytest.mark.parametrize("image_input", ["embedding", "both"])
def test_image_rows_start_where_the_adapter_is(assets, image_input):
    """The own image rows are initialised so the model is unchanged: same logits as the adapter-only model."""
    adapter, tokenizer = build(assets, "llama")
    rows, _ = build(assets, "llama", image_input=image_input)
    batch = mixed_batch(adapter, tokenizer)
    assert rows.image_embedding.weight.shape == (adapter.vocab.num_image_ids, 32)
    for a, b in zip(logits(adapter, *batch[:2]), logits(rows, *batch[:2]), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("train_llm", ["frozen", "lora", "full"])
def test_image_rows_train_in_every_llm_mode_and_round_trip(assets, tmp_path, train_llm):
    model, tokenizer = build(assets, "qwen2", image_input="embedding", train_llm=train_llm)
    batch = mixed_batch(model, tokenizer)
    assert model.image_embedding.weight.requires_grad and not model.adapter.proj.weight.requires_grad
    before = model.image_embedding.weight.detach().clone()
    train(model, batch, steps=3, lr=1e-2)
    used = model.vocab.ids_to_index(batch[0][model.vocab.is_image_id(batch[0])]).unique()
    changed = (model.image_embedding.weight != before).any(-1)
    assert changed[used].all() and not changed[~torch.isin(torch.arange(len(changed)), used)].any()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = SemHiTokLM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.image_input == "embedding"
    for a, b in zip(logits(model, *batch[:2]), logits(loaded, *batch[:2]), strict=True):
        assert torch.equal(a, b)
    if train_llm == "lora":  # the merged export carries the rows too
        model.export_merged(tmp_path / "export")
        for a, b in zip(logits(model, *batch[:2]), logits(SemHiTokLM.from_pretrained(tmp_path / "export"), *batch[:2]),
                        strict=True):  # fmt: skip
            assert torch.allclose(a, b, atol=1e-5)


def test_new_config_keys_of_old_checkpoints_load_as_they_were_trained(assets, tmp_path):
    """A mllm_config.json written before image_input / system_prompt existed loads as it was trained: the adapter,
    and the template's default system prompt (null); a bad value is named."""
    model, _ = build(assets)
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert config["image_input"] == "adapter" and config["system_prompt"] == ""
    old = {k: v for k, v in config.items() if k not in ("image_input", "system_prompt")}
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(old))
    loaded = SemHiTokLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.image_input == "adapter" and loaded.config.system_prompt is None
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps({**config, "image_input": "rows"}))
    with pytest.raises(ConfigError, match=r"image_input: 'rows' is not one of \['adapter', 'embedding', 'both'\]"):
        SemHiTokLM.from_pretrained(tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------------- scoring


def test_sequence_nll_is_per_row_and_matches_the_forward(assets):
    model, tokenizer = build(assets, "llama", head="factorized")
    ids, mask, labels = mixed_batch(model, tokenizer)
    with torch.no_grad():
        rows = model.sequence_nll(ids, mask, labels)
        for b in range(len(ids)):
            n = int(mask[b].sum())
            alone = model(ids[b : b + 1, :n], None, labels[b : b + 1, :n])
            single = model.sequence_nll(ids[b : b + 1, :n], None, labels[b : b + 1, :n])
            for part in ("text", "image"):
                assert int(rows[f"n_{part}"][b]) == int(alone[f"n_{part}"])
                assert torch.allclose(rows[part][b], alone[f"loss_{part}"] * alone[f"n_{part}"], atol=1e-4)
                assert torch.allclose(rows[part][b], single[part][0], atol=1e-4)


# ---------------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("system", ["", None, "be brief"])
def test_inference_prompts_render_as_the_training_data(assets, system):
    """ChatSession's prompt is token for token the training sample up to the answer, and generate_images' prompt
    the generation sample up to `<boi>`, whatever the model's system_prompt (vicuna_v1: "" none, None LLaVA's)."""
    from mllm.diagnostics import MemoryCodes
    from mllm.sampling import ChatSession, _generation_prompt, model_template

    model, tokenizer = build(assets, "llama", system_prompt=system)
    grid = random_grid(1)
    builder = SampleBuilder(tokenizer, model.vocab, MemoryCodes({"x": grid}, model.vocab.K, model.vocab.m),
                            "vicuna_v1", system=system)  # fmt: skip
    sample = builder.understanding([{"from": "human", "value": "<image>\nwhat color is it"},
                                    {"from": "gpt", "value": "red"}], "x")  # fmt: skip
    prompt = ChatSession(model, tokenizer, model.vocab.to_ids(grid)).prompt_ids("what color is it")
    assert torch.equal(sample.input_ids[: len(prompt)], prompt)
    assert (sample.labels[: len(prompt)] == IGNORE_INDEX).all() and (sample.labels[len(prompt) :] != IGNORE_INDEX).all()
    generation = builder.generation("a red cat", "x").input_ids
    template = model_template(model, "auto", tokenizer)
    prefix = _generation_prompt(model, "a red cat", 0, tokenizer, template, GENERATION_PROMPT, 16)
    assert torch.equal(generation[: len(prefix) + 1], torch.cat([prefix, torch.tensor([model.vocab.boi_id])]))
    system_text = VICUNA_SYSTEM if system is None else system  # words of the word-level tokenizer (no BOS)
    expected = f"{system_text} USER: <image> what color is it ASSISTANT:"
    assert len(prompt) == len(tokenizer(expected)["input_ids"]) - 1 + 18  # <image> -> <boi> + 16 ids + <eoi>


def test_grid_sincos_codes_row_and_column_at_unit_norm():
    """Each cell's row of norm 1; equal rows share the row quarters, equal columns the column ones; a neighbour is more
    alike than a far cell; dims beyond a multiple of 4 stay 0."""
    code = grid_sincos(4, 6, 42)  # quarter = 10, 2 padding dims
    assert code.shape == (24, 42) and torch.allclose(code.norm(dim=-1), torch.ones(24))
    grid = code.reshape(4, 6, 42)
    assert torch.equal(grid[1, 0, :20], grid[1, 5, :20]) and torch.equal(grid[0, 3, 20:40], grid[3, 3, 20:40])
    assert not grid[..., 40:].any()
    sim = code @ code[0]
    assert sim[0] > sim[1] > sim[5] and sim[0] > sim[6] > sim[18]  # along row 0, down column 0
    with pytest.raises(ValueError, match="dim >= 4"):
        grid_sincos(2, 2, 3)
