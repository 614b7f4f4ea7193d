"""Issue #11: bad command lines give one line and exit 2, never a traceback or a silent success.

The scripts run in-process (their `main(argv)`), so `torch.cuda.is_available` can be faked to False on any machine.
"""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import torch

from semhitok import PRESETS, SemHiTok
from semhitok.runtime import resolve_device
from semhitok.runtime.configio import ConfigError

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "--device cuda: no CUDA device available (torch.cuda.is_available() is False)"


def load_script(relative: str) -> types.ModuleType:
    """A script (scripts/ and eval/ are not packages) as a module, to call its main() in-process."""
    spec = importlib.util.spec_from_file_location(f"_{Path(relative).stem}", REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line_error(relative: str, argv: list, capsys) -> str:
    """Run the script's main(argv); assert exit 2 with one line `prog: error: message` on stderr; return message."""
    with pytest.raises(SystemExit) as exc:
        load_script(relative).main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and ": error: " in err and "Traceback" not in err, err
    return err.strip().split(": error: ", 1)[1]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def tokenizer_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    SemHiTok(PRESETS["semhitok-tiny"]).save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


# ---------------------------------------------------------------------------------------------------- devices


def test_resolve_device_names_the_option_and_the_missing_device(no_cuda, monkeypatch):
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda", option="--device")
    assert str(err.value) == NO_CUDA
    with pytest.raises(ConfigError, match=r"^train\.device cuda:1: no CUDA device available"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match=r"^--device gpu: not a device \(expected auto, cpu, cuda or cuda:N\)$"):
        resolve_device("gpu", option="--device")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("meta", option="--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"^--device cuda:2: no CUDA device 2 \(2 visible\)$"):
        resolve_device("cuda:2", option="--device")


def test_device_cuda_without_a_gpu_is_one_line(no_cuda, tmp_path, tokenizer_dir, capsys):
    (tmp_path / "images").mkdir()
    extract = ["--tokenizer", tokenizer_dir, "--images", tmp_path / "images", "--out", tmp_path / "codes"]
    err = one_line_error("scripts/extract_codes.py", [*extract, "--device", "cuda"], capsys)
    assert err == NO_CUDA
    recon = ["--checkpoint", tokenizer_dir, "--data", tmp_path / "images", "--device", "cuda"]
    assert one_line_error("eval/reconstruction.py", recon, capsys) == NO_CUDA


# ---------------------------------------------------------------------------------------------------- extract_codes


@pytest.mark.parametrize("value", ["0", "-2"])
def test_extract_codes_shard_size_below_one_is_one_line(tmp_path, value, capsys):
    argv = ["--tokenizer", tmp_path, "--images", tmp_path, "--out", tmp_path / "codes", "--shard-size", value]
    err = one_line_error("scripts/extract_codes.py", argv, capsys)
    assert err == f"argument --shard-size: expected an integer >= 1, got '{value}'"


def test_extract_codes_with_no_encodable_image_fails(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    (tmp_path / "bad" / "b.jpg").write_bytes(b"")
    base = ["--tokenizer", tokenizer_dir, "--workers", "0", "--device", "cpu"]
    err = one_line_error("scripts/extract_codes.py", [*base, "--images", tmp_path / "empty", "--out",
                                                      tmp_path / "c1"], capsys)  # fmt: skip
    assert "empty: no image could be encoded: the folder holds no image files (.jpg" in err
    err = one_line_error("scripts/extract_codes.py", [*base, "--images", tmp_path / "bad", "--out",
                                                      tmp_path / "c2"], capsys)  # fmt: skip
    assert "bad: no image could be encoded; skipped 2 of 2 items (2 distinct files): a.png (" in err
    assert "b.jpg (empty file (0 bytes))" in err


def test_extract_codes_on_a_truncated_llava_json_names_the_file(tmp_path, tokenizer_dir, capsys):
    text = '[{"id": "0", "image": "a.png",\n  "conversations": [{"from": "human", "value": "<image> Wha'  # cut short
    (tmp_path / "llava.json").write_text(text)
    argv = ["--tokenizer", tokenizer_dir, "--images", tmp_path / "llava.json", "--out", tmp_path / "codes"]
    err = one_line_error("scripts/extract_codes.py", argv, capsys)
    column = text.splitlines()[1].index('"<image>') + 1
    assert err == (f"{tmp_path / 'llava.json'}: invalid JSON at line 2, column {column}: Unterminated string; "
                   "the file ends early (truncated?)")  # fmt: skip
