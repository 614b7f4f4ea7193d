"""scripts/package_demo.py (the shipped demo checkpoints) and the `asset:` references those checkpoints use."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_mllm_model import assets, build, logits, mixed_batch, train  # noqa: F401 (assets is a fixture)

from mllm.assets import SMOLLM2_DIRNAME, expand_reference, resolve_reference, smollm2_path
from mllm.model import CONFIG_NAME, SemHiTokLM, read_config
from semhitok import SemHiTok
from semhitok.runtime import AssetError

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("package_demo", REPO / "scripts" / "package_demo.py")
package_demo = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(package_demo)


def trained_lora(assets, folder: Path) -> SemHiTokLM:  # noqa: F811
    model, tokenizer = build(assets, "llama", train_llm="lora", head="factorized")
    train(model, mixed_batch(model, tokenizer), steps=3, lr=1e-2)  # LoRA B and the parts move off their init
    model.save_pretrained(folder)
    return model.eval()


def test_package_writes_half_precision_folders_with_portable_paths(assets, tmp_path):  # noqa: F811
    model = trained_lora(assets, tmp_path / "trained")
    sizes = package_demo.package(assets / "semhitok", tmp_path / "trained", tmp_path / "demo", llm=str(assets / "llama"))
    assert set(sizes) == {"tokenizer", "mllm"} and all(v > 0 for v in sizes.values())
    shipped = json.loads((tmp_path / "demo" / "mllm" / CONFIG_NAME).read_text())
    assert shipped["semhitok"] == "../tokenizer" and shipped["llm"] == str(assets / "llama")
    for path in (tmp_path / "demo").rglob("*.safetensors"):
        floats = [v for v in load_file(str(path)).values() if v.is_floating_point()]
        assert floats and all(v.dtype == torch.float16 for v in floats), path
    lora_config = json.loads((tmp_path / "demo" / "mllm" / "lora" / "adapter_config.json").read_text())
    assert lora_config["base_model_name_or_path"] == str(assets / "llama")  # no path of the training machine
    loaded = SemHiTokLM.from_pretrained(tmp_path / "demo" / "mllm").eval()
    assert Path(loaded.config.semhitok) == (tmp_path / "demo" / "tokenizer").resolve()
    batch = mixed_batch(model, build(assets, "llama")[1])
    for a, b in zip(logits(model, *batch[:2]), logits(loaded, *batch[:2]), strict=True):
        assert torch.allclose(a, b, atol=5e-2, rtol=1e-2)  # float16 weights, float32 compute
    tokenizer = SemHiTok.from_pretrained(tmp_path / "demo" / "tokenizer")
    assert tokenizer.omitted == ("semantic_decoder",)  # stage 1's loss head does not ship


def test_package_refuses_a_mismatched_tokenizer_or_llm(assets, tmp_path):  # noqa: F811
    trained_lora(assets, tmp_path / "trained")
    script = [sys.executable, str(REPO / "scripts" / "package_demo.py"), "--mllm", str(tmp_path / "trained"),
              "--out", str(tmp_path / "demo")]  # fmt: skip
    cases = ((["--tokenizer", str(assets / "semhitok-k64"), "--llm", str(assets / "llama")], "was trained on the tokenizer"),
             (["--tokenizer", str(assets / "semhitok"), "--llm", str(assets / "qwen2")], "was trained on the LLM"),
             (["--tokenizer", str(assets / "semhitok"), "--llm", str(assets / "llama"), "--max-mb", "0.001"], "over --max-mb"))  # fmt: skip
    for extra, message in cases:
        proc = subprocess.run(script + extra, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_package_accepts_a_stage_2b_tokenizer_of_the_same_codes_only(assets, tmp_path):  # noqa: F811
    trained_lora(assets, tmp_path / "trained")
    tokenizer = SemHiTok.from_pretrained(assets / "semhitok")
    tokenizer.use_enhance_decoder()  # what stage 2b does: a new decoder, every other weight frozen
    tokenizer.save_pretrained(tmp_path / "stage2b")
    sizes = package_demo.package(tmp_path / "stage2b", tmp_path / "trained", tmp_path / "demo", llm=str(assets / "llama"))
    assert sizes["tokenizer"] > 0 and SemHiTok.from_pretrained(tmp_path / "demo" / "tokenizer").config.pixel.use_enhance_decoder
    with torch.no_grad():
        tokenizer.pixel_encoder.requires_grad_(False)
        next(tokenizer.pixel_encoder.parameters()).add_(1.0)  # other codes: refused
    tokenizer.save_pretrained(tmp_path / "recoded")
    with pytest.raises(ValueError, match="nor a stage-2b descendant"):
        package_demo.package(tmp_path / "recoded", tmp_path / "trained", tmp_path / "demo2", llm=str(assets / "llama"))

def test_asset_references_resolve_to_the_verified_folder_or_say_what_is_known(tmp_path):
    assert expand_reference("~/x") == str(Path.home() / "x")
    assert expand_reference("lmsys/vicuna-7b-v1.5") == "lmsys/vicuna-7b-v1.5"  # hub names pass through
    assert resolve_reference("../tok", tmp_path / "ckpt") == str((tmp_path / "tok").resolve())
    with pytest.raises(AssetError, match="unknown asset 'asset:nope'.*asset:smollm2-135m-instruct"):
        expand_reference("asset:nope")
    assert expand_reference(f"asset:{SMOLLM2_DIRNAME}") == str(smollm2_path())  # converted by `make assets`


def test_shipped_demo_checkpoints_fit_the_budget_and_name_only_portable_paths():
    demo = REPO / "mllm" / "demo"
    total = sum(p.stat().st_size for p in demo.rglob("*") if p.is_file()) / 2**20
    assert 0 < total <= 40, f"{demo}: {total:.1f} MiB"
    config = read_config(demo / "mllm" / CONFIG_NAME)
    assert config.llm == f"asset:{SMOLLM2_DIRNAME}" and config.semhitok == "../tokenizer" and config.train_llm == "lora"
