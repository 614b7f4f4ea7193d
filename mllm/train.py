"""MLLM training (DESIGN §4): run config, the three launch modes, what trains per stage, a resumable loop, export.

Launch modes (one code path; `detect_launch` picks the runner):
    python scripts/train_mllm.py --config C.yaml                      one process            -> TorchRunner
    torchrun --nproc_per_node N scripts/train_mllm.py --config C.yaml  DDP (nccl / gloo CPU)  -> TorchRunner + DDP
    deepspeed --num_gpus N scripts/train_mllm.py --config C.yaml --deepspeed configs/deepspeed/zero2.json
                                                                       DeepSpeed engine       -> DeepSpeedRunner
A DeepSpeed JSON (`train.deepspeed`) selects the engine under any launcher (also torchrun or plain python, world 1).
It holds ONLY ZeRO policy: micro-batch, accumulation, clipping and precision are injected from `train.*` in one
place (`deepspeed_config`). The optimizer is always our torch AdamW and the LR schedule our own function of the step,
so every mode trains the same objective with the same hyper-parameters.

Stages set defaults for what trains (`STAGE_PARTS`, LLaVA recipe); the run config's `model:` may override each flag.

A run lives in `train.out_dir`: `config.yaml`, `log.jsonl` (one record per `log_every` steps: token-weighted loss,
loss_text (≈ understanding), loss_image (generation), lr, grad_norm, tokens/s, samples per direction, skipped and
truncated samples), `checkpoints/step-XXXXXX/` (semhitok's atomic checkpoints: trainable weights + optimizer as
safetensors, step, data position, every rank's RNG, the run config; COMPLETE marker last), and at the end `model/`
(`SemHiTokLM.save_pretrained`) and `export/` (`export_merged`: plain HF folder, loadable without PEFT/DeepSpeed).
Starting a run in an out_dir with a complete checkpoint resumes it exactly (same data order, RNG, optimizer) from the
newest intact one. One run at a time owns an out_dir (`semhitok.runtime.runlock`, taken by rank 0); a second is refused.
Nothing is downloaded at run time: `model.llm`, `model.text_tokenizer` and `model.semhitok` are local folders.

DeepSpeed checkpoints (decision): the engine's state (its ZeRO-partitioned fp32 master weights and optimizer shards)
is saved with DeepSpeed's own `save_checkpoint` into `deepspeed/.step-XXXXXX.tmp`, renamed to `deepspeed/step-XXXXXX`
once every rank has written, and only then is our checkpoint (meta + RNG, no weights) written with its COMPLETE
marker, so the marker still decides what is complete. DeepSpeed's shards are torch.save pickles, loaded by DeepSpeed
with `torch.load(weights_only=False)`: only files this run wrote are ever read that way; our own files and the
final `model/` and `export/` folders are safetensors + JSON. Frozen LLM weights are not checkpointed (they come from
`model.llm`).

ZeRO-3 (decision): the loss calls the text and image heads once per chunk of labelled positions, a number that differs
between ranks, while ZeRO-3 needs every rank to call its hooked modules in the same order; the heads' parameters are
therefore gathered once per step with the top module (`gather_loss_parts_per_step`). On a CPU, DeepSpeed runs over
gloo without building its shared-memory op (`_no_cpu_shm_op`), so nothing is compiled at run time.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from mllm.assets import expand_reference, resolve_reference
from mllm.conversation import IGNORE_INDEX
from mllm.data.mixture import DataConfig, build_dataset, collate_lm
from mllm.model import CONFIG_NAME, PARTS_NAME, VOCAB_NAME, LoraSettings, MLLMConfig, SemHiTokLM, read_config
from mllm.text_tokenizer import load_text_tokenizer
from mllm.vocab import VisualVocab
from semhitok.runtime import (
    MAX_EMPTY_BATCHES,
    AssetError,
    ConfigError,
    EmptyBatches,
    Precision,
    SkipCounter,
    append_jsonl,
    apply_overrides,
    check_lr,
    config_diff,
    console,
    flatten_state,
    from_dict,
    hold_run_folder,
    load_resume_point,
    merge_dicts,
    read_yaml,
    resolve_device,
    resolve_precision,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
    save_config,
    skipped_line,
    to_dict,
    truncate_log,
    unwrap_model,
)

STAGES = ("pretrain", "instruct", "t2i", "joint")
# What trains per stage unless `model:` says otherwise. LLaVA: pre-training aligns the adapter only; instruction tuning
# trains adapter + LLM; text-to-image adds the image head; joint trains everything.
STAGE_PARTS: dict[str, dict[str, Any]] = {
    "pretrain": {"train_adapter": True, "train_head": False, "train_special_tokens": False, "train_llm": "frozen"},
    "instruct": {"train_adapter": True, "train_head": False, "train_special_tokens": True, "train_llm": "full"},
    "t2i": {"train_adapter": True, "train_head": True, "train_special_tokens": True, "train_llm": "full"},
    "joint": {"train_adapter": True, "train_head": True, "train_special_tokens": True, "train_llm": "full"},
}
# Keys a resumed run may change: they steer cadence and outputs, not what is computed up to the checkpoint.
RESUMABLE_CHANGES = ("train.out_dir", "train.precision", "train.steps", "train.epochs", "train.log_every", "train.ckpt_every", "train.keep_last",
                     "train.num_workers", "train.export_merged")  # fmt: skip
# DeepSpeed keys that come from the run config (`deepspeed_config`), never from the ZeRO policy JSON.
INJECTED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")  # fmt: skip
DS_DIR = "deepspeed"
MODEL_PATHS = ("llm", "text_tokenizer", "semhitok")  # model.* keys naming local folders
MODEL_INPUTS = ("input_ids", "attention_mask", "labels")


# ------------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class TrainConfig:
    """One training stage. Batch sizes are per process; the global batch is batch_size x grad_accum x world size."""

    stage: Literal["pretrain", "instruct", "t2i", "joint"] = "pretrain"
    out_dir: str = ""
    init_from: str = ""  # a previous stage's `model/` or `export/` folder: its adapter, head and special rows
    lr: float = 1e-3
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
    deepspeed: str | None = None  # ZeRO policy JSON (configs/deepspeed/); null = DDP / single process
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = 2
    log_every: int = 10
    ckpt_every: int = 500  # 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept; 0 = all
    export_merged: bool = True  # also write out_dir/export (a plain HF folder with a second copy of the LLM)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or (self.steps == 0 and self.epochs <= 0):
            raise ValueError(f"train.steps must be > 0, or train.epochs > 0 (got {self.steps}, {self.epochs})")
        if min(self.batch_size, self.grad_accum, self.log_every) < 1 or min(self.ckpt_every, self.keep_last) < 0:
            raise ValueError("train.batch_size, grad_accum, log_every must be >= 1; ckpt_every, keep_last >= 0")
        if self.global_batch_size and self.grad_accum != 1:
            raise ValueError("set train.global_batch_size (grad_accum derived) or train.grad_accum, not both")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("train.warmup_ratio must be in [0, 1) and train.min_lr_ratio in [0, 1]")
        check_lr("train.lr", self.lr)


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
              "train.init_from": t.init_from, "train.deepspeed": t.deepspeed or ""}  # fmt: skip
    missing = [f"{key}: {path}" for key, path in needed.items() if path and not Path(path).exists()]
    if missing:
        raise ConfigError(f"not found: {'; '.join(missing)}")


# ------------------------------------------------------------------------------------------------------ launch


@dataclass(frozen=True)
class Launch:
    """How this process runs: "single" (plain python), "ddp" (torchrun, WORLD_SIZE > 1) or "deepspeed" (a ZeRO JSON
    is given; any launcher). rank / local_rank / world_size come from the launcher's environment."""

    mode: Literal["single", "ddp", "deepspeed"]
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launch(train: TrainConfig, env: dict[str, str] | None = None) -> Launch:
    """The launch mode from the environment torchrun / the deepspeed launcher set (RANK, LOCAL_RANK, WORLD_SIZE)."""
    env = os.environ if env is None else env
    world, rank, local = (int(env.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    mode = "deepspeed" if train.deepspeed else "ddp" if world > 1 else "single"
    return Launch(mode, resolve_device(train.device, local), rank, local, world)


def join_process_group(launch: Launch) -> bool:
    """Join the launcher's process group (nccl on CUDA, gloo on CPU); a world-1 DeepSpeed run gets an in-memory
    group. Returns True if this call created the group (the caller destroys it)."""
    if launch.mode == "single" or dist.is_initialized():
        return False
    backend = "nccl" if launch.device.type == "cuda" else "gloo"
    if launch.device.type == "cuda":
        torch.cuda.set_device(launch.device)
    if launch.world_size == 1 and "MASTER_ADDR" not in os.environ:  # DeepSpeed without a launcher
        for key in ("RANK", "LOCAL_RANK"):  # DeepSpeed asserts on these, as a launcher would set them
            os.environ.setdefault(key, "0")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    return True


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _min_over_ranks(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def rank_rng_states(launch: Launch) -> dict[str, Tensor]:
    """Every rank's torch CPU (+ CUDA) generator state, gathered: {"cpu.<rank>": uint8 tensor, "cuda.<rank>": ...}.
    (semhitok's checkpoint group `rng` holds rank 0's torch / numpy / python states.)"""
    mine = {"cpu": torch.get_rng_state()}
    if launch.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(launch.device)
    if not dist.is_initialized():
        return {f"{k}.0": v for k, v in mine.items()}
    out = {}
    for kind, state in mine.items():
        parts = [torch.empty_like(state, device=launch.device) for _ in range(launch.world_size)]
        dist.all_gather(parts, state.to(launch.device))
        out.update({f"{kind}.{r}": p.cpu() for r, p in enumerate(parts)})
    return out


def restore_rank_rng(states: dict[str, Tensor], launch: Launch) -> None:
    torch.set_rng_state(states[f"cpu.{launch.rank}"])
    if launch.device.type == "cuda" and f"cuda.{launch.rank}" in states:
        torch.cuda.set_rng_state(states[f"cuda.{launch.rank}"], launch.device)


# --------------------------------------------------------------------------------------------- model and data


def stage_model_config(run: MLLMRunConfig) -> MLLMConfig:
    """The model config this run builds: gradient checkpointing comes from `train`."""
    return replace(run.model, gradient_checkpointing=run.train.gradient_checkpointing)


def build_model(run: MLLMRunConfig) -> SemHiTokLM:
    """Base LLM + fresh parts (+ `train.init_from`'s parts); bad paths, K*m mismatches etc. raise ConfigError."""
    config = stage_model_config(run)
    try:
        tokenizer = load_text_tokenizer(config.text_tokenizer or config.llm)
        model = SemHiTokLM.from_config(config, tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None
    if run.train.init_from:
        load_init(model, Path(run.train.init_from))
    return model


def load_init(model: SemHiTokLM, folder: Path) -> None:
    """Copy adapter, head and special rows from a previous stage's `save_pretrained` / `export_merged` folder.
    Its vocabulary must equal this model's, and its LLM must be the one `model.llm` names (a LoRA or fully trained
    LLM is carried on by pointing `model.llm` at that stage's `export/` or `model/llm/`)."""
    try:
        saved, vocab = read_config(folder / CONFIG_NAME), VisualVocab.load(folder / VOCAB_NAME)
        state = load_file(str(folder / PARTS_NAME))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"train.init_from: {err}") from None
    if vocab != model.vocab:
        raise ConfigError(f"train.init_from {folder}: its vocab.json (K*m = {vocab.K}*{vocab.m}, offset {vocab.offset}) "
                          f"differs from this model's (K*m = {model.vocab.K}*{model.vocab.m}, offset "
                          f"{model.vocab.offset}): another tokenizer or text vocabulary")  # fmt: skip
    if saved.train_llm == "lora":
        raise ConfigError(f"train.init_from {folder} holds LoRA weights: start from its stage's export/ folder and set "
                          "model.llm to it too")  # fmt: skip
    llm = Path(resolve_reference(saved.llm, folder))
    if llm != Path(model.config.llm).resolve():
        raise ConfigError(f"train.init_from {folder} was trained on the LLM {llm}, but model.llm is "
                          f"{model.config.llm}: set model.llm={llm}")  # fmt: skip
    try:
        model.parts().load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"train.init_from {folder}: its parts do not fit model: {err}") from None


def build_data(run: MLLMRunConfig, tokenizer, vocab: VisualVocab) -> Dataset:
    """The stage's training mixture (`mllm.data.mixture.build_dataset`); data errors raise ConfigError."""
    try:
        return build_dataset(run.data, tokenizer, vocab, run.model.semhitok)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data: {err}") from None


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the text tokenizer has neither a pad nor an eos token to pad batches with")
    return pad


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, this rank's share) that starts `skip` samples into the epoch."""

    def __init__(self, dataset: Dataset, launch: Launch, seed: int):
        super().__init__(dataset, num_replicas=launch.world_size, rank=launch.rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        it = super().__iter__()
        for _ in range(self.skip):
            next(it)
        return it

    def __len__(self) -> int:
        return self.num_samples - self.skip


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: nn.Module, state: dict[str, Tensor]) -> None:
    params = trainable_state(model)
    if set(state) != set(params):
        diff = sorted(set(state) ^ set(params))[:8]
        raise ConfigError(f"checkpoint weights do not match this model's trainable parameters (e.g. {diff})")
    for name, p in params.items():
        p.copy_(state[name])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters: matrices decay, biases / norm weights (1-D) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip


def lr_at(step: int, total: int, t: TrainConfig) -> float:
    """LR of optimizer step `step` (0-based) of `total`: linear warm-up to t.lr, then cosine to t.min_lr_ratio * lr."""
    warmup = math.ceil(t.warmup_ratio * total)
    if step < warmup:
        return t.lr * (step + 1) / warmup
    if t.schedule == "constant":
        return t.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grad_accum_of(t: TrainConfig, world: int) -> int:
    if not t.global_batch_size:
        return t.grad_accum
    accum, rest = divmod(t.global_batch_size, t.batch_size * world)
    if rest or accum < 1:
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not a multiple of batch_size "
                          f"{t.batch_size} x {world} processes")  # fmt: skip
    return accum


# ------------------------------------------------------------------------------------------------------ runners


class TorchRunner:
    """Single process or DDP: our own gradient accumulation (no_sync), clipping, AdamW step and checkpoint state."""

    def __init__(self, model: SemHiTokLM, optimizer: torch.optim.Optimizer, launch: Launch, train: TrainConfig):
        self.module, self.optimizer, self.clip = model, optimizer, train.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.precision, self.device = resolve_precision(train.precision, launch.device), launch.device
        self.model: nn.Module = model
        if launch.mode == "ddp":  # robust to parts a batch does not reach (e.g. the image head, no image targets);
            ids = [launch.device.index] if launch.device.type == "cuda" else None  # buffers (code tables) are constant
            self.model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True,
                                                 broadcast_buffers=False)  # fmt: skip

    def micro_step(self, batch: dict[str, Tensor], accum: int, last: bool) -> dict[str, Tensor]:
        """Forward + backward of one micro-batch; DDP syncs gradients only on the `last` of the accumulation."""
        sync = self.model.no_sync() if isinstance(self.model, DistributedDataParallel) and not last else nullcontext()
        with sync:
            with self.precision.autocast(self.device):
                out = self.model(**batch)
            (out["loss"] / accum).backward()
        return out

    def optimizer_step(self, lr: float) -> Tensor:
        set_lr(self.optimizer, lr)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def state(self) -> dict[str, dict[str, Tensor]]:
        return {"trainable": trainable_state(self.module), "optimizer": flatten_state(self.optimizer.state_dict())}

    def save_engine(self, out: Path, step: int) -> str | None:
        return None  # everything is in `state()`

    def load(self, groups: dict[str, dict[str, Tensor]], meta: dict[str, Any], out: Path) -> None:
        load_trainable(self.module, groups["trainable"])
        restore_optimizer(self.optimizer, groups["optimizer"])


