"""Benchmarks and instruction data on synthetic scenes: GenEval metadata (and scenes that satisfy an entry), POPE,
MME (with its scoring) and LLaVA-format conversations.

Short answers (yes/no, counts, colours, single words) are asked with LLaVA-1.5's suffix SHORT_ANSWER, the
`post_prompt` of lmms-eval's built-in pope / mme tasks, so those tasks' own prompts ask what training taught.

Object category for POPE/MME/LLaVA is the coloured shape ("red circle"): len(SHAPES) * len(COLORS) = 60 categories.
GenEval entries use the shape as "class" and GenEval's colour words, exactly in the schema of GenEval's
`evaluation_metadata.jsonl` (keys tag, include, optional exclude, prompt).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from types import MappingProxyType

import numpy as np

from mllm.synthetic.scene import (
    CATEGORIES,
    COLORS,
    OPPOSITE,
    RELATIONS,
    SHAPES,
    SamplerConfig,
    Scene,
    SceneObject,
    place_objects,
    relative_position,
    sample_background,
)
from mllm.synthetic.text import (
    BACKGROUND_WORDS,
    RELATION_PHRASES,
    captions,
    describe,
    join,
    noun_phrase,
    plural,
)

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
POPE_STRATEGIES = ("random", "popular", "adversarial")
MME_CATEGORIES = ("existence", "count", "color", "position")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's; lmms-eval pope/mme post_prompt
YES, NO = "Yes", "No"


def _pick(rng: np.random.Generator, options: Sequence[str], k: int) -> list[str]:
    """k distinct items in random order."""
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def _choice(rng: np.random.Generator, items: Sequence):
    """One item, uniformly."""
    return items[int(rng.integers(len(items)))]


def with_article(category: str) -> str:
    """'red circle' -> 'a red circle'."""
    color, shape = category.split()
    return noun_phrase(1, shape, color)


# ---------------------------------------------------------------------------------------------------- GenEval


def geneval_prompt(include: Sequence[dict]) -> str:
    """GenEval's wording: 'a photo of two circles', 'a photo of a red star and a blue cross',
    'a photo of a star right of a circle' (the object with `position` comes first)."""
    phrases = [noun_phrase(r["count"], r["class"], r.get("color")) for r in include]
    if any("position" in r for r in include):
        return f"a photo of {phrases[1]} {include[1]['position'][0]} {phrases[0]}"
    return f"a photo of {join(phrases)}"


def sample_geneval_entry(rng: np.random.Generator, tag: str) -> dict:
    """One GenEval-style metadata entry of the synthetic domain for `tag` (one of GENEVAL_TAGS)."""
    (s0, s1), (c0, c1) = _pick(rng, SHAPES, 2), _pick(rng, COLORS, 2)
    count = int(rng.integers(2, 5))
    include = {
        "single_object": [{"class": s0, "count": 1}],
        "two_object": [{"class": s0, "count": 1}, {"class": s1, "count": 1}],
        "counting": [{"class": s0, "count": count}],
        "colors": [{"class": s0, "count": 1, "color": c0}],
        "position": [
            {"class": s0, "count": 1},
            {"class": s1, "count": 1, "position": [_choice(rng, RELATIONS), 0]},
        ],
        "color_attr": [{"class": s0, "count": 1, "color": c0}, {"class": s1, "count": 1, "color": c1}],
    }[tag]
    entry = {"tag": tag, "include": include}
    if tag == "counting":
        entry["exclude"] = [{"class": s0, "count": count + 1}]
    return {**entry, "prompt": geneval_prompt(include)}


def sample_geneval_entries(rng: np.random.Generator, n: int) -> list[dict]:
    """n entries cycling through GENEVAL_TAGS (every tag appears once n >= 6)."""
    return [sample_geneval_entry(rng, GENEVAL_TAGS[i % len(GENEVAL_TAGS)]) for i in range(n)]


def _check_entry(entry: dict, cfg: SamplerConfig) -> None:
    """Raise ValueError unless the entry is satisfiable in the synthetic domain."""
    for req in entry["include"] + entry.get("exclude", []):
        if req["class"] not in SHAPES or req.get("color", COLORS[0]) not in COLORS or req["count"] < 1:
            raise ValueError(f"not a synthetic-domain requirement (shapes {SHAPES}, colours {COLORS}): {req}")
    total = sum(r["count"] for r in entry["include"])
    if total > cfg.max_objects:
        raise ValueError(
            f"entry asks for {total} objects, more than max_objects={cfg.max_objects}: {entry['prompt']!r}"
        )
    for ex in entry.get("exclude", []):
        if sum(r["count"] for r in entry["include"] if r["class"] == ex["class"]) >= ex["count"]:
            raise ValueError(f"entry includes and excludes the same objects: {entry}")


def scene_for_entry(entry: dict, rng: np.random.Generator, cfg: SamplerConfig | None = None) -> Scene:
    """A scene that satisfies a GenEval-style entry with exactly the requested objects (unspecified colours random,
    no distractors), each `position` requirement holding for every object pair of the two groups."""
    cfg = cfg or SamplerConfig()
    _check_entry(entry, cfg)
    specs, group = [], []
    for g, req in enumerate(entry["include"]):
        for _ in range(req["count"]):
            specs.append((req["class"], req.get("color") or _choice(rng, COLORS)))
            group.append(g)

    def accept(objs: tuple[SceneObject, ...]) -> bool:
        return all(
            req["position"][0] in relative_position(objs[i].bbox, objs[j].bbox)
            for g, req in enumerate(entry["include"])
            if "position" in req
            for i in range(len(objs))
            if group[i] == g
            for j in range(len(objs))
            if group[j] == req["position"][1]
        )

    return Scene(place_objects(rng, specs, cfg, accept), sample_background(rng, cfg))


# ---------------------------------------------------------------------------------------------------- POPE


def _ranked(rng: np.random.Generator, candidates: Sequence[str], score: Counter) -> list[str]:
    """candidates by decreasing score, ties in random order."""
    shuffled = [candidates[i] for i in rng.permutation(len(candidates))]
    return sorted(shuffled, key=lambda c: -score[c])


def pope_pairs(
    present: Sequence[Sequence[str]], categories: Sequence[str], strategy: str, rng: np.random.Generator, per_image: int = 3
) -> list[list[tuple[str, str]]]:
    """POPE's recipe over any labelled image set (`present[i]`: the categories annotated in image i, from the universe
    `categories`). Per image: up to `per_image` (present, absent) category pairs. Negatives: `random` uniformly among
    absent categories; `popular` the absent categories present in the most images of the dataset; `adversarial` the
    absent categories that co-occur most often with this image's categories."""
    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"strategy must be one of {POPE_STRATEGIES}, got {strategy!r}")
    present = [sorted(set(cats)) for cats in present]
    frequency = Counter(c for cats in present for c in cats)
    cooccur = Counter((a, b) for cats in present for a in cats for b in cats if a != b)
    pairs = []
    for cats in present:
        absent = [c for c in categories if c not in cats]
        positives = _pick(rng, cats, min(per_image, len(cats)))
        if strategy == "random":
            negatives = _pick(rng, absent, len(positives))
        elif strategy == "popular":
            negatives = _ranked(rng, absent, frequency)[: len(positives)]
        else:
            score = Counter({c: sum(cooccur[(p, c)] for p in cats) for c in absent})
            negatives = _ranked(rng, absent, score)[: len(positives)]
        pairs.append(list(zip(positives, negatives, strict=True)))
    return pairs


