"""What scripts/generate.py and scripts/chat.py share: the checkpoint flag and its default, the --trust-remote-code
opt-in, sampling and batching flags, one-line errors, and writing images (with the check of their path)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torchvision.utils import make_grid
from transformers.utils import logging as hf_logging

from mllm.sampling import Inference, InferenceError, SamplingConfig, load_for_inference
from semhitok.runtime import PRECISIONS, AssetError, ImageLoadError, fail, int_in, resolve_device, to_pil

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "demo" / "mllm"  # the shipped demo MLLM (docs/demo.md)
USER_ERRORS = (InferenceError, ImageLoadError, AssetError, OSError, ValueError)  # ConfigError, VocabError: ValueError
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def add_sampling_args(parser: argparse.ArgumentParser, temperature: float) -> None:
    """--checkpoint, --trust-remote-code, --device, --template, --seed, --temperature, --top-k, --top-p."""
    parser.add_argument("--checkpoint", type=Path, help="MLLM folder (SemHiTokLM.save_pretrained / export_merged); "
                        "default: the embedded demo checkpoint")  # fmt: skip
    add_trust_remote_code_arg(parser)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--template", default="auto", help="conversation template the model was trained with: "
                        "chat_template, vicuna_v1, or auto (the tokenizer's chat template if it has one)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto = bf16 weights where the device "
                        "computes bf16 natively (CUDA, avx512_bf16 CPUs), else fp32")  # fmt: skip


def add_batching_args(parser: argparse.ArgumentParser) -> None:
    """--max-batch, --memory-budget: how many images one decoding call holds (`mllm.sampling.images_per_call`)."""
    parser.add_argument("--max-batch", type=int_in(0), default=0, help="images decoded per call at most (0 = as many "
                        "as --memory-budget holds); the images are the same in any batch")  # fmt: skip
    parser.add_argument("--memory-budget", type=float, default=0.0, metavar="GIB", help="memory one decoding call "
                        "may take (KV cache, logits, activations); 0 = half of what the device has free")  # fmt: skip


def add_trust_remote_code_arg(parser: argparse.ArgumentParser) -> None:
    """--trust-remote-code: the only way Python code shipped with a checkpoint runs (its own config never asks)."""
    parser.add_argument("--trust-remote-code", action="store_true", help="let transformers run Python code shipped "
                        "with the checkpoint's LLM; only for checkpoints whose source you trust")  # fmt: skip


def image_path(text: str) -> Path:
    """argparse type of an image file to write: a .png/.jpg/.jpeg path that is not an existing folder."""
    path = Path(text)
    if path.suffix.lower() not in IMAGE_SUFFIXES or path.is_dir():
        what = "an existing directory" if path.is_dir() else "no .png/.jpg extension"
        raise argparse.ArgumentTypeError(f"must be a .png/.jpg file path, got {text!r} ({what})")
    return path


def sampling_config(args: argparse.Namespace, **fields) -> SamplingConfig:
    """SamplingConfig from the flags of `add_sampling_args` (and `add_batching_args` where the parser has them) plus
    `fields`; ValueError names a bad value."""
    base = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          max_batch=vars(args).get("max_batch", 0),
                          memory_budget_gib=vars(args).get("memory_budget", 0.0))  # fmt: skip
    return replace(base, **fields)


def checkpoint_dir(path: Path | None) -> Path:
    """The --checkpoint folder, or the demo checkpoint; InferenceError when no demo checkpoint exists."""
    if path is not None:
        return path
    if not DEFAULT_CHECKPOINT.is_dir():
        raise InferenceError(f"the shipped demo checkpoint is missing (nothing at {DEFAULT_CHECKPOINT}; restore it with git "
                             "or rebuild it with `bash configs/demo/reproduce.sh`): or pass --checkpoint "
                             "DIR, a folder written by SemHiTokLM.save_pretrained (e.g. <train.out_dir>/model)")  # fmt: skip
    return DEFAULT_CHECKPOINT


def load(args: argparse.Namespace) -> Inference:
    """The checkpoint of --checkpoint on --device, with transformers' loading bars and notices silenced (stderr is
    for our progress and errors). Its code runs only with --trust-remote-code (False where a parser lacks the flag)."""
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    trust, precision = vars(args).get("trust_remote_code", False), vars(args).get("precision", "auto")
    device = resolve_device(args.device, option="--device")
    return load_for_inference(checkpoint_dir(args.checkpoint), device, trust, precision)


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """A user mistake raised in the block -> `prog: error: message` on stderr and exit status 2, no traceback."""
    try:
        yield
    except USER_ERRORS as err:
        fail(prog, one_line(err))


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (its type name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


def save_images(images: torch.Tensor, out: Path, per_row: int) -> list[Path]:
    """images (B, 3, H, W) in [-1, 1] -> `out` (a grid PNG, `per_row` images per row) and each image beside it as
    <stem>-<row>-<col>.png. Returns [grid, *images]. If one cannot be written (e.g. `out` is a folder or has no
    image extension: scripts check it first with `image_path`), the files written so far are removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_name(f"{out.stem}-{k // per_row}-{k % per_row}.png") for k in range(len(images))]
    pictures = [to_pil(make_grid(images.float().cpu(), nrow=per_row, padding=2, pad_value=1.0)), *map(to_pil, images)]
    written: list[Path] = []
    try:
        for picture, path in zip(pictures, [out, *paths], strict=True):
            written.append(path)
            picture.save(path)
    except BaseException:
        for path in written:
            if path.is_file():
                path.unlink()
        raise
    return [out, *paths]
