"""lmms-eval on our model: eval/run_lmms.py (as a user runs it), the local tasks of eval/build_lmms_tasks.py, the
entry point `semhitok`, and batched text generation. The tiny random MLLM of tests/helpers.py has its `yes` / `no`
output rows set along a direction orthogonal to one prompt's hidden state, so its one-word answers mix yes, no and
other words, and every POPE / MME score is non-trivial."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from helpers import build_tiny_mllm, save_tiny_world
from test_mllm_model import random_grid

from mllm.evaluation.lmms_model import sampling_config
from mllm.sampling import ChatSession, SamplingConfig, generate_text, generate_texts
from mllm.synthetic import SHORT_ANSWER

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("random", "popular", "adversarial")


def script(name: str):
    return runpy.run_path(str(REPO / "eval" / f"{name}.py"), run_name="eval")["main"]


def run_main(name: str, args: list[str], capsys) -> tuple[int, str, str]:
    try:
        script(name)([str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def yes_no_model(root: Path) -> Path:
    """The tiny MLLM with `yes` / `no` output rows +-1000 u, u orthogonal to one prompt's last hidden state: which
    of them wins (if either) depends on the question and the image. Exported to root/yes-no; returns that folder."""
    model = build_tiny_mllm(root)
    tokenizer = model.load_text_tokenizer()
    with torch.no_grad():
        prompt = ChatSession(model, tokenizer, model.vocab.to_ids(random_grid(1))).prompt_ids("Is there a red circle?")
        h0 = model.backbone(model.embed(prompt[None])).last_hidden_state[0, -1]  # (D,)
        u = torch.randn(h0.shape, generator=torch.Generator().manual_seed(0))
        u -= (u @ h0) / (h0 @ h0) * h0
        weight = model.causal_lm.get_output_embeddings().weight
        weight[tokenizer.convert_tokens_to_ids("yes")], weight[tokenizer.convert_tokens_to_ids("no")] = 1e3 * u, -1e3 * u
    model.export_merged(root / "yes-no")
    return root / "yes-no"


def fake_hub_cache(cache: Path, repo_id: str, parquet: Path) -> None:
    """Put a parquet file into the datasets cache as if the hub dataset `repo_id` (config default, split test) had
    been downloaded, the way lmms-eval's built-in tasks find it offline."""
    name = repo_id.split("/")[-1].lower()
    target = cache / repo_id.replace("/", "___").lower() / "default" / "0.0.0" / "0000"
    ds = datasets.Dataset.from_parquet(str(parquet), cache_dir=str(cache / "build"))
    ds.save_to_disk(cache / "saved")
    target.mkdir(parents=True)
    shutil.copy(next((cache / "saved").glob("*.arrow")), target / f"{name}-test.arrow")
    split = datasets.SplitInfo("test", num_examples=len(ds), dataset_name=name)
    datasets.DatasetInfo(features=ds.features, config_name="default", dataset_name=name,
                         splits=datasets.SplitDict({"test": split})).write_to_directory(str(target))  # fmt: skip
    shutil.rmtree(cache / "saved")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """root: the tiny world + yes-no model, tasks/synthetic (6 scenes at the tiny tokenizer's 32 px), hf/ (a datasets
    cache holding the synthetic MME and POPE-random data under lmms-lab's hub names, for the built-in mme / pope)."""
    root = save_tiny_world(tmp_path_factory.mktemp("lmms"))
    yes_no_model(root)
    script("build_lmms_tasks")(["synthetic", "--num", "6", "--size", "32", "--seed", "5", "--out", str(root / "tasks")])
    fake_hub_cache(root / "hf", "lmms-lab-encoder/MME", root / "tasks/synthetic/synthetic_mme.parquet")
    fake_hub_cache(root / "hf", "lmms-lab-encoder/POPE", root / "tasks/synthetic/synthetic_pope_random.parquet")
    return root


# ---------------------------------------------------------------------------------------------------- scores by hand


def parse_yes_no(text: str) -> str:
    """MME's answer parser, written out again: yes / no / other from the first four characters."""
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t
    if len(t) == 1:
        return {"y": "yes", "n": "no"}.get(t, "other")
    return "yes" if "yes" in t[:4] else "no" if "no" in t[:4] else "other"


