"""Learning diagnostics of the MLLM (DESIGN §9): does understanding read the image, does generation read the caption?

    image dependence    balanced held-out yes/no questions (per scene one present and one absent category, asked as
                        the synthetic training data asks them: `existence_question`). Margin = log P(answer "Yes") -
                        log P(answer "No"), each the whole teacher-forced answer with its end-of-turn token, with the
                        scene's own image and with another scene's image (a fixed derangement: scene k is shown scene
                        k + 1's image). AUC of the margin against the true answer for both; a model that ignores the
                        image has the same margins either way, so AUC(real) = AUC(swapped).
    caption dependence  teacher-forced image NLL (nats per image token) of each scene's image after its caption, the
                        empty caption (the unconditional prompt) and another scene's caption (the same derangement);
                        gap = NLL(empty) - NLL(true) > 0 when the caption helps, 0 for a model that ignores it.
    layout dependence   teacher-forced image NLL per token on the grid cells objects overlap, after each scene's region
                        description (`describe`) and after the same description with its region words mirrored
                        (`mirror_regions`: left <-> right, top <-> bottom; scenes whose objects are all centred are
                        left out); gap = NLL(mirrored) - NLL(true) > 0 when generation reads where things go, 0 for a
                        model that draws what the caption names but anywhere.
    description dependence  teacher-forced text NLL (nats per token) of each scene's caption as the answer to LLaVA's
                        first brief-description instruction, with the scene's own image and with another scene's
                        (the same derangement); gap = NLL(swapped) - NLL(real) > 0 when the description reads the image.
                        It shows an alignment stage (descriptions only) binding the image before any yes/no question
                        is trained, where the image dependence of yes/no answers is still at chance.
    count accuracy      held-out "How many stars are there?" questions (`count_question`), per scene one about a shape
                        it holds and one about a shape it lacks ("0"); the answer is the most likely of "0".."5" (each
                        the whole teacher-forced answer), with the real and with a swapped image.

Samples are built exactly as training builds them (`SampleBuilder`: template, system prompt, image layout, generation
prompt) and scored in right-padded batches by `SemHiTokLM.sequence_nll` (NLL per row), outside the training forward:
under DDP each rank scores on its own module, under ZeRO-2 the engine's module (its weights are whole); ZeRO-3
partitions the weights, so the trainer refuses diagnostics there.

Held-out data: a folder `scripts/render_synthetic.py` wrote (scenes.jsonl + images/), rendered with another seed than
the training data. Used by `eval/diagnose.py` and, every `train.diagnose_every` steps, by the MLLM trainer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from mllm.constants import GENERATION_PROMPT, IMAGE_PLACEHOLDER
from mllm.data.mixture import BRIEF_INSTRUCTIONS, LMSample, SampleBuilder, Skip, box_cells, collate_lm
from mllm.synthetic.questions import NO, YES, count_question, existence_question
from mllm.synthetic.scene import CATEGORIES, SHAPES, Scene
from mllm.synthetic.text import describe, mirror_regions
from mllm.vocab import VisualVocab
from semhitok import SemHiTok, TokenGrid
from semhitok.runtime import load_image, read_jsonl, to_tensor

SCENES_NAME = "scenes.jsonl"
COUNT_ANSWERS = tuple(str(k) for k in range(6))  # the answers a count question is scored over
LOG_KEYS = ("diag/image_auc", "diag/image_auc_swapped", "diag/caption_gap", "diag/description_gap",
            "diag/layout_gap")  # the trainer logs these
COUNT_LOG_KEYS = ("diag/count_accuracy", "diag/count_accuracy_swapped")  # ... and these when it has count questions


class DiagnosticsError(ValueError):
    """Held-out data that cannot be diagnosed on; the message names the problem in one line."""


# ---------------------------------------------------------------------------------------------------- arithmetic


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for the `positive` labels: P(score of a positive > score of a negative),
    ties counting one half (Mann-Whitney). 0.5 = no separation."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if y.all() or not y.any():
        raise DiagnosticsError("AUC needs both positive and negative examples")
    diff = s[y][:, None] - s[~y][None, :]  # (P, N)
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def derangement(n: int) -> list[int]:
    """The fixed derangement k -> k + 1 (mod n): no index maps to itself (n >= 2)."""
    if n < 2:
        raise DiagnosticsError(f"swapping images or captions needs at least 2 scenes, got {n}")
    return [(k + 1) % n for k in range(n)]


# ---------------------------------------------------------------------------------------------------- held-out data


@dataclass(frozen=True)
class HeldOutScene:
    image: str  # path relative to the folder (the key of its codes)
    scene: Scene
    caption: str  # the scene's first caption (its object list)


def read_scenes(folder: str | Path, n: int) -> list[HeldOutScene]:
    """The first `n` scenes of a synthetic folder; DiagnosticsError names a missing folder, file or field."""
    path = Path(folder) / SCENES_NAME
    if not path.is_file():
        raise DiagnosticsError(f"{folder} is not a synthetic data folder (no {SCENES_NAME}): render one with "
                               "scripts/render_synthetic.py --out DIR --seed S (another seed than the training data)")  # fmt: skip
    scenes = []
    for lineno, rec in read_jsonl(path):
        if len(scenes) == n:
            break
        if not {"image", "scene", "captions"} <= set(rec) or not rec["captions"]:
            raise DiagnosticsError(f"{path}:{lineno}: a scene record needs image, scene and captions")
        scenes.append(HeldOutScene(rec["image"], Scene.from_dict(rec["scene"]), rec["captions"][0]))
    if len(scenes) < 2:
        raise DiagnosticsError(f"{path} holds {len(scenes)} scene(s); the diagnostics need at least 2")
    return scenes


@dataclass(frozen=True)
class MemoryCodes:
    """Codes of a few images held in memory, read like a `CodeCache` (what `SampleBuilder` reads)."""

    grids: dict[str, TokenGrid]  # key -> TokenGrid (1, h, w)
    K: int  # noqa: N815 (glossary name)
    m: int
    directory: str = "<held-out images>"

    def __contains__(self, key: str) -> bool:
        return key in self.grids

    def grid(self, key: str) -> TokenGrid:
        return self.grids[key]


@torch.no_grad()
def encode_images(semhitok: SemHiTok, folder: Path, keys: Sequence[str], batch_size: int = 16) -> MemoryCodes:
    """The images `folder/key` through `semhitok` (resized and centre-cropped to its image size) -> MemoryCodes."""
    size, device = semhitok.config.image_size, next(semhitok.parameters()).device
    grids: dict[str, TokenGrid] = {}
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        pixels = torch.stack([to_tensor(load_image(folder / key, size)) for key in chunk])  # (B, 3, H, W)
        grid = semhitok.encode(pixels.to(device))
        for k, key in enumerate(chunk):
            grids[key] = TokenGrid(grid.semantic[k : k + 1].cpu(), grid.texture[k : k + 1].cpu())
    return MemoryCodes(grids, semhitok.config.K, semhitok.config.m)


# ---------------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class YesNo:
    scene: int  # index of the scene asked about
    question: str
    answer: bool


def held_and_lacked(scenes: Sequence[HeldOutScene], n: int, key: Callable, universe: Sequence[str], seed: int,
                    what: str) -> list[tuple[int, HeldOutScene, str, str]]:  # fmt: skip
    """For each of the first n / 2 scenes (n even): a value of `key` that one of its objects has and one of `universe`
    that none has, each uniform (the subjects of a balanced pair of questions)."""
    if n < 2 or n % 2 or n // 2 > len(scenes):
        raise DiagnosticsError(f"{n} {what} need an even n >= 2 and n / 2 <= {len(scenes)} scenes")
    rng, out = np.random.default_rng(seed), []
    for k, s in enumerate(scenes[: n // 2]):
        held = sorted({key(o) for o in s.scene.objects})
        lacked = [v for v in universe if v not in held]
        out.append((k, s, held[rng.integers(len(held))], lacked[rng.integers(len(lacked))]))
    return out


def balanced_questions(scenes: Sequence[HeldOutScene], n: int, seed: int = 0,
                       ask: Callable[[str], str] = existence_question) -> list[YesNo]:  # fmt: skip
    """n (even) yes/no questions, one present and one absent category (uniform) for each of the first n / 2 scenes;
    `ask(category)` words each ('red circle' -> the training data's 'Is there a red circle in the image?...')."""
    pairs = held_and_lacked(scenes, n, lambda o: o.category, CATEGORIES, seed, "balanced questions")
    return [q for k, _, present, absent in pairs for q in (YesNo(k, ask(present), True), YesNo(k, ask(absent), False))]


@dataclass(frozen=True)
class CountQuestion:
    scene: int
    question: str
    answer: str  # the true count, a digit


def count_questions(scenes: Sequence[HeldOutScene], n: int, seed: int = 0,
                    ask: Callable[[str], str] = count_question) -> list[CountQuestion]:  # fmt: skip
    """n (even) count questions, one about a shape the scene holds (answer >= 1) and one about a shape it lacks ("0"),
    shapes uniform, for each of the first n / 2 scenes; `ask(shape)` words each ('star' -> 'How many stars are
    there?...', the training data's wording)."""
    pairs = held_and_lacked(scenes, n, lambda o: o.shape, SHAPES, seed, "count questions")
    return [q for k, s, held, lacked in pairs
            for q in (CountQuestion(k, ask(held), str(s.scene.count(held))),
                      CountQuestion(k, ask(lacked), "0"))]  # fmt: skip


@dataclass(frozen=True)
class NLL:
    """Teacher-forced NLL of one sample: its text and image targets, summed, and how many there are."""

    text: float
    n_text: int
    image: float
    n_image: int


class Scorer(Protocol):
    """What the diagnostics use of a model (`SemHiTokLM.sequence_nll`)."""

    def sequence_nll(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor) -> dict[str, Tensor]: ...


def batches(samples: Sequence[LMSample], device: torch.device, batch_size: int) -> Iterator[tuple[Tensor, ...]]:
    """(input_ids, attention_mask, labels) of `batch_size` right-padded samples at a time, on `device`."""
    for start in range(0, len(samples), batch_size):
        batch = collate_lm(samples[start : start + batch_size], pad_id=0)
        yield tuple(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))