def pope_questions(
    scenes: Sequence[Scene], images: Sequence[str], strategy: str, rng: np.random.Generator, per_image: int = 3
) -> list[dict]:
    """`pope_pairs` over synthetic scenes (categories: the 60 coloured shapes), as records alternating yes / no:
    {question_id, image, text, label} like POPE's files."""
    present = [[o.category for o in s.objects] for s in scenes]
    records: list[dict] = []
    for pairs, image in zip(pope_pairs(present, CATEGORIES, strategy, rng, per_image), images, strict=True):
        for pos, neg in pairs:
            for cat, label in ((pos, "yes"), (neg, "no")):
                text = f"Is there {with_article(cat)} in the image?"
                records.append({"question_id": len(records) + 1, "image": image, "text": text, "label": label})
    return records


# ---------------------------------------------------------------------------------------------------- MME


def _unique(scene: Scene, key) -> list[SceneObject]:
    """Objects whose key (e.g. shape, category) no other object of the scene shares."""
    counts = Counter(key(o) for o in scene.objects)
    return [o for o in scene.objects if counts[key(o)] == 1]


def _existence(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """(a present category, an absent category)."""
    present = {o.category for o in scene.objects}
    return _choice(rng, sorted(present)), _choice(rng, [c for c in CATEGORIES if c not in present])


def _related(scene: Scene) -> list[tuple[SceneObject, SceneObject, frozenset[str]]]:
    """Pairs of objects with unique categories (so 'the red circle' is well defined) that have GenEval relations."""
    return [
        (a, b, rels)
        for a, b in combinations(_unique(scene, lambda o: o.category), 2)
        if (rels := relative_position(a.bbox, b.bbox))
    ]


def _count_question(n: int, shape: str) -> str:
    """'Is there exactly one star in this image?', 'Are there exactly two stars in this image?'."""
    if n == 1:
        return f"Is there exactly one {shape} in this image?"
    return f"Are there exactly {noun_phrase(n, shape)} in this image?"


def mme_pairs(scene: Scene, rng: np.random.Generator) -> dict[str, tuple[str, str]]:
    """Per applicable MME category, a (yes question, no question) pair about one fact of the scene."""
    yes, no = _existence(scene, rng)
    pairs = {"existence": (f"Is there {with_article(yes)} in this image?", f"Is there {with_article(no)} in this image?")}
    shape = _choice(rng, scene.objects).shape
    n = scene.count(shape)
    pairs["count"] = (
        _count_question(n, shape),
        _count_question(_choice(rng, [m for m in range(1, 6) if m != n]), shape),
    )
    if lone := _unique(scene, lambda o: o.shape):
        o = _choice(rng, lone)
        other = _choice(rng, [c for c in COLORS if c != o.color])
        pairs["color"] = (f"Is the {o.shape} in this image {o.color}?", f"Is the {o.shape} in this image {other}?")
    if related := _related(scene):
        a, b, rels = _choice(rng, related)
        r = _choice(rng, sorted(rels))
        pairs["position"] = tuple(
            f"Is the {a.category} {RELATION_PHRASES[x]} the {b.category} in this image?" for x in (r, OPPOSITE[r])
        )
    return pairs


def mme_questions(scene: Scene, image: str, rng: np.random.Generator) -> list[dict]:
    """MME-format records, two per applicable category (answers "Yes" then "No"), grouped by `question_id` (= image)
    like MME: {question_id, image, question, answer, category}."""
    return [
        {
            "question_id": image,
            "image": image,
            "question": f"{q} Please answer yes or no.",
            "answer": a,
            "category": cat,
        }
        for cat, pair in mme_pairs(scene, rng).items()
        for q, a in zip(pair, ("Yes", "No"), strict=True)
    ]


def parse_yes_no(text: str) -> str:
    """'yes', 'no' or 'other', as lmms-eval's MME/POPE parsers read a model answer."""
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no", "y", "n"):
        return {"y": "yes", "n": "no"}.get(t, t)
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


@dataclass(frozen=True)
class MMEScore:
    """MME's report, in percent per category: acc over questions, acc_plus over images with both questions right,
    score = acc + acc_plus (max 200); total = sum of category scores."""

    acc: dict[str, float]
    acc_plus: dict[str, float]
    score: dict[str, float]
    total: float


def mme_score(questions: Sequence[dict], predictions: Sequence[str]) -> MMEScore:
    """Score model answers (one per MME record, in order) the way MME and lmms-eval do."""
    right: dict[str, dict[str, list[bool]]] = {}
    for q, pred in zip(questions, predictions, strict=True):
        ok = parse_yes_no(pred) == q["answer"].lower()
        right.setdefault(q["category"], {}).setdefault(q["question_id"], []).append(ok)
    acc = {c: 100 * float(np.mean([x for v in per.values() for x in v])) for c, per in right.items()}
    acc_plus = {c: 100 * float(np.mean([all(v) for v in per.values()])) for c, per in right.items()}
    score = {c: acc[c] + acc_plus[c] for c in right}
    return MMEScore(acc, acc_plus, score, sum(score.values()))


# ---------------------------------------------------------------------------------------------------- LLaVA


def existence_question(category: str) -> str:
    """'Is there a red circle in the image?' + SHORT_ANSWER (POPE's question, asked the LLaVA-1.5 way)."""
    return f"Is there {with_article(category)} in the image?{SHORT_ANSWER}"


def count_question(shape: str) -> str:
    """'How many stars are there?' + SHORT_ANSWER (answered with a digit: '0' when there is none)."""
    return f"How many {plural(shape)} are there?{SHORT_ANSWER}"


@dataclass(frozen=True)
class CategoryStats:
    """Over a set of scenes: images per category and pairwise co-occurrences (POPE's popular / adversarial
    negatives). Empty: every strategy draws uniformly among the absent categories."""

    frequency: Counter = field(default_factory=Counter)
    cooccur: Counter = field(default_factory=Counter)

    @classmethod
    def of(cls, scenes: Sequence[Scene]) -> CategoryStats:
        present = [sorted({o.category for o in s.objects}) for s in scenes]
        return cls(Counter(c for cats in present for c in cats),
                   Counter((a, b) for cats in present for a in cats for b in cats if a != b))  # fmt: skip


def negative_category(rng: np.random.Generator, present: Sequence[str], absent: Sequence[str], strategy: str,
                      stats: CategoryStats, top: int = 3) -> str:  # fmt: skip
    """An absent category as POPE draws negatives: `random` uniformly; `popular` among the `top` most frequent;
    `adversarial` among the `top` that co-occur most with `present` (ties in random order). Drawing among a few,
    not always the first, keeps a training set from asking the same negatives again and again."""
    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"strategy must be one of {POPE_STRATEGIES}, got {strategy!r}")
    if strategy == "random":
        return _choice(rng, absent)
    score = stats.frequency if strategy == "popular" else Counter({c: sum(stats.cooccur[(p, c)] for p in present)
                                                                   for c in absent})  # fmt: skip
    return _choice(rng, _ranked(rng, absent, score)[:top])


