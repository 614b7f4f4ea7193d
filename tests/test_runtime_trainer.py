"""The shared training skeleton (`semhitok.runtime.trainer`) on its own, with a toy trainer (linear regression) that
supplies only its model, objective, log record and checkpoint groups: exact resume by batches seen, the config-diff
refusal, gradient accumulation, skipped samples, log records and the final checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from semhitok.runtime import (
    BadItem,
    BatchStream,
    Cadence,
    ConfigError,
    Launch,
    TorchRunner,
    Trainer,
    collate_skip_bad,
    flatten_state,
    latest_checkpoint,
    resolve_precision,
    restore_optimizer,
    run_training,
    seed_everything,
)


@dataclass(frozen=True)
class ToyRun:
    out_dir: str
    steps: int = 6
    lr: float = 0.1
    accum: int = 1


class ToyData(torch.utils.data.Dataset):
    """y = x . (1, 2, 3); every 5th item is unreadable."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> dict[str, Tensor] | BadItem:
        if i % 5 == 4:
            return BadItem(i, f"item-{i}", "unreadable")
        x = torch.linspace(-1, 1, 3) * (i + 1) / 20
        return {"x": x, "y": x @ torch.tensor([1.0, 2.0, 3.0])}


class ToyTrainer(Trainer):
    RESUMABLE_CHANGES = ("steps",)

    def __init__(self, run: ToyRun):
        super().__init__(run, Launch(), Path(run.out_dir), "toy", Cadence(log_every=2, ckpt_every=3, keep_last=0))
        seed_everything(0)
        self.stream = BatchStream(ToyData(), self.launch, seed=0, batch_size=3, num_workers=0,
                                  collate_fn=collate_skip_bad)  # fmt: skip
        self.total, self.model = run.steps, nn.Linear(3, 1)
        opt = torch.optim.SGD(self.model.parameters(), lr=run.lr)
        precision = resolve_precision("fp32", self.launch.device)
        self.runner = TorchRunner(self.model, opt, list(self.model.parameters()), precision, self.launch.device, 0.0)
        self.losses: list[float] = []
        found = self.find_resume_point()
        if found is not None:
            self.resume(*found)
        self.start("toy: resuming" if found else "toy: starting")

    def run_step(self) -> None:
        accum = self.run.accum
        for micro in range(accum):
            out = self.runner.micro_step(partial(squared_error, batch=self.stream.next_usable()), micro, accum)
            self.losses.append(out["loss"].item())
        self.runner.optimizer_step(self.run.lr)

    def log_record(self, seconds: float, skipped: int) -> tuple[dict[str, Any], str, dict[str, str]]:
        record = {"step": self.step, "loss": self.losses[-1], "num_skipped": skipped}
        return record, f"step {self.step} loss {record['loss']:.4f}", {"loss": f"{record['loss']:.4f}"}

    def checkpoint_state(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        return {"model": self.model.state_dict(), "optimizer": flatten_state(self.runner.optimizer.state_dict())}, {}

    def load_state(self, groups: dict[str, dict[str, Tensor]], meta: dict[str, Any]) -> None:
        self.model.load_state_dict(groups["model"])
        restore_optimizer(self.runner.optimizer, groups["optimizer"])

    def export(self) -> Path:
        torch.save(self.model.state_dict(), self.out / "model.pt")
        return self.out / "model.pt"


def squared_error(model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
    return {"loss": ((model(batch["x"])[:, 0] - batch["y"]) ** 2).mean()}


def fit(run: ToyRun) -> ToyTrainer:
    trainer = ToyTrainer(run)
    trainer.fit()
    return trainer


def test_resume_continues_exactly_and_logs_records(tmp_path, capsys):
    whole = fit(ToyRun(str(tmp_path / "whole")))
    fit(ToyRun(str(tmp_path / "split"), steps=3))
    resumed = fit(ToyRun(str(tmp_path / "split")))  # train.steps may change on resume
    assert resumed.losses == whole.losses[3:]
    assert torch.equal(resumed.model.weight, whole.model.weight)
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and set(log[0]) == {"step", "loss", "num_skipped"}
    assert sum(r["num_skipped"] for r in log) > 0  # unreadable items are counted, the batches still train
    out = capsys.readouterr().out
    assert "sample(s) skipped since the last log" in out and "stage toy done: skipped" in out
    meta = json.loads((latest_checkpoint(tmp_path / "split") / "meta.json").read_text())
    assert meta["step"] == 6 and meta["batches_seen"] == resumed.stream.seen and meta["config"]["steps"] == 6


def test_a_resume_with_another_config_is_refused(tmp_path):
    run = ToyRun(str(tmp_path / "run"), steps=2)
    fit(run)
    with pytest.raises(ConfigError, match=r"holds a run with a different config .*lr: 0.1 vs 0.2"):
        ToyTrainer(replace(run, lr=0.2))


@dataclass(frozen=True)
class OldToyRun:
    """ToyRun before the schema had `accum` (what the old code did: one micro-batch)."""

    out_dir: str
    steps: int = 6
    lr: float = 0.1
    accum = 1  # a class attribute, not a field: not in the saved config


def test_a_run_resumes_across_a_new_config_key_at_its_default(tmp_path):
    """A checkpoint written before the schema gained a key resumes when the key is at its default (the same
    computation), and is refused when it is set otherwise."""
    fit(OldToyRun(str(tmp_path / "run"), steps=2))
    assert "accum" not in json.loads((latest_checkpoint(tmp_path / "run") / "meta.json").read_text())["config"]
    with pytest.raises(ConfigError, match=r"different config .*accum: 1 vs 2"):
        ToyTrainer(ToyRun(str(tmp_path / "run"), steps=3, accum=2))
    assert fit(ToyRun(str(tmp_path / "run"), steps=3)).step == 3


def test_accumulation_takes_accum_batches_per_step_and_run_training_exports(tmp_path):
    run = ToyRun(str(tmp_path / "run"), steps=2, accum=2)
    path = run_training(Launch(), run.out_dir, lambda: ToyTrainer(run))
    assert path.is_file()
    meta = json.loads((latest_checkpoint(run.out_dir) / "meta.json").read_text())
    assert meta["batches_seen"] >= 4


class SizedData(torch.utils.data.Dataset):
    """Item i has length (i * 7) % 23 (its own value), per `length_hint` as well."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"i": torch.tensor(i), "length": torch.tensor(self.length_hint(i, 0))}

    def length_hint(self, i: int, epoch: int) -> int:
        return (i * 7) % 23


def epoch_batches(group: int, epoch: int = 0, skip: int = 0) -> list[list[int]]:
    stream = BatchStream(SizedData(), Launch(), seed=3, batch_size=4, num_workers=0, collate_fn=collate_dicts,
                         group_by_length=group)  # fmt: skip
    stream.sampler.set_epoch(epoch)
    stream.sampler.skip = skip
    return [b["i"].tolist() for b in stream.loader]


def collate_dicts(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_group_by_length_sorts_batches_within_windows_and_keeps_the_epoch():
    """The same samples as the plain shuffle (but the 2 the loader's drop_last drops: the partial batch stays last),
    each window of G batches sorted by length (a batch's lengths never interleave another's of its window), a fixed
    function of (seed, epoch), and a resume (`skip`) continues the same order."""
    plain, grouped = epoch_batches(0), epoch_batches(3)
    flat = [i for b in grouped for i in b]
    assert len(grouped) == len(plain) == 12 and all(len(b) == 4 for b in grouped)
    order = list(iter(BatchStream(SizedData(), Launch(), seed=3, batch_size=4, num_workers=0, collate_fn=collate_dicts,
                                  group_by_length=0).sampler))  # fmt: skip
    assert len(set(flat)) == 48 and set(flat) == set(order[:48])  # windows of 12: the last 2 form the partial batch
    length = partial(SizedData().length_hint, epoch=0)
    for w in range(0, 12, 3):
        window = grouped[w : w + 3]
        spans = sorted((min(map(length, b)), max(map(length, b))) for b in window)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False)), window  # sorted into disjoint ranges
    assert epoch_batches(3) == grouped and epoch_batches(3, epoch=1) != grouped
    assert epoch_batches(3, skip=5 * 4) == grouped[5:]
    padded = {g: sum(max(map(length, b)) * 4 for b in epoch_batches(g)) for g in (0, 3)}
    assert padded[3] < padded[0]
    with pytest.raises(ConfigError, match="length_hint"):
        BatchStream(ToyData(), Launch(), seed=0, batch_size=3, num_workers=0, collate_fn=collate_skip_bad,
                    group_by_length=2)  # fmt: skip
