"""GenEval (DESIGN §5): prompts in, images out in GenEval's folder layout, scores per tag and overall.

Layout (GenEval's, as its README and DESIGN.md §5 give it; `evaluation/evaluate_images.py` reads samples/*.png):

    <out>/<index:05d>/metadata.jsonl      the prompt's metadata entry, one line
    <out>/<index:05d>/samples/<k:04d>.png the k-th image for that prompt
    <out>/<index:05d>/grid.png            optional: the samples side by side

`index` is the entry's position in the metadata file. The official evaluator (Mask2Former detector + CLIP colour
classifier) scores the real 553 prompts: `python evaluation/evaluate_images.py <out> --outfile results.jsonl
--model-path <mask2former weights>` then `python evaluation/summary_scores.py results.jsonl`; its weights cannot be had
offline here. `score_folder` scores the same folder with any `scorer(entry, image) -> (correct, reason)`; the default
is the exact detector of the synthetic domain, which scores synthetic-domain entries (`synthetic_metadata`) and
reports every other entry as not scorable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from mllm.sampling import (
    Inference,
    SamplingConfig,
    expand_captions,
    generate_images,
    generation_prompts,
    images_per_call,
    prompt_length,
)
from mllm.synthetic import COLORS, GENEVAL_TAGS, SHAPES, sample_geneval_entries, score_geneval
from semhitok.runtime import read_jsonl, to_pil

Generator = Callable[[list[str], int, int], list[Image.Image]]  # (prompts, n, seed) -> P·n images, prompt-major
Scorer = Callable[[dict, Image.Image], tuple[bool, str]]
REQUIRED_KEYS = ("tag", "include", "prompt")
NOT_SCORABLE = "not scorable by the synthetic detector"
DEFAULT_SAMPLING = SamplingConfig()  # frozen


# ---------------------------------------------------------------------------------------------------- metadata


def load_metadata(path: str | Path) -> list[dict]:
    """GenEval metadata JSONL -> entries. ValueError naming file:line for a line that does not parse or is not a
    valid entry (see `check_entry`)."""
    return [check_entry(entry, f"{path}:{lineno}") for lineno, entry in read_jsonl(path)]


def check_entry(entry: dict, where: str) -> dict:
    """`entry` if it is a GenEval metadata entry: `tag` one of GENEVAL_TAGS, a `prompt` string, a non-empty `include`
    list and an optional `exclude` list of objects with a `class` and a `count` >= 1. Else ValueError `where: problem`."""
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    if missing:
        raise ValueError(f"{where}: GenEval entry lacks {', '.join(missing)}")
    if entry["tag"] not in GENEVAL_TAGS:
        raise ValueError(f"{where}: unknown GenEval tag {entry['tag']!r} (expected one of {', '.join(GENEVAL_TAGS)})")
    if not isinstance(entry["prompt"], str) or not entry["prompt"]:
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {entry['prompt']!r}")
    if not isinstance(entry["include"], list) or not entry["include"]:
        raise ValueError(f"{where}: 'include' must be a non-empty list of objects, got {entry['include']!r}")
    if not isinstance(entry.get("exclude", []), list):
        raise ValueError(f"{where}: 'exclude' must be a list of objects, got {entry['exclude']!r}")
    for key in ("include", "exclude"):
        for k, obj in enumerate(entry.get(key, [])):
            _check_object(obj, f"{where}: {key}[{k}]")
    return entry


def _check_object(obj: object, where: str) -> None:
    """One include / exclude object: a `class` name and a `count` >= 1 (1 when absent)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("class"), str) or not obj["class"]:
        raise ValueError(f"{where}: expected an object with a 'class' name, got {obj!r}")
    count = obj.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{where}: 'count' must be an integer >= 1, got {count!r}")


def synthetic_metadata(n: int, seed: int = 0) -> list[dict]:
    """n synthetic-domain entries in GenEval's schema, cycling through GENEVAL_TAGS (the held-out benchmark)."""
    return sample_geneval_entries(np.random.default_rng(seed), n)