QUESTION_KINDS = MappingProxyType({"existence": 0.45, "position": 0.15, "count": 0.15, "color": 0.15,
                                   "background": 0.1})  # share of each kind among a sample's questions  # fmt: skip
DESCRIBE_SHARE = 0.25  # of the samples end with a description (brief or detailed)
QA = tuple[str, str]
Asker = Callable[[Scene, np.random.Generator, set, CategoryStats], QA | None]


def _shape(category: str) -> str:
    return category.split()[1]


def _ask_existence(scene: Scene, rng: np.random.Generator, locked: set, stats: CategoryStats) -> QA | None:
    """Yes/no: is a category in the image? A present and an absent category (shapes no earlier question is about)
    are both drawn and both their shapes locked, then a fair coin picks which one is asked: what later questions can
    be about never depends on this answer."""
    present = sorted({o.category for o in scene.objects})
    yes = [c for c in present if _shape(c) not in locked]
    absent = [c for c in CATEGORIES if c not in present and _shape(c) not in locked]
    if not yes or not absent:
        return None
    pair = (_choice(rng, yes), negative_category(rng, present, absent, _choice(rng, POPE_STRATEGIES), stats))
    locked.update(map(_shape, pair))
    answer = bool(rng.random() < 0.5)
    return existence_question(pair[0] if answer else pair[1]), YES if answer else NO


