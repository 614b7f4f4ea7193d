"""The synthetic domain: renderer, captions, GenEval metadata, POPE, MME, LLaVA data, and the exact detector.

Detector accuracies are printed; run with `-s` to see them.
"""

import io
import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mllm.synthetic import (
    CATEGORIES,
    GENEVAL_TAGS,
    MME_CATEGORIES,
    POPE_STRATEGIES,
    SHAPES,
    SHORT_ANSWER,
    TEXTURES,
    CategoryStats,
    DetectedObject,
    Scene,
    captions,
    describe,
    detect,
    detection_accuracy,
    judge_geneval,
    llava_conversation,
    mme_questions,
    mme_score,
    pope_questions,
    relative_position,
    render,
    sample_geneval_entries,
    sample_questions,
    sample_scene,
    scene_for_entry,
    score_geneval,
)
from mllm.synthetic.dataset import write_dataset
from mllm.synthetic.detector import foreground_mask, rgb_to_lab
from mllm.synthetic.questions import negative_category
from mllm.synthetic.render import render_background
from mllm.synthetic.text import is_description

REPO = Path(__file__).resolve().parents[1]
GENEVAL_METADATA = REPO.parent / "shared/data/bench/geneval/evaluation_metadata.jsonl"


def scenes(n: int, seed: int = 0) -> list[Scene]:
    return [sample_scene(np.random.default_rng([seed, i])) for i in range(n)]


# ------------------------------------------------------------------------------------------- scenes and renderer


def test_render_is_deterministic_and_depends_on_the_seed():
    a, b, c = (
        sample_scene(np.random.default_rng(7)),
        sample_scene(np.random.default_rng(7)),
        sample_scene(np.random.default_rng(8)),
    )
    assert a == b and a != c
    assert render(a, 96).tobytes() == render(b, 96).tobytes()
    assert render(a, 96).tobytes() != render(c, 96).tobytes()


@pytest.mark.parametrize("size", [32, 64, 128, 256, 512])
def test_renders_the_same_picture_at_any_resolution(size):
    scene = scenes(1, seed=3)[0]
    img = render(scene, size)
    assert img.size == (size, size) and img.mode == "RGB"
    reference = np.asarray(render(scene, 32), np.float64)
    shrunk = np.asarray(img.resize((32, 32), Image.BOX), np.float64)
    assert np.abs(shrunk - reference).mean() < 6  # same geometry, only sharper


def test_scenes_respect_the_sampler_constraints_and_round_trip_through_json():
    for scene in scenes(100):
        assert 1 <= len(scene.objects) <= 4
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
        for obj in scene.objects:
            assert min(obj.bbox) >= 0 and max(obj.bbox) <= 1
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                sep = max(abs(a.center[0] - b.center[0]), abs(a.center[1] - b.center[1])) - (a.size + b.size) / 2
                assert sep > 0.04  # no overlap, a visible gap


def test_backgrounds_are_textured_and_never_look_like_an_object():
    for kind in TEXTURES:
        bg = next(s.background for s in scenes(200) if s.background.kind == kind)
        pixels = np.asarray(render_background(bg, 128), np.float64)
        assert pixels.std(axis=(0, 1)).max() > 3, kind  # a real texture, not a flat colour
        assert not foreground_mask(rgb_to_lab(pixels)).any(), kind
    for scene in scenes(30):
        assert detect(render(Scene((), scene.background), 128)) == []


def test_captions_are_varied_and_exact():
    scene = next(
        s for s in scenes(200) if len(s.objects) == 2 and relative_position(s.objects[0].bbox, s.objects[1].bbox)
    )
    caps = captions(scene)
    assert len(caps) == len(set(caps)) >= 5
    for obj in scene.objects:
        assert all(obj.shape in c and obj.color in c for c in caps)
    assert any(" of " in c or " above " in c or " below " in c for c in caps)  # a spatial caption


def test_exactly_one_caption_of_each_scene_is_its_region_description():
    """`is_description` picks `describe`'s caption out of the styles (prompt expansion and layout prompts rely on
    it), for 1 to 4 objects."""
    for scene in scenes(60):
        assert [c for c in captions(scene) if is_description(c)] == [describe(scene)]


# ------------------------------------------------------------------------------------------- GenEval


def structure(entry: dict) -> tuple:
    """Keys of an entry and of its requirements, and the type of a position."""
    reqs = entry["include"] + entry.get("exclude", [])
    return tuple(entry), tuple(tuple(sorted(r)) for r in reqs)


