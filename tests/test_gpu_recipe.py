"""The GPU recipe's scripts (issue #14; scripts/gpu/): what can be checked without a GPU. The recipe's configs load
in test_tokenizer_train / test_mllm_train; `GPU_DEMO_SMOKE=1 bash scripts/gpu/demo.sh` runs its plumbing on the CPU
and `bash scripts/gpu/assets.sh check` its asset transfer (both minutes: run by hand, see the scripts)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu" / script), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})  # fmt: skip


def test_the_gpu_demo_stops_with_one_line_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: scripts/gpu/demo.sh would train")
    result = run("demo.sh")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "gpu/demo.sh: error: no CUDA device" in result.stderr


def test_the_asset_transfer_refuses_missing_pieces_with_one_line(tmp_path):
    env = {"GPU_DIR": str(tmp_path / "gpu"), "GPU_STORE": str(tmp_path / "store"), "GPU_SITE": str(tmp_path / "site")}
    result = run("assets.sh", "receive", env=env)  # nothing carried
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "bundle.sha256 did not travel" in result.stderr
    result = run("assets.sh", "install", env=env)  # nothing received
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no chunks received" in result.stderr
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "bundle.sha256").write_text("0" * 64 + "\n")
    (tmp_path / "store" / "00").write_bytes(b"part of a bundle")
    result = run("assets.sh", "install", env=env)  # a chunk missing or damaged: the join does not verify
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "do not join" in result.stderr
    assert not (tmp_path / "site").exists()
    result = run("assets.sh", "unpack", env=env)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_a_received_chunk_is_kept_for_the_next_call(tmp_path):
    env = {"GPU_DIR": str(tmp_path / "gpu"), "GPU_STORE": str(tmp_path / "store")}
    for k in range(2):  # two calls, one chunk each
        (tmp_path / "gpu" / "parts").mkdir(parents=True, exist_ok=True)
        (tmp_path / "gpu" / "parts" / f"{k:02d}").write_bytes(bytes([k]) * 10)
        (tmp_path / "gpu" / "bundle.sha256").write_text("x\n")
        result = run("assets.sh", "receive", env=env)
        assert result.returncode == 0, result.stderr
        assert not any((tmp_path / "gpu" / "parts").iterdir())
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["00", "01", "bundle.sha256"]


def test_the_gpu_recipe_is_the_cpu_recipe_on_cuda():
    """Same batches, steps, schedules and mixes as the CPU recipe; only device, precision, workers and folders differ;
    the MLLM stages chain in the order scripts/gpu/demo.sh runs them, and the last writes runs/demo-gpu/mllm."""
    from mllm.train.config import load_run_config as load_mllm
    from semhitok.train import load_run_config as load_tokenizer

    for stage in ("1", "2", "2b"):
        gpu, cpu = (load_tokenizer(REPO / "configs" / "demo" / d / f"tokenizer-stage{stage}.yaml") for d in ("gpu", "."))
        assert gpu.train.device == "cuda" and gpu.out_dir.startswith("runs/demo-gpu/")
        assert (gpu.model, gpu.train.steps, gpu.train.data.batch_size, gpu.train.optim) == (
            cpu.model, cpu.train.steps, cpu.train.data.batch_size, cpu.train.optim)  # fmt: skip
    stages = ("align", "instruct", "t2i", "joint", "joint-prompts", "expand")
    assert f"STAGES=({' '.join(stages)})" in (REPO / "scripts" / "gpu" / "demo.sh").read_text()
    prev = None
    for name in stages:
        gpu, cpu = (load_mllm(REPO / "configs" / "demo" / d / "mllm" / f"{name}.yaml") for d in ("gpu", "."))
        assert (gpu.train.device, gpu.model.semhitok, gpu.data.codes) == ("cuda", "runs/demo-gpu/tokenizer-stage2/model",
                                                                          "runs/demo-gpu/codes")  # fmt: skip
        for field in ("stage", "steps", "lr", "batch_size", "schedule", "loss"):
            assert getattr(gpu.train, field) == getattr(cpu.train, field), (name, field)
        assert (gpu.data.mix, gpu.model.lora, gpu.model.train_llm) == (cpu.data.mix, cpu.model.lora, cpu.model.train_llm)
        assert gpu.train.init_from == (f"{prev.train.out_dir}/model" if prev else "")
        prev = gpu
    assert prev.train.out_dir == "runs/demo-gpu/mllm"
