"""The MLLM trainer: model and data of a stage, its objective through the runner, the log record, checkpoint groups
and export; the run loop, resumable data order, logging and checkpoint policy are the shared skeleton's
(`semhitok.runtime.trainer`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset

from mllm.assets import resolve_reference
from mllm.constants import IGNORE_INDEX
from mllm.data.mixture import build_dataset, collate_lm
from mllm.diagnostics import DiagnosticSet, build_diagnostic_set
from mllm.model import CONFIG_NAME, LORA_DIR, PARTS_NAME, VOCAB_NAME, LoraSettings, MLLMConfig, SemHiTokLM, read_config
from mllm.text_tokenizer import load_text_tokenizer
from mllm.train.config import (
    RESUMABLE_CHANGES,
    MLLMRunConfig,
    TrainConfig,
    check_paths,
    grad_accum_of,
    lr_at,
    resolve_model_paths,
)
from mllm.train.objectives import MODEL_INPUTS, OBJECTIVES
from mllm.train.runners import (
    DeepSpeedRunner,
    MLLMTorchRunner,
    deepspeed_config,
    load_trainable,
    param_groups,
    prune_engine_dirs,
    whole_parameters,
)
from mllm.vocab import VisualVocab
from semhitok import SemHiTok
from semhitok.runtime import (
    CHECKPOINTS,
    BatchStream,
    Cadence,
    ConfigError,
    Launch,
    Trainer,
    complete_checkpoints,
    load_checkpoint,
    rank_rng_states,
    resolve_precision,
    restore_rank_rng,
    run_training,
    seed_everything,
    unwrap_model,
    wrap_ddp,
)


def detect_launch(train: TrainConfig, env: dict[str, str] | None = None) -> Launch:
    """The launch mode from the environment torchrun / the deepspeed launcher set (RANK, LOCAL_RANK, WORLD_SIZE); a
    DeepSpeed JSON selects the engine under any launcher."""
    return Launch.detect(train.device, bool(train.deepspeed), env)


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


def set_attention(model: SemHiTokLM, attention: str, device: torch.device) -> str:
    """Switch the LLM's attention kernel for training (`train.attention`); returns the one set."""
    kernel = attention if attention != "auto" else ("eager" if device.type == "cpu" else "sdpa")
    model.causal_lm.set_attn_implementation(kernel)
    return kernel


def load_init(model: SemHiTokLM, folder: Path) -> None:
    """Copy adapter, head, special rows (and image rows) from a previous stage's `save_pretrained` / `export_merged`
    folder, and its LoRA when both stages train the same LoRA (r, alpha, targets) on the same LLM, so a staged recipe
    ships one small LoRA instead of a merged LLM. A model with image rows (`image_input: embedding | both`) from a
    stage without them starts them from the loaded adapter (`init_image_embedding`); one with `image_position` from a
    stage without it starts its cell rows at 0.
    Its vocabulary must equal this model's, and its LLM must be the one `model.llm` names (a fully trained LLM, or a
    LoRA that does not carry on, is handed over by pointing `model.llm` at that stage's `export/` or `model/llm/`)."""
    try:
        saved, vocab = read_config(folder / CONFIG_NAME), VisualVocab.load(folder / VOCAB_NAME)
        state = load_file(str(folder / PARTS_NAME))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"train.init_from: {err}") from None
    if vocab != model.vocab:
        raise ConfigError(f"train.init_from {folder}: its vocab.json (K*m = {vocab.K}*{vocab.m}, offset {vocab.offset}) "
                          f"differs from this model's (K*m = {model.vocab.K}*{model.vocab.m}, offset "
                          f"{model.vocab.offset}): another tokenizer or text vocabulary")  # fmt: skip
    lora = saved.train_llm == "lora"
    if lora and (model.config.train_llm != "lora" or _lora_shape(saved.lora) != _lora_shape(model.config.lora)):
        raise ConfigError(f"train.init_from {folder} holds LoRA weights (r={saved.lora.r}, alpha={saved.lora.alpha}, "
                          f"targets {saved.lora.target_modules}): continue them with model.train_llm=lora and the same "
                          "model.lora r / alpha / target_modules, or start from its stage's export/ folder and set "
                          "model.llm to it")  # fmt: skip
    llm = Path(resolve_reference(saved.llm, folder))
    if llm != Path(model.config.llm).resolve():
        raise ConfigError(f"train.init_from {folder} was trained on the LLM {llm}, but model.llm is "
                          f"{model.config.llm}: set model.llm={llm}")  # fmt: skip
    fresh_rows = model.image_embedding is not None and not any(k.startswith("image_embedding.") for k in state)
    if fresh_rows:  # a stage without image rows (image_input: adapter) before one with them: rows from its adapter
        state = {**state, **{f"image_embedding.{k}": v for k, v in model.image_embedding.state_dict().items()}}
    if model.image_position is not None and not any(k.startswith("image_position.") for k in state):
        state = {**state, **{f"image_position.{k}": v for k, v in model.image_position.state_dict().items()}}  # at 0
    try:
        model.parts().load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"train.init_from {folder}: its parts do not fit model: {' '.join(str(err).split())}") from None
    if fresh_rows:
        model.init_image_embedding()
    if lora:
        try:
            model._load_lora(folder / LORA_DIR)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"train.init_from: {err}") from None


