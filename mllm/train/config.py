"""MLLM run config (DESIGN §4): `model:` (mllm.model.MLLMConfig), `data:` (the stage's mixture) and `train:` (one
stage: optimisation, batch, precision, launch, cadence), strictly validated; the LR schedule and the accumulation that
follow from it. `train.stage` supplies the defaults of `model.train_*` (its objective's PARTS) and of `data.stage`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from mllm.assets import expand_reference
from mllm.data.mixture import DataConfig
from mllm.model import LoraSettings, MLLMConfig
from mllm.train.objectives import STAGE_PARTS, STAGES, LossConfig
from semhitok.runtime import (
    AssetError,
    ConfigError,
    Precision,
    apply_overrides,
    check_lr,
    from_dict,
    merge_dicts,
    read_yaml,
    scheduled_lr,
    to_dict,
)

# Keys a resumed run may change: they steer cadence and outputs, not what is computed up to the checkpoint.
RESUMABLE_CHANGES = ("train.out_dir", "train.precision", "train.steps", "train.epochs", "train.log_every", "train.ckpt_every", "train.keep_last",
                     "train.num_workers", "train.export_merged", "train.diagnose_every", "train.diagnose",
                     "train.tensorboard", "train.attention")  # fmt: skip
MODEL_PATHS = ("llm", "text_tokenizer", "semhitok")  # model.* keys naming local folders


@dataclass(frozen=True)
class DiagnoseConfig:
    """Learning diagnostics during training (DESIGN §9; `mllm.diagnostics`): every `train.diagnose_every` steps (and
    at step 0 of a fresh run) on a fixed held-out synthetic folder `data` (scripts/render_synthetic.py, rendered with
    another seed than the training data; "" = off): the yes/no answer margin AUC with the real vs a swapped image over
    `questions` balanced questions, the image NLL gap (empty - true caption), the description NLL gap (swapped -
    real image) and the object-cell NLL gap (mirrored - true region description) over `captions` scenes ->
    `diag/image_auc`, `diag/image_auc_swapped`, `diag/caption_gap`, `diag/description_gap`, `diag/layout_gap` in
    log.jsonl, and with `counts` > 0 the count accuracy with the real vs a swapped image over that many count
    questions -> `diag/count_accuracy`, `diag/count_accuracy_swapped` (eval/diagnose.py reports the means behind them). Not under ZeRO-3 (its weights are partitioned)."""

    data: str = ""
    questions: int = 32  # cost: 4 scored samples per question, 7 per caption scene (seconds on a GPU)
    captions: int = 16
    counts: int = 0  # count questions (even; 0 = off); cost: 12 scored samples each

    def __post_init__(self) -> None:
        if self.questions < 2 or self.questions % 2 or self.captions < 2 or self.counts < 0 or self.counts % 2:
            raise ValueError(f"train.diagnose.questions must be even and >= 2, captions >= 2, counts even and >= 0 "
                             f"(got {self.questions}, {self.captions}, {self.counts})")  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """One training stage. Batch sizes are per process; the global batch is batch_size x grad_accum x world size.
    `tensorboard: true` also writes every number of log.jsonl as a TensorBoard scalar into `out_dir/tensorboard/`
    (rank 0; needs the tensorboardX package, the `tensorboard` extra)."""

    stage: Literal["pretrain", "instruct", "t2i", "joint"] = "pretrain"
    out_dir: str = ""
    init_from: str = ""  # a previous stage's `model/` or `export/` folder: its adapter, head and special rows
    lr: float = 1e-3
    # {part: factor}: a part's lr is the schedule's x factor, e.g. {image_position: 10} for a part new in this stage
    # beside trained ones (parts: adapter, head, special, image_embedding, image_position, llm)
    lr_scale: dict[str, float] = field(default_factory=dict)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0  # not applied to biases / norms (1-D parameters)
    warmup_ratio: float = 0.03  # linear warm-up over this share of the steps
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # cosine floor, as a share of lr
    batch_size: int = 16  # per process (DeepSpeed: train_micro_batch_size_per_gpu)
    grad_accum: int = 1
    global_batch_size: int = 0  # > 0: grad_accum is derived as global / (batch_size x world); must divide
    epochs: float = 1.0  # passes over the stage's mixture
    steps: int = 0  # > 0: exactly this many optimizer steps instead (epochs is then not used)
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    precision: Precision = "auto"  # auto | bf16 | fp32 (auto = bf16 where native); DeepSpeed bf16 on CUDA, autocast elsewhere
    gradient_checkpointing: bool = False
    # The LLM's attention kernel while training: auto = eager on CPU, sdpa elsewhere. Same numbers; on this 2-core CPU
    # a SmolLM2-135M LoRA step (bf16 autocast, 16 x ~180 tokens) takes 5.9 s eager vs 7.0 s with PyTorch's CPU sdpa.
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    # G > 0: batches of samples of similar length (LLaVA's group_by_length): the shuffled order is cut into windows of
    # G batches, each sorted by length into batches whose order is shuffled. Less padding (the demo's instruct mix:
    # see docs/demo.md), the same samples per epoch; 0 = plain shuffle. Not a resumable change (the order changes).
    group_by_length: int = 0
    deepspeed: str | None = None  # ZeRO policy JSON (configs/deepspeed/); null = DDP / single process
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = 2
    log_every: int = 10
    ckpt_every: int = 500  # 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept; 0 = all
    tensorboard: bool = False  # also log to out_dir/tensorboard/ (semhitok.runtime.tensorboard)
    export_merged: bool = True  # also write out_dir/export (a plain HF folder with a second copy of the LLM)
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)
    diagnose_every: int = 0  # steps between learning diagnostics (train.diagnose); 0 = never
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)

    def __post_init__(self) -> None:
        if self.steps < 0 or (self.steps == 0 and self.epochs <= 0):
            raise ValueError(f"train.steps must be > 0, or train.epochs > 0 (got {self.steps}, {self.epochs})")
        if min(self.batch_size, self.grad_accum, self.log_every) < 1 or min(self.ckpt_every, self.keep_last) < 0:
            raise ValueError("train.batch_size, grad_accum, log_every must be >= 1; ckpt_every, keep_last >= 0")
        if self.group_by_length < 0:
            raise ValueError(f"train.group_by_length must be >= 0 (0 = off), got {self.group_by_length}")
        if self.global_batch_size and self.grad_accum != 1:
            raise ValueError("set train.global_batch_size (grad_accum derived) or train.grad_accum, not both")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("train.warmup_ratio must be in [0, 1) and train.min_lr_ratio in [0, 1]")
        check_lr("train.lr", self.lr)
        if any(not isinstance(v, (int, float)) or v <= 0 for v in self.lr_scale.values()):
            raise ValueError(f"train.lr_scale: every factor must be a number > 0, got {self.lr_scale}")
        if self.diagnose_every < 0 or (self.diagnose_every > 0) != bool(self.diagnose.data):
            raise ValueError("train.diagnose_every > 0 needs train.diagnose.data (a held-out synthetic folder), and "
                             f"train.diagnose.data needs train.diagnose_every > 0 (got {self.diagnose_every}, "
                             f"{self.diagnose.data!r})")  # fmt: skip


@dataclass(frozen=True)
class MLLMRunConfig:
    """Everything an MLLM training run needs; saved as `out_dir/config.yaml`."""

    model: MLLMConfig
    data: DataConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        if not self.train.out_dir:
            raise ValueError("train.out_dir must be set")
        if self.model.gradient_checkpointing and not self.train.gradient_checkpointing:
            raise ValueError("set train.gradient_checkpointing, not model.gradient_checkpointing")
        m = self.model
        if not (m.train_adapter or m.train_head or m.train_special_tokens or m.train_llm != "frozen"):
            raise ValueError(f"nothing trains in stage {self.train.stage}: every model.train_* flag is off")


def load_run_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> MLLMRunConfig:
    """YAML run config + `a.b=value` overrides, strictly validated (unknown keys / bad values raise ConfigError).
    `train.stage` supplies the defaults of `model.train_*` (STAGE_PARTS) and of `data.stage`."""
    data = read_yaml(Path(path))
    if not all(isinstance(data.get(k, {}), dict) for k in ("model", "data", "train")):
        raise ConfigError(f"{path}: `model:`, `data:` and `train:` must be mappings")
    stage = _stage_of(data, overrides)
    defaults = {"model": {**STAGE_PARTS[stage], "lora": to_dict(LoraSettings())},
                "data": {"stage": stage, "mix": {}}, "train": to_dict(TrainConfig())}  # fmt: skip
    return from_dict(MLLMRunConfig, apply_overrides(merge_dicts(defaults, data), overrides))


def _stage_of(data: dict, overrides: Sequence[str]) -> str:
    stage = str(data.get("train", {}).get("stage", TrainConfig.stage))
    for item in overrides:
        key, _, value = item.partition("=")
        stage = str(yaml.safe_load(value)) if key == "train.stage" else stage
    if stage not in STAGE_PARTS:
        raise ConfigError(f"train.stage: {stage!r} is not one of {list(STAGES)}")
    return stage


def resolve_model_paths(run: MLLMRunConfig) -> MLLMRunConfig:
    """`~` and `asset:<name>` in the model paths expanded (`mllm.assets.expand_reference`). Nothing is downloaded at
    run time: a model path that is not a local folder is a ConfigError naming the key."""
    try:
        paths = {k: expand_reference(getattr(run.model, k)) for k in MODEL_PATHS}
    except AssetError as err:
        raise ConfigError(f"model: {err}") from None
    missing = [f"model.{k}: {path}" for k, path in paths.items() if path and not Path(path).exists()]
    if missing:
        raise ConfigError(f"not found: {'; '.join(missing)} (nothing is downloaded at run time: pass a local folder)")
    return replace(run, model=replace(run.model, **paths))


def check_paths(run: MLLMRunConfig) -> None:
    """Every input file/folder of the run beyond the model's (`resolve_model_paths`) exists, checked before anything
    large loads; ConfigError lists the missing ones."""
    d, t = run.data, run.train
    needed = {"data.codes": d.codes, "data.conversations": d.conversations, "data.captions": d.captions,
              "train.init_from": t.init_from, "train.deepspeed": t.deepspeed or "",
              "train.diagnose.data": t.diagnose.data}  # fmt: skip
    missing = [f"{key}: {path}" for key, path in needed.items() if path and not Path(path).exists()]
    if missing:
        raise ConfigError(f"not found: {'; '.join(missing)}")


def grad_accum_of(t: TrainConfig, world: int) -> int:
    if not t.global_batch_size:
        return t.grad_accum
    accum, rest = divmod(t.global_batch_size, t.batch_size * world)
    if rest or accum < 1:
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not a multiple of batch_size "
                          f"{t.batch_size} x {world} processes")  # fmt: skip
    return accum


def lr_at(step: int, total: int, t: TrainConfig) -> float:
    """LR of optimizer step `step` (0-based) of `total`: linear warm-up (t.warmup_ratio of the steps) to t.lr, then
    cosine to t.min_lr_ratio * lr, or constant (`semhitok.runtime.scheduled_lr`)."""
    return scheduled_lr(step, total, t.lr, math.ceil(t.warmup_ratio * total), t.schedule, t.min_lr_ratio)
