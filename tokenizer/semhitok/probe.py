"""Semantic probe: do the quantized semantic codes keep the semantics of the teacher's features?

Two image-level representations from one pass over a labelled `ImageFolderDataset`:
(a) "teacher": the teacher's patch features (B, L, D_t) mean-pooled over the grid;
(b) "semantic_codes": the semantic code vectors of `code_embeddings(encode(x))` (B, h, w, d_sem) mean-pooled.
Each is scored on the same stratified train/test split (seeded) by cosine kNN (majority vote of the k nearest
training images, ties going to the nearer neighbours) and by a linear probe (multinomial logistic regression on
standardised features, full-batch AdamW, zero init, so deterministic).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPRESENTATIONS = ("teacher", "semantic_codes")


@torch.no_grad()
def probe_features(model: nn.Module, loader: Iterable[dict]) -> dict[str, Tensor]:
    """Batches from `collate_skip_bad` with "image" (B, 3, S, S) in [-1, 1] and "label" (B,) ->
    {"teacher": (N, D_t) float32, "semantic_codes": (N, d_sem) float32, "labels": (N,) int64, "num_skipped": () int64}
    (CPU tensors; bad images skipped and counted)."""
    device, out, skipped = next(model.parameters()).device, {k: [] for k in (*REPRESENTATIONS, "labels")}, 0
    for batch in loader:
        skipped += batch["num_skipped"]
        if batch["batch_size"] == 0:
            continue
        x = batch["image"].to(device)
        emb_sem, _ = model.code_embeddings(model.encode(x))  # (B, h, w, d_sem)
        out["teacher"].append(model.teacher_features(x).mean(1).float().cpu())  # (B, D_t)
        out["semantic_codes"].append(emb_sem.mean((1, 2)).float().cpu())
        out["labels"].append(batch["label"].long().cpu())
    if not out["labels"]:
        raise ValueError(f"no readable images for the probe ({skipped} skipped)")
    return {**{k: torch.cat(v) for k, v in out.items()}, "num_skipped": torch.tensor(skipped)}


def stratified_split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """labels (N,) -> (train indices, test indices): per class, round(n * test_fraction) random items go to test,
    keeping at least one in train (a class with one item is train only)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = min(round(len(idx) * test_fraction), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int) -> float:
    """Cosine kNN: train (N, D) / (N,), test (M, D) / (M,) -> accuracy in [0, 1]."""
    sims = F.normalize(test_x.double(), dim=-1) @ F.normalize(train_x.double(), dim=-1).t()  # (M, N)
    k = min(k, train_x.shape[0])
    nearest = sims.topk(k, dim=1).indices  # (M, k), nearest first
    weights = 1.0 + 0.5 ** torch.arange(1, k + 1, dtype=torch.float64)  # 1 vote each; ties go to nearer neighbours
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    votes = torch.zeros(len(test_x), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, train_y[nearest], weights.expand_as(nearest).contiguous())
    return float((votes.argmax(1) == test_y).double().mean())


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, steps: int = 300,
                          lr: float = 0.05, weight_decay: float = 1e-3) -> float:
    """Logistic regression on features standardised with the training statistics -> test accuracy in [0, 1]."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    head = nn.Linear(xs.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(head(xs), train_y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((head(xt).argmax(1) == test_y).float().mean())


def probe_accuracies(x: Tensor, labels: Tensor, train: Tensor, test: Tensor, ks: Sequence[int] = (1, 5),
                     steps: int = 300) -> dict[str, float]:
    """Features x (N, D), labels (N,), split indices -> {"knn@k" for k in ks, "linear"}."""
    args = (x[train], labels[train], x[test], labels[test])
    return {**{f"knn@{k}": knn_accuracy(*args, k) for k in ks}, "linear": linear_probe_accuracy(*args, steps=steps)}


def semantic_probe(model: nn.Module, loader: Iterable[dict], ks: Sequence[int] = (1, 5), test_fraction: float = 0.5,
                   seed: int = 0, steps: int = 300) -> dict:
    """One pass over a labelled loader -> {"num_images", "num_skipped", "num_classes", "num_train", "num_test",
    "chance" (majority-class rate on test), "teacher": {...}, "semantic_codes": {...}} (see `probe_accuracies`)."""
    feats = probe_features(model, loader)
    labels = feats["labels"]
    train, test = stratified_split(labels, test_fraction, seed)
    if len(test) == 0 or labels.unique().numel() < 2:
        raise ValueError("the probe needs at least 2 classes and 2 images in some class")
    return {
        "num_images": len(labels),
        "num_skipped": int(feats["num_skipped"]),
        "num_classes": int(labels.unique().numel()),
        "num_train": len(train),
        "num_test": len(test),
        "chance": float(labels[test].bincount().max() / len(test)),
        **{r: probe_accuracies(feats[r], labels, train, test, ks, steps) for r in REPRESENTATIONS},
    }