def _lora_shape(lora: LoraSettings) -> tuple:
    """What must match for a LoRA to carry on into the next stage (dropout may change)."""
    targets = lora.target_modules
    return lora.r, lora.alpha, targets if isinstance(targets, str) else tuple(targets)


def build_data(run: MLLMRunConfig, tokenizer, vocab: VisualVocab) -> Dataset:
    """The stage's training mixture (`mllm.data.mixture.build_dataset`); data errors raise ConfigError."""
    try:
        return build_dataset(run.data, tokenizer, vocab, run.model.semhitok, run.model.system_prompt)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data: {err}") from None


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the text tokenizer has neither a pad nor an eos token to pad batches with")
    return pad


# ------------------------------------------------------------------------------------------------------ logging


@dataclass
class Tally:
    """Sums over the micro-batches since the last log record: the optimised loss per micro-batch, the text and image
    losses token-weighted, counts. The loss sums stay tensors on the device, so training never waits for the device
    between log records."""

    loss: float | Tensor = 0.0
    micro_batches: float = 0.0
    loss_text: float | Tensor = 0.0
    n_text: float = 0.0
    loss_image: float | Tensor = 0.0
    loss_image_texture: float | Tensor = 0.0
    n_image: float = 0.0
    tokens: float = 0.0
    samples: float = 0.0
    understanding: float = 0.0
    generation: float = 0.0
    num_truncated: float = 0.0

    def add(self, out: dict[str, Tensor], batch: dict[str, Any], vocab: VisualVocab) -> None:
        target = batch["labels"][:, 1:]
        n_image = int(vocab.is_image_id(target).sum())
        n_text = int((target != IGNORE_INDEX).sum()) - n_image
        self.loss_text = self.loss_text + out["loss_text"].detach().double() * n_text
        self.loss_image = self.loss_image + out["loss_image"].detach().double() * n_image
        self.loss_image_texture = self.loss_image_texture + out["loss_image_texture"].detach().double() * n_image
        self.loss, self.micro_batches = self.loss + out["loss"].detach().double(), self.micro_batches + 1
        self.n_text, self.n_image = self.n_text + n_text, self.n_image + n_image
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


