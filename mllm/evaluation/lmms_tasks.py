"""Local lmms-eval tasks in the schemas of lmms-eval's own `pope` and `mme` tasks, runnable offline.

A built task is a folder with one parquet file per split (images embedded as bytes, a Hugging Face `Image` feature)
and one task YAML per split, plus a group YAML. Each task YAML is lmms-eval's own pope.yaml / mme.yaml with only
the dataset and the name changed, and its `!function utils.X` references pointing at `lmms_eval.tasks.pope.utils.X`
/ `lmms_eval.tasks.mme.utils.X`: prompts, generation settings, answer parsing and metrics are lmms-eval's code. The
prompts are the built-in default (LLaVA-1.5's "\nAnswer the question using a single word or phrase."), which the
synthetic conversations teach (`mllm.synthetic.questions.SHORT_ANSWER`): no per-model prompt entry is needed.

Document schemas (those of lmms-lab's POPE and MME datasets):
    POPE: question_id (str), question, answer ("yes" / "no"), image, image_source (file stem), category (= split)
    MME:  question_id (str, the image: a yes and a no question share it), image, question, answer ("Yes" / "No"),
          category (existence, count, color, position: MME's perception categories)
Sources: `coco_pope_records` (POPE's recipe on COCO object annotations) and `synthetic_pope_records` /
`synthetic_mme_records` (the files `mllm.synthetic.write_dataset` renders).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import yaml

from mllm.synthetic.questions import POPE_STRATEGIES, pope_pairs
from semhitok.runtime import read_jsonl

POPE_FEATURES = {"question_id": "string", "question": "string", "answer": "string", "image": "image",
                 "image_source": "string", "category": "string"}  # fmt: skip
MME_FEATURES = {"question_id": "string", "image": "image", "question": "string", "answer": "string",
                "category": "string"}  # fmt: skip
BUILTIN = {"pope": (POPE_FEATURES, "pope/pope.yaml", "lmms_eval.tasks.pope.utils"),
           "mme": (MME_FEATURES, "mme/mme.yaml", "lmms_eval.tasks.mme.utils")}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- documents


def coco_pope_records(coco: Path, strategy: str, seed: int = 0, min_objects: int = 3, per_image: int = 3,
                      num_images: int | None = None) -> list[dict]:  # fmt: skip
    """POPE documents for one split over a COCO folder with `annotations.jsonl` ({image, objects: [category names]}).
    Like POPE: images with at least `min_objects` annotated categories (images with none are unannotated, never
    used), `per_image` present categories ("yes") and as many absent ones ("no") each, negatives drawn by `strategy`
    from the categories annotated anywhere in the folder. `num_images`: the first N eligible images (file order)."""
    rows = [r for _, r in read_jsonl(coco / "annotations.jsonl")]
    categories = sorted({c for r in rows for c in r.get("objects", [])})
    rows = [r for r in rows if len(set(r.get("objects", []))) >= max(min_objects, 1)][:num_images]
    pairs = pope_pairs([r["objects"] for r in rows], categories, strategy, np.random.default_rng(seed), per_image)
    docs = []
    for row, image_pairs in zip(rows, pairs, strict=True):
        for pos, neg in image_pairs:
            for category, answer in ((pos, "yes"), (neg, "no")):
                docs.append(pope_doc(len(docs) + 1, f"Is there a {category} in the image?", answer,
                                     coco / row["image"], strategy))  # fmt: skip
    return docs


def synthetic_pope_records(folder: Path, strategy: str) -> list[dict]:
    """POPE documents from a rendered synthetic folder's pope_<strategy>.jsonl ({question_id, image, text, label})."""
    rows = _read_jsonl(folder / f"pope_{strategy}.jsonl")
    return [pope_doc(r["question_id"], r["text"], r["label"], folder / r["image"], strategy) for r in rows]


def synthetic_mme_records(folder: Path) -> list[dict]:
    """MME documents from a rendered synthetic folder's mme.jsonl (already in MME's schema, image path relative)."""
    return [{**r, "question_id": str(r["question_id"]), "image": folder / r["image"]} for r in _read_jsonl(folder / "mme.jsonl")]


