"""Attribute probes of a tokenizer's representations: what can be read from the teacher, the student, the codes?

For a batch of images `code_representations` gives five per-patch representations (each (B, L, D)):
  teacher         the frozen teacher's features (the target of stage 1)
  student         the semantic branch's output before quantization (l2-normalised, d_sem)
  semantic_codes  the quantized semantic code vectors the MLLM's adapter sees (d_sem)
  texture_codes   the texture code vectors (d_pix)
  both_codes      semantic and texture code vectors side by side
A `PatchProbe` (a small per-patch MLP, mean- and max-pooled over the patches plus a small projection kept in patch
order, one linear head per task) is trained on one split and scored on another, the same way for every
representation, so the numbers compare side by side.

Tasks are named targets of two kinds: "multilabel" (N, C) in {0, 1} (e.g. "is there a red object", scored as the
accuracy over all N x C entries; chance = the majority rate per label) and "multiclass" (N,) in [0, C) (accuracy;
chance = the majority class). The synthetic domain's targets (count, colour, shape, position, POPE categories) are
built by `mllm.synthetic.probe_targets`; an image folder's class labels make one multiclass task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROBE_REPRESENTATIONS = ("teacher", "student", "semantic_codes", "texture_codes", "both_codes")


@torch.no_grad()
def code_representations(model: nn.Module, images: Tensor,
                         names: tuple[str, ...] = PROBE_REPRESENTATIONS) -> dict[str, Tensor]:  # fmt: skip
    """images (B, 3, H, W) in [-1, 1] -> {name: (B, L, D) float32 on the CPU} for `names` (each computed only when
    asked for: the teacher is the expensive one)."""
    was_training = model.training
    model.eval()
    try:
        out = {}
        if "teacher" in names:
            out["teacher"] = model.teacher_features(images)
        if "student" in names:
            out["student"] = model.semantic_latent(images)
        if {"semantic_codes", "texture_codes", "both_codes"} & set(names):
            sem, pix = (e.flatten(1, 2) for e in model.code_embeddings(model.encode(images)))  # (B, L, d) each
            out.update(semantic_codes=sem, texture_codes=pix, both_codes=torch.cat([sem, pix], dim=-1))
    finally:
        model.train(was_training)
    return {k: out[k].float().cpu() for k in names}


def batched_code_representations(model: nn.Module, images: Tensor, names: tuple[str, ...] = PROBE_REPRESENTATIONS,
                                 batch_size: int = 64) -> dict[str, Tensor]:  # fmt: skip
    """`code_representations` of images (N, 3, H, W), `batch_size` at a time on the model's device -> (N, L, D)."""
    device = next(model.parameters()).device
    parts = [code_representations(model, chunk.to(device), names) for chunk in images.split(batch_size)]
    return {name: torch.cat([p[name] for p in parts]) for name in names}


@dataclass(frozen=True)
class Task:
    """A probe target: kind "multilabel" with `classes` binary labels, or "multiclass" over `classes` classes."""

    kind: str
    classes: int

    def __post_init__(self) -> None:
        if self.kind not in ("multilabel", "multiclass") or self.classes < 1:
            raise ValueError(f"bad probe task {self}: kind multilabel | multiclass, classes >= 1")


def tasks_of(targets: Mapping[str, Tensor]) -> dict[str, Task]:
    """Task per target: float (N, C) -> multilabel C; integer (N,) -> multiclass over max + 1 classes."""
    return {name: Task("multilabel", t.shape[1]) if t.dim() == 2 else Task("multiclass", int(t.max()) + 1)
            for name, t in targets.items()}  # fmt: skip


