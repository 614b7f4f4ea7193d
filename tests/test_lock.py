"""The set-up installs exactly the complete lock: the venv equals it, `pip check` passes, and the CUDA flavour differs
from the CPU one only in the torch family."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REQ = REPO / "requirements"
TORCH_FAMILY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
PIN = re.compile(r"^([a-z0-9][a-z0-9._-]*)==(\S+) \\$", re.M)


def pins(path: Path) -> dict[str, str]:
    return dict(PIN.findall(path.read_text()))


def flavour() -> str:
    return "cpu" if torch.version.cuda is None else "cuda"


def test_the_venv_holds_exactly_the_lock_and_pip_check_passes():
    cmd = [sys.executable, "scripts/setup_env.py", "--check", "--lock", f"requirements/lock-{flavour()}.txt",
           "--assets", "requirements/assets.txt"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "holds exactly the lock" in proc.stdout


def test_the_lock_check_names_a_drifted_missing_or_extra_distribution(tmp_path):
    lock = tmp_path / "lock.txt"
    lines = (REQ / f"lock-{flavour()}.txt").read_text()
    lines = re.sub(r"^filelock==\S+", "filelock==4.3.1", lines, flags=re.M)  # the version that broke a fresh machine
    lines = re.sub(r"^einops==\S+ \\\n(    --hash.*\n)+", "", lines, flags=re.M)  # installed, no longer locked
    lock.write_text(lines + "not-installed-dist==1.0 \\\n    --hash=sha256:00\n")
    cmd = [sys.executable, "scripts/setup_env.py", "--check", "--lock", str(lock), "--assets", "requirements/assets.txt"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert re.search(r"filelock==4\.3\.1 is locked but installed at 3\.", proc.stdout), proc.stdout
    assert "not-installed-dist==1.0 is locked but missing" in proc.stdout
    assert re.search(r"einops==\S+ is installed but not in the lock", proc.stdout)


def test_every_locked_line_is_pinned_with_hashes_and_the_hand_pins_hold():
    for name in ("lock-cpu.txt", "lock-cuda.txt", "assets.txt"):
        text = (REQ / name).read_text()
        blocks = re.split(r"\n(?=[a-z0-9])", text.split("\n", 2)[2].strip())
        assert blocks and all(PIN.match(b) and "--hash=sha256:" in b for b in blocks), name
    cpu = pins(REQ / "lock-cpu.txt")
    assert cpu["torch"] == "2.13.0+cpu" and cpu["torchvision"] == "0.28.0"
    assert int(cpu["filelock"].split(".")[0]) < 4  # lmms-eval 0.7.3 imports filelock._api
    assert {"lmms-eval", "deepspeed", "transformers", "uv", "setuptools"} <= set(cpu)


def test_the_cuda_lock_differs_from_the_cpu_lock_only_in_the_torch_family():
    cpu, cuda = pins(REQ / "lock-cpu.txt"), pins(REQ / "lock-cuda.txt")
    differ = {n for n in set(cpu) | set(cuda) if cpu.get(n) != cuda.get(n)}
    assert differ and all(TORCH_FAMILY.match(n) for n in differ), sorted(differ)
    assert cuda["torch"] == "2.13.0" and any(n.startswith("nvidia-") for n in cuda)
    assert not any(n.startswith("nvidia-") for n in cpu)


@pytest.mark.parametrize(("driver", "lock"), [(True, "lock-cuda.txt"), (False, "lock-cpu.txt")])
def test_make_picks_the_cuda_lock_where_an_nvidia_driver_answers(tmp_path, driver, lock):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nexit {0 if driver else 9}\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    env.pop("TORCH", None)
    out = subprocess.run(["make", "-s", "print-lock"], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"requirements/{lock}"
    forced = subprocess.run(["make", "-s", "print-lock", "TORCH=cpu"], cwd=REPO, env=env, capture_output=True,
                            text=True, check=True)  # fmt: skip
    assert forced.stdout.strip() == "requirements/lock-cpu.txt"
