"""Shared infrastructure of both trainers and every entry point (DESIGN §2): config loading, checkpoints and the
run-folder lock, atomic folders, distributed launch, precision, the training skeleton (`runtime.trainer`), image I/O and
image datasets, JSON/JSONL readers, packaged assets and command-line plumbing.

Nothing here knows the tokenizer: `semhitok.runtime` never imports the rest of `semhitok`. `mllm` and the scripts
use the infrastructure only through the names exported here.
"""

from semhitok.runtime.assets import (
    AssetError,
    PackagedFile,
    cache_dir,
    inception_path,
    packaged_file,
    verify_folder,
    write_manifest,
)
from semhitok.runtime.atomic import atomic_folder
from semhitok.runtime.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    complete_checkpoints,
    flatten_state,
    latest_checkpoint,
    load_checkpoint,
    load_resume_point,
    prune_checkpoints,
    restore_optimizer,
    restore_rng,
    rng_state,
    save_checkpoint,
    unflatten_state,
)
from semhitok.runtime.cli import Parser, check_gates, fail, gate, int_in, positive_int
from semhitok.runtime.configio import (
    ConfigError,
    apply_overrides,
    check_lr,
    config_diff,
    from_dict,
    load_config,
    merge_dicts,
    read_yaml,
    save_config,
    to_dict,
)
from semhitok.runtime.data import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    BadItem,
    ImageFolderDataset,
    ImageLoadError,
    JsonlImageDataset,
    SkipCounter,
    collate_skip_bad,
    load_image,
    read_json,
    read_jsonl,
    resize_center_crop,
    to_pil,
    to_rgb,
    to_tensor,
)
from semhitok.runtime.distributed import resolve_device, unwrap_model
from semhitok.runtime.launch import (
    Launch,
    barrier,
    join_process_group,
    rank_rng_states,
    reduce_int,
    restore_rank_rng,
    seed_everything,
    wrap_ddp,
)
from semhitok.runtime.loop import (
    MAX_EMPTY_BATCHES,
    EmptyBatches,
    append_jsonl,
    console,
    skipped_line,
    truncate_log,
)
from semhitok.runtime.precision import PRECISIONS, Precision, ResolvedPrecision, resolve_precision
from semhitok.runtime.runlock import RunLock, RunLockError, hold_run_folder
from semhitok.runtime.trainer import (
    BatchStream,
    Cadence,
    RankZeroLog,
    ResumableSampler,
    TorchRunner,
    Trainer,
    run_training,
    scheduled_lr,
    set_lr,
)

__all__ = [
    # assets
    "AssetError",
    "PackagedFile",
    "cache_dir",
    "inception_path",
    "packaged_file",
    "verify_folder",
    "write_manifest",
    # atomic
    "atomic_folder",
    # checkpoint
    "CheckpointError",
    "flatten_state",
    "latest_checkpoint",
    "load_checkpoint",
    "complete_checkpoints",
    "CHECKPOINTS",
    "load_resume_point",
    "prune_checkpoints",
    "restore_optimizer",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
    "unflatten_state",
    # cli
    "Parser",
    "check_gates",
    "fail",
    "gate",
    "int_in",
    "positive_int",
    # configio
    "ConfigError",
    "apply_overrides",
    "check_lr",
    "config_diff",
    "from_dict",
    "load_config",
    "merge_dicts",
    "read_yaml",
    "save_config",
    "to_dict",
    # data
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "BadItem",
    "ImageFolderDataset",
    "ImageLoadError",
    "JsonlImageDataset",
    "SkipCounter",
    "collate_skip_bad",
    "load_image",
    "read_json",
    "read_jsonl",
    "resize_center_crop",
    "to_pil",
    "to_rgb",
    "to_tensor",
    # distributed
    "resolve_device",
    "unwrap_model",
    # launch
    "Launch",
    "barrier",
    "join_process_group",
    "rank_rng_states",
    "reduce_int",
    "restore_rank_rng",
    "seed_everything",
    "wrap_ddp",
    # loop
    "MAX_EMPTY_BATCHES",
    "EmptyBatches",
    "append_jsonl",
    "console",
    "skipped_line",
    "truncate_log",
    # precision
    "PRECISIONS",
    "Precision",
    "ResolvedPrecision",
    "resolve_precision",
    # runlock
    "RunLock",
    "RunLockError",
    "hold_run_folder",
    # trainer
    "BatchStream",
    "Cadence",
    "RankZeroLog",
    "ResumableSampler",
    "TorchRunner",
    "Trainer",
    "run_training",
    "scheduled_lr",
    "set_lr",
]
