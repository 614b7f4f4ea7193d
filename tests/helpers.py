"""Builders shared by several test files: tiny random checkpoints on disk."""

from pathlib import Path

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
