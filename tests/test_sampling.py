"""Sampling (mllm/sampling.py) and its entry points scripts/generate.py and scripts/chat.py, on tiny random models:
Llama (untied) and Qwen2 (tied, qkv bias) with a word-level tokenizer (no chat template: vicuna_v1), the tiny
SemHiTok (K = 32, m = 4, 4x4 grid), flat and factorized heads."""

import copy
import os
import runpy
import subprocess
import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import CONTEXT, build_tiny_mllm, save_tiny_world
from PIL import Image
from test_mllm_model import FAMILIES, GRID, random_grid
from torch.utils._python_dispatch import TorchDispatchMode

import mllm.cli
from mllm.conversation import generation_prompt_ids
from mllm.kernels import PackedLinear, can_pack, fusion_blocker
from mllm.model import FactorizedImageHead, MLLMConfig, SemHiTokLM
from mllm.sampling import (
    ChatSession,
    DecodingRows,
    InferenceError,
    SamplingConfig,
    draw,
    draw_image_index,
    filter_logits,
    generate_images,
    generate_text,
    generation_prompts,
    images_per_call,
    kv_cache_bytes,
    left_pad,
    load_for_inference,
    make_generators,
    model_template,
    row_bytes,
    sample_image_ids,
)
from mllm.text_tokenizer import load_text_tokenizer
from semhitok import PRESETS, SemHiTok
from semhitok.runtime import resolve_device, to_tensor

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["draw a red cat", "a big blue dog on the mat with a ball under the sky", "two fish"]
NUM = GRID * GRID
DEMO = Path(__file__).resolve().parents[1] / "mllm" / "demo" / "mllm"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Folders: a tiny LLM + tokenizer per family, the tiny SemHiTok, a saved MLLM checkpoint, an image, a non-image."""
    root = save_tiny_world(tmp_path_factory.mktemp("sampling"))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "red.png")
    (root / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def models(world):
    return {(f, h): build_tiny_mllm(world, f, h) for f in FAMILIES for h in ("flat", "factorized")}


def images(model, prompts=PROMPTS, **fields) -> torch.Tensor:
    """generate_images -> image ids (P*N, 16)."""
    grid = generate_images(model, prompts, SamplingConfig(**fields), tokenizer=model.load_text_tokenizer())
    return model.vocab.to_ids(grid)


def prompt_ids(model, caption: str) -> torch.Tensor:
    """The generation prompt as generate_images renders it (vicuna_v1 with the model's system prompt)."""
    tokenizer = model.load_text_tokenizer()
    return generation_prompt_ids(caption, tokenizer, model_template(model, "vicuna_v1", tokenizer))


# ---------------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["flat", "factorized"])
def test_kv_cache_gives_the_ids_of_full_recomputation(models, family, head):
    model = models[family, head]
    for fields in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 5, "num_images": 2}):
        cached, full = (images(model, cfg_scale=3.0, use_cache=c, **fields) for c in (True, False))
        assert cached.shape == (len(PROMPTS) * fields.get("num_images", 1), NUM)
        assert torch.equal(cached, full)


def test_cached_steps_over_left_padded_rows_match_one_plain_forward_per_row(models):
    """DecodingRows' hidden states (prefill + cached steps, left-padded batch) equal one plain forward per row."""
    model = models["qwen2", "flat"]
    rows = [prompt_ids(model, p) for p in PROMPTS[:2]]
    extra = model.vocab.to_ids(random_grid(2))[:, :3]  # (2, 3) image ids fed one per step
    with torch.no_grad():
        single = []
        for r, e in zip(rows, extra, strict=True):
            ids = torch.cat([r, e])[None]
            single.append(model.backbone(model.embed(ids)).last_hidden_state[0, -4:])
        state = DecodingRows(model)
        stepped = [state.start(*left_pad(rows, model.vocab.boi_id))] + [state.step(e) for e in extra.T]
    for b in range(2):
        assert torch.allclose(torch.stack([s[b] for s in stepped]), single[b], atol=1e-5)