def test_geneval_metadata_has_the_official_schema():
    if not GENEVAL_METADATA.is_file():
        pytest.skip(f"official GenEval metadata not found at {GENEVAL_METADATA}")
    official = [json.loads(line) for line in GENEVAL_METADATA.read_text().splitlines()]
    ours = sample_geneval_entries(np.random.default_rng(0), 120)
    assert {e["tag"] for e in ours} == {e["tag"] for e in official} == set(GENEVAL_TAGS)
    for tag in GENEVAL_TAGS:
        assert {structure(e) for e in ours if e["tag"] == tag} == {structure(e) for e in official if e["tag"] == tag}
    official_positions = {tuple(r["position"]) for e in official for r in e["include"] if "position" in r}
    assert {tuple(r["position"]) for e in ours for r in e["include"] if "position" in r} == official_positions
    for entry in ours:
        assert json.loads(json.dumps(entry)) == entry and entry["prompt"].startswith("a photo of ")


def test_scene_for_entry_satisfies_its_entry_according_to_the_detector():
    rng = np.random.default_rng(1)
    entries = sample_geneval_entries(rng, 60)
    for entry in entries:
        scene = scene_for_entry(entry, rng)
        correct, reason = score_geneval(entry, render(scene, 128))
        assert correct, (entry, reason)
    counting = next(e for e in entries if e["tag"] == "counting" and e["include"][0]["count"] < 4)
    one_more = {**counting, "include": [{**counting["include"][0], "count": counting["include"][0]["count"] + 1}]}
    del one_more["exclude"]
    assert not score_geneval(counting, render(scene_for_entry(one_more, rng), 128))[0]


def test_judge_geneval_follows_genevals_rules():
    def obj(shape, color, x, y):
        return DetectedObject(shape, color, (x - 0.1, y - 0.1, x + 0.1, y + 0.1), (x, y), 0.04)

    circle, star = obj("circle", "red", 0.2, 0.5), obj("star", "blue", 0.8, 0.5)
    position = {
        "tag": "position",
        "include": [{"class": "circle", "count": 1}, {"class": "star", "count": 1, "position": ["right of", 0]}],
    }
    assert judge_geneval(position, [circle, star]) == (True, "")
    assert not judge_geneval(
        {**position, "include": [position["include"][0], {**position["include"][1], "position": ["left of", 0]}]},
        [circle, star],
    )[0]
    colors = {"tag": "colors", "include": [{"class": "star", "count": 1, "color": "red"}]}
    assert "expected red star>=1, found 0 red" in judge_geneval(colors, [circle, star])[1]
    counting = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}],
    }
    assert judge_geneval(counting, [circle, obj("circle", "red", 0.5, 0.2)])[0]
    assert not judge_geneval(counting, [circle, circle, circle])[0]
    assert not judge_geneval(counting, [circle])[0]