def deepspeed_config(policy_path: str, train: TrainConfig, accum: int, bf16: bool) -> dict[str, Any]:
    """The ZeRO policy JSON + what the run config decides (the one place batch, clipping and precision are set)."""
    try:
        policy = json.loads(Path(policy_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"train.deepspeed: cannot read {policy_path} as JSON ({err})") from None
    clash = sorted(set(policy) & set(INJECTED_DS_KEYS))
    if clash or "zero_optimization" not in policy:
        raise ConfigError(f"{policy_path}: a DeepSpeed JSON here holds only ZeRO policy (`zero_optimization`); "
                          f"{clash or 'its absence'}: batch, accumulation, clipping and precision come from train.*")  # fmt: skip
    return {**policy, "train_micro_batch_size_per_gpu": train.batch_size, "gradient_accumulation_steps": accum,
            "gradient_clipping": train.grad_clip, "bf16": {"enabled": bf16}, "steps_per_print": 2**31 - 1}  # fmt: skip


def _no_cpu_shm_op() -> None:
    """DeepSpeed's CPU comm backend JIT-compiles a shared-memory op (minutes) at init; it only serves inference
    all-reduce, training collectives go through torch.distributed (gloo). DeepSpeed's own switch: mark it unavailable
    in `deepspeed.ops.__compatible_ops__` (a dict it keeps so edits persist)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedRunner:
    """A DeepSpeed engine (ZeRO-2 / ZeRO-3 per the JSON) around the model and our AdamW: the engine accumulates,
    clips and steps; checkpoints are its own shards (see the module docstring)."""

    def __init__(self, model: SemHiTokLM, optimizer: torch.optim.Optimizer, launch: Launch, config: dict[str, Any],
                 autocast: AbstractContextManager | None = None):
        import deepspeed

        if launch.device.type == "cpu":
            _no_cpu_shm_op()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.module, self.launch = self.engine.module, launch
        self.autocast = autocast or nullcontext()  # bf16 autocast where DeepSpeed's own bf16 mode is not used (CPU)
        if self.engine.zero_optimization_stage() == 3:
            gather_loss_parts_per_step(self.engine, model)

    def micro_step(self, batch: dict[str, Tensor], accum: int, last: bool) -> dict[str, Tensor]:
        with self.autocast:
            out = self.engine(**batch)
        self.engine.backward(out["loss"])  # the engine divides by its gradient_accumulation_steps
        if not last:
            self.engine.step()  # counts the micro-step; the boundary step is optimizer_step's
        return out

    def optimizer_step(self, lr: float) -> float:
        set_lr(self.engine.optimizer, lr)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def state(self) -> dict[str, dict[str, Tensor]]:
        return {}  # the engine's weights and optimizer live in its own checkpoint folder

    def save_engine(self, out: Path, step: int) -> str:
        """Collective: DeepSpeed's checkpoint into a hidden folder, renamed into place once every rank has written."""
        final = out / DS_DIR / f"step-{step:06d}"
        tmp = final.with_name(f".{final.name}.tmp")
        if self.launch.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False, exclude_frozen_parameters=True)
        _barrier()
        if self.launch.is_main:
            for file in (f for f in tmp.rglob("*") if f.is_file()):  # on disk before the rename makes them visible
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
        _barrier()
        return final.relative_to(out).as_posix()

    def load(self, groups: dict[str, dict[str, Tensor]], meta: dict[str, Any], out: Path) -> None:
        folder = out / meta["engine"]
        path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False,
                                              load_lr_scheduler_states=False)  # fmt: skip
        if path is None:
            raise ConfigError(f"DeepSpeed could not load its checkpoint {folder}")