def test_image_position_rows_are_the_cells_the_sampler_feeds(world, tmp_path):
    """`image_position`: the grid-cell rows start at 0 and are saved with the parts; with rows far from 0, greedy
    sampling (cell t fed at step t) draws exactly the teacher-forced greedy choices of one plain forward over the
    sampled image (cells from `embed`'s runs of image ids), for a flat and a factorized head; off by one cell it would
    not."""
    for head in ("flat", "factorized"):
        base = build_tiny_mllm(world, "llama", head)
        model = SemHiTokLM.from_config(replace(base.config, image_position=True), base.load_text_tokenizer()).eval()
        assert model.image_position.weight.shape == (NUM, model.causal_lm.config.hidden_size)
        assert not model.image_position.weight.any() and "image_position" in model.parts()
        with torch.no_grad():
            model.image_position.weight.normal_(0, 3.0)
        model.save_pretrained(tmp_path / head)
        loaded = SemHiTokLM.from_pretrained(tmp_path / head).eval()
        assert torch.equal(loaded.image_position.weight, model.image_position.weight)
        ids = images(model, temperature=0.0, cfg_scale=1.0)  # (P, 16) image ids
        for p, caption in enumerate(PROMPTS):
            prompt = torch.cat([prompt_ids(model, caption), torch.tensor([model.vocab.boi_id]), ids[p]])[None]
            with torch.no_grad():
                hidden = model.backbone(model.embed(prompt)).last_hidden_state[0, -NUM - 1 : -1]
                forced = model.vocab.index_to_ids(model.head.sample(hidden, lambda logits: logits.argmax(-1)))
            assert torch.equal(forced, ids[p])


def test_cfg_scale_one_equals_plain_conditional_sampling(models):
    model = models["llama", "flat"]
    cond, uncond = [prompt_ids(model, p) for p in PROMPTS], prompt_ids(model, "")
    cfg = SamplingConfig(cfg_scale=1.0, seed=3, num_images=2)
    with_uncond_rows = sample_image_ids(model, cond, uncond, NUM, cfg)
    assert torch.equal(with_uncond_rows, sample_image_ids(model, cond, None, NUM, cfg))
    assert torch.equal(with_uncond_rows, images(model, cfg_scale=1.0, seed=3, num_images=2))
    guided = images(model, cfg_scale=4.0, seed=3, num_images=2)
    assert not torch.equal(guided, with_uncond_rows)
    linear = images(model, cfg_scale=4.0, cfg_schedule="linear", seed=3, num_images=2)
    assert torch.equal(linear[:, 0], with_uncond_rows[:, 0]) and not torch.equal(linear, guided)  # scale 1 at t = 0


@contextmanager
def scaled(weight: torch.Tensor, factor: float):
    """Multiply a parameter in place for the block, then restore it."""
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(factor)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize("head", ["flat", "factorized"])
def test_image_positions_never_get_text_ids_even_when_text_is_far_likelier(models, head):
    model = models["llama", head]
    with scaled(model.causal_lm.get_output_embeddings().weight, 1e3):  # every text logit dwarfs every image logit
        ids = images(model, temperature=1.0, cfg_scale=2.0, num_images=2)
        assert model.vocab.is_image_id(ids).all()
        seq = torch.cat([prompt_ids(model, PROMPTS[0]), torch.tensor([model.vocab.boi_id]), ids[0]])[None]
        with torch.no_grad():
            hidden = model.backbone(model.embed(seq)).last_hidden_state[0, -NUM - 1 : -1]  # predicts ids[0]
            text_max = model.text_logits(hidden).max(-1).values
            image_max = model.image_logits(hidden).max(-1).values
        assert (text_max > image_max + 10).all()  # an unrestricted sampler would have written text here


def test_fixed_seed_reproduces_and_each_image_has_its_own_seed(models):
    model = models["llama", "factorized"]
    first = images(model, seed=11, num_images=2, top_k=20, top_p=0.9)
    assert torch.equal(first, images(model, seed=11, num_images=2, top_k=20, top_p=0.9))
    assert not torch.equal(first, images(model, seed=12, num_images=2, top_k=20, top_p=0.9))
    assert not torch.equal(first[0], first[1])  # two images of one prompt differ
    alone = images(model, PROMPTS[1:2], seed=11 + 3, num_images=1, top_k=20, top_p=0.9)  # image 3 = prompt 1, n 1
    assert torch.equal(alone[0], first[3])


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_prompts_of_different_lengths_equal_one_by_one(models, family):
    model, n = models[family, "flat"], 2
    assert len({len(prompt_ids(model, p)) for p in PROMPTS}) == len(PROMPTS)
    for fields in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7}):
        batched = images(model, num_images=n, cfg_scale=3.0, **fields)
        for p, prompt in enumerate(PROMPTS):
            seed = fields.get("seed", 0) + p * n
            alone = images(model, [prompt], num_images=n, cfg_scale=3.0, **{**fields, "seed": seed})
            assert torch.equal(batched[p * n : (p + 1) * n], alone)