def write_metadata(path: str | Path, entries: Sequence[dict]) -> None:
    """Entries -> JSONL, one per line (GenEval's evaluation_metadata.jsonl format)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(e) + "\n" for e in entries))


# ---------------------------------------------------------------------------------------------------- layout


def prompt_dir(out: str | Path, index: int) -> Path:
    return Path(out) / f"{index:05d}"


def sample_path(out: str | Path, index: int, k: int) -> Path:
    return prompt_dir(out, index) / "samples" / f"{k:04d}.png"


ORIGIN_NAME = "generation.json"  # which checkpoint and sampling settings made a folder's images
IMAGE_SETTINGS = ("temperature", "top_k", "top_p", "cfg_scale", "cfg_schedule", "seed")  # SamplingConfig fields that
# change the images (batching never does)


class StaleImagesError(ValueError):
    """An output folder holds images made by another checkpoint or other sampling settings."""


def image_origin(run: Inference, cfg: SamplingConfig) -> dict:
    """What makes a folder's images what they are: the checkpoint (`Inference.origin`) and the sampling settings."""
    return {"checkpoint": run.origin, "sampling": {k: getattr(cfg, k) for k in IMAGE_SETTINGS}}


def claim_folder(out: str | Path, origin: dict) -> None:
    """Record `origin` in out/generation.json, or check that it is the one recorded: resuming into a folder whose
    images came from another checkpoint (e.g. after retraining or repackaging) or other sampling settings would mix
    or silently reuse them. A folder with finished prompts and no record (older runs) is refused too."""
    out, record = Path(out), Path(out) / ORIGIN_NAME
    if record.is_file():
        old = json.loads(record.read_text() or "null")
        if old != origin:
            what = "checkpoint" if not isinstance(old, dict) or old.get("checkpoint") != origin["checkpoint"] else "sampling"
            raise StaleImagesError(f"{out} holds images made with another {what} ({ORIGIN_NAME}: {old}, now {origin}): "
                                   "use a new --out folder or delete this one")  # fmt: skip
        return
    if any(out.glob("[0-9]*/samples/*.png")):
        raise StaleImagesError(f"{out} holds images of unknown origin (no {ORIGIN_NAME}): use a new --out folder or "
                               "delete this one")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(origin) + "\n")


def is_complete(out: str | Path, index: int, entry: dict, n: int) -> bool:
    """True when the prompt folder holds this entry's metadata and samples 0..n-1."""
    meta = prompt_dir(out, index) / "metadata.jsonl"
    if not meta.is_file() or json.loads(meta.read_text() or "null") != entry:
        return False
    return all(sample_path(out, index, k).is_file() for k in range(n))


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    """Images in one row (GenEval's grid.png)."""
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h), "white")
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), (k * w, 0))
    return grid