def gather_loss_parts_per_step(engine, model: SemHiTokLM) -> None:
    """ZeRO-3: hold the loss parts (SpecialRows' matrices, the image head, lm_head) gathered for a whole
    forward/backward, as parameters of the top module, instead of per call of their modules.

    Why: the loss calls the heads once per chunk of labelled positions, and chunk counts differ between ranks;
    ZeRO-3 requires every rank to call its hooked modules in the same order (it all-gathers per call and asserts the
    recorded module order across ranks), so the heads' module hooks are removed and their parameters registered with
    the top module, which every rank enters exactly once. SpecialRows' matrices are used outside any forward anyway.
    Cost: these parameters stay whole for the step (with a 7B LLM ~0.3 GB for lm_head + the image head's size)."""
    import deepspeed

    lm_head = model.causal_lm.get_output_embeddings()
    for p in [*model.special.parameters(), *model.head.parameters(), *lm_head.parameters()]:
        deepspeed.zero.register_external_parameter(model, p)
    hook_dicts = {id(d) for m in [*model.head.modules(), *lm_head.modules()]
                  for d in (m._forward_pre_hooks, m._forward_hooks)}  # fmt: skip
    offload = engine.optimizer.parameter_offload  # DeepSpeed keeps the handles of the hooks it registered
    for handle in [*offload.forward_hooks, *offload.backward_hooks]:
        if id(handle.hooks_dict_ref()) in hook_dicts:
            handle.remove()