def test_factorized_head_draws_i_then_j_given_i_with_guidance_at_both_levels(models):
    model, scale = models["qwen2", "factorized"], 2.5
    ids = images(model, PROMPTS[:1], temperature=0.0, cfg_scale=scale)
    rows = [torch.cat([prompt_ids(model, c), torch.tensor([model.vocab.boi_id])]) for c in (PROMPTS[0], "")]
    with torch.no_grad():  # the first position by hand: cond and uncond rows, guided i, then guided j given that i
        h = torch.stack([model.backbone(model.embed(r[None])).last_hidden_state[0, -1] for r in rows])  # (2, D)
        sem = model.head.semantic_logits(h)
        i = int((sem[0] + (scale - 1) * (sem[0] - sem[1])).argmax())
        tex = model.head.texture_logits(h, torch.tensor([i, i]))
        j = int((tex[0] + (scale - 1) * (tex[0] - tex[1])).argmax())
    assert model.vocab.split(ids[0, :1]) == (torch.tensor([i]), torch.tensor([j]))
    sampled = images(model, temperature=1.0, num_images=4, seed=1)
    semantic, texture = model.vocab.split(sampled)
    assert semantic.max() < model.vocab.K and texture.max() < model.vocab.m and len(sampled.unique()) > NUM


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor back to the host (a GPU would wait for them): `.item()` / `bool(tensor)`
    (`_local_scalar_dense`), `nonzero`, `masked_select` and indexing with a boolean mask."""

    def __init__(self):
        super().__init__()
        self.count = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = [a for a in (args[1] if func is torch.ops.aten.index.Tensor else []) if a is not None]
        reads = func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                         torch.ops.aten.masked_select.default) or any(m.dtype == torch.bool for m in masks)  # fmt: skip
        self.count[str(func)] += reads
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["flat", "factorized"])
def test_decoding_steps_read_nothing_back_to_the_host(models, family, head):
    """Two runs that differ only in the number of image positions read the host equally often: the per-step loop
    (guidance, top-k / top-p, the factorized head's two draws, the next input, HF's attention mask) reads nothing."""
    model = models[family, head]
    cond, uncond = [prompt_ids(model, p) for p in PROMPTS[:2]], prompt_ids(model, "")
    counts = []
    for n in (3, 9):
        with HostReads() as reads:
            sample_image_ids(model, cond, uncond, n, SamplingConfig(top_k=5, top_p=0.9, seed=1))
        counts.append(reads.count)
    assert counts[0] == counts[1], counts


def test_sampling_never_builds_the_joint_logits_of_the_factorized_head(models, monkeypatch):
    """The factorized head draws i from K logits, then j from the m logits of that i: the K·m joint table
    (`FactorizedImageHead.logits`) is never computed while sampling."""
    model = models["qwen2", "factorized"]
    monkeypatch.setattr(FactorizedImageHead, "logits", lambda self, hidden: pytest.fail("joint K*m logits built"))
    assert images(model, num_images=2, seed=2).shape == (2 * len(PROMPTS), NUM)


@pytest.mark.parametrize("head", ["flat", "factorized"])
def test_images_are_the_same_in_any_split_into_decoding_calls(models, monkeypatch, head):
    model, calls = models["llama", head], []
    real = sample_image_ids

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(mllm.sampling, "sample_image_ids", counted)
    fields = {"num_images": 2, "seed": 9, "cfg_scale": 2.0, "top_k": 20}
    together = images(model, **fields)
    assert calls == [2 * len(PROMPTS)]  # the tiny model: every image fits one call
    for max_batch, sizes in ((1, [1] * 6), (4, [4, 2]), (5, [5, 1])):
        calls.clear()
        assert torch.equal(images(model, max_batch=max_batch, **fields), together) and calls == sizes
    calls.clear()
    assert torch.equal(images(model, memory_budget_gib=1e-9, **fields), together) and calls == [1] * 6


def test_the_memory_budget_counts_kv_cache_logits_and_activations(models):
    model = models["llama", "flat"]  # 2 layers, 2 KV heads of 8 dims, hidden 32, MLP 64, K·m = 128
    config = model.causal_lm.config
    assert kv_cache_bytes(config, 10, torch.float32) == 2 * 2 * 2 * 8 * 10 * 4
    assert kv_cache_bytes(config, 10, torch.bfloat16) == 2 * 2 * 2 * 8 * 10 * 2
    assert row_bytes(model, 10) == 2 * 2 * 2 * 8 * 10 * 4 + 6 * 4 * 128 + 10 * (4 * 32 + 3 * 64) * 4
    three = 3 * 2 * row_bytes(model, 40 + NUM) / 2**30  # 3 guided images of a 40-id prompt
    assert images_per_call(model, 40, NUM, SamplingConfig(memory_budget_gib=three)) == 3
    assert images_per_call(model, 40, NUM, SamplingConfig(memory_budget_gib=three), guided=False) == 6
    assert images_per_call(model, 40, NUM, SamplingConfig(memory_budget_gib=three, max_batch=2)) == 2
    assert images_per_call(model, 40, NUM, SamplingConfig(memory_budget_gib=three / 10)) == 1  # always at least 1
    assert images_per_call(model, 40, NUM, SamplingConfig()) > 1000  # half of this machine's free memory
    with pytest.raises(ValueError, match="max_batch >= 0, memory_budget_gib >= 0"):
        SamplingConfig(max_batch=-1, memory_budget_gib=-1.0)


def test_decoding_preparation_merges_lora_and_packs_linears_without_changing_the_model(world):
    """`prepare_for_decoding`: LoRA folded into the weights (its adapters kept but unused), every other linear layer
    packed for oneDNN on this CPU; hidden states and both heads' logits unchanged (fp32: within 1e-5)."""
    torch.manual_seed(0)
    config = MLLMConfig(llm=str(world / "llama"), semhitok=str(world / "semhitok"), adapter_width_sem=16,
                        adapter_width_pix=8, head="factorized", train_llm="lora")  # fmt: skip
    model = SemHiTokLM.from_config(config, load_text_tokenizer(world / "llama")).eval()
    with torch.no_grad():
        for name, weight in model.llm.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.1)  # PEFT starts B at 0: make the LoRA change the model
    seq = torch.cat([prompt_ids(model, PROMPTS[0]), torch.tensor([model.vocab.boi_id])])[None]

    def outputs():
        with torch.no_grad():
            hidden = model.backbone(model.embed(seq)).last_hidden_state[0]
            return hidden, model.text_logits(hidden), model.head.semantic_logits(hidden)

    before = outputs()
    packed = model.prepare_for_decoding(torch.device("cpu"))
    assert packed == 2 * 7 + 1 + 5 + 3  # layers x (q, k, v, o, gate, up, down), lm_head, adapter, head
    assert model.fused_decoder is not None and len(model.fused_decoder.layers) == 2  # the layers' 7 packed there
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == packed - 2 * 7
    with pytest.raises(RuntimeError, match="packed into the fused decoder"):
        model.causal_lm.get_decoder()(inputs_embeds=model.embed(seq))  # HF's layers hold no weight any more
    assert all(".lora_" in name for name, m in model.named_modules() if type(m) is torch.nn.Linear)  # A, B unused
    for a, b in zip(before, outputs(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(RuntimeError, match="packed for CPU inference"):
        model.state_dict()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_decoder_computes_what_the_hf_decoder_does(world, family, dtype):
    """`FusedDecoder` (q|k|v packed, rotary on q and k at once, oneDNN post-ops for SiLU, the gate product and the
    residual adds, a preallocated KV cache) against the HF decoder body on the same weights: a left-padded prefill
    and cached steps (`DecodingRows`), a right-padded teacher-forced pass, and a cache that has to grow. fp32:
    within 1e-5; bf16: within 3 % of the hidden states' scale (measured: 0.6-1.1 %; a wrong sign, scale, mask or
    cache slot is off by O(1))."""
    if not can_pack(torch.device("cpu"), dtype):  # e.g. an AVX2-only CPU: oneDNN computes no bf16, nothing is fused
        pytest.skip(f"oneDNN cannot compute {dtype} on this CPU, so prepare_for_decoding builds no fused decoder")
    reference = build_tiny_mllm(world, family).to(dtype)
    model = copy.deepcopy(reference)
    model.prepare_for_decoding(torch.device("cpu"), dtype)
    assert model.fused_decoder is not None
    rows = [prompt_ids(reference, p) for p in PROMPTS]
    ids, mask = left_pad(rows, reference.vocab.boi_id)
    extra = reference.vocab.to_ids(random_grid(len(rows)))[:, :3]  # image ids fed one per step
    right = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    real = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)

    def run(m: SemHiTokLM) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            state = DecodingRows(m)
            stepped = torch.stack([state.start(ids, mask)] + [state.step(e) for e in extra.T], 1)  # (R, 4, D)
            forced = m.backbone(m.embed(right), real).last_hidden_state[real.bool()]  # (real positions, D)
        return stepped.float(), forced.float()

    tolerance = (lambda ref: 1e-5) if dtype == torch.float32 else (lambda ref: 0.03 * ref.abs().max().item())
    for ref, got in zip(run(reference), run(model), strict=True):
        assert torch.isfinite(got).all() and (ref - got).abs().max() <= tolerance(ref)
    with torch.no_grad():  # a cache with room for one more position grows (twice) while stepping
        embeds = model.embed(ids)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # as DecodingRows numbers left-padded rows
        hidden, cache = model.fused_decoder(embeds, mask, positions, None, extra_capacity=1)
        grown = [model.fused_decoder(model.embed(e[:, None]), torch.cat([mask, mask.new_ones(len(e), k + 1)], 1),
                                     (mask.sum(1, keepdim=True) + k), cache)[0][:, 0] for k, e in enumerate(extra.T)]  # fmt: skip
    assert cache.length == ids.shape[1] + 3 and cache.keys[0].shape[2] >= cache.length
    ref = run(reference)[0]
    assert (torch.stack([hidden[:, -1].float()] + [g.float() for g in grown], 1) - ref).abs().max() <= tolerance(ref)


def test_decoders_the_fused_one_cannot_run_keep_hf_layers(world):
    model = build_tiny_mllm(world, "llama")
    model.causal_lm.config.hidden_act = "gelu"
    assert fusion_blocker(model.causal_lm.get_decoder()) == "activation 'gelu'"
    model.prepare_for_decoding(torch.device("cpu"))
    assert model.fused_decoder is None
    assert isinstance(model.causal_lm.get_decoder().layers[0].self_attn.q_proj, PackedLinear)


def test_draws_follow_the_probabilities_and_never_pick_a_filtered_id():
    """`draw` (exponential race, uniforms from each row's own generator): frequencies over 4,000 draws within
    0.03 of the probabilities, a zero-probability id never, top_k's cut ids never, rows independent of each other."""
    logits = torch.tensor([0.1, 0.0, 0.6, 0.3]).log().expand(4000, 4)
    cfg = SamplingConfig(temperature=1.0)
    drawn = draw(logits, cfg, make_generators(0, 4000, torch.device("cpu")))
    assert torch.allclose(torch.bincount(drawn, minlength=4) / 4000, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.03)
    top2 = draw(logits, replace(cfg, top_k=2), make_generators(0, 4000, torch.device("cpu")))
    assert set(top2.tolist()) == {2, 3}
    alone = draw(logits[:1], cfg, make_generators(7, 1, torch.device("cpu")))
    assert drawn[7] == alone[0]


def test_filtering_keeps_top_k_and_the_top_p_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.76)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False]]
    assert torch.equal(filter_logits(logits, top_k=9), logits)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        SamplingConfig(top_p=0.0)