def test_scene_for_entry_rejects_entries_outside_the_domain():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="not a synthetic-domain requirement"):
        scene_for_entry({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"}, rng)
    with pytest.raises(ValueError, match="more than max_objects"):
        scene_for_entry({"tag": "counting", "include": [{"class": "star", "count": 5}], "prompt": "five stars"}, rng)


# ------------------------------------------------------------------------------------------- POPE, MME, LLaVA


@pytest.mark.parametrize("strategy", POPE_STRATEGIES)
def test_pope_is_balanced_and_its_negatives_are_absent(strategy):
    data = scenes(60)
    images = [f"images/{i}.png" for i in range(len(data))]
    records = pope_questions(data, images, strategy, np.random.default_rng(0))
    assert [r["question_id"] for r in records] == list(range(1, len(records) + 1))
    assert all(set(r) == {"question_id", "image", "text", "label"} for r in records)
    present = {im: {o.category for o in s.objects} for s, im in zip(data, images, strict=True)}
    frequency = Counter(c for cats in present.values() for c in cats)
    for image in images:
        mine = [r for r in records if r["image"] == image]
        labels = Counter(r["label"] for r in mine)
        assert labels["yes"] == labels["no"] >= 1
        for r in mine:
            cat = next(c for c in CATEGORIES if f" {c} in the image?" in r["text"])
            assert (cat in present[image]) == (r["label"] == "yes")
        if strategy == "popular":
            asked = {c for r in mine if r["label"] == "no" for c in CATEGORIES if f" {c} in" in r["text"]}
            others = [frequency[c] for c in CATEGORIES if c not in present[image] | asked]
            assert min(frequency[c] for c in asked) >= max(others)


def test_mme_pairs_one_yes_one_no_and_scoring():
    rng = np.random.default_rng(0)
    records = [q for i, s in enumerate(scenes(40)) for q in mme_questions(s, f"images/{i}.png", rng)]
    pairs = Counter((r["category"], r["question_id"]) for r in records)
    assert set(pairs.values()) == {2} and {c for c, _ in pairs} == set(MME_CATEGORIES)
    for (category, qid), _ in pairs.items():
        answers = [r["answer"] for r in records if (r["category"], r["question_id"]) == (category, qid)]
        assert sorted(answers) == ["No", "Yes"]
    assert all(r["question"].endswith("? Please answer yes or no.") for r in records)
    perfect = mme_score(records, [r["answer"] + "." for r in records])
    assert perfect.total == 200 * len(MME_CATEGORIES) and set(perfect.score.values()) == {200.0}
    always_yes = mme_score(records, ["Yes"] * len(records))
    assert always_yes.acc == dict.fromkeys(always_yes.acc, 50.0) and set(always_yes.acc_plus.values()) == {0.0}


def yes_no_answers(conversations: list[list[tuple[str, str]]]) -> list[list[bool]]:
    return [[a == "Yes" for _, a in qa if a in ("Yes", "No")] for qa in conversations]


def test_multi_question_samples_are_balanced_and_independent():
    """Several questions per image, each yes/no answer a fair coin: the yes-rate is 0.5 and the answer of question k
    is not predictable from the yes/no answers before it (P(yes | every prefix pattern with support) ~ 0.5); no two
    questions of a sample are about the same shape; a description only comes last; short answers carry LLaVA's
    suffix."""
    rng, pool = np.random.default_rng(0), scenes(60)
    stats = CategoryStats.of(pool)
    samples = [sample_questions(pool[i % len(pool)], rng, stats, max_questions=6) for i in range(16000)]
    answers = yes_no_answers(samples)
    flat = [a for row in answers for a in row]
    assert len(flat) > 10000 and abs(np.mean(flat) - 0.5) < 0.02
    by_prefix: dict[tuple, list[bool]] = {}
    for row in answers:
        for k, answer in enumerate(row):
            by_prefix.setdefault(tuple(row[:k]), []).append(answer)
    supported = {p: v for p, v in by_prefix.items() if len(v) >= 60}
    assert {(), (True,), (False,), (True, True), (True, False), (False, True), (False, False)} <= set(supported)
    for prefix, later in supported.items():  # within 4 standard errors of a fair coin
        assert abs(np.mean(later) - 0.5) < 4 * 0.5 / np.sqrt(len(later)), (prefix, np.mean(later), len(later))
    assert Counter(len(qa) for qa in samples).keys() >= {1, 2, 3, 4}
    counts = [a for qa in samples for q, a in qa if q.startswith("How many")]  # about a held or a lacked shape: a coin
    assert len(counts) > 2000 and abs(np.mean([a == "0" for a in counts]) - 0.5) < 0.05
    for qa in samples:
        questions = [q for q, _ in qa]
        assert all(not q.startswith("Describe") for q in questions[:-1])
        assert all(q.endswith(SHORT_ANSWER) != q.startswith("Describe") for q in questions)
        shapes = [s for q in questions for s in ("circle", "square", "triangle", "star", "diamond", "cross") if s in q]
        assert len(shapes) == len(set(shapes)) or questions[-1].startswith("Describe")


def test_yes_no_questions_cover_every_negative_strategy():
    rng, pool = np.random.default_rng(1), scenes(40)
    stats = CategoryStats.of(pool)
    asked = Counter()
    for i in range(2000):
        scene = pool[i % len(pool)]
        present = {o.category for o in scene.objects}
        for q, a in sample_questions(scene, rng, stats):
            if q.startswith("Is there"):
                category = q.removeprefix("Is there ").split(" in the image")[0].split(" ", 1)[1]
                assert (category in present) == (a == "Yes"), (q, a, present)
                asked[a] += 1
            if q.startswith("How many"):
                assert a.isdigit()
    assert asked["Yes"] > 500 and asked["No"] > 500
    third = sorted(stats.frequency.values(), reverse=True)[2]
    popular = {c for c, n in stats.frequency.items() if n >= third}  # the top three, ties included
    negatives = [negative_category(rng, ["red circle"], [c for c in CATEGORIES if c != "red circle"], "popular", stats)
                 for _ in range(200)]  # fmt: skip
    assert set(negatives) <= set(popular) and len(set(negatives)) > 1  # the top few, not always the first
    with pytest.raises(ValueError, match="strategy must be one of"):
        negative_category(rng, [], ["red circle"], "common", stats)


def test_llava_conversations_are_valid():
    rng = np.random.default_rng(0)
    for i, scene in enumerate(scenes(50)):
        record = json.loads(json.dumps(llava_conversation(scene, str(i), f"images/{i}.png", rng)))
        assert set(record) == {"id", "image", "conversations"}
        turns = record["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert all(t["value"].strip() for t in turns)


# ------------------------------------------------------------------------------------------- detector


def degrade(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(1))
    if kind == "jpeg75":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=75)
        return Image.open(buf).convert("RGB")
    arr = np.asarray(img, np.float64)
    if kind == "noise":
        arr = arr + rng.normal(0, 8, arr.shape)
    elif kind == "color_shift":
        gray = arr.mean(-1, keepdims=True)
        arr = gray + 0.8 * (arr - gray) + np.array([12, -8, 10])
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def renders() -> tuple[list[Scene], dict[int, list[Image.Image]]]:
    data = scenes(300, seed=11)
    return data, {size: [render(s, size) for s in data] for size in (64, 128, 256)}


@pytest.mark.parametrize("size", [64, 128, 256])
def test_detector_is_exact_on_clean_renders(renders, size):
    data, images = renders
    acc = detection_accuracy(data, [detect(im) for im in images[size]])
    print(f"\ndetector clean {size}px, {len(data)} scenes: {acc}")
    assert min(acc.values()) >= 0.99, acc


def test_shape_accuracy_names_the_shape_a_decoder_loses(renders):
    """Per true shape: exact on clean renders; a decoder that draws every star as a cross fails stars alone."""
    data, images = renders
    detections = [detect(im) for im in images[64]]
    clean = detection_accuracy(data, detections)
    assert {k for k in clean if k.startswith("shape_")} == {f"shape_{k}" for k in SHAPES}
    assert min(clean[f"shape_{k}"] for k in SHAPES) >= 0.98, clean
    crossed = [[replace(d, shape="cross") if d.shape == "star" else d for d in dets] for dets in detections]
    acc = detection_accuracy(data, crossed)
    assert acc["shape_star"] == 0.0 and all(acc[f"shape_{k}"] == clean[f"shape_{k}"] for k in SHAPES if k != "star"), acc
    stars = sum(o.shape == "star" for s in data for o in s.objects) / sum(len(s.objects) for s in data)
    assert acc["shape"] <= 1 - stars + 1e-9


@pytest.mark.parametrize("kind", ["blur", "jpeg75", "noise", "color_shift"])
def test_detector_survives_mild_degradation(renders, kind):
    data, images = renders
    rng = np.random.default_rng(0)
    for size in (64, 128):
        acc = detection_accuracy(data[:100], [detect(degrade(im, kind, rng)) for im in images[size][:100]])
        print(f"\ndetector {kind} {size}px, 100 scenes: {acc}")
        assert min(acc[k] for k in ("count", "shape", "color", "position")) >= 0.9, (size, acc)


def test_detector_accepts_arrays():
    img = render(scenes(1)[0], 64)

    def summary(image):
        return [(o.shape, o.color, o.bbox) for o in detect(image)]

    assert summary(np.asarray(img)) == summary(np.asarray(img, np.float32) / 255) == summary(img) != []
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detect(np.zeros((8, 8)))


# ------------------------------------------------------------------------------------------- entry point


def test_render_synthetic_script_writes_a_dataset(tmp_path):
    script = REPO / "scripts" / "render_synthetic.py"
    proc = subprocess.run(
        [sys.executable, script, "--out", tmp_path, "--num", "12", "--size", "32", "--seed", "3"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all((tmp_path / r["image"]).is_file() for r in rows)
    assert Image.open(tmp_path / rows[0]["image"]).size == (32, 32)
    # the region description alone (`data.t2i_captions` can weight it), the same text as one caption
    assert all(is_description(r["description"]) and r["description"] in r["captions"] for r in rows)
    assert all(sum(map(is_description, r["captions"])) == 1 for r in rows)
    entries = [json.loads(line) for line in (tmp_path / "geneval_metadata.jsonl").read_text().splitlines()]
    assert entries == [r["geneval"] for r in rows if r["geneval"]] and {e["tag"] for e in entries} == set(GENEVAL_TAGS)
    for name in ["pope_random", "pope_popular", "pope_adversarial", "mme"]:
        assert (tmp_path / f"{name}.jsonl").read_text().count("\n") > 12
    llava = json.loads((tmp_path / "llava.json").read_text())
    assert len(llava) == 12 and all((tmp_path / r["image"]).is_file() for r in llava)

    bad = subprocess.run([sys.executable, script, "--out", tmp_path, "--num", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--num" in bad.stderr


def test_several_conversations_per_image_keep_the_first_and_every_other_file(tmp_path):
    one = write_dataset(tmp_path / "one", 6, size=32, seed=4)
    three = write_dataset(tmp_path / "three", 6, size=32, seed=4, conversations=3)
    first, more = json.loads((one / "llava.json").read_text()), json.loads((three / "llava.json").read_text())
    assert more[:6] == first and len(more) == 18
    assert [r["id"] for r in more[6:12]] == [f"{r['id']}-1" for r in first]
    assert [r["image"] for r in more[12:]] == [r["image"] for r in first]
    assert more[6:12] != first  # independent draws, not copies
    for name in ["scenes.jsonl", "pope_random.jsonl", "mme.jsonl", "probe.jsonl"]:
        assert (one / name).read_text() == (three / name).read_text()
    with pytest.raises(ValueError, match="conversations"):
        write_dataset(tmp_path / "none", 2, size=32, conversations=0)