def prune_engine_dirs(out: Path) -> None:
    """Drop DeepSpeed folders whose checkpoint is gone (pruned, or never completed) and leftovers of killed writes."""
    keep = {p.name for p in (out / "checkpoints").glob("step-*")}  # atomic writes: a visible step-* is complete
    root = out / DS_DIR
    for path in root.iterdir() if root.is_dir() else ():
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def whole_parameters(runner: TorchRunner | DeepSpeedRunner):
    """A context in which every parameter is whole (ZeRO-3 gathers them; a no-op otherwise)."""
    if isinstance(runner, DeepSpeedRunner) and runner.engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(runner.module.parameters()), modifier_rank=None)
    return nullcontext()


# ------------------------------------------------------------------------------------------------------ logging


class RankZeroLog:
    """The one logger: rank 0 appends records to `log.jsonl` and shows them on the progress bar (or prints a line
    when stderr is not a terminal); other ranks stay silent."""

    def __init__(self, path: Path, launch: Launch, total: int, start: int):
        self.path, self.main = path, launch.is_main
        self.bar = tqdm(total=total, initial=start, disable=not (self.main and sys.stderr.isatty()), unit="step")

    def info(self, text: str) -> None:
        if self.main:
            console(text, self.bar)

    def record(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        append_jsonl(self.path, record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if self.bar.disable:
            print(f"step {record['step']}/{self.bar.total} loss {record['loss']:.4f} (text {record['loss_text']:.4f},"
                  f" image {record['loss_image']:.4f}) lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s",
                  flush=True)  # fmt: skip

    def close(self) -> None:
        self.bar.close()


@dataclass
class Tally:
    """Sums over the micro-batches since the last log record (token-weighted losses, counts). The loss sums stay
    tensors on the device, so training never waits for the device between log records."""

    loss: float | Tensor = 0.0
    n: float = 0.0
    loss_text: float | Tensor = 0.0
    n_text: float = 0.0
    loss_image: float | Tensor = 0.0
    n_image: float = 0.0
    tokens: float = 0.0
    samples: float = 0.0
    understanding: float = 0.0
    generation: float = 0.0
    num_truncated: float = 0.0
    num_skipped: float = 0.0  # samples dropped by the collator (every batch taken, used or not)

    def add(self, out: dict[str, Tensor], batch: dict[str, Any], vocab: VisualVocab) -> None:
        target = batch["labels"][:, 1:]
        n_image = int(vocab.is_image_id(target).sum())
        n_text = int((target != IGNORE_INDEX).sum()) - n_image
        self.loss_text = self.loss_text + out["loss_text"].detach().double() * n_text
        self.loss_image = self.loss_image + out["loss_image"].detach().double() * n_image
        self.loss = self.loss + out["loss"].detach().double() * (n_text + n_image)
        self.n, self.n_text, self.n_image = self.n + n_text + n_image, self.n_text + n_text, self.n_image + n_image
        self.tokens += int(batch["attention_mask"].sum())
        self.samples += batch["batch_size"]
        directions = batch.get("direction", [])
        self.understanding += sum(d == "understanding" for d in directions)
        self.generation += sum(d == "generation" for d in directions)
        self.num_truncated += batch.get("num_truncated", 0)

    def reduced(self, device: torch.device) -> Tally:
        """Plain numbers summed over ranks (one device sync)."""
        sums = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in vars(self).values()])
        if dist.is_initialized():
            dist.all_reduce(sums)
        return Tally(*sums.tolist())