def pope_doc(question_id: int | str, question: str, answer: str, image: Path, split: str) -> dict:
    return {"question_id": str(question_id), "question": question, "answer": answer, "image": image,
            "image_source": image.stem, "category": split}  # fmt: skip


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a folder written by scripts/render_synthetic.py")
    return [r for _, r in read_jsonl(path)]


# ---------------------------------------------------------------------------------------------------- task folders


def write_task(folder: Path, name: str, kind: str, docs: Sequence[dict], source: str) -> Path:
    """Write docs (image = a file path) as `folder/<name>.parquet` (image bytes embedded) and the task YAML
    `folder/<name>.yaml`: lmms-eval's built-in `kind` ("pope" or "mme") task on this data. Returns the YAML path."""
    import datasets  # heavy: only when writing

    features, _, _ = BUILTIN[kind]
    if not docs:
        raise ValueError(f"task {name}: no documents")
    columns = {key: [_image_cell(d[key]) if kind_ == "image" else d[key] for d in docs] for key, kind_ in features.items()}
    schema = datasets.Features({key: datasets.Image() if k == "image" else datasets.Value(k) for key, k in features.items()})
    folder.mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict(columns, features=schema).to_parquet(folder / f"{name}.parquet")
    local = {"task": name, "dataset_path": "parquet", "dataset_kwargs": {"data_files": {"test": f"{name}.parquet"}},
             "test_split": "test"}  # fmt: skip
    config = {**local, **{k: v for k, v in builtin_config(kind).items() if k not in (*local, "dataset_name")}}
    return _write_yaml(folder / f"{name}.yaml", config, f"lmms-eval's {kind} task on {len(docs)} local documents: {source}")


def write_group(folder: Path, group: str, tasks: Sequence[str]) -> Path:
    """A group YAML running `tasks` (each scored on its own, like lmms-eval's pope_full)."""
    return _write_yaml(folder / f"{group}.yaml", {"group": group, "task": list(tasks)}, f"group of {', '.join(tasks)}")


def builtin_config(kind: str) -> dict:
    """lmms-eval's own task YAML for `kind` ("pope" / "mme") with its `!function utils.X` made absolute."""
    _, relative, module = BUILTIN[kind]
    text = (Path(find_spec("lmms_eval").origin).parent / "tasks" / relative).read_text()
    config = yaml.load(text, Loader=_Loader)  # SafeLoader + the !function tag
    for key, value in config.items():
        config[key] = _absolute(value, module)
    for metric in config.get("metric_list", []):
        metric.update({k: _absolute(v, module) for k, v in metric.items()})
    return config


class FunctionRef(str):
    """The value of a `!function module.name` YAML tag."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))
_Dumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def _absolute(value, module: str):
    """`utils.f` (relative to the built-in task's folder) -> `<module>.f`; other values unchanged."""
    if isinstance(value, FunctionRef) and value.startswith("utils."):
        return FunctionRef(f"{module}.{value.removeprefix('utils.')}")
    return value


def _write_yaml(path: Path, config: dict, comment: str) -> Path:
    header = f"# Built by eval/build_lmms_tasks.py: {comment}\n"
    path.write_text(header + yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
    return path


def _image_cell(path: Path) -> dict:
    """An image file -> an `Image` feature cell with the file's own bytes (no re-encoding)."""
    return {"bytes": Path(path).read_bytes(), "path": Path(path).name}


def build_pope_tasks(folder: Path, prefix: str, records, source: str) -> list[str]:
    """One task per POPE split (`<prefix>_<split>`, records(split) -> docs) and the group `<prefix>`."""
    names = [f"{prefix}_{split}" for split in POPE_STRATEGIES]
    for split, name in zip(POPE_STRATEGIES, names, strict=True):
        write_task(folder, name, "pope", records(split), f"{source}, {split} negatives")
    write_group(folder, prefix, names)
    return [prefix, *names]
