"""How an MLLM step runs (see the module docstring of `mllm.train`): `MLLMTorchRunner` (single process / DDP: the
shared skeleton's torch runner, checkpointing the trainable weights + AdamW) or `DeepSpeedRunner` (a ZeRO-2 / ZeRO-3
engine that accumulates, clips, steps and checkpoints its own shards). Both take `compute(model) -> dict` per
micro-batch and `optimizer_step(lr)`."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mllm.model import SemHiTokLM
from mllm.train.config import TrainConfig
from semhitok.runtime import (
    ConfigError,
    Launch,
    ResolvedPrecision,
    TorchRunner,
    barrier,
    flatten_state,
    restore_optimizer,
    set_lr,
)

# DeepSpeed keys that come from the run config (`deepspeed_config`), never from the ZeRO policy JSON.
INJECTED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")  # fmt: skip
DS_DIR = "deepspeed"


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


def param_groups(model: nn.Module, weight_decay: float, lr_scale: Mapping[str, float] | None = None
                 ) -> list[dict[str, Any]]:  # fmt: skip
    """Trainable parameters: matrices decay, biases / norm weights (1-D) do not. `lr_scale` {part: factor}: the
    parameters under that top-level name (adapter, head, special, image_embedding, image_position, llm) in groups of
    their own whose lr is the schedule's x factor (`set_lr`); an unknown or untrained part raises ConfigError."""
    scale, params = dict(lr_scale or {}), [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trained = {n.split(".")[0] for n, _ in params}
    if set(scale) - trained:
        raise ConfigError(f"train.lr_scale: {sorted(set(scale) - trained)} not among the parts this stage trains "
                          f"({', '.join(sorted(trained))})")  # fmt: skip
    groups = []
    for factor in sorted({scale.get(n.split(".")[0], 1.0) for n, _ in params}):
        mine = [p for n, p in params if scale.get(n.split(".")[0], 1.0) == factor]
        for decays in (True, False):
            chosen = [p for p in mine if (p.ndim >= 2) == decays]
            if chosen:
                groups.append({"params": chosen, "weight_decay": weight_decay if decays else 0.0, "lr_scale": factor})
    return groups


class MLLMTorchRunner(TorchRunner):
    """Single process or DDP (the skeleton's TorchRunner); checkpoints the trainable weights and AdamW."""

    def __init__(self, model: SemHiTokLM, optimizer: torch.optim.Optimizer, launch: Launch, forward: nn.Module,
                 precision: ResolvedPrecision, grad_clip: float):  # fmt: skip
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(forward, optimizer, params, precision, launch.device, grad_clip)
        self.module = model

    def forward_context(self) -> AbstractContextManager:
        """The precision a forward outside the training step (diagnostics) runs in: the step's autocast."""
        return self.precision.autocast(self.device)

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

    def micro_step(self, compute: Callable[[nn.Module], dict[str, Tensor]], micro: int, accum: int) -> dict[str, Tensor]:
        with self.autocast:
            out = compute(self.engine)
        self.engine.backward(out["loss"])  # the engine divides by its gradient_accumulation_steps
        if micro < accum - 1:
            self.engine.step()  # counts the micro-step; the boundary step is optimizer_step's
        return out

    def forward_context(self) -> AbstractContextManager:
        """The precision a forward outside the training step (diagnostics) runs in: the step's autocast, if any."""
        return self.autocast

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
        barrier()
        self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False, exclude_frozen_parameters=True)
        barrier()
        if self.launch.is_main:
            for file in (f for f in tmp.rglob("*") if f.is_file()):  # on disk before the rename makes them visible
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
        barrier()
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


def whole_parameters(runner: MLLMTorchRunner | DeepSpeedRunner):
    """A context in which every parameter is whole (ZeRO-3 gathers them; a no-op otherwise)."""
    if isinstance(runner, DeepSpeedRunner) and runner.engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(runner.module.parameters()), modifier_rank=None)
    return nullcontext()