def score(model: Scorer, samples: Sequence[LMSample], device: torch.device, batch_size: int = 16) -> list[NLL]:
    """Every sample's NLL, `batch_size` right-padded samples per call of `model.sequence_nll`."""
    out = []
    for inputs in batches(samples, device, batch_size):
        sums = model.sequence_nll(*inputs)
        rows = zip(*(sums[k].tolist() for k in ("text", "n_text", "image", "n_image")), strict=True)
        out += [NLL(text, int(n_text), image, int(n_image)) for text, n_text, image, n_image in rows]
    return out


def object_cells(scene: Scene, h: int, w: int) -> np.ndarray:
    """(h*w,) bool in raster order: the grid cells an object's box overlaps (with positive area)."""
    return box_cells([o.bbox for o in scene.objects], h, w)


def score_image_tokens(model: Any, samples: Sequence[LMSample], device: torch.device, batch_size: int = 16) -> list[np.ndarray]:
    """Every sample's (n_image, 2) semantic / texture NLL per image target (`SemHiTokLM.image_token_nll`)."""
    return [row.cpu().numpy() for inputs in batches(samples, device, batch_size) for row in model.image_token_nll(*inputs)]


@dataclass
class DiagnosticSet:
    """A fixed held-out set and the two diagnostics on it (see the module docstring)."""

    builder: SampleBuilder  # renders samples as training does; its codes hold every scene's image
    scenes: list[HeldOutScene]
    questions: list[YesNo]
    captions: int  # scenes scored for caption dependence
    device: torch.device
    batch_size: int = 16
    counts: list[CountQuestion] = field(default_factory=list)

    def image_dependence(self, model: Scorer) -> dict[str, Any]:
        """AUC of the yes/no margin against the truth with the real and a swapped image, and the mean margins."""
        swap = derangement(len(self.scenes))
        images = {"": [self.scenes[q.scene].image for q in self.questions],
                  "_swapped": [self.scenes[swap[q.scene]].image for q in self.questions]}  # fmt: skip
        truth = [q.answer for q in self.questions]
        result: dict[str, Any] = {"questions": len(truth)}
        for name, shown in images.items():
            samples = [self._answer(q.question, image, a) for q, image in zip(self.questions, shown, strict=True)
                       for a in (YES, NO)]  # fmt: skip
            nll = score(model, samples, self.device, self.batch_size)
            margins = [no.text - yes.text for yes, no in zip(nll[::2], nll[1::2], strict=True)]  # log P(Yes) - log P(No)
            result[f"auc{name}"] = auc(margins, truth)
            for answer, word in ((True, "yes"), (False, "no")):
                result[f"margin_{word}{name}"] = float(np.mean([m for m, t in zip(margins, truth, strict=True) if t == answer]))
        return {k: result[k] for k in ("questions", "auc", "auc_swapped", *sorted(k for k in result if "margin" in k))}

    def caption_dependence(self, model: Scorer, cells: bool = False) -> dict[str, Any]:
        """Mean image NLL per image token with the true, the empty and a swapped caption; gap = empty - true, per
        token and per image (summed over its tokens: what the caption tells about the whole image, at most the
        caption's own information). cells=True (a model with `image_token_nll`) adds the same per token on the grid
        cells objects overlap and on the background cells, each split into the semantic and texture levels."""
        scenes = self.scenes[: self.captions]
        swap = derangement(len(scenes))
        shown = {"true": [s.caption for s in scenes], "empty": [""] * len(scenes),
                 "swapped": [scenes[swap[k]].caption for k in range(len(scenes))]}  # fmt: skip
        means, sums, tokens = {}, {}, {}
        for name, captions in shown.items():
            samples = [self._build(lambda c=c, s=s: self.builder.generation(c, s.image), s.image)
                       for c, s in zip(captions, scenes, strict=True)]  # fmt: skip
            if cells:  # one pass gives both: each image's NLL is the sum of its tokens'
                tokens[name] = score_image_tokens(model, samples, self.device, self.batch_size)
                per_image = [(float(t.sum()), len(t)) for t in tokens[name]]
            else:
                per_image = [(x.image, x.n_image) for x in score(model, samples, self.device, self.batch_size)]
            means[f"nll_{name}"] = float(np.mean([nll / max(n, 1) for nll, n in per_image]))
            sums[name] = float(np.mean([nll for nll, _ in per_image]))
        result = {"scenes": len(scenes), **means, "gap": means["nll_empty"] - means["nll_true"],
                  "gap_swapped": means["nll_swapped"] - means["nll_true"],
                  "gap_per_image": sums["empty"] - sums["true"]}  # fmt: skip
        return {**result, **(self._cell_split(scenes, tokens) if cells else {})}

    def _cell_split(self, scenes: Sequence[HeldOutScene], tokens: dict[str, list[np.ndarray]]) -> dict[str, Any]:
        """Per-token NLL on object / background cells, semantic / texture level, true and empty caption, from the
        per-token NLL of each scene's image (`score_image_tokens`)."""
        masks = self._object_masks(scenes)
        out: dict[str, Any] = {"object_cell_share": float(np.mean(np.concatenate(masks)))}
        for name in ("true", "empty"):
            nll = tokens[name]
            for where, pick in (("object", True), ("background", False)):
                picked = np.concatenate([n[m == pick] for n, m in zip(nll, masks, strict=True)])  # (N, 2)
                for k, level in enumerate(("semantic", "texture")):
                    out[f"nll_{name}_{where}_{level}"] = float(picked[:, k].mean()) if len(picked) else float("nan")
        for where in ("object", "background"):
            out[f"gap_{where}"] = sum(out[f"nll_empty_{where}_{lv}"] - out[f"nll_true_{where}_{lv}"]
                                      for lv in ("semantic", "texture"))  # fmt: skip
        return out

    def layout_dependence(self, model: Any) -> dict[str, Any]:
        """Image NLL per token on object and background cells (semantic + texture) after each caption scene's region
        description and after it mirrored; gap = mirrored - true, and the share of scenes whose object cells cost less
        after their true description. Needs a model with `image_token_nll`."""
        described = [(s, describe(s.scene)) for s in self.scenes[: self.captions]]
        told = {"true": [], "mirrored": []}  # the captions of the scenes kept: those with an object off centre
        scenes = []
        for s, d in described:
            if (mirrored := mirror_regions(d)) != d:
                scenes.append(s)
                told["true"].append(d)
                told["mirrored"].append(mirrored)
        if len(scenes) < 2:
            raise DiagnosticsError(f"layout dependence needs at least 2 scenes with an object off centre, got {len(scenes)}")
        masks = self._object_masks(scenes)
        per_scene: dict[str, dict[str, np.ndarray]] = {}
        for name, captions in told.items():
            samples = [self._build(lambda s=s, c=c: self.builder.generation(c, s.image), s.image)
                       for s, c in zip(scenes, captions, strict=True)]  # fmt: skip
            nll = [t.sum(-1) for t in score_image_tokens(model, samples, self.device, self.batch_size)]  # (n_image,)
            per_scene[name] = {where: np.array([n[m == pick].mean() if (m == pick).any() else np.nan
                                                for n, m in zip(nll, masks, strict=True)])
                               for where, pick in (("object", True), ("background", False))}  # fmt: skip
        out: dict[str, Any] = {"scenes": len(scenes)}
        for where in ("object", "background"):
            true, mirrored = per_scene["true"][where], per_scene["mirrored"][where]
            out |= {f"nll_true_{where}": float(np.nanmean(true)), f"nll_mirrored_{where}": float(np.nanmean(mirrored)),
                    f"gap_{where}": float(np.nanmean(mirrored - true))}  # fmt: skip
        obj = per_scene["true"]["object"] < per_scene["mirrored"]["object"]
        return {**out, "gap": out["gap_object"], "share_true_lower": float(obj.mean())}

    def _object_masks(self, scenes: Sequence[HeldOutScene]) -> list[np.ndarray]:
        """Per scene, (h*w,) bool: the cells of its code grid that its objects overlap (`object_cells`)."""
        return [object_cells(s.scene, *self.builder.codes.grid(s.image).semantic.shape[-2:]) for s in scenes]

    def description_dependence(self, model: Scorer) -> dict[str, Any]:
        """Mean text NLL per token of each caption scene's description with its own and with a swapped image; gap =
        swapped - real, and the share of scenes whose description costs less with their own image."""
        scenes = self.scenes[: self.captions]
        swap = derangement(len(scenes))
        shown = {"real": [s.image for s in scenes], "swapped": [scenes[swap[k]].image for k in range(len(scenes))]}
        nll = {}
        for name, images in shown.items():
            samples = [self._describe(s.caption, image) for s, image in zip(scenes, images, strict=True)]
            nll[name] = np.array([x.text / max(x.n_text, 1) for x in score(model, samples, self.device, self.batch_size)])
        return {"scenes": len(scenes), "nll_real": float(nll["real"].mean()), "nll_swapped": float(nll["swapped"].mean()),
                "gap": float(nll["swapped"].mean() - nll["real"].mean()),
                "share_real_lower": float(np.mean(nll["real"] < nll["swapped"]))}  # fmt: skip

    def count_accuracy(self, model: Scorer) -> dict[str, Any]:
        """Accuracy of the most likely count with the real and a swapped image: over all count questions, those about a
        held shape and those about a lacked one; chance_held = the share of the most frequent held count."""
        if not self.counts:
            raise DiagnosticsError("this diagnostic set holds no count questions (build it with counts > 0)")
        swap = derangement(len(self.scenes))
        truth = np.array([q.answer for q in self.counts])
        held = truth != "0"
        result: dict[str, Any] = {"questions": len(truth)}
        for name, shown in (("", lambda k: k), ("_swapped", lambda k: swap[k])):
            samples = [self._answer(q.question, self.scenes[shown(q.scene)].image, a)
                       for q in self.counts for a in COUNT_ANSWERS]  # fmt: skip
            nll = np.array([x.text for x in score(model, samples, self.device, self.batch_size)])
            right = np.array(COUNT_ANSWERS)[nll.reshape(len(truth), len(COUNT_ANSWERS)).argmin(1)] == truth
            result |= {f"accuracy{name}": float(right.mean()), f"accuracy_held{name}": float(right[held].mean()),
                       f"accuracy_lacked{name}": float(right[~held].mean())}  # fmt: skip
        result["chance_held"] = float(np.unique(truth[held], return_counts=True)[1].max() / held.sum())
        return result

    def log_record(self, model: nn.Module) -> dict[str, float]:
        """The trainer's cheap record: `LOG_KEYS` from the four diagnostics (the layout gap NaN when fewer than 2 caption
        scenes have an object off centre; `COUNT_LOG_KEYS` too when the set holds count questions), the model in eval
        mode (no dropout; its mode is restored)."""
        was_training = model.training
        model.eval()
        try:
            image, caption = self.image_dependence(model), self.caption_dependence(model)
            description = self.description_dependence(model)
            try:
                layout = self.layout_dependence(model)["gap"]
            except DiagnosticsError:
                layout = float("nan")
            counts = self.count_accuracy(model) if self.counts else None
        finally:
            model.train(was_training)
        values = (image["auc"], image["auc_swapped"], caption["gap"], description["gap"], layout)
        record = dict(zip(LOG_KEYS, values, strict=True))
        if counts:
            record |= dict(zip(COUNT_LOG_KEYS, (counts["accuracy"], counts["accuracy_swapped"]), strict=True))
        return record

    def _describe(self, caption: str, image: str) -> LMSample:
        turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{BRIEF_INSTRUCTIONS[0]}"},
                 {"from": "gpt", "value": caption}]  # fmt: skip
        return self._build(lambda: self.builder.understanding(turns, image), image)

    def _answer(self, question: str, image: str, answer: str) -> LMSample:
        turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"}, {"from": "gpt", "value": answer}]
        return self._build(lambda: self.builder.understanding(turns, image), image)

    def _build(self, make: Callable[[], LMSample], image: str) -> LMSample:
        try:
            return make()
        except Skip as skip:
            raise DiagnosticsError(f"held-out sample of {image} cannot be built: {skip.reason}") from None