def pope_scores(samples: list[dict]) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 and yes ratio (of the labels) from predictions and targets."""
    pairs = [(s["filtered_resps"].lower().strip(), s["target"]) for s in samples]
    tp = sum(p == t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"pope_accuracy": sum(p == t for p, t in pairs) / len(pairs), "pope_precision": precision,
            "pope_recall": recall, "pope_f1_score": 2 * precision * recall / (precision + recall or 1),
            "pope_yes_ratio": sum(t == "yes" for _, t in pairs) / len(pairs)}  # fmt: skip


def mme_perception(samples: list[dict], docs: dict) -> float:
    """Sum over categories of mean over images of (accuracy + accuracy+) in percent; docs from the task's parquet."""
    per: dict[str, dict[str, list[bool]]] = {}
    for s in samples:
        qid, category = docs["question_id"][s["doc_id"]], docs["category"][s["doc_id"]]
        right = parse_yes_no(s["filtered_resps"]) == s["target"].lower()
        per.setdefault(category, {}).setdefault(qid, []).append(right)
    return sum(sum(100 * sum(v) / len(v) + 100 * all(v) for v in images.values()) / len(images)
               for images in per.values())  # fmt: skip


# ---------------------------------------------------------------------------------------------------- run_lmms.py


def test_run_lmms_scores_equal_those_recomputed_from_its_samples(world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(world / "hf"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "eval" / "run_lmms.py"), "--tasks", "synthetic_mme,synthetic_pope,mme,pope",
           "--include-path", str(world / "tasks"), "--model-path", str(world / "yes-no"), "--batch-size", "3",
           "--limit", "14", "--gen-kwargs", "max_new_tokens=1", "--output", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = (tmp_path / "out").glob("*/*_results.json")
    results = json.loads(results_file.read_text())
    samples = {p.name.split("_samples_")[1].removesuffix(".jsonl"): [json.loads(line) for line in p.open()]
               for p in results_file.parent.glob("*_samples_*.jsonl")}  # fmt: skip
    pope_tasks = [f"synthetic_pope_{s}" for s in SPLITS] + ["pope"]
    assert set(samples) == {"synthetic_mme", "mme", *pope_tasks}
    predictions = [parse_yes_no(s["filtered_resps"]) for task in samples.values() for s in task]
    assert {"yes", "no"} <= set(predictions)  # the scores below are not degenerate
    for task in pope_tasks:
        assert len(samples[task]) == 14
        for metric, value in pope_scores(samples[task]).items():
            assert results["results"][task][f"{metric},none"] == pytest.approx(value), (task, metric)
    for task, parquet in (("synthetic_mme", "synthetic_mme"), ("mme", "synthetic_mme")):
        docs = pq.read_table(world / "tasks" / "synthetic" / f"{parquet}.parquet").to_pydict()
        expected = mme_perception(samples[task], docs)
        assert results["results"][task]["mme_perception_score,none"] == pytest.approx(expected)
    # the built-in tasks read the same documents from the hub cache; both ask with lmms-eval's default suffix, LLaVA's,
    # which the synthetic training conversations use too (no per-model prompt entry)
    local, builtin = samples["synthetic_pope_random"], samples["pope"]
    assert [s["doc_id"] for s in local] == [s["doc_id"] for s in builtin]
    for a, b in zip(local, builtin, strict=True):
        assert a["input"] == b["input"] and a["input"].endswith(f"?{SHORT_ANSWER}")
    config = results["config"]
    assert config["batch_size"] == 3 and config["limit"] == 14 and config["gen_kwargs"] == {"max_new_tokens": 1}
    assert f"pretrained={world / 'yes-no'}" in config["model_args"] and "seed=0" in config["model_args"]
    assert {"random_seed", "numpy_seed", "torch_seed"} <= set(config)
    assert results["configs"]["pope"]["generation_kwargs"]["temperature"] == 0
    assert results["configs"]["synthetic_mme"]["generation_kwargs"]["max_new_tokens"] == 1
    table = [line.split() for line in result.stdout.splitlines()]
    assert table[0] == ["task", "metric", "value"] and len(table) == 1 + 5 * 4 + 2 + 1  # + the line naming the files
    for task, metric, value in table[1:-1]:
        assert float(value) == pytest.approx(results["results"][task][f"{metric},none"], abs=1e-4)


def test_unknown_task_lists_close_matches(world, capsys):
    args = ["--tasks", "synthetic_mme,synthetic_pop,mmee", "--include-path", world / "tasks", "--model-path", world / "yes-no"]
    code, _, err = run_main("run_lmms", args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "error: unknown task 'synthetic_pop' (close: synthetic_pope" in err and "'mmee' (close: mme" in err


@pytest.mark.parametrize("folder, message", [("semhitok", "is a SemHiTok tokenizer checkpoint, not an MLLM checkpoint"),
                                             ("nowhere", "checkpoint folder not found")])  # fmt: skip
def test_a_model_path_that_is_not_a_checkpoint_is_one_line_and_exit_2(world, capsys, folder, message):
    args = ["--tasks", "synthetic_mme", "--include-path", world / "tasks", "--model-path", world / folder]
    code, _, err = run_main("run_lmms", args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(world / folder) in err and message in err


def test_the_entry_point_registers_our_model_class():
    import lmms_eval.models

    from mllm.evaluation.lmms_model import SemHiTokLMMS

    assert lmms_eval.models.get_model("semhitok") is SemHiTokLMMS


# ---------------------------------------------------------------------------------------------------- task builder


def test_coco_pope_splits_are_balanced_with_negatives_absent_from_each_image(shared_data, tmp_path, capsys):
    coco = shared_data / "real" / "coco-491"
    code, out, err = run_main("build_lmms_tasks", ["coco-pope", "--coco", coco, "--num-images", "40", "--out", tmp_path], capsys)
    assert code == 0, err
    objects = {Path(r["image"]).stem: set(r["objects"]) for r in map(json.loads, (coco / "annotations.jsonl").open())}
    negatives = {}
    for split in SPLITS:
        table = pq.read_table(tmp_path / "coco_pope_mini" / f"coco_pope_mini_{split}.parquet").to_pydict()
        assert set(table) == {"question_id", "question", "answer", "image", "image_source", "category"}
        assert table["answer"].count("yes") == table["answer"].count("no") == 3 * 40
        assert set(table["category"]) == {split} and len(set(table["image_source"])) == 40
        for question, answer, source in zip(table["question"], table["answer"], table["image_source"], strict=True):
            name = question.removeprefix("Is there a ").removesuffix(" in the image?")
            assert (name in objects[source]) == (answer == "yes"), (split, question, source)
        negatives[split] = [q for q, a in zip(table["question"], table["answer"], strict=True) if a == "no"]
        sources = sorted(set(table["image_source"]))
    assert negatives["random"] != negatives["popular"] != negatives["adversarial"]
    top = Counter(c for source in sources for c in objects[source]).most_common(1)[0][0]  # "person"
    without = [source for source in sources if top not in objects[source]]
    assert len(without) > 0 and negatives["popular"].count(f"Is there a {top} in the image?") == len(without)
    assert "coco_pope_mini" in out and (tmp_path / "coco_pope_mini" / "coco_pope_mini.yaml").is_file()


# ---------------------------------------------------------------------------------------------------- generation


def test_batched_text_generation_equals_one_prompt_at_a_time(world):
    model = build_tiny_mllm(world)
    tokenizer = model.load_text_tokenizer()
    questions = ["what color is it", "how many", "is there a big blue dog on the mat with a ball under the sky"]
    prompts = [ChatSession(model, tokenizer, model.vocab.to_ids(random_grid(1, seed=k)) if k != 1 else None)
               .prompt_ids(q) for k, q in enumerate(questions)]  # fmt: skip
    assert len({len(p) for p in prompts}) == 3
    for cfg in (SamplingConfig(temperature=0.0, max_new_tokens=6), SamplingConfig(temperature=1.0, seed=4, max_new_tokens=6)):
        batched = generate_texts(model, prompts, cfg)
        alone = [generate_text(model, p, replace(cfg, seed=cfg.seed + k)) for k, p in enumerate(prompts)]
        assert all(torch.equal(b, a) for b, a in zip(batched, alone, strict=True)) and len(batched[0]) == 6
        assert all(torch.equal(b, a) for b, a in zip(batched, generate_texts(model, prompts, replace(cfg, use_cache=False)), strict=True))
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    full = generate_texts(model, prompts, greedy)
    stopped = generate_texts(model, prompts, greedy, done=lambda p, ids: p == 1 and len(ids) == 2)  # row 1 leaves early
    assert torch.equal(stopped[1], full[1][:2]) and torch.equal(stopped[0], full[0]) and torch.equal(stopped[2], full[2])


def test_gen_kwargs_map_to_sampling_settings():
    greedy = sampling_config({"temperature": 0.7, "do_sample": False, "top_p": 0, "max_new_tokens": 5, "until": ["\n"]}, 3)
    assert (greedy.temperature, greedy.top_p, greedy.max_new_tokens, greedy.seed) == (0.0, 1.0, 5, 3)
    sampled = sampling_config({"temperature": 0.7, "top_p": 0.9, "top_k": 5}, 0)
    assert (sampled.temperature, sampled.top_p, sampled.top_k) == (0.7, 0.9, 5)
    assert sampling_config({}, 0).temperature == 0.0
    with pytest.raises(ValueError, match="does not do beam search"):
        sampling_config({"num_beams": 4}, 0)