def test_bad_prompts_are_named(models):
    model = models["llama", "flat"]
    with pytest.raises(InferenceError, match="prompt 1 is empty"):
        images(model, ["a cat", "  "])
    with pytest.raises(InferenceError, match=f"exceeds the model's context of {CONTEXT} tokens"):
        images(model, ["cat " * 80])  # + the prompt template and the 16 + 2 image tokens


def test_load_for_inference_loads_the_tokenizer_once_and_sampling_reads_no_tokenizer_file(world, monkeypatch):
    loads, load = [], SemHiTok.from_pretrained.__func__

    def counted(cls, directory, *args, **kwargs):
        loads.append(Path(directory).resolve())
        return load(cls, directory, *args, **kwargs)

    monkeypatch.setattr(SemHiTok, "from_pretrained", classmethod(counted))
    run = load_for_inference(world / "mllm")
    assert loads == [(world / "semhitok").resolve()]
    assert run.model.config.image_grid == (GRID, GRID)
    run.model.config = replace(run.model.config, semhitok=str(world / "nowhere"))  # the grid comes from the config
    grid = generate_images(run.model, PROMPTS[:1], SamplingConfig(temperature=0.0), tokenizer=run.tokenizer)
    assert grid.shape == (1, GRID, GRID) and run.decode(grid).shape == (1, 3, 32, 32) and len(loads) == 1


