"""GenEval: folder layout, resume, scoring with fake generators of known answers, metadata errors, the script."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import save_tiny_world
from PIL import Image

import mllm.evaluation.geneval
from mllm.evaluation.geneval import (
    NOT_SCORABLE,
    ORIGIN_NAME,
    StaleImagesError,
    format_summary,
    generate,
    load_metadata,
    score_folder,
    summarize,
    synthetic_metadata,
    write_layout,
    write_metadata,
)
from mllm.sampling import SamplingConfig, expand_captions, load_for_inference
from mllm.synthetic import GENEVAL_TAGS, Scene, SceneObject, render, scene_for_entry

REPO = Path(__file__).resolve().parents[1]
SIZE = 128


def fake_generator(entries: list[dict], correct):
    """(prompts, n, seed) -> images: the exact scene of the prompt's entry where `correct(entry, k)`, else the same
    scene's background alone. Records every call."""
    by_prompt = {e["prompt"]: e for e in entries}
    calls = []

    def generate_fn(prompts, n, seed):
        calls.append((list(prompts), n, seed))
        images = []
        for p in prompts:
            for k in range(n):
                scene = scene_for_entry(by_prompt[p], np.random.default_rng(seed + k))
                images.append(render(scene if correct(by_prompt[p], k) else Scene((), scene.background), SIZE))
        return images

    generate_fn.calls = calls
    return generate_fn


def test_layout_is_genevals(tmp_path):
    entry = synthetic_metadata(1, seed=0)[0]
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    write_layout(tmp_path, 7, entry, images)
    folder = tmp_path / "00007"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "grid.png", "metadata.jsonl", "samples", "samples/0000.png", "samples/0001.png"]  # fmt: skip
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == entry
    assert Image.open(folder / "grid.png").size == (16, 8)


def test_resume_skips_complete_folders(tmp_path):
    entries = synthetic_metadata(4, seed=0)
    gen = fake_generator(entries, lambda e, k: True)
    assert generate(gen, entries, tmp_path, 2, batch=2) == [0, 1, 2, 3]
    assert [c[2] for c in gen.calls] == [0, 4]  # image k of entry i has seed i*n + k
    (tmp_path / "00002" / "samples" / "0001.png").unlink()  # interrupted
    gen.calls.clear()
    assert generate(gen, entries, tmp_path, 2, batch=2) == [2]
    assert gen.calls == [([entries[2]["prompt"]], 2, 4)]
    assert generate(gen, entries, tmp_path, 2) == []


