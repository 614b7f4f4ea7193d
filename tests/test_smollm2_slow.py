"""The converted SmolLM2-135M-Instruct is the real model: it answers a simple factual question."""

import pytest
import torch


@pytest.mark.slow
def test_smollm2_answers_capital_of_france():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mllm.assets import smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "paris" in answer.lower(), answer