# ---------------------------------------------------------------------------------------------------- text


def test_text_generation_cache_stops_and_never_draws_specials(models):
    model = models["llama", "flat"]
    tokenizer, image = model.load_text_tokenizer(), model.vocab.to_ids(random_grid(1))
    session = ChatSession(model, tokenizer, image, SamplingConfig(temperature=0.0, max_new_tokens=12))
    ids = session.prompt_ids("what color is the cat")
    assert (ids == model.vocab.boi_id).sum() == 1 and model.vocab.is_image_id(ids).sum() == NUM
    greedy, sampled = (SamplingConfig(temperature=t, seed=4, max_new_tokens=12) for t in (0.0, 1.0))
    cached = generate_text(model, ids, greedy)
    assert len(cached) > 0 and torch.equal(cached, generate_text(model, ids, replace(greedy, use_cache=False)))
    assert torch.equal(generate_text(model, ids, sampled), generate_text(model, ids, replace(sampled, use_cache=False)))
    with scaled(model.special.head, 1e3):  # untied Llama: the specials' own output rows
        with torch.no_grad():
            hidden = model.backbone(model.embed(ids[None])).last_hidden_state[0, -1]
        assert int(model.text_logits(hidden).argmax()) in model.vocab.special_ids  # a special would win
        answer = generate_text(model, ids, greedy)
    assert torch.equal(answer, cached)  # the specials are never candidates, however likely
    assert not (answer.unsqueeze(-1) == torch.tensor(model.vocab.special_ids)).any()
    assert len(generate_text(model, ids, greedy, stop_ids=[int(cached[0])])) == 0
    assert tokenizer.eos_token_id in session.stop_ids()


