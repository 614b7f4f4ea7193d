"""MLLM data pipeline: the code cache (script run as a user runs it, resume after a kill, equality with
`SemHiTok.encode`, strict tokenizer check) and the tokenized samples built from it with the real SmolLM2 tokenizer
(understanding labels and image blocks, generation labels, CFG caption dropout, skipped-and-counted samples), the
collator and the mixture. Tiny SemHiTok (32 px, 4x4 grid, K = 32, m = 4) on a 12-image synthetic dataset."""

import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm.codes import INDEX_NAME, CodeCache, CodeCacheError, extract_codes
from mllm.constants import IGNORE_INDEX
from mllm.conversation import Turn, conversation_template, generation_prompt_ids, tokenize_conversation
from mllm.data.llava import LlavaSample, load_llava
from mllm.data.mixture import (
    IMAGE_CUT,
    MANY_PLACEHOLDERS,
    MISSING_IMAGE,
    NO_PLACEHOLDER,
    NO_TARGETS,
    PLACEHOLDER_NO_IMAGE,
    STAGE_MIXES,
    CaptionDataset,
    ConversationDataset,
    DataConfig,
    LMSample,
    MixtureDataset,
    SampleBuilder,
    TextToImageDataset,
    box_cells,
    build_dataset,
    collate_lm,
    load_captions,
    onset_cells,
)
from mllm.synthetic.dataset import write_dataset
from mllm.vocab import VisualVocab, VocabError
from semhitok import PRESETS, SemHiTok
from semhitok.runtime import BadItem, SkipCounter, load_image, read_jsonl, to_tensor

REPO = Path(__file__).resolve().parents[1]
TINY = PRESETS["semhitok-tiny"]
TEMPLATE = conversation_template("chat_template", "")  # what SampleBuilder renders by default: no system prompt


def run_script(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / "extract_codes.py"), "--workers", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)