def _ask_position(scene: Scene, rng: np.random.Generator, locked: set, stats: CategoryStats) -> QA | None:
    """Yes/no: does a relation hold between two objects? A fair coin picks a relation that holds or its opposite."""
    pairs = [(a, b, r) for a, b, r in _related(scene) if not {a.shape, b.shape} & locked]
    if not pairs:
        return None
    a, b, rels = _choice(rng, pairs)
    relation, answer = _choice(rng, sorted(rels)), bool(rng.random() < 0.5)
    locked.update((a.shape, b.shape))
    asked = relation if answer else OPPOSITE[relation]
    return f"Is the {a.category} {RELATION_PHRASES[asked]} the {b.category}?{SHORT_ANSWER}", YES if answer else NO


def _ask_count(scene: Scene, rng: np.random.Generator, locked: set, stats: CategoryStats) -> QA | None:
    """How many objects of a shape: like a yes/no question it needs a free shape the scene holds and a free one it
    lacks, then a fair coin picks which is asked, so the answer is '0' half the time whatever came before (a uniform
    shape made it 78%, a prior that paid better than looking: the model answered '0' to everything)."""
    held = {o.shape for o in scene.objects}
    sides = [[s for s in SHAPES if s in held and s not in locked], [s for s in SHAPES if s not in held | locked]]
    if not all(sides):
        return None
    shape = _choice(rng, sides[int(rng.random() < 0.5)])
    locked.add(shape)
    return count_question(shape), str(scene.count(shape))