# ------------------------------------------------------------------------------------------------------ trainer


class MLLMTrainer:
    """One stage of MLLM training in `run.train.out_dir`, resumed from its newest complete checkpoint if any.
    `dataset` (map-style, items as `mllm.data.mixture` yields them) replaces the configured data (tests, benches)."""

    def __init__(self, run: MLLMRunConfig, launch: Launch, dataset: Dataset | None = None):
        self.run, self.t, self.launch = run, run.train, launch
        self.out = Path(run.train.out_dir)
        self.accum = grad_accum_of(self.t, launch.world_size)
        self.step = self.seen = 0  # optimizer steps done; micro-batches taken from the loader (per rank)
        self.skips = SkipCounter()
        run = self.run = resolve_model_paths(run)
        check_paths(run)
        self.precision = resolve_precision(self.t.precision, launch.device)
        ds_bf16 = self.precision.bf16 and launch.device.type == "cuda"  # DeepSpeed's bf16 mode: CUDA; CPU: autocast
        ds_config = deepspeed_config(self.t.deepspeed, self.t, self.accum, ds_bf16) if self.t.deepspeed else None
        _seed(self.t.seed)
        model = build_model(run).to(launch.device).train()
        tokenizer = model.load_text_tokenizer()
        dataset = dataset if dataset is not None else build_data(run, tokenizer, model.vocab)
        self._build_loader(dataset, pad_id_of(tokenizer))
        self.total = self.t.steps or math.ceil(self.t.epochs * self.per_epoch / self.accum)
        self.vocab = model.vocab
        optimizer = torch.optim.AdamW(param_groups(model, self.t.weight_decay), lr=self.t.lr, betas=self.t.betas)
        cpu_autocast = self.precision.autocast(launch.device) if not ds_bf16 else None
        self.runner = (DeepSpeedRunner(model, optimizer, launch, ds_config, cpu_autocast) if ds_config is not None
                       else TorchRunner(model, optimizer, launch, self.t))  # fmt: skip
        found = load_resume_point(self.out, owner=launch.is_main)
        if found is not None:
            self._resume(*found)
        self.log = RankZeroLog(self.out / "log.jsonl", launch, self.total, self.step)
        if launch.is_main:
            self._start_files(model, len(dataset), found[0] if found else None)

    # ---------------------------------------------------------------- set-up

    def _build_loader(self, dataset: Dataset, pad_id: int) -> None:
        world, bs = self.launch.world_size, self.t.batch_size
        if len(dataset) < bs * world:
            raise ConfigError(f"only {len(dataset)} training samples for batch_size {bs} x {world} processes")
        self.dataset = dataset
        self.sampler = ResumableSampler(dataset, self.launch, self.t.seed)
        self.per_epoch = self.sampler.num_samples // bs  # micro-batches per epoch and rank
        self.empty = EmptyBatches(min(self.per_epoch, MAX_EMPTY_BATCHES))
        self.loader = DataLoader(
            dataset, batch_size=bs, sampler=self.sampler, num_workers=self.t.num_workers, drop_last=True,
            collate_fn=partial(collate_lm, pad_id=pad_id), pin_memory=self.launch.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.t.seed),  # never draws from the global RNG
        )  # fmt: skip

    def _start_files(self, model: SemHiTokLM, n_samples: int, ckpt: Path | None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.run, self.out / "config.yaml")
        truncate_log(self.out / "log.jsonl", self.step)
        m, t, world = model.config, self.t, self.launch.world_size
        trains = [k.removeprefix("train_") for k in ("train_adapter", "train_head", "train_special_tokens")
                  if getattr(m, k)] + ([f"llm ({m.train_llm})"] if m.train_llm != "frozen" else [])  # fmt: skip
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        note = f", {self.precision.describe()}"
        if m.dtype != "float32" and self.launch.mode != "deepspeed":
            note += f" (model.dtype {m.dtype} without DeepSpeed: AdamW updates {m.dtype} weights, no fp32 master copy)"
        zero = f", {Path(t.deepspeed).name}" if t.deepspeed else ""
        self.log.info(
            f"stage {t.stage}: {'resuming ' + str(ckpt) if ckpt else 'starting'}; {self.launch.mode}{zero} x {world} "
            f"on {self.launch.device}{note}; trains {', '.join(trains)} ({n_params:,} parameters); global batch "
            f"{t.batch_size * self.accum * world} = {t.batch_size} per device x {self.accum} accumulation x {world} "
            f"processes; {n_samples} samples, {self.total} steps"
        )

    # ---------------------------------------------------------------- loop

    def fit(self) -> None:
        """Train to the configured length, logging and checkpointing on the way; a final checkpoint at the end."""
        batches, tally, tick = self.batches(), Tally(), time.perf_counter()
        while self.step < self.total:
            grad_norm = self.train_step(batches, tally)
            self.step += 1
            self.log.bar.update(1)
            if self.step % self.t.log_every == 0 or self.step == self.total:
                self._log(tally, grad_norm, time.perf_counter() - tick)
                tally, tick = Tally(), time.perf_counter()
            if self.t.ckpt_every and self.step % self.t.ckpt_every == 0 and self.step < self.total:
                self.save()
        self.log.close()
        if self.skips.num_skipped:
            self.log.info(f"stage {self.t.stage} done: {self.skips.summary()}")
        self.save()

    def train_step(self, batches: Iterator[dict[str, Any]], tally: Tally) -> Tensor | float:
        """`accum` micro-batches forward/backward, then one optimizer step. Returns the gradient norm (a tensor,
        not synchronised here)."""
        for micro in range(self.accum):
            batch = self._next_nonempty(batches, tally)
            inputs = {k: batch[k].to(self.launch.device, non_blocking=True) for k in MODEL_INPUTS}
            out = self.runner.micro_step(inputs, self.accum, last=micro == self.accum - 1)
            tally.add(out, batch, self.vocab)
        return self.runner.optimizer_step(lr_at(self.step, self.total, self.t))

    def _next_nonempty(self, batches: Iterator[dict[str, Any]], tally: Tally) -> dict[str, Any]:
        """The next micro-batch every rank has samples for (all ranks skip a batch that is empty on any of them);
        ConfigError after too many empty ones in a row (`EmptyBatches`)."""
        while True:
            batch = next(batches)
            self.seen += 1
            self.skips.update(batch)
            tally.num_skipped += batch["num_skipped"]
            usable = _min_over_ranks(batch["batch_size"], self.launch.device) > 0
            self.empty.update(usable, self.skips)
            if usable:
                return batch

    def batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches in a fixed order given (seed, epoch), continuing from `seen` (exact resume)."""
        while True:
            epoch, done = divmod(self.seen, self.per_epoch)
            self.sampler.set_epoch(epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            self.sampler.skip = done * self.t.batch_size
            yield from self.loader

    def _log(self, tally: Tally, grad_norm: Tensor | float, seconds: float) -> None:
        s = tally.reduced(self.launch.device)  # collective: every rank gets here
        self.log.record({
            "step": self.step, "epoch": round(self.seen / self.per_epoch, 4),
            "loss": s.loss / max(s.n, 1), "loss_text": s.loss_text / max(s.n_text, 1),
            "loss_image": s.loss_image / max(s.n_image, 1), "lr": lr_at(self.step - 1, self.total, self.t),
            "grad_norm": float(grad_norm), "tokens_per_s": s.tokens / seconds, "samples": int(s.samples),
            "understanding": int(s.understanding), "generation": int(s.generation),
            "num_skipped": int(s.num_skipped), "num_truncated": int(s.num_truncated), "sec": seconds,
        })  # fmt: skip
        if s.num_skipped:
            self.log.info(skipped_line(self.step, int(s.num_skipped), self.skips))

    # ---------------------------------------------------------------- checkpoints and outputs

    def save(self) -> None:
        """Collective: an atomic checkpoint of step `self.step` (see the module docstring)."""
        engine = self.runner.save_engine(self.out, self.step)
        groups = {**self.runner.state(), "rank_rng": rank_rng_states(self.launch)}
        if self.launch.is_main:
            meta = {"seen": self.seen, "num_ok": self.skips.num_ok, "num_skipped": self.skips.num_skipped,
                    "world_size": self.launch.world_size, "mode": self.launch.mode, "engine": engine,
                    "total_steps": self.total, "config": to_dict(self.run)}  # fmt: skip
            save_checkpoint(self.out, self.step, groups, meta, keep_last=self.t.keep_last)
            prune_engine_dirs(self.out)
        _barrier()

    def _resume(self, path: Path, groups: dict[str, dict[str, Tensor]], meta: dict[str, Any]) -> None:
        diff = config_diff(meta["config"], to_dict(self.run), RESUMABLE_CHANGES)
        launch = {"world_size": self.launch.world_size, "mode": self.launch.mode}
        diff += [f"{k}: {meta[k]!r} vs {v!r}" for k, v in launch.items() if meta[k] != v]
        if diff:
            raise ConfigError(f"{self.out} holds a run with a different config (checkpoint vs now): {'; '.join(diff)}. "
                              "Use a new train.out_dir, or delete the old one to start over")  # fmt: skip
        self.runner.load(groups, meta, self.out)
        self.step, self.seen = meta["step"], meta["seen"]
        self.skips.num_ok, self.skips.num_skipped = meta["num_ok"], meta["num_skipped"]
        restore_rng(groups["rng"])
        restore_rank_rng(groups["rank_rng"], self.launch)

    def export(self) -> Path:
        """`out_dir/model` (save_pretrained) and, if `train.export_merged`, `out_dir/export` (plain HF folder).
        Collective under ZeRO-3 (parameters are gathered); rank 0 writes."""
        path = self.out / "model"
        with whole_parameters(self.runner):
            if self.launch.is_main:
                model = unwrap_model(self.runner.module)
                model.save_pretrained(path)
                if self.t.export_merged:
                    model.export_merged(self.out / "export")
        _barrier()
        return path


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def train(run: MLLMRunConfig, dataset: Dataset | None = None) -> Path:
    """Run (or resume) one stage of `run`; returns `out_dir/model`. Joins the process group of torchrun or the
    deepspeed launcher (see `detect_launch`)."""
    launch = detect_launch(run.train)
    created = join_process_group(launch)
    try:
        with hold_run_folder(run.train.out_dir, launch.is_main, launch.device):  # one run per out_dir
            trainer = MLLMTrainer(run, launch, dataset)
            trainer.fit()
            return trainer.export()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