def test_chat_renders_the_history_with_the_image_once(models):
    model = models["llama", "factorized"]
    tokenizer, greedy = model.load_text_tokenizer(), SamplingConfig(temperature=0.0, max_new_tokens=4)
    session = ChatSession(model, tokenizer, model.vocab.to_ids(random_grid(1)), greedy)
    answer = session.ask("what color is the cat")
    assert session.history == ([("what color is the cat", answer)] if answer else [])  # empty answers are dropped
    session.history = [("what color is the cat", "red")]
    ids = session.prompt_ids("how many fish")
    text = tokenizer.decode(ids[~model.vocab.is_image_id(ids)].tolist())
    assert model.vocab.is_image_id(ids).sum() == NUM and (ids == model.vocab.boi_id).sum() == 1
    assert text.index("what color is the cat") < text.index("red") < text.index("how many fish")
    with pytest.raises(InferenceError, match="exceeds the model's context"):
        session.ask("cat " * 80)
    with pytest.raises(InferenceError, match="empty"):
        session.ask(" ")


# ---------------------------------------------------------------------------------------------------- scripts


def script_main(name: str):
    return runpy.run_path(str(REPO / "scripts" / f"{name}.py"), run_name="scripts")["main"]


def run_in_process(name: str, args: list[str], capsys) -> tuple[int, str, str]:
    try:
        script_main(name)(args)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def run_script(name: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / f"{name}.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, input=stdin, timeout=300)


def test_generate_script_writes_images_and_a_grid(world, tmp_path):
    out = tmp_path / "out" / "cats.png"
    result = run_script("generate", "--checkpoint", str(world / "mllm"), "--prompt", "a red cat", "--prompt",
                        "two fish", "--num-images", "3", "--seed", "2", "--top-k", "40", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    files = [out, *(out.with_name(f"cats-{p}-{n}.png") for p in range(2) for n in range(3))]
    assert all(str(f) in result.stdout for f in files) and "image tokens" in result.stderr  # tqdm
    size = PRESETS["semhitok-tiny"].image_size
    assert Image.open(files[1]).size == (size, size) and Image.open(out).size == (3 * size + 8, 2 * size + 6)


def test_chat_script_answers_once_and_interactively(world, capsys):
    args = ["--checkpoint", str(world / "mllm"), "--image", str(world / "red.png"), "--max-new-tokens", "5"]
    code, out, err = run_in_process("chat", [*args, "--question", "what color is it"], capsys)
    assert code == 0 and len(out.splitlines()) == 1, err
    result = run_script("chat", *args, stdin="what color is it\n\nhow many\nexit\nnever asked\n")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 2, result.stderr
    assert result.stdout.splitlines()[0] == out.strip()  # greedy: the one-shot answer again


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("generate", ["--prompt", " "], "prompt 0 is empty"),
        ("generate", ["--prompt", "cat " * 80], "exceeds the model's context of 96 tokens"),
        ("generate", ["--prompt", "a cat", "--top-p", "0"], "0 < top_p <= 1"),
        ("chat", ["--image", "{world}/broken.png", "--question", "what"], "cannot load image"),
        ("chat", ["--image", "{world}/missing.png", "--question", "what"], "cannot load image"),
        ("chat", ["--image", "{world}/red.png", "--question", ""], "the question is empty"),
        ("chat", ["--image", "{world}/red.png", "--question", "cat " * 80], "exceeds the model's context"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(world, capsys, name, args, message):
    args = [a.format(world=world) for a in args]
    code, _, err = run_in_process(name, ["--checkpoint", str(world / "mllm"), *args], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("name", ["generate", "chat"])
def test_bad_checkpoints_are_one_line_and_exit_2(world, capsys, monkeypatch, tmp_path, name):
    question = ["--prompt", "a cat"] if name == "generate" else ["--image", str(world / "red.png"), "--question", "a"]
    monkeypatch.setattr(mllm.cli, "DEFAULT_CHECKPOINT", tmp_path / "demo")
    cases = {None: "the shipped demo checkpoint is missing", world / "nowhere": "checkpoint folder not found",
             world / "semhitok": "is a SemHiTok tokenizer checkpoint, not an MLLM checkpoint",
             world: "not an MLLM checkpoint (no mllm_config.json)"}  # fmt: skip
    for folder, message in cases.items():
        code, _, err = run_in_process(name, [*question, *(["--checkpoint", str(folder)] if folder else [])], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_a_real_failing_run_prints_no_traceback(world):
    result = run_script("generate", "--checkpoint", str(world / "semhitok"), "--prompt", "a cat")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("generate.py: error: ")


# ---------------------------------------------------------------------------------------------------- precision


def test_bf16_inference_keeps_cache_and_guidance_exact_within_its_precision(world):
    """bf16 (weights cast, logits sampled in fp32): the MLLM is bf16, the tokenizer fp32; within bf16 the KV cache
    still equals full recomputation exactly. CFG scale 1 equals plain conditional sampling up to bf16 rounding: the
    conditional rows' logits are the same computation, but in a batch twice as large (the unconditional rows added)
    bf16 matmuls accumulate in another order, so a near-tie may flip (seen: 1 id of 48)."""
    run = load_for_inference(world / "mllm", "cpu", precision="bf16")
    assert run.precision.bf16 and all(p.dtype == torch.bfloat16 for p in run.model.parameters())
    assert all(p.dtype == torch.float32 for p in run.semhitok.parameters())
    cached, full = (images(run.model, cfg_scale=3.0, seed=1, use_cache=c) for c in (True, False))
    assert torch.equal(cached, full)
    assert (images(run.model, cfg_scale=1.0, seed=3) == images(run.model, seed=3)).float().mean() >= 0.9
    assert not load_for_inference(world / "mllm", "cpu", precision="fp32").precision.bf16


def greedy_decisions(run, captions: list[str], cfg: SamplingConfig, forced: torch.Tensor | None = None):
    """The greedy image-index decision at every position, as `sample_image_ids` makes it, with the context fed
    either the model's own decisions (forced None: free greedy decoding) or `forced` (P, T) indices (teacher
    forcing: each decision given the same prefix). -> (P, T) decisions."""
    model = run.model
    cond, uncond = generation_prompts(model, captions, cfg, run.tokenizer)
    boi = torch.tensor([model.vocab.boi_id])
    ids, mask = left_pad([torch.cat([r, boi]) for r in cond + [uncond] * len(cond)], model.vocab.boi_id)
    rows, generators = DecodingRows(model), make_generators(0, len(cond), ids.device)
    steps = model.config.image_grid[0] * model.config.image_grid[1]
    out = torch.empty(len(cond), steps, dtype=torch.long)
    with torch.no_grad():
        hidden = rows.start(ids, mask)
        for t in range(steps):
            out[:, t] = draw_image_index(model, hidden, cfg.cfg_scale, cfg, generators, True)
            fed = out[:, t] if forced is None else forced[:, t]
            hidden = rows.step_embeds(model.index_embeds(fed, t).to(hidden.dtype).repeat(2, 1))
    return out


def test_bf16_agrees_with_fp32_on_the_shipped_demo_model():
    """Greedy decoding of the shipped demo checkpoint in bf16 vs fp32. Free-running greedy paths part at the first
    near-tie (the trained model's first image ids are near-ties among background codes: the paths split at
    position 0-1), so image ids are compared teacher-forced: each bf16 decision given fp32's own greedy prefix.
    Measured here: 96.5 % of those decisions equal (4 prompts x 64 ids); asserted with margin: >= 85 %; and >= 3 of
    4 answers equal."""
    runs = {p: load_for_inference(DEMO, "cpu", precision=p) for p in ("fp32", "bf16")}
    prompts = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green star",
               "a photo of a yellow cross above a blue circle"]  # fmt: skip
    greedy = SamplingConfig(temperature=0.0, cfg_scale=3.0)
    reference = greedy_decisions(runs["fp32"], prompts, greedy)
    assert torch.equal(greedy_decisions(runs["fp32"], prompts, greedy, forced=reference), reference)
    agreement = (greedy_decisions(runs["bf16"], prompts, greedy, forced=reference) == reference).float().mean()
    print(f"\nbf16 vs fp32 teacher-forced greedy image decisions: {agreement:.3f}")
    assert agreement >= 0.85
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    answers = {}
    for p, r in runs.items():
        session = ChatSession(r.model, r.tokenizer, r.model.vocab.to_ids(r.semhitok.encode(to_tensor(image)[None])))
        answers[p] = [session.ask(q) for q in ("How many objects are there?", "Is there a red object?",
                                              "What color is the circle?", "Is there a blue square?")]  # fmt: skip
    assert sum(a == b for a, b in zip(answers["fp32"], answers["bf16"], strict=True)) >= 3, answers


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_on_cuda_device_auto_picks_the_gpu_and_decoding_never_waits_for_the_host(world):
    """`--device auto` is CUDA where there is one; there nothing is packed (cuBLAS), the KV cache equals full
    recomputation in bf16, and CUDA's sync-debug mode reports no synchronizing call per decoding step."""
    device = resolve_device("auto", option="--device")
    assert device.type == "cuda"
    run = load_for_inference(world / "mllm", device, precision="bf16")
    model = run.model
    assert model.code_sem.is_cuda and not any(isinstance(m, PackedLinear) for m in model.modules())
    cached, full = (images(model, cfg_scale=3.0, seed=1, use_cache=c) for c in (True, False))
    assert torch.equal(cached, full)
    cond, uncond, syncs = [prompt_ids(model, p) for p in PROMPTS[:2]], prompt_ids(model, ""), []
    for n in (3, 9):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ids = sample_image_ids(model, cond, uncond, n, SamplingConfig(top_k=5, top_p=0.9, seed=1))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    assert ids.is_cuda and ids.shape == (2, 9) and syncs[0] == syncs[1], syncs


def test_the_gpu_check_stops_with_one_line_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: scripts/gpu_check.sh would run")
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and result.stdout == "" and not (tmp_path / "out").exists()
    assert result.stderr.count("\n") == 1 and "gpu_check.sh: error: no CUDA device" in result.stderr