def write_layout(out: str | Path, index: int, entry: dict, images: Sequence[Image.Image], grid: bool = True) -> Path:
    """Write one prompt's folder; metadata last, so an interrupted folder is never taken for a complete one."""
    folder = prompt_dir(out, index)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        image.save(sample_path(out, index, k))
    if grid:
        side_by_side(images).save(folder / "grid.png")
    (folder / "metadata.jsonl").write_text(json.dumps(entry) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------------- generation


def model_generator(run: Inference, cfg: SamplingConfig, template: str = "auto") -> Generator:
    """A Generator that samples from a loaded checkpoint with `cfg` (num_images and seed set per call)."""

    def generate_fn(prompts: list[str], n: int, seed: int) -> list[Image.Image]:
        grid = generate_images(run.model, prompts, replace(cfg, num_images=n, seed=seed), tokenizer=run.tokenizer,
                               template=template)  # fmt: skip
        return [to_pil(x) for x in run.decode(grid)]  # (P·n, 3, H, W) in [-1, 1]

    return generate_fn


def generate(source: Inference | Generator, entries: Sequence[dict], out: str | Path, n_per_prompt: int,
             cfg: SamplingConfig = DEFAULT_SAMPLING, batch: int | None = None, grid: bool = True) -> list[int]:  # fmt: skip
    """Generate `n_per_prompt` images for each entry into GenEval's layout, `batch` prompts per call (None: from a
    checkpoint, as many as one decoding call holds, `prompts_per_call`; from a Generator, 1). Resumable: prompt
    folders already complete are skipped, and each call's folders are written when it returns; a folder holds the
    images of one checkpoint and sampling setting (`claim_folder`). Image k of entry i
    is drawn with seed cfg.seed + i·n + k whatever the batch size (row r of a call is seeded seed + r). Returns the
    indices generated in this call."""
    generate_fn = model_generator(source, cfg) if isinstance(source, Inference) else source
    if isinstance(source, Inference) and source.origin:
        claim_folder(out, image_origin(source, cfg))
    todo = [i for i, e in enumerate(entries) if not is_complete(out, i, e, n_per_prompt)]
    if batch is None:
        prompts = [entries[i]["prompt"] for i in todo]
        batch = prompts_per_call(source, prompts, n_per_prompt, cfg) if isinstance(source, Inference) and todo else 1
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        images = _generate_chunk(generate_fn, entries, chunk, n_per_prompt, cfg.seed)
        for j, i in enumerate(chunk):
            write_layout(out, i, entries[i], images[j * n_per_prompt : (j + 1) * n_per_prompt], grid)
    return todo


def expand_entries(run: Inference, entries: Sequence[dict]) -> list[dict]:
    """Prompt expansion of GenEval entries: each `prompt` replaced by the model's own scene description of it
    (`expand_captions`), the original kept as `original_prompt`; the judge's requirements are untouched."""
    expanded = expand_captions(run.model, run.tokenizer, [e["prompt"] for e in entries])
    return [{**e, "prompt": x, "original_prompt": e["prompt"]} for e, x in zip(entries, expanded, strict=True)]


def prompts_per_call(run: Inference, prompts: Sequence[str], n: int, cfg: SamplingConfig,
                     template: str = "auto") -> int:  # fmt: skip
    """Prompts whose `n` images each one decoding call holds (`images_per_call` for the longest of `prompts`, within
    cfg's memory budget and max_batch), at least 1."""
    cond, uncond = generation_prompts(run.model, prompts, cfg, run.tokenizer, template)
    h, w = run.model.config.image_grid
    return max(1, images_per_call(run.model, prompt_length(cond, uncond), h * w, cfg, uncond is not None) // n)


def _generate_chunk(generate_fn: Generator, entries: Sequence[dict], chunk: list[int], n: int, seed: int):
    """Images for the entries at `chunk`, one call per stretch of consecutive indices (resuming leaves gaps), so that
    every image keeps its own seed."""
    starts = [k for k, i in enumerate(chunk) if k == 0 or i != chunk[k - 1] + 1]
    runs = [chunk[a:b] for a, b in zip(starts, [*starts[1:], len(chunk)], strict=True)]
    images = [im for r in runs for im in generate_fn([entries[i]["prompt"] for i in r], n, seed + r[0] * n)]
    if len(images) != len(chunk) * n:
        raise ValueError(f"the generator returned {len(images)} images for {len(chunk)} prompts x {n}")
    return images


# ---------------------------------------------------------------------------------------------------- scoring


def synthetic_scorable(entry: dict) -> bool:
    """True when every class is a synthetic shape and every colour a synthetic colour."""
    reqs = entry["include"] + entry.get("exclude", [])
    return all(r["class"] in SHAPES and r.get("color", COLORS[0]) in COLORS for r in reqs)


def prompt_folders(out: str | Path) -> list[Path]:
    """The numbered prompt folders of a GenEval image folder, in order. ValueError when there are none."""
    root = Path(out)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    if not folders:
        raise ValueError(f"no GenEval prompt folders (<index:05d>/metadata.jsonl, samples/) in {root}")
    return folders


def read_entry(folder: Path) -> dict:
    """The one-line metadata.jsonl of a prompt folder; ValueError naming the file when it is missing or bad."""
    path = folder / "metadata.jsonl"
    records = read_jsonl(path) if path.is_file() else []
    if len(records) != 1:
        raise ValueError(f"{path}: expected one metadata line, found {len(records)}")
    lineno, entry = records[0]
    return check_entry(entry, f"{path}:{lineno}")


def score_folder(out: str | Path, scorer: Scorer | None = None) -> dict:
    """Score every sample of a GenEval image folder. scorer: (entry, image) -> (correct, reason); default the
    synthetic detector, which marks non-synthetic entries `scorable: False`. Returns {"results": per image,
    "summary": summarize(results)}; per-image rows carry GenEval's results.jsonl fields."""
    results = []
    for folder in prompt_folders(out):
        entry = read_entry(folder)
        for path in sorted((folder / "samples").glob("*.png")):
            results.append(_score_image(path, entry, scorer))
    return {"results": results, "summary": {**summarize(results), "failures": failure_counts(results)}}


def _score_image(path: Path, entry: dict, scorer: Scorer | None) -> dict:
    row = {"filename": str(path), "tag": entry["tag"], "prompt": entry["prompt"], "metadata": json.dumps(entry)}
    if scorer is None and not synthetic_scorable(entry):
        return {**row, "scorable": False, "correct": None, "reason": NOT_SCORABLE}
    with Image.open(path) as image:
        correct, reason = (scorer or score_geneval)(entry, image.convert("RGB"))
    return {**row, "scorable": True, "correct": bool(correct), "reason": reason}


def summarize(results: Sequence[dict]) -> dict:
    """GenEval's summary (evaluation/summary_scores.py): accuracy per tag = mean over that tag's images; overall =
    mean of the per-tag accuracies (a macro average, not the mean over images); plus image / prompt counts, the
    fraction of correct images and of prompts with at least one correct image (prompts told apart by their metadata,
    as GenEval does). Unscorable rows are only counted."""
    scored = [r for r in results if r.get("scorable", True)]
    seen = {r["tag"] for r in scored}
    if seen - set(GENEVAL_TAGS):
        raise ValueError(f"unknown GenEval tag(s) {sorted(seen - set(GENEVAL_TAGS))} (expected {GENEVAL_TAGS})")
    tags = [t for t in GENEVAL_TAGS if t in seen]
    per_tag = {t: _tally([r for r in scored if r["tag"] == t]) for t in tags}
    prompts = {}
    for r in scored:
        prompts[r["metadata"]] = prompts.get(r["metadata"], False) or r["correct"]
    return {
        "tags": per_tag,
        "overall": float(np.mean([v["accuracy"] for v in per_tag.values()])) if per_tag else None,
        "images": len(scored),
        "prompts": len(prompts),
        "correct_images": _mean([r["correct"] for r in scored]),
        "correct_prompts": _mean(list(prompts.values())),
        "not_scorable": len(results) - len(scored),
        "not_scorable_prompts": len({r["metadata"] for r in results if not r.get("scorable", True)}),
    }


FAILURES = (  # (kind, pattern of one reason line in the detector's / GenEval's wording)
    ("missing", re.compile(r"expected \S+>=\d+, found 0$")),
    ("too few", re.compile(r"expected \S+>=\d+, found [1-9]\d*$")),
    ("too many", re.compile(r"expected \S+<\d+, found \d+$")),
    ("colour", re.compile(r"expected \S+ \S+>=\d+, found ")),
    ("relation", re.compile(r"expected \S+ .+ target, found ")),
)  # "no target for X to be <rel>" follows a missing object and is not counted again


def failure_kinds(reason: str) -> list[str]:
    """The kinds of requirement a failed image missed, from its reason lines: missing (an object class found 0
    times), too few, too many, colour, relation."""
    lines = reason.splitlines()
    return [kind for kind, pattern in FAILURES if any(pattern.match(line) for line in lines)]


def failure_counts(results: Sequence[dict]) -> dict[str, dict[str, int]]:
    """Per tag, how many failed images missed each kind of requirement (`failure_kinds`; an image can miss several):
    what a GenEval score is lost to. Rows without a reason are skipped."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        if r.get("scorable", True) and r["correct"] is False and r.get("reason"):
            tally = out.setdefault(r["tag"], {})
            for kind in failure_kinds(r["reason"]):
                tally[kind] = tally.get(kind, 0) + 1
    return {t: out[t] for t in GENEVAL_TAGS if t in out}


def judge_images(entries: Sequence[dict | None], images: Sequence[Image.Image]) -> dict | None:
    """`summarize` of images judged by the exact detector against their entries (an image whose entry is None is
    skipped; None when none has one). On tokenizer reconstructions of scenes rendered for GenEval entries it is the
    ceiling that decoding puts on the GenEval score of anything generated through that tokenizer."""
    results = [{"tag": e["tag"], "metadata": json.dumps(e, sort_keys=True), "correct": bool(score_geneval(e, im)[0])}
               for e, im in zip(entries, images, strict=True) if e]  # fmt: skip
    return summarize(results) if results else None


def _mean(values: Sequence[bool]) -> float | None:
    return float(np.mean(values)) if values else None


def _tally(rows: Sequence[dict]) -> dict:
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / len(rows), "correct": correct, "images": len(rows)}


def format_summary(summary: dict) -> str:
    """A short table: one line per tag, then overall and counts."""
    lines = [f"{'tag':<16} {'accuracy':>8}  correct/images"]
    lines += [f"{t:<16} {v['accuracy']:>8.2%}  {v['correct']}/{v['images']}" for t, v in summary["tags"].items()]
    overall = "n/a" if summary["overall"] is None else f"{summary['overall']:.5f}"
    lines.append(f"{'overall':<16} {overall:>8}  (mean over tags)")
    lines.append(f"images {summary['images']}, prompts {summary['prompts']}")
    if summary.get("failures"):
        lost = "; ".join(f"{t} " + ", ".join(f"{k} {n}" for k, n in kinds.items())
                         for t, kinds in summary["failures"].items())  # fmt: skip
        lines.append(f"failed images by what they missed: {lost}")
    if summary["not_scorable"]:
        lines.append(f"{summary['not_scorable']} images ({summary['not_scorable_prompts']} prompts) {NOT_SCORABLE}: "
                     "score them with GenEval's evaluation/evaluate_images.py (Mask2Former + CLIP)")  # fmt: skip
    return "\n".join(lines)
