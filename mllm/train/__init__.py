"""MLLM training (DESIGN §4): run config, the three launch modes, what trains per stage, a resumable loop, export.

The package: `config` (run config, LR schedule, accumulation), `objectives` (one class per stage, `OBJECTIVES`),
`runners` (TorchRunner / DeepSpeedRunner), `trainer` (MLLMTrainer on the shared skeleton `semhitok.runtime.trainer`).

Launch modes (one code path; `detect_launch` picks the runner):
    python scripts/train_mllm.py --config C.yaml                      one process            -> TorchRunner
    torchrun --nproc_per_node N scripts/train_mllm.py --config C.yaml  DDP (nccl / gloo CPU)  -> TorchRunner + DDP
    deepspeed --num_gpus N scripts/train_mllm.py --config C.yaml --deepspeed configs/deepspeed/zero2.json
                                                                       DeepSpeed engine       -> DeepSpeedRunner
A DeepSpeed JSON (`train.deepspeed`) selects the engine under any launcher (also torchrun or plain python, world 1).
It holds ONLY ZeRO policy: micro-batch, accumulation, clipping and precision are injected from `train.*` in one
place (`deepspeed_config`). The optimizer is always our torch AdamW and the LR schedule our own function of the step,
so every mode trains the same objective with the same hyper-parameters.

Stages set defaults for what trains (`STAGE_PARTS`: each objective's PARTS, LLaVA recipe); the run config's `model:` may override each flag.

The optimised loss (`train.loss`, `objectives.LossConfig`): by default the text (≈ understanding) and image
(generation) terms are each a mean over their own targets, weighted `train.loss.text` / `train.loss.image`;
`train.loss.mode: tokens` is one mean over all targets instead.

A run lives in `train.out_dir`: `config.yaml`, `log.jsonl` (one record per `log_every` steps: loss (the optimised
loss, mean over micro-batches), loss_text, loss_image (token means), lr, grad_norm, tokens/s, samples per direction,
skipped and truncated samples; with `train.diagnose_every`, records of the learning diagnostics `diag/image_auc`,
`diag/image_auc_swapped`, `diag/caption_gap`, `diag/description_gap`, `diag/layout_gap` (and
`diag/count_accuracy[_swapped]` with `train.diagnose.counts`) at step 0 and every so many steps: `mllm.diagnostics`), `curves.png`
(every metric of the log, drawn at the end), `checkpoints/step-XXXXXX/` (semhitok's atomic checkpoints: trainable
weights + optimizer as safetensors, step, data position, every rank's RNG, the run config; COMPLETE marker last), and
at the end `model/` (`SemHiTokLM.save_pretrained`) and `export/` (`export_merged`: plain HF folder, loadable without
PEFT/DeepSpeed).
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

from mllm.train.config import (
    MODEL_PATHS,
    RESUMABLE_CHANGES,
    DiagnoseConfig,
    MLLMRunConfig,
    TrainConfig,
    check_paths,
    grad_accum_of,
    load_run_config,
    lr_at,
    resolve_model_paths,
)
from mllm.train.objectives import MODEL_INPUTS, OBJECTIVES, STAGE_PARTS, STAGES, LossConfig, StageObjective, combine
from mllm.train.runners import (
    DS_DIR,
    INJECTED_DS_KEYS,
    DeepSpeedRunner,
    MLLMTorchRunner,
    deepspeed_config,
    param_groups,
    prune_engine_dirs,
    whole_parameters,
)
from mllm.train.trainer import (
    MLLMTrainer,
    Tally,
    build_data,
    build_model,
    detect_launch,
    export_checkpoint,
    load_init,
    set_attention,
    train,
)
from semhitok.runtime import Launch

__all__ = [
    "DS_DIR",
    "INJECTED_DS_KEYS",
    "MODEL_INPUTS",
    "MODEL_PATHS",
    "OBJECTIVES",
    "RESUMABLE_CHANGES",
    "STAGES",
    "STAGE_PARTS",
    "DeepSpeedRunner",
    "DiagnoseConfig",
    "Launch",
    "LossConfig",
    "MLLMRunConfig",
    "MLLMTorchRunner",
    "MLLMTrainer",
    "StageObjective",
    "Tally",
    "TrainConfig",
    "build_data",
    "build_model",
    "set_attention",
    "export_checkpoint",
    "combine",
    "check_paths",
    "deepspeed_config",
    "detect_launch",
    "grad_accum_of",
    "load_init",
    "load_run_config",
    "lr_at",
    "param_groups",
    "prune_engine_dirs",
    "resolve_model_paths",
    "train",
    "whole_parameters",
]