class MLLMTrainer(Trainer):
    """One stage of MLLM training in `run.train.out_dir`, resumed from its newest complete checkpoint if any.
    `dataset` (map-style, items as `mllm.data.mixture` yields them) replaces the configured data (tests, benches)."""

    RESUMABLE_CHANGES = RESUMABLE_CHANGES
    OUT_KEY = "train.out_dir"
    POSITION_KEY = "seen"

    def __init__(self, run: MLLMRunConfig, launch: Launch, dataset: Dataset | None = None):
        t = run.train
        cadence = Cadence(t.log_every, t.ckpt_every, t.keep_last, eval_every=t.diagnose_every, log_at_end=True)
        super().__init__(run, launch, Path(t.out_dir), t.stage, cadence, tensorboard=t.tensorboard)
        self.t, self.accum = t, grad_accum_of(t, launch.world_size)
        self.objective = OBJECTIVES[t.stage](t.loss)
        run = self.run = resolve_model_paths(run)
        check_paths(run)
        self.precision = resolve_precision(t.precision, launch.device)
        ds_bf16 = self.precision.bf16 and launch.device.type == "cuda"  # DeepSpeed's bf16 mode: CUDA; CPU: autocast
        ds_config = deepspeed_config(t.deepspeed, t, self.accum, ds_bf16) if t.deepspeed else None
        if t.diagnose_every and ds_config is not None and ds_config["zero_optimization"].get("stage") == 3:
            raise ConfigError("train.diagnose_every: the learning diagnostics do not run under ZeRO-3 (its weights are "
                              "partitioned); use ZeRO-2 or DDP, or set train.diagnose_every=0")  # fmt: skip
        seed_everything(t.seed)
        model = build_model(run).to(launch.device).train()
        set_attention(model, t.attention, launch.device)
        tokenizer = model.load_text_tokenizer()
        dataset = dataset if dataset is not None else build_data(run, tokenizer, model.vocab)
        self.stream = BatchStream(dataset, launch, seed=t.seed, batch_size=t.batch_size, num_workers=t.num_workers,
                                  collate_fn=partial(collate_lm, pad_id=pad_id_of(tokenizer)),
                                  group_by_length=t.group_by_length)  # fmt: skip
        self.loader, self.per_epoch = self.stream.loader, self.stream.per_epoch
        self.total = t.steps or math.ceil(t.epochs * self.per_epoch / self.accum)
        self.vocab = model.vocab
        self.diagnostics = self._diagnostic_set(tokenizer) if t.diagnose_every else None  # every rank: same errors
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay, t.lr_scale), lr=t.lr, betas=t.betas)
        if ds_config is not None:
            autocast = self.precision.autocast(launch.device) if not ds_bf16 else None
            self.runner = DeepSpeedRunner(model, optimizer, launch, ds_config, autocast)
        else:  # DDP: robust to parts a batch does not reach (the image head without image targets); buffers are constant
            forward = wrap_ddp(model, launch, sync_buffers=False, find_unused=True)
            self.runner = MLLMTorchRunner(model, optimizer, launch, forward, self.precision, t.grad_clip)
        found = self.find_resume_point()
        if found is not None:
            self.resume(*found)
        self.tally = Tally()
        self.start(self._start_line(model, len(dataset), found[0] if found else None))
        if self.diagnostics is not None and self.step == 0:  # where a fresh run starts from
            self.periodic_eval()

    def _start_line(self, model: SemHiTokLM, n_samples: int, ckpt: Path | None) -> str:
        m, t, world = model.config, self.t, self.launch.world_size
        parts = {"adapter": m.train_adapter and m.image_input != "embedding", "image rows": m.train_adapter and
                 m.image_input != "adapter", "head": m.train_head, "special_tokens": m.train_special_tokens}  # fmt: skip
        trains = [k for k, on in parts.items() if on] + ([f"llm ({m.train_llm})"] if m.train_llm != "frozen" else [])
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        note = f", {self.precision.describe()}"
        if m.dtype != "float32" and self.launch.mode != "deepspeed":
            note += f" (model.dtype {m.dtype} without DeepSpeed: AdamW updates {m.dtype} weights, no fp32 master copy)"
        zero = f", {Path(t.deepspeed).name}" if t.deepspeed else ""
        return (f"stage {t.stage}: {'resuming ' + str(ckpt) if ckpt else 'starting'}; {self.launch.mode}{zero} x {world} "
                f"on {self.launch.device}{note}; trains {', '.join(trains)} ({n_params:,} parameters); global batch "
                f"{t.batch_size * self.accum * world} = {t.batch_size} per device x {self.accum} accumulation x {world} "
                f"processes; {n_samples} samples, {self.total} steps")  # fmt: skip

    # ---------------------------------------------------------------- the step

    def run_step(self) -> None:
        self.grad_norm = self.train_step(self.tally)

    def train_step(self, tally: Tally) -> Tensor | float:
        """`accum` micro-batches forward/backward, then one optimizer step. Returns the gradient norm (a tensor,
        not synchronised here)."""
        for micro in range(self.accum):
            batch = self.stream.next_usable()
            inputs = {k: batch[k].to(self.launch.device, non_blocking=True) for k in MODEL_INPUTS}
            out = self.runner.micro_step(partial(self.objective.loss, batch=inputs), micro, self.accum)
            tally.add(out, batch, self.vocab)
        return self.runner.optimizer_step(lr_at(self.step, self.total, self.t))

    def log_record(self, seconds: float, skipped: int) -> tuple[dict[str, Any], str, dict[str, str]]:
        s, self.tally = self.tally.reduced(self.launch.device), Tally()  # collective: every rank gets here
        r = {
            "step": self.step, "epoch": round(self.stream.seen / self.per_epoch, 4),
            "loss": s.loss / max(s.micro_batches, 1), "loss_text": s.loss_text / max(s.n_text, 1),
            "loss_image": s.loss_image / max(s.n_image, 1), "loss_image_texture": s.loss_image_texture / max(s.n_image, 1),
            "lr": lr_at(self.step - 1, self.total, self.t),
            "grad_norm": float(self.grad_norm), "tokens_per_s": s.tokens / seconds, "samples": int(s.samples),
            "understanding": int(s.understanding), "generation": int(s.generation),
            "num_skipped": skipped, "num_truncated": int(s.num_truncated), "sec": seconds,
        }  # fmt: skip
        line = (f"step {r['step']}/{self.total} loss {r['loss']:.4f} (text {r['loss_text']:.4f}, image "
                f"{r['loss_image']:.4f}) lr {r['lr']:.2e} {r['tokens_per_s']:.0f} tok/s")  # fmt: skip
        return r, line, {"loss": f"{r['loss']:.4f}", "tok_s": f"{r['tokens_per_s']:.0f}"}

    # ---------------------------------------------------------------- learning diagnostics

    def _diagnostic_set(self, tokenizer) -> DiagnosticSet:
        """`train.diagnose`'s held-out set, its images encoded once by the run's SemHiTok; its samples rendered as
        the training data is."""
        d, data, device = self.t.diagnose, self.run.data, self.launch.device
        try:
            semhitok = SemHiTok.from_pretrained(self.run.model.semhitok).to(device)
            return build_diagnostic_set(d.data, semhitok, tokenizer, self.vocab, questions=d.questions,
                                        captions=d.captions, counts=d.counts, template=data.template,
                                        system=self.run.model.system_prompt, prompt=data.prompt,
                                        max_length=data.max_length, device=device)  # fmt: skip
        except ValueError as err:  # DiagnosticsError, ConversationError, a bad SemHiTok folder
            raise ConfigError(f"train.diagnose.data: {err}") from None

    def periodic_eval(self) -> None:
        """Rank 0: the learning diagnostics on the held-out set -> `diag/*` in log.jsonl (the other ranks go on and
        wait for it at the next step's gradient all-reduce)."""
        if self.diagnostics is None or not self.launch.is_main:
            return
        with self.runner.forward_context():
            record = self.diagnostics.log_record(self.runner.module)
        self.log.write({"step": self.step, **record})

    # ---------------------------------------------------------------- checkpoints and outputs

    def checkpoint_state(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """Collective: the engine's own checkpoint first (DeepSpeed), then our groups and every rank's RNG."""
        engine = self.runner.save_engine(self.out, self.step)
        groups = {**self.runner.state(), "rank_rng": rank_rng_states(self.launch)}
        meta = {"world_size": self.launch.world_size, "mode": self.launch.mode, "engine": engine,
                "total_steps": self.total}  # fmt: skip
        return groups, meta

    def after_save(self) -> None:
        prune_engine_dirs(self.out)

    def resume_diff(self, meta: dict[str, Any]) -> list[str]:
        launch = {"world_size": self.launch.world_size, "mode": self.launch.mode}
        return [f"{k}: {meta[k]!r} vs {v!r}" for k, v in launch.items() if meta[k] != v]

    def load_state(self, groups: dict[str, dict[str, Tensor]], meta: dict[str, Any]) -> None:
        self.runner.load(groups, meta, self.out)

    def resume(self, path: Path, groups: dict[str, dict[str, Tensor]], meta: dict[str, Any]) -> None:
        super().resume(path, groups, meta)
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
        return path


def export_checkpoint(run: MLLMRunConfig, step: int, out: Path | None = None) -> Path:
    """The run's checkpoint of optimizer step `step` as a model folder like its final `model/` (save_pretrained), to
    evaluate a stage before it ends; default `out_dir/model-step-XXXXXX`. Checkpoints of the torch runner (one
    process, DDP); a DeepSpeed run's are ZeRO shards (ConfigError: export them with DeepSpeed's zero_to_fp32)."""
    folder, found = Path(run.train.out_dir) / CHECKPOINTS / f"step-{step:06d}", complete_checkpoints(run.train.out_dir)
    if folder not in found:
        raise ConfigError(f"{folder} not found: the complete checkpoints of {run.train.out_dir} are "
                          f"{[p.name for p in found] or 'none'}")  # fmt: skip
    groups, _ = load_checkpoint(folder)
    if "trainable" not in groups:
        raise ConfigError(f"{folder} holds no trainable.safetensors (a DeepSpeed checkpoint?): use DeepSpeed's "
                          "zero_to_fp32 on its engine folder")  # fmt: skip
    run = resolve_model_paths(run)
    check_paths(run)
    seed_everything(run.train.seed)
    model = build_model(run)
    load_trainable(model, groups["trainable"])
    out = out or Path(run.train.out_dir) / f"model-step-{step:06d}"
    model.save_pretrained(out)
    return out


def train(run: MLLMRunConfig, dataset: Dataset | None = None) -> Path:
    """Run (or resume) one stage of `run`; returns `out_dir/model`. Joins the process group of torchrun or the
    deepspeed launcher (see `detect_launch`)."""
    launch = detect_launch(run.train)
    return run_training(launch, run.train.out_dir, lambda: MLLMTrainer(run, launch, dataset))
