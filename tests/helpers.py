"""Builders shared by several test files: tiny random checkpoints on disk; training launches that report a hang."""

import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch
from test_mllm_model import FAMILIES, word_tokenizer

from mllm.model import MLLMConfig, SemHiTokLM
from mllm.text_tokenizer import load_text_tokenizer
from semhitok import PRESETS, SemHiTok

CONTEXT = 96  # max_position_embeddings of the tiny LLMs: a vicuna_v1 prompt is ~35 tokens, an image 16 + 2


def save_tiny_world(root: Path) -> Path:
    """Into `root`: a tiny random LLM + word-level tokenizer per family (root/<family>), the tiny SemHiTok
    (root/semhitok) and an MLLM checkpoint around the Llama one (root/mllm). Returns root."""
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    for family, (model_cls, config_cls, extra) in FAMILIES.items():
        config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, **extra)  # fmt: skip
        model_cls(config).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    SemHiTok(PRESETS["semhitok-tiny"]).save_pretrained(root / "semhitok")
    build_tiny_mllm(root).save_pretrained(root / "mllm")
    return root


def build_tiny_mllm(root: Path, family: str = "llama", head: str = "flat") -> SemHiTokLM:
    """A fresh MLLM (eval mode, seed 0) around root/<family> and root/semhitok of `save_tiny_world`."""
    torch.manual_seed(0)
    config = MLLMConfig(llm=str(root / family), semhitok=str(root / "semhitok"), adapter_width_sem=16,
                        adapter_width_pix=8, head=head)  # fmt: skip
    return SemHiTokLM.from_config(config, load_text_tokenizer(root / family)).eval()


def run_launch(cmd: list[str], *, timeout: float, retries: int = 0, **popen) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` for a training launch (python, torchrun, deepspeed). On a
    timeout, every process under the launcher prints its threads' stacks (SIGUSR1: `run_training` registers it with
    faulthandler) before the whole tree is killed; the stacks end the failure message. `retries`: launches again after
    a timeout (a rare hang of torch's CPU launch: a stuck run that stays stuck still fails), warning with the stacks."""
    for attempt in range(retries + 1):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                **popen)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):  # one at a time: stacks not interleaved
                try:
                    child.send_signal(signal.SIGUSR1)
                except psutil.NoSuchProcess:
                    pass
                time.sleep(1)
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        report = f"{' '.join(cmd[:6])} ... timed out after {timeout:.0f} s (attempt {attempt + 1} of {retries + 1})"
        tail = f"{report}\n--- stdout tail\n{out[-3000:]}\n--- stderr tail (stacks)\n{err[-12000:]}"
        if attempt == retries:
            pytest.fail(tail, pytrace=False)
        warnings.warn(tail, stacklevel=2)
    raise AssertionError("unreachable")