def build_diagnostic_set(folder: str | Path, semhitok: SemHiTok, tokenizer, vocab: VisualVocab, *, questions: int,
                         captions: int, template: str, system: str | None, prompt: str = GENERATION_PROMPT,
                         max_length: int = sys.maxsize, device: torch.device | str = "cpu", seed: int = 0,
                         ask: Callable[[str], str] = existence_question, counts: int = 0,
                         count_ask: Callable[[str], str] = count_question) -> DiagnosticSet:  # fmt: skip
    """The held-out set of a synthetic folder: `questions` balanced yes/no questions (over questions / 2 scenes),
    `captions` scenes and `counts` count questions (over counts / 2 scenes; 0: none), their images encoded once by
    `semhitok` (`ask` words the yes/no questions: `balanced_questions`, `count_ask` the count questions); samples
    rendered with `template`, the system prompt `system`, the generation `prompt` and `max_length` as in training.
    DiagnosticsError for bad data or sizes."""
    if questions < 2 or questions % 2 or captions < 2 or counts < 0 or counts % 2:
        raise DiagnosticsError(f"the yes/no questions must be an even number >= 2, the caption scenes >= 2 and the count "
                               f"questions an even number >= 0, got {questions}, {captions} and {counts}")  # fmt: skip
    need = max(questions // 2, captions, counts // 2)
    scenes = read_scenes(folder, need)
    if len(scenes) < need:
        raise DiagnosticsError(f"{folder} holds {len(scenes)} scenes; {questions} yes/no and {counts} count questions "
                               f"(one scene per two) and {captions} caption scenes need {need}")  # fmt: skip
    asked = balanced_questions(scenes, questions, seed, ask)
    try:
        codes = encode_images(semhitok, Path(folder), [s.image for s in scenes])
    except (OSError, ValueError) as err:
        raise DiagnosticsError(f"{folder}: cannot read its images ({' '.join(str(err).split())})") from None
    builder = SampleBuilder(tokenizer, vocab, codes, template, max_length, prompt, system)
    counted = count_questions(scenes, counts, seed, count_ask) if counts else []
    return DiagnosticSet(builder, scenes, asked, captions, torch.device(device), counts=counted)