class PatchProbe(nn.Module):
    """Per-patch MLP (D -> width -> width); the image is read as its mean- and max-pooled patch features (what is
    there, however many patches it covers) plus a small per-patch projection kept in patch order (where it is).
    One linear head per task."""

    def __init__(self, patches: int, dim: int, tasks: Mapping[str, Task], width: int = 128, local: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.local = nn.Linear(width, local)
        features = 2 * width + patches * local
        self.heads = nn.ModuleDict({name: nn.Linear(features, t.classes) for name, t in tasks.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x (B, L, D) -> {task: logits (B, C)}."""
        h = self.mlp(self.norm(x))  # (B, L, width)
        pooled = torch.cat([h.mean(1), h.amax(1), self.local(h).flatten(1)], dim=-1)  # (B, 2 * width + L * local)
        return {name: head(pooled) for name, head in self.heads.items()}


def probe_loss(logits: Mapping[str, Tensor], targets: Mapping[str, Tensor], tasks: Mapping[str, Task]) -> Tensor:
    """Sum over tasks of BCE (multilabel) or cross-entropy (multiclass)."""
    return sum(F.binary_cross_entropy_with_logits(logits[n], targets[n].float()) if t.kind == "multilabel"
               else F.cross_entropy(logits[n], targets[n]) for n, t in tasks.items())  # fmt: skip


def accuracy(logits: Tensor, target: Tensor, task: Task) -> float:
    """multilabel: mean over all entries of (logit > 0) == label; multiclass: argmax accuracy."""
    if task.kind == "multilabel":
        return float(((logits > 0) == target.bool()).float().mean())
    return float((logits.argmax(1) == target).float().mean())


def chance(train: Tensor, test: Tensor, task: Task) -> float:
    """Accuracy on `test` of always answering the training majority (per label for multilabel)."""
    if task.kind == "multilabel":
        return float(((train.float().mean(0) > 0.5) == test.bool()).float().mean())
    return float((test == train.bincount(minlength=task.classes).argmax()).float().mean())


def fit_probe(x: Tensor, targets: Mapping[str, Tensor], train: Tensor, epochs: int = 30, batch_size: int = 128,
              lr: float = 2e-3, seed: int = 0) -> PatchProbe:
    """Train a PatchProbe on x[train] (N, L, D) -> targets; seeded, AdamW, cosine-free constant lr."""
    tasks = tasks_of(targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = PatchProbe(x.shape[1], x.shape[-1], tasks)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in train[torch.randperm(len(train), generator=generator)].split(batch_size):
                loss = probe_loss(probe(x[idx]), {n: t[idx] for n, t in targets.items()}, tasks)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return probe.eval()


@torch.no_grad()
def probe_scores(x: Tensor, targets: Mapping[str, Tensor], train: Tensor, test: Tensor, **fit) -> dict[str, float]:
    """Fit on `train` indices, score on `test`: {task: accuracy}."""
    tasks = tasks_of(targets)
    probe = fit_probe(x, targets, train, **fit)
    logits = probe(x[test])
    return {n: accuracy(logits[n], targets[n][test], t) for n, t in tasks.items()}


def probe_table(reps: Mapping[str, Tensor], targets: Mapping[str, Tensor], train: Tensor, test: Tensor,
                **fit) -> dict[str, dict[str, float]]:
    """{representation: {task: accuracy}} for every representation, plus {"chance": {task: majority accuracy}}."""
    tasks = tasks_of(targets)
    table = {name: probe_scores(x, targets, train, test, **fit) for name, x in reps.items()}
    table["chance"] = {n: chance(targets[n][train], targets[n][test], t) for n, t in tasks.items()}
    return table


def format_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """Rows = representations (and chance), columns = tasks, accuracies to 3 decimals."""
    tasks = list(next(iter(table.values())))
    lines = [f"{'':<16}" + "".join(f"{t:>10}" for t in tasks)]
    lines += [f"{r:<16}" + "".join(f"{row[t]:>10.3f}" for t in tasks) for r, row in table.items()]
    return "\n".join(lines)


def targets_from_rows(rows: list[dict[str, int | list[int]]]) -> dict[str, Tensor]:
    """Per-image targets {task: int | list of 0/1} -> {task: (N,) int64 | (N, C) float}; every row names the same
    tasks (ValueError names the first row that does not)."""
    tasks = sorted(rows[0])
    for k, row in enumerate(rows):
        if sorted(row) != tasks:
            raise ValueError(f"probe targets row {k + 1} has tasks {sorted(row)}, the first row {tasks}")
    return {t: torch.tensor([r[t] for r in rows], dtype=torch.float32 if isinstance(rows[0][t], list) else torch.long)
            for t in tasks}  # fmt: skip


class ProbeSet:
    """A fixed set of images with attribute targets, probed during training: teacher once, the live representations
    (student, codes) at every call. `path`: JSON lines {"image": path relative to the file, "targets": {...}}
    (`mllm.synthetic.dataset.write_dataset` writes `probe.jsonl`); the first `limit` rows are used, the first
    `train_fraction` of them train each probe."""

    def __init__(self, path: str | Path, image_size: int, limit: int, train_fraction: float = 0.8, epochs: int = 10):
        from semhitok.runtime import load_image, read_jsonl, to_tensor

        path = Path(path)
        rows = [row for _, row in read_jsonl(path)][:limit]
        if len(rows) < 10:
            raise ValueError(f"{path}: {len(rows)} probe rows; at least 10 are needed")
        self.images = torch.stack([to_tensor(load_image(path.parent / r["image"], image_size)) for r in rows])
        self.targets = targets_from_rows([r["targets"] for r in rows])
        cut = int(round(len(rows) * train_fraction))
        self.train, self.test, self.epochs = torch.arange(cut), torch.arange(cut, len(rows)), epochs

    def scores(self, model: nn.Module, names: tuple[str, ...], batch_size: int = 64) -> dict[str, float]:
        """{"probe/<representation>/<task>": accuracy} for the representations `names` of `model` now."""
        out = {}
        for name, x in batched_code_representations(model, self.images, names, batch_size).items():
            for task, acc in probe_scores(x, self.targets, self.train, self.test, epochs=self.epochs).items():
                out[f"probe/{name}/{task}"] = acc
        return out