def load_codes(root: Path) -> dict[str, tuple[list, list]]:
    cache = CodeCache(root)
    return {k: (cache.grid(k).semantic.tolist(), cache.grid(k).texture.tolist()) for k in cache.images}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny SemHiTok + 12-image synthetic dataset at its 32 px + a cache made by the script + the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    from mllm.assets import smollm2_path

    root = tmp_path_factory.mktemp("data")
    torch.manual_seed(0)
    SemHiTok(TINY).save_pretrained(root / "tok")
    write_dataset(root / "synth", 12, size=TINY.image_size)
    result = run_script("--tokenizer", str(root / "tok"), "--images", str(root / "synth/scenes.jsonl"),
                        "--out", str(root / "codes"), "--shard-size", "4", "--batch-size", "3", "--size", "32")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "12 images encoded, 0 skipped" in result.stdout
    text = AutoTokenizer.from_pretrained(smollm2_path())
    vocab = VisualVocab.create(text, TINY.K, TINY.m)
    codes = CodeCache(root / "codes", tokenizer=root / "tok")
    return {"root": root, "text": text, "vocab": vocab, "codes": codes,
            "builder": SampleBuilder(text, vocab, codes, "chat_template", max_length=512)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- code cache


def test_cache_equals_encode(world):
    root, codes = world["root"], world["codes"]
    tok = SemHiTok.from_pretrained(root / "tok")
    keys = sorted(codes.images)
    images = torch.stack([to_tensor(load_image(root / "synth" / k, TINY.image_size)) for k in keys])
    grid = tok.encode(images)
    for b, key in enumerate(keys):
        cached = codes.grid(key)
        assert cached.semantic.shape == (1, 4, 4) and cached.semantic.dtype == torch.int64
        assert torch.equal(cached.semantic[0], grid.semantic[b]) and torch.equal(cached.texture[0], grid.texture[b])
    index = json.loads((root / "codes" / INDEX_NAME).read_text())
    assert (index["tokenizer"]["K"], index["tokenizer"]["m"], index["tokenizer"]["h"], index["num_skipped"]) == (
        32,
        4,
        4,
        0,
    )
    assert len(index["shards"]) == 3 and len(codes) == 12 and "./images/0000003.png" in codes
    shard = load_file(root / "codes/shard-00000.safetensors")
    assert shard["semantic"].dtype == shard["texture"].dtype == torch.int16 and shard["semantic"].shape == (4, 4, 4)


def test_resume_after_kill_gives_the_same_codes(world, tmp_path):
    """A kill leaves: a temp file, a finished shard not yet in index.json, the index listing the earlier shards.
    A shard corrupted on disk is also recomputed. The resumed cache equals the straight one; done shards are kept."""
    root, out = world["root"], tmp_path / "codes"
    args = dict(tokenizer_dir=root / "tok", images=root / "synth/llava.json", out=out, shard_size=4, batch_size=3)
    extract_codes(**args)
    straight = load_codes(out)
    index = json.loads((out / INDEX_NAME).read_text())
    del index["shards"]["2"]  # killed after shard 2's os.replace, before the index update
    index["complete"] = False
    (out / INDEX_NAME).write_text(json.dumps(index))
    (out / ".shard-00003.safetensors.tmp999").write_bytes(b"half a shard")
    with pytest.raises(CodeCacheError, match="incomplete .2/3 shards.*re-run"):
        CodeCache(out)
    shard1 = out / "shard-00001.safetensors"
    shard1.write_bytes(shard1.read_bytes()[:-10])  # corrupt on disk
    shard0_mtime = (out / "shard-00000.safetensors").stat().st_mtime_ns
    extract_codes(**args)
    assert load_codes(out) == straight
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == shard0_mtime  # kept, not recomputed
    assert not list(out.glob(".*tmp*"))
    other = dict(args, shard_size=5)
    with pytest.raises(CodeCacheError, match="another run.*shard_size"):
        extract_codes(**other)


def test_bad_images_are_skipped_and_counted(world, tmp_path):
    root = world["root"]
    (tmp_path / "images").mkdir()
    (tmp_path / "images/broken.png").write_bytes(b"not a png")
    (tmp_path / "images/good.png").write_bytes((root / "synth/images/0000000.png").read_bytes())
    rows = [{"image": "images/good.png"}, {"image": "images/broken.png"}, {"image": "images/absent.png"}, {"x": 1}]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extract_codes(root / "tok", tmp_path / "list.jsonl", tmp_path / "codes")
    cache = CodeCache(tmp_path / "codes")
    assert (
        len(cache) == 1
        and "images/good.png" in cache
        and set(cache.skipped) == {"images/broken.png", "images/absent.png"}
    )
    with pytest.raises(KeyError, match="broken.png.*no codes"):
        cache.grid("images/broken.png")


def test_mismatched_tokenizer_is_a_clear_error(world, tmp_path):
    torch.manual_seed(1)
    SemHiTok(TINY).save_pretrained(tmp_path / "retrained")  # same config, other weights
    k64 = dataclasses.replace(TINY, semantic=dataclasses.replace(TINY.semantic, codebook_size=64))
    SemHiTok(k64).save_pretrained(tmp_path / "k64")
    cache_dir = world["root"] / "codes"
    with pytest.raises(CodeCacheError, match="weights_hash.*re-extract"):
        CodeCache(cache_dir, tokenizer=tmp_path / "retrained")
    with pytest.raises(CodeCacheError, match="config_hash.*K: 32 vs 64"):
        CodeCache(cache_dir, tokenizer=tmp_path / "k64")
    with pytest.raises(VocabError, match="K, m = 32, 4 but the visual vocabulary 64, 4"):
        SampleBuilder(world["text"], VisualVocab.create(world["text"], 64, 4), world["codes"])
    result = run_script("--tokenizer", str(tmp_path / "k64"), "--images", str(world["root"] / "synth/scenes.jsonl"),
                        "--out", str(cache_dir))  # fmt: skip
    assert result.returncode == 2 and "another run" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------- samples


def image_segment(world, key: str) -> torch.Tensor:
    return world["vocab"].segment(world["vocab"].to_ids(world["codes"].grid(key)))[0]  # (P + 2,)


def test_understanding_labels_answers_and_places_the_image_block(world):
    vocab, text = world["vocab"], world["text"]
    data = ConversationDataset(world["root"] / "synth/llava.json", world["builder"])
    for s, item in zip(data.samples, data, strict=True):
        assert item.direction == "understanding" and item.num_truncated == 0
        plain = tokenize_conversation(s.turns, text, TEMPLATE, max_length=10_000)
        segment = image_segment(world, s.image)
        at = int((plain.input_ids == vocab.image_token_id).nonzero())
        assert torch.equal(item.input_ids, torch.cat([plain.input_ids[:at], segment, plain.input_ids[at + 1 :]]))
        assert (item.labels[at : at + len(segment)] == IGNORE_INDEX).all()
        answers = "".join(t.text + text.eos_token for t in s.turns if t.role == "gpt")
        assert text.decode(item.labels[item.labels != IGNORE_INDEX]) == answers


def test_generation_labels_image_ids_and_eoi(world):
    vocab, text = world["vocab"], world["text"]
    pairs = load_captions(world["root"] / "synth/scenes.jsonl")
    data = TextToImageDataset(pairs, world["builder"], cfg_dropout=0.1, seed=0)
    for i, item in enumerate(data):
        segment = image_segment(world, pairs[i].image)
        prompt = generation_prompt_ids(data.caption(i, 0), text, TEMPLATE)
        assert item.direction == "generation"
        assert torch.equal(item.input_ids, torch.cat([prompt, segment])) and segment[0] == vocab.boi_id
        assert torch.equal(item.labels[item.labels != IGNORE_INDEX], segment[1:])  # image ids + <eoi>
        assert vocab.is_image_id(segment[1:-1]).all() and segment[-1] == vocab.eoi_id
    assert text.decode(generation_prompt_ids("", text, TEMPLATE)) == (
        "<|im_start|>user\nGenerate an image of:<|im_end|>\n<|im_start|>assistant\n"
    )


def test_samples_carry_no_system_prompt_unless_asked(world):
    """SmolLM2's chat template injects "You are a helpful AI assistant named SmolLM, ..." when a conversation has no
    system message: the default (system "") removes those tokens, null keeps them, a text replaces them."""
    turns = [{"from": "human", "value": "<image>\nIs there a red circle?"}, {"from": "gpt", "value": "Yes"}]
    key, text = load_captions(world["root"] / "synth/scenes.jsonl")[0].image, world["text"]
    rendered = {}
    for system in ("", None, "Be brief."):
        builder = dataclasses.replace(world["builder"], system=system)
        rendered[system] = builder.understanding(turns, key).input_ids
        decoded = text.decode(rendered[system])
        assert decoded.startswith({"": "<|im_start|>user\n", None: "<|im_start|>system\nYou are a helpful AI",
                                   "Be brief.": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"}[system])  # fmt: skip
        assert decoded.count("<|im_start|>system") == (system != "")
        prompt = text.decode(builder.generation("a red circle", key).input_ids)
        assert prompt.startswith("<|im_start|>user\n") == (system == "")
    default = text("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
                   add_special_tokens=False)["input_ids"]  # fmt: skip
    assert len(rendered[None]) - len(rendered[""]) == len(default) > 10
    assert torch.equal(rendered[None][len(default) :], rendered[""])  # the rest is token for token the same


def test_caption_dropout_is_ten_percent_and_deterministic(world):
    pairs = load_captions(world["root"] / "synth/scenes.jsonl")
    data = TextToImageDataset(pairs, world["builder"], cfg_dropout=0.1, seed=3)
    draws = [data.caption(i, epoch) for epoch in range(400) for i in range(len(pairs))]
    assert abs(sum(c == "" for c in draws) / len(draws) - 0.1) < 0.015
    again = TextToImageDataset(pairs, world["builder"], cfg_dropout=0.1, seed=3)
    assert draws == [again.caption(i, epoch) for epoch in range(400) for i in range(len(pairs))]
    assert len({c for c in draws if c}) > len(pairs)  # several captions per image get used
    data.set_epoch(7)
    assert torch.equal(data[5].input_ids, again.sample(5, 7).input_ids)
    dropped = next(i for i in range(len(pairs)) if data.caption(i, 7) == "")
    assert torch.equal(data[dropped].input_ids[:-18], generation_prompt_ids("", world["text"], TEMPLATE))


def test_t2i_captions_draw_fields_by_weight(world):
    scenes = world["root"] / "synth/scenes.jsonl"
    plain = load_captions(scenes)
    pairs = load_captions(scenes, sources={"captions": 1, "geneval.prompt": 3})
    assert [p.image for p in pairs] == [p.image for p in plain]  # every scene has captions: none is left out
    data = TextToImageDataset(pairs, world["builder"], cfg_dropout=0.0, seed=0)
    records = [r for _, r in read_jsonl(scenes)]
    with_prompt = [i for i, r in enumerate(records) if r.get("geneval")]
    without = [i for i, r in enumerate(records) if not r.get("geneval")]
    assert with_prompt and without
    for i in with_prompt:
        prompt = records[i]["geneval"]["prompt"]
        draws = [data.caption(i, epoch) for epoch in range(400)]
        share = 0.75 + 0.25 * plain[i].captions.count(prompt) / len(plain[i].captions)  # also among its captions
        assert abs(draws.count(prompt) / len(draws) - share) < 0.08, (i, draws.count(prompt))
    for i in without:  # no such field: the captions, uniformly
        assert set(pairs[i].captions) == set(plain[i].captions) and sum(pairs[i].weights) == pytest.approx(1.0)
    for bad in ({}, {"captions": 0}, {"captions": -1.0}):
        with pytest.raises(ValueError, match="positive weights"):
            load_captions(scenes, sources=bad)
    with pytest.raises(ValueError, match="missing 'image' or 'nope'"):
        load_captions(scenes, sources={"nope": 1})


def test_t2i_repeat_oversamples_records_by_field_value(world):
    """data.t2i_repeat: a record whose field holds a listed value appears that many times among the pairs (each copy
    draws its own caption), others once; counts that are not positive integers and values no record has are errors."""
    root, text, vocab = world["root"], world["text"], world["vocab"]
    scenes = root / "synth/scenes.jsonl"
    records = [r for _, r in read_jsonl(scenes)]
    tags = [(r.get("geneval") or {}).get("tag") for r in records]
    assert "counting" in tags and "position" in tags and None in tags
    pairs = load_captions(scenes, repeat={"geneval.tag": {"counting": 3, "position": 2}})
    times = {"counting": 3, "position": 2}
    expected = [r["image"] for r, t in zip(records, tags, strict=True) for _ in range(times.get(t, 1))]
    assert [p.image for p in pairs] == expected
    config = DataConfig(codes=str(root / "codes"), stage="t2i", captions=str(scenes))
    plain = build_dataset(config, text, vocab, root / "tok")
    more = build_dataset(dataclasses.replace(config, t2i_repeat={"geneval.tag": {"counting": 4}}), text, vocab,
                         root / "tok")  # fmt: skip
    assert len(more.sources[0]) == len(plain.sources[0]) + 3 * tags.count("counting")
    for bad in ({"geneval.tag": {"counting": 0}}, {"geneval.tag": {"counting": 1.5}}, {"geneval.tag": {}}):
        with pytest.raises(ValueError, match="positive integer counts"):
            load_captions(scenes, repeat=bad)
    with pytest.raises(ValueError, match="geneval.tag = 'countng'.*matches nothing"):
        load_captions(scenes, repeat={"geneval.tag": {"countng": 2}})


def test_t2i_boxes_weight_the_image_targets_in_object_cells(world, tmp_path):
    """data.t2i_boxes / t2i_box_weight / t2i_onset_weight: a record's boxes give its image targets in the cells they
    overlap that loss weight (`box_cells`, raster order) and each box's first cell the onset weight (`onset_cells`),
    every other label 1; the collator carries them as label_weights."""
    root, text, vocab = world["root"], world["text"], world["vocab"]
    scenes = root / "synth/scenes.jsonl"
    pairs = load_captions(scenes, boxes_key="boxes")
    records = [r for _, r in read_jsonl(scenes)]
    assert [list(map(list, p.boxes)) for p in pairs] == [r["boxes"] for r in records] and all(p.boxes for p in pairs)
    assert all(p.boxes == () for p in load_captions(scenes))  # not asked: none
    data = TextToImageDataset(pairs, world["builder"], cfg_dropout=0.0, box_weight=4.0)
    sample = data[0]
    image = vocab.is_image_id(sample.labels)
    h, w = world["builder"].codes.grid(pairs[0].image).semantic.shape[-2:]
    cells = torch.from_numpy(box_cells(pairs[0].boxes, h, w))
    assert 0 < cells.sum() < h * w
    assert torch.equal(sample.weights[image], torch.where(cells, 4.0, 1.0)) and (sample.weights[~image] == 1).all()
    plain = TextToImageDataset(pairs, world["builder"], cfg_dropout=0.0)[0]
    assert plain.weights is None and torch.equal(plain.labels, sample.labels)
    batch = collate_lm([plain, sample], pad_id=0)
    assert torch.equal(batch["label_weights"][1], sample.weights) and (batch["label_weights"][0] == 1).all()
    lower_right = box_cells([(0.5, 0.5, 0.75, 1.0)], 4, 4)  # a box edge on a cell edge: that cell is not in
    assert lower_right.reshape(4, 4)[2:, 2].all() and lower_right.sum() == 2
    assert TextToImageDataset(pairs, world["builder"], cfg_dropout=1.0, box_weight=4.0)[0].weights is None  # CFG's ""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "captions": ["x"], "boxes": [[-0.01, 0.1, 1.0000001, 0.3]]}\n')
    assert load_captions(bad, boxes_key="boxes")[0].boxes == ((0.0, 0.1, 1.0, 0.3),)  # rounding outside: clipped
    for boxes in ("[[0.2, 0.1, 0.1, 0.3]]", "[[0.1, 0.1, NaN, 0.3]]", "[0.1, 0.1, 0.2, 0.3]", '"all"'):
        bad.write_text(f'{{"image": "a.png", "captions": ["x"], "boxes": {boxes}}}\n')
        with pytest.raises(ValueError, match=r"bad.jsonl:1: 'boxes' must be a list of \[x0, y0, x1, y1\] boxes"):
            load_captions(bad, boxes_key="boxes")
    with pytest.raises(ValueError, match="box_weight must be finite and > 0"):
        TextToImageDataset(pairs, world["builder"], box_weight=0.0)
    with pytest.raises(ValueError, match="onset_weight must be finite and > 0"):
        TextToImageDataset(pairs, world["builder"], onset_weight=float("inf"))
    onsets = TextToImageDataset(pairs, world["builder"], cfg_dropout=0.0, box_weight=4.0, onset_weight=10.0)[0]
    first = torch.from_numpy(onset_cells(pairs[0].boxes, h, w))
    assert 1 <= first.sum() <= len(pairs[0].boxes) and not (first & ~cells).any()
    assert torch.equal(onsets.weights[image], torch.where(first, 10.0, torch.where(cells, 4.0, 1.0)))
    assert onset_cells([(0.3, 0.3, 0.9, 0.6), (0.0, 0.8, 0.2, 1.0)], 4, 4).nonzero()[0].tolist() == [5, 12]
    config = DataConfig(codes=str(root / "codes"), stage="t2i", captions=str(scenes), t2i_box_weight=2.0)
    for bad_config in (config, dataclasses.replace(config, t2i_box_weight=1.0, t2i_onset_weight=5.0)):
        with pytest.raises(ValueError, match="t2i_onset_weight need data.t2i_boxes"):
            build_dataset(bad_config, text, vocab, root / "tok")
    weighted = build_dataset(dataclasses.replace(config, t2i_boxes="boxes"), text, vocab, root / "tok")
    assert any(isinstance(item, LMSample) and item.weights is not None and (item.weights == 2.0).any() for item in weighted)
    with pytest.raises(ValueError, match="no record of .*scenes.jsonl has boxes in 'bbox'"):  # a wrong field name
        build_dataset(dataclasses.replace(config, t2i_boxes="bbox"), text, vocab, root / "tok")


def test_caption_understanding_answers_with_a_caption(world):
    pairs = load_captions(world["root"] / "synth/scenes.jsonl")
    item = CaptionDataset(pairs, world["builder"], seed=0)[2]
    answer = world["text"].decode(item.labels[item.labels != IGNORE_INDEX])
    assert answer.removesuffix(world["text"].eos_token) in pairs[2].captions
    assert (item.input_ids == world["vocab"].boi_id).sum() == 1


def test_bad_samples_are_skipped_and_counted(world):
    good = load_llava(world["root"] / "synth/llava.json")[0]
    q, a = good.turns[0].text.removeprefix("<image>\n"), good.turns[1].text
    long_answer = " ".join(["red"] * 200)

    def sample(image, question, answer=a):
        return LlavaSample("x", image, (Turn("human", question), Turn("gpt", answer)))

    def placeholder_at(question):
        ids = tokenize_conversation(sample(good.image, question).turns, world["text"], TEMPLATE, 10_000).input_ids
        return int((ids == world["vocab"].image_token_id).nonzero())

    straddle = f"{q} {' '.join(['red'] * (140 - placeholder_at(q + ' <image>')))} <image>"
    assert 130 < placeholder_at(straddle) < 150 < placeholder_at(straddle) + 18  # the 18-token block crosses the cut

    samples = [
        good,
        sample(good.image, q),  # no placeholder
        sample(good.image, f"<image>\n<image>\n{q}"),  # two placeholders
        sample(None, f"<image>\n{q}"),  # placeholder, no image
        sample("images/missing.png", f"<image>\n{q}"),
        sample(good.image, straddle),  # the cut falls inside the image block
        sample(good.image, f"<image>\n{long_answer}"),  # the image fits, the answer is cut away
        sample(good.image, f"<image>\n{q}", long_answer),  # cut inside the answer: truncated, kept
        sample(None, q),  # text only: fine
    ]
    builder = dataclasses.replace(world["builder"], max_length=150)
    batch = collate_lm(list(ConversationDataset(samples, builder)), pad_id=world["text"].pad_token_id)
    reasons = [b.reason for b in batch["skipped"]]
    assert reasons == [NO_PLACEHOLDER, MANY_PLACEHOLDERS, PLACEHOLDER_NO_IMAGE, MISSING_IMAGE, IMAGE_CUT, NO_TARGETS]
    assert batch["batch_size"] == 3 and batch["num_skipped"] == 6 and batch["num_truncated"] == 1
    assert batch["input_ids"].shape[1] == 150
    counter = SkipCounter()
    counter.update(batch)
    assert counter.num_skipped == 6 and "images/missing.png" in counter.reasons


def test_collate_pads_right_and_masks(world):
    a = LMSample(torch.tensor([5, 6, 7]), torch.tensor([IGNORE_INDEX, 6, 7]), "understanding")
    b = LMSample(torch.tensor([8]), torch.tensor([IGNORE_INDEX]), "generation", num_truncated=4)
    batch = collate_lm([a, BadItem(1, "k", MISSING_IMAGE), b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 3]
    assert batch["label_weights"].tolist() == [[1.0] * 3] * 2  # no sample weights: all 1
    assert (batch["direction"], batch["num_skipped"], batch["num_truncated"]) == (["understanding", "generation"], 1, 1)
    empty = collate_lm([BadItem(0, "k", MISSING_IMAGE)], pad_id=0)
    assert empty["input_ids"].shape == empty["labels"].shape == empty["attention_mask"].shape == (0, 0)
    assert (empty["batch_size"], empty["num_skipped"]) == (0, 1)


# ---------------------------------------------------------------------------------------------------- mixture


class Numbers:
    """A source whose sample is (name, index, epoch)."""

    def __init__(self, name: str, n: int):
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int, epoch: int):
        return self.name, index, epoch


def test_mixture_ratios_determinism_and_coverage():
    mix = MixtureDataset({"a": Numbers("a", 10), "b": Numbers("b", 300)}, {"a": 0.5, "b": 0.5}, seed=1)
    assert len(mix) == 310
    epochs = [[mix.sample(i, e) for i in range(len(mix))] for e in range(2)]
    assert [Counter(s[0] for s in ep) for ep in epochs] == [Counter(a=155, b=155)] * 2
    again = MixtureDataset({"a": Numbers("a", 10), "b": Numbers("b", 300)}, {"a": 0.5, "b": 0.5}, seed=1)
    assert epochs[0] == [again[i] for i in range(len(again))] and epochs[0] != epochs[1]
    small = Counter(s[1] for s in epochs[0] if s[0] == "a")
    assert set(small.values()) == {15, 16}  # over-sampled: every item 15 or 16 times, each draw a new cycle
    assert len({s for s in epochs[0] if s[0] == "a"}) == 155
    big = [s[1] for ep in epochs for s in ep if s[0] == "b"]
    assert sorted(big[:300]) == list(range(300))  # under-sampled: epoch 1 continues the pass epoch 0 began
    with pytest.raises(ValueError, match="one positive weight per source"):
        MixtureDataset({"a": Numbers("a", 3)}, {"a": 1.0, "b": 1.0})


def test_stage_presets_build_a_mixture(world):
    root = world["root"]
    assert set(STAGE_MIXES) == {"pretrain", "instruct", "t2i", "joint"}
    config = DataConfig(codes=str(root / "codes"), stage="joint", conversations=str(root / "synth/llava.json"),
                        captions=str(root / "synth/scenes.jsonl"), max_length=512)  # fmt: skip
    data = build_dataset(config, world["text"], world["vocab"], root / "tok")
    directions = Counter(item.direction for item in data)
    assert len(data) == 24 and directions == Counter(understanding=12, generation=12)
    pretrain = build_dataset(dataclasses.replace(config, stage="pretrain"), world["text"], world["vocab"], root / "tok")
    assert {item.direction for item in pretrain} == {"understanding"} and len(pretrain) == 12
    with pytest.raises(ValueError, match="set data.conversations"):
        build_dataset(dataclasses.replace(config, stage="instruct", conversations=""), world["text"], world["vocab"],
                      root / "tok")  # fmt: skip