def test_checkpoint_prompts_per_call_follow_the_memory_budget_and_never_change_the_images(tmp_path, monkeypatch):
    """From a checkpoint, `generate` decodes as many prompts per call as the budget holds (here all 5 by default, 2
    under max_batch 4 with 2 images each, 1 under a tiny budget); the PNGs are byte-identical whatever the batch,
    resumed gaps included."""
    run = load_for_inference(save_tiny_world(tmp_path / "world") / "mllm")
    entries, calls = synthetic_metadata(5, seed=2), []
    real = mllm.evaluation.geneval.generate_images

    def counted(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(mllm.evaluation.geneval, "generate_images", counted)
    cfg = SamplingConfig(seed=3, top_k=10)
    folders = {}
    for name, budget, expected in (("auto", cfg, [5]), ("max4", replace(cfg, max_batch=4), [2, 2, 1]),
                                   ("tiny", replace(cfg, memory_budget_gib=1e-9), [1] * 5)):  # fmt: skip
        calls.clear()
        assert generate(run, entries, tmp_path / name, 2, budget) == list(range(5)) and calls == expected
        folders[name] = sorted((tmp_path / name).rglob("*.png"))
        assert len(folders[name]) == 5 * 3  # 2 samples + grid.png per prompt
    for name in ("max4", "tiny"):
        assert [f.read_bytes() for f in folders[name]] == [f.read_bytes() for f in folders["auto"]]
    for index in (1, 3):
        (tmp_path / "auto" / f"{index:05d}" / "samples" / "0001.png").unlink()
    calls.clear()
    assert generate(run, entries, tmp_path / "auto", 2, cfg) == [1, 3] and calls == [1, 1]  # one call per stretch
    assert [f.read_bytes() for f in sorted((tmp_path / "auto").rglob("*.png"))] == [
        f.read_bytes() for f in folders["max4"]]  # fmt: skip


def test_a_folder_keeps_the_images_of_one_checkpoint_and_sampling_setting(tmp_path):
    """Resuming into a folder made by another checkpoint (retrained, repackaged: any file rewritten) or with other
    sampling settings is refused with a one-line error, as is a folder of images of unknown origin; the same
    checkpoint and settings resume, and batching settings do not count."""
    world = save_tiny_world(tmp_path / "world") / "mllm"
    entries, cfg = synthetic_metadata(2, seed=2), SamplingConfig(seed=3, top_k=10)
    run = load_for_inference(world)
    assert run.origin and load_for_inference(world).origin == run.origin  # the same files: the same origin
    generate(run, entries, tmp_path / "a", 1, cfg)
    assert generate(run, entries, tmp_path / "a", 1, replace(cfg, max_batch=1)) == []
    with pytest.raises(StaleImagesError, match="another sampling"):
        generate(run, entries, tmp_path / "a", 1, replace(cfg, cfg_scale=5.0))
    parts = world / "mllm_parts.safetensors"
    parts.write_bytes(parts.read_bytes())  # rewritten (same bytes, new time): as packaging does
    with pytest.raises(StaleImagesError, match="another checkpoint"):
        generate(load_for_inference(world), entries, tmp_path / "a", 1, cfg)
    (tmp_path / "a" / ORIGIN_NAME).unlink()
    with pytest.raises(StaleImagesError, match="unknown origin"):
        generate(run, entries, tmp_path / "a", 1, cfg)
    meta = tmp_path / "meta.jsonl"
    write_metadata(meta, entries)
    out = run_script("generate", "--metadata", meta, "--out", tmp_path / "a", "--checkpoint", world)
    assert out.returncode == 2 and "unknown origin" in out.stderr and "Traceback" not in out.stderr


def test_expand_writes_each_prompt_out_first_and_keeps_the_original(tmp_path):
    """`generate --expand`: the model's greedy description of each prompt (`expand_captions`, batched like one by
    one) is what is drawn from; the folder's metadata holds it as `prompt` and the original as `original_prompt`."""
    world = save_tiny_world(tmp_path / "world") / "mllm"
    entries = synthetic_metadata(3, seed=2)
    run = load_for_inference(world)
    expanded = expand_captions(run.model, run.tokenizer, [e["prompt"] for e in entries])
    assert expanded == [expand_captions(run.model, run.tokenizer, [e["prompt"]])[0] for e in entries]
    assert all(isinstance(x, str) and x for x in expanded)
    meta = tmp_path / "meta.jsonl"
    write_metadata(meta, entries)
    out = run_script("generate", "--metadata", meta, "--out", tmp_path / "x", "--checkpoint", world, "--expand",
                     "--num-images", 1)  # fmt: skip
    assert out.returncode == 0, out.stderr
    stored = [json.loads((tmp_path / "x" / f"{i:05d}" / "metadata.jsonl").read_text()) for i in range(3)]
    assert [m["original_prompt"] for m in stored] == [e["prompt"] for e in entries]
    assert [m["prompt"] for m in stored] == expanded
    assert [{k: v for k, v in m.items() if k not in ("prompt", "original_prompt")} for m in stored] == [
        {k: v for k, v in e.items() if k != "prompt"} for e in entries]  # fmt: skip


def test_exact_scenes_score_one_and_backgrounds_zero(tmp_path):
    entries = synthetic_metadata(6, seed=3)
    generate(fake_generator(entries, lambda e, k: True), entries, tmp_path / "good", 1, batch=3)
    generate(fake_generator(entries, lambda e, k: False), entries, tmp_path / "bad", 1, batch=3)
    good, bad = score_folder(tmp_path / "good")["summary"], score_folder(tmp_path / "bad")["summary"]
    assert list(good["tags"]) == list(GENEVAL_TAGS)
    assert {t: v["accuracy"] for t, v in good["tags"].items()} == dict.fromkeys(GENEVAL_TAGS, 1.0)
    assert {t: v["accuracy"] for t, v in bad["tags"].items()} == dict.fromkeys(GENEVAL_TAGS, 0.0)
    assert (good["overall"], bad["overall"], good["images"], good["not_scorable"]) == (1.0, 0.0, 6, 0)


def test_mixed_generator_gives_hand_computed_scores(tmp_path):
    """7 entries: single_object twice, the other tags once; 2 images each. single_object always right, the others
    right on image 0 only -> per tag 1.0 and 0.5; overall = mean over tags = (1 + 5 * 0.5) / 6, not the image
    mean 9 / 14."""
    entries = synthetic_metadata(7, seed=5)
    gen = fake_generator(entries, lambda e, k: e["tag"] == "single_object" or k == 0)
    generate(gen, entries, tmp_path, 2, batch=4)
    summary = score_folder(tmp_path)["summary"]
    assert summary["tags"]["single_object"] == {"accuracy": 1.0, "correct": 4, "images": 4}
    assert all(summary["tags"][t]["accuracy"] == 0.5 for t in GENEVAL_TAGS[1:])
    assert summary["overall"] == pytest.approx((1 + 5 * 0.5) / 6)
    assert summary["correct_images"] == pytest.approx(9 / 14)
    distinct = len({json.dumps(e) for e in entries})  # GenEval counts prompts by their metadata (duplicates merge)
    assert (summary["images"], summary["prompts"], summary["correct_prompts"]) == (14, distinct, 1.0)


def test_summarize_averages_tags_not_images():
    rows = [{"tag": "counting", "metadata": "a", "correct": c} for c in (True, True, True, False)]
    rows.append({"tag": "colors", "metadata": "b", "correct": False})
    summary = summarize(rows)
    assert summary["overall"] == pytest.approx((0.75 + 0.0) / 2)
    assert summary["correct_images"] == pytest.approx(3 / 5)


def test_official_metadata_loads_and_is_not_scorable(tmp_path, shared_data):
    entries = load_metadata(shared_data / "bench" / "geneval" / "evaluation_metadata.jsonl")
    assert len(entries) == 553 and {e["tag"] for e in entries} == set(GENEVAL_TAGS)
    blank = lambda prompts, n, seed: [Image.new("RGB", (8, 8))] * (len(prompts) * n)  # noqa: E731
    generate(blank, entries[:3], tmp_path, 1)
    scored = score_folder(tmp_path)
    assert {r["reason"] for r in scored["results"]} == {NOT_SCORABLE}
    summary = scored["summary"]
    assert (summary["not_scorable"], summary["not_scorable_prompts"], summary["images"]) == (3, 3, 0)
    assert summary["overall"] is None


@pytest.mark.parametrize(("line", "message"), [("{not json", "invalid JSON"),
                                               ('{"tag": "colors", "prompt": "x"}', "lacks include")])  # fmt: skip
def test_bad_metadata_line_is_named(tmp_path, line, message):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps(synthetic_metadata(1)[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"meta\.jsonl:3: .*{message}"):
        load_metadata(path)


ONE = {"class": "circle", "count": 1}


@pytest.mark.parametrize(("entry", "message"), [
    ({"tag": "shapes", "include": [ONE], "prompt": "x"}, "unknown GenEval tag 'shapes' (expected one of "
                                                         "single_object, two_object, counting, colors, position, "
                                                         "color_attr)"),
    ({"tag": "counting", "include": [{"class": "circle", "count": -2}], "prompt": "x"},
     "include[0]: 'count' must be an integer >= 1, got -2"),
    ({"tag": "counting", "include": [ONE], "exclude": [{"class": "circle", "count": 0}], "prompt": "x"},
     "exclude[0]: 'count' must be an integer >= 1, got 0"),
    ({"tag": "colors", "include": [{"count": 1}], "prompt": "x"},
     "include[0]: expected an object with a 'class' name, got {'count': 1}"),
    ({"tag": "colors", "include": [], "prompt": "x"}, "'include' must be a non-empty list of objects, got []"),
])  # fmt: skip
def test_invalid_metadata_entry_is_named_not_scored(tmp_path, entry, message):
    """#11: unknown tags and counts < 1 used to be loaded and folded into "overall"; now file:line: problem."""
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps(synthetic_metadata(1)[0]) + "\n" + json.dumps(entry) + "\n")
    with pytest.raises(ValueError) as err:
        load_metadata(path)
    assert str(err.value) == f"{path}:2: {message}"
    write_layout(tmp_path / "images", 0, entry, [Image.new("RGB", (8, 8))])  # a folder made by another tool
    with pytest.raises(ValueError) as err:
        score_folder(tmp_path / "images")
    assert str(err.value) == f"{tmp_path / 'images' / '00000' / 'metadata.jsonl'}:1: {message}"


def test_failures_say_what_each_failed_image_missed(tmp_path):
    """`score_folder`'s summary["failures"]: per tag, the failed images by what they missed, read from the exact
    detector's reasons on rendered scenes that each break one requirement."""
    background = scene_for_entry(synthetic_metadata(1, seed=0)[0], np.random.default_rng(0)).background
    circle = lambda x, y: SceneObject("circle", "red", (x, y), 0.25)  # noqa: E731
    square = SceneObject("square", "blue", (0.75, 0.5), 0.25)
    one, two = {"class": "circle", "count": 1}, {"class": "circle", "count": 2}
    cases = [  # (entry, the image's objects): what it misses
        ({"tag": "single_object", "include": [{"class": "star", "count": 1}]}, [circle(0.5, 0.5)]),  # missing
        ({"tag": "counting", "include": [two]}, [circle(0.25, 0.25)]),  # too few
        ({"tag": "counting", "include": [one], "exclude": [two]}, [circle(0.25, 0.25), circle(0.75, 0.75)]),  # too many
        ({"tag": "colors", "include": [{**one, "color": "blue"}]}, [circle(0.5, 0.5)]),  # colour
        ({"tag": "position", "include": [{"class": "square", "count": 1}, {**one, "position": ["right of", 0]}]},
         [circle(0.25, 0.5), square]),  # relation: the circle is left of the square
    ]  # fmt: skip
    for i, (entry, objects) in enumerate(cases):
        write_layout(tmp_path, i, {**entry, "prompt": f"case {i}"}, [render(Scene(tuple(objects), background), SIZE)])
    scored = score_folder(tmp_path)
    assert not any(r["correct"] for r in scored["results"])
    assert scored["summary"]["failures"] == {"single_object": {"missing": 1}, "counting": {"too few": 1, "too many": 1},
                                             "colors": {"colour": 1}, "position": {"relation": 1}}  # fmt: skip
    assert "failed images by what they missed: single_object missing 1; counting too few 1, too many 1" in (
        format_summary(scored["summary"]))  # fmt: skip


def test_summarize_refuses_unknown_tags():
    with pytest.raises(ValueError, match=r"unknown GenEval tag\(s\) \['shapes'\]"):
        summarize([{"tag": "shapes", "metadata": "a", "correct": True}])


def run_script(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "eval" / "geneval.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_script_synthetic_metadata_and_score(tmp_path):
    meta = tmp_path / "meta.jsonl"
    proc = run_script("synthetic-metadata", "--num", 6, "--seed", 1, "--out", meta)
    assert proc.returncode == 0, proc.stderr
    entries = load_metadata(meta)
    assert entries == synthetic_metadata(6, 1)
    generate(fake_generator(entries, lambda e, k: True), entries, tmp_path / "images", 1, batch=6)
    proc = run_script("score", "--images", tmp_path / "images", "--out", tmp_path / "results.json")
    assert proc.returncode == 0, proc.stderr
    assert "overall" in proc.stdout and "1.00000" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["summary"]["overall"] == 1.0 and len(results["results"]) == 6


def load_script():
    """eval/geneval.py as a module (eval/ is not a package), to run its main() in-process."""
    spec = importlib.util.spec_from_file_location("geneval_script", REPO / "eval" / "geneval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_bad_input_is_one_line(tmp_path, capsys):
    main = load_script().main
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    write_metadata(tmp_path / "neg.jsonl", [{"tag": "counting", "include": [{"class": "circle", "count": -1}],
                                             "prompt": "a photo of -1 circles"}])  # fmt: skip
    write_metadata(tmp_path / "ok.jsonl", synthetic_metadata(1))
    (tmp_path / "empty").mkdir()
    cases = {"bad.jsonl:1: invalid JSON": ["generate", "--metadata", tmp_path / "bad.jsonl", "--out", tmp_path / "o"],
             "checkpoint folder not found": ["generate", "--metadata", tmp_path / "ok.jsonl", "--out", tmp_path / "o",
                                             "--checkpoint", tmp_path / "missing"],
             "no GenEval prompt folders": ["score", "--images", tmp_path / "empty"],
             "image folder not found": ["score", "--images", tmp_path / "nowhere"],
             "neg.jsonl:1: include[0]: 'count' must be an integer >= 1, got -1":
                 ["generate", "--metadata", tmp_path / "neg.jsonl", "--out", tmp_path / "o"]}  # fmt: skip
    for needle, args in cases.items():
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