def _ask_color(scene: Scene, rng: np.random.Generator, locked: set, stats: CategoryStats) -> QA | None:
    """The colour of the only object of its shape."""
    lone = [o for o in _unique(scene, lambda o: o.shape) if o.shape not in locked]
    if not lone:
        return None
    o = _choice(rng, lone)
    locked.add(o.shape)
    return f"What color is the {o.shape}?{SHORT_ANSWER}", o.color.capitalize()


def _ask_background(scene: Scene, rng: np.random.Generator, locked: set, stats: CategoryStats) -> QA | None:
    """The background's pattern, once per sample."""
    if "background" in locked:
        return None
    locked.add("background")
    return f"What pattern does the background have?{SHORT_ANSWER}", BACKGROUND_WORDS[scene.background.kind].capitalize()


ASKERS: dict[str, Asker] = {"existence": _ask_existence, "position": _ask_position, "count": _ask_count,
                            "color": _ask_color, "background": _ask_background}  # fmt: skip


def sample_questions(scene: Scene, rng: np.random.Generator, stats: CategoryStats | None = None,
                     max_questions: int = 4) -> list[QA]:  # fmt: skip
    """1..max_questions (question, answer) pairs about one scene, for one multi-turn sample.

    Independent and balanced: question kinds are drawn first (QUESTION_KINDS); a yes/no question (existence with
    random / popular / adversarial negatives, position) reserves its subjects for both answers, then a fair coin
    picks the answer, so which questions a sample holds never depends on an answer and P(yes) = 0.5 whatever came
    before; no two questions are about the same shape (one answer never tells another: "Is there a red star? Yes" is
    never followed by "What color is the star?"); the order is shuffled; a description, which tells everything, only
    ever comes last (DESCRIBE_SHARE of the samples). A kind with nothing left to ask about is dropped."""
    stats = stats if stats is not None else CategoryStats()
    describe_it = rng.random() < DESCRIBE_SHARE
    n = int(rng.integers(1, max_questions + 1)) - describe_it
    kinds = rng.choice(list(QUESTION_KINDS), size=n, p=list(QUESTION_KINDS.values()))
    locked: set[str] = set()  # shapes (and "background") some question is about
    asked = [qa for kind in kinds if (qa := ASKERS[str(kind)](scene, rng, locked, stats)) is not None]
    asked = [asked[i] for i in rng.permutation(len(asked))]
    if describe_it or not asked:
        asked.append(_description(scene, rng))
    return asked


def _description(scene: Scene, rng: np.random.Generator) -> QA:
    """A brief caption (LLaVA's brief-description style) or the detailed description."""
    if rng.random() < 0.5:
        return "Describe the image briefly.", _choice(rng, captions(scene)[:3]).capitalize() + "."
    return "Describe the image in detail.", describe(scene)


def qa_pool(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """Several independent questions about a scene with their answers (`sample_questions`, up to 6)."""
    return sample_questions(scene, rng, max_questions=6)


def llava_conversation(scene: Scene, sample_id: str, image: str, rng: np.random.Generator, max_turns: int = 4,
                       stats: CategoryStats | None = None) -> dict:  # fmt: skip
    """A LLaVA-format record: 1..max_turns question/answer turns from `sample_questions` (`stats`: the dataset's
    category statistics for popular / adversarial negatives); the first human turn starts with the only "<image>\n"
    placeholder."""
    conversations = []
    for t, (q, a) in enumerate(sample_questions(scene, rng, stats, max_turns)):
        conversations += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": sample_id, "image": image, "conversations": conversations}
