"""Image-generation speed of `mllm.sampling`, measured side by side in one run (never asserted in tests).

    python bench/generate.py [--models smollm2,qwen2.5-0.5b-shape] [--tokens 256] [--layers N] [--semhitok
                             inception-128] [--head flat] [--iters 2] [--device cpu] [--dtype float32] [--threads N]
                             [--json PATH]

For each model, one image of `--tokens` image ids with classifier-free guidance (cond + uncond row: batch 2),
KV cache, temperature 1, is sampled by `sample_image_ids` (decode to pixels excluded), and compared with
  - HF generate: transformers' `generate` on the same causal LM, same 2 left-padded prompt rows, sampling `--tokens`
    tokens (min_new_tokens) with its cache and a LogitsProcessor that keeps a K·m-sized id range. Our image ids cannot go through
    `generate` (their embeddings come from the adapter, their logits from the image head), so this is equal work at
    the LLM level, not the same computation: HF computes the LLM's full-vocabulary head each step, we the K·m head.
  - lower bounds at batch 2: the same prefill + (tokens - 1) single-token forwards with the cache of the bare LLM
    body (`get_decoder()`, no head: the transformer cost any sampler pays) and of the causal LM (body + lm_head,
    last position only), feeding a constant token, no sampling. ours / body is the sampler's overhead (target <= 1.15).
Models: "smollm2" = SmolLM2-135M-Instruct, real weights (`mllm.assets.smollm2_path`); "qwen2.5-0.5b-shape" = a random
Qwen2 of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936;
`--layers` cuts the depth, reported). Both wear a random adapter/head and a random SemHiTok of the `--semhitok`
preset's shape (it sets K·m: inception-128 = 1024·8; the grid does not matter, `--tokens` ids are drawn).
Times are the fastest of `--iters` interleaved runs after a short warm-up. Default `--tokens`: 256 on CUDA, 64 on a
CPU (decoding at batch 2 streams every weight once per token: a 2-core CPU needs ~0.1 s per SmolLM2 token and ~1 s
per 0.5B-shape token across the four runs, so the full 256 takes ~10 min there; ms per token is what compares).
On a CPU shared with other jobs use `--threads 1`: with more threads than free cores every op waits for a time slice.
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM

from mllm.conversation import generation_prompt_ids
from mllm.model import MLLMConfig, SemHiTokLM
from mllm.sampling import SamplingConfig, left_pad, sample_image_ids
from mllm.text_tokenizer import load_text_tokenizer
from mllm.vocab import VisualVocab
from semhitok import PRESETS, SemHiTok

QWEN_SHAPE = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
              "max_position_embeddings": 32768, "rope_theta": 1e6}  # fmt: skip
CAPTION = "three red circles and a blue square on a striped background"


class KeepRange(LogitsProcessor):
    """Scores outside [start, stop) -> -inf (the image-id restriction, for HF generate)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        keep[self.start : self.stop] = True
        return scores.masked_fill(~keep, float("-inf"))


def load_llm(name: str, layers: int | None, dtype: torch.dtype) -> tuple[torch.nn.Module, object, str]:
    """(causal LM, text tokenizer, description)."""
    if name == "smollm2":
        from mllm.assets import smollm2_path

        path = smollm2_path()
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), load_text_tokenizer(path), "SmolLM2-135M (real)"
    config = Qwen2Config(**{**QWEN_SHAPE, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(config).to(dtype)
    depth = f"{config.num_hidden_layers} of 24 layers" if layers else "24 layers"
    return llm, load_text_tokenizer("qwen2.5"), f"Qwen2.5-0.5B shape (random, {depth})"


def wrap(llm: torch.nn.Module, tokenizer, preset: str, head: str, dtype: str) -> SemHiTokLM:
    """A SemHiTokLM around an in-memory LLM with a random adapter/head and a random SemHiTok of `preset`'s shape."""
    torch.manual_seed(0)
    semhitok = SemHiTok(PRESETS[f"semhitok-{preset}"], init_from_teacher=False)
    rows = llm.get_input_embeddings().num_embeddings
    vocab = VisualVocab.create(tokenizer, semhitok.config.K, semhitok.config.m, rows)
    config = MLLMConfig(llm="<in memory>", semhitok=f"<random {preset}>", head=head, dtype=dtype)
    return SemHiTokLM(config, llm, vocab, semhitok).eval()


def bare_loop(forward: Callable, ids: torch.Tensor, mask: torch.Tensor, tokens: int) -> None:
    """Prefill + (tokens - 1) single-token cached forwards, feeding the last prompt token again."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = forward(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True).past_key_values
    token, pos = ids[:, -1:], pos[:, -1:]
    for _ in range(tokens - 1):
        mask, pos = torch.cat([mask, torch.ones_like(token)], 1), pos + 1
        cache = forward(input_ids=token, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True).past_key_values  # fmt: skip


def runs(model: SemHiTokLM, tokenizer, tokens: int, device: torch.device) -> dict[str, Callable[[int], object]]:
    """name -> fn(number of image tokens), each at batch 2 (cond + uncond rows)."""
    template = "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
    cond, uncond = (generation_prompt_ids(c, tokenizer, template) for c in (CAPTION, ""))
    boi = torch.tensor([model.vocab.boi_id])
    ids, mask = (t.to(device) for t in left_pad([torch.cat([r, boi]) for r in (cond, uncond)], model.vocab.boi_id))
    lm, cfg = model.causal_lm, SamplingConfig(temperature=1.0, cfg_scale=3.0)
    keep = LogitsProcessorList([KeepRange(0, min(model.vocab.num_image_ids, model.vocab.offset))])

    def hf_generate(n: int) -> None:
        out = lm.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                          max_new_tokens=n, min_new_tokens=n, logits_processor=keep, pad_token_id=model.vocab.boi_id)  # fmt: skip
        assert out.shape[1] == ids.shape[1] + n, "HF generate stopped early"

    return {
        "ours": lambda n: sample_image_ids(model, [cond], uncond, n, cfg),
        "hf_generate": hf_generate,
        "bare_body": lambda n: bare_loop(lm.get_decoder(), ids, mask, n),
        "bare_causal_lm": lambda n: bare_loop(lambda **kw: lm(**kw, logits_to_keep=1), ids, mask, n),
    }


def best_seconds(fns: dict[str, Callable[[int], object]], tokens: int, iters: int, device: torch.device,
                 warmup_tokens: int = 8) -> dict[str, float]:  # fmt: skip
    """Fastest wall time of each fn(tokens) over `iters` round-robin runs, after one warm-up of `warmup_tokens`."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn(warmup_tokens)
    for _ in range(iters):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn(tokens)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    llm, tokenizer, description = load_llm(name, args.layers, getattr(torch, args.dtype))
    model = wrap(llm, tokenizer, args.semhitok, args.head, args.dtype).to(device)
    with torch.inference_mode():
        sec = best_seconds(runs(model, tokenizer, args.tokens, device), args.tokens, args.iters, device)
    return {"model": description, "params_M": sum(p.numel() for p in llm.parameters()) / 1e6,
            "image_ids": model.vocab.num_image_ids, "text_vocab": model.vocab.offset, "tokens": args.tokens,
            "rows": 2, "seconds": sec, "ms_per_token": {k: 1e3 * v / args.tokens for k, v in sec.items()},
            "ours_over_hf_generate": sec["ours"] / sec["hf_generate"],
            "ours_over_bare_body": sec["ours"] / sec["bare_body"],
            "ours_over_bare_causal_lm": sec["ours"] / sec["bare_causal_lm"]}  # fmt: skip


def print_table(results: list[dict]) -> None:
    cols = ("ours", "hf_generate", "bare_body", "bare_causal_lm")
    print(f"\n{'model':<42}{'K*m':>7}" + "".join(f"{c + ' s':>17}" for c in cols)
          + f"{'ours/HF':>9}{'ours/body':>11}{'ours/LM':>9}")  # fmt: skip
    for r in results:
        times = "".join(f"{r['seconds'][c]:>10.2f} ({r['ms_per_token'][c]:>4.0f}ms)" for c in cols)
        print(f"{r['model']:<42}{r['image_ids']:>7}{times}{r['ours_over_hf_generate']:>9.2f}"
              f"{r['ours_over_bare_body']:>11.2f}{r['ours_over_bare_causal_lm']:>9.2f}")  # fmt: skip
    print("(seconds per image of `tokens` ids at batch 2 = cond + uncond, ms per token in brackets)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,qwen2.5-0.5b-shape")
    p.add_argument("--tokens", type=int, default=None, help="image ids per image (256 = a 16x16 grid; default 256 on "
                   "CUDA, 64 on a CPU)")  # fmt: skip
    p.add_argument("--layers", type=int, default=None, help="cut the Qwen2.5-0.5B shape to this many layers")
    p.add_argument("--semhitok", default="inception-128", choices=("tiny", "inception-128"))
    p.add_argument("--head", default="flat", choices=("flat", "factorized"))
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.tokens = args.tokens or (256 if device.type == "cuda" else 64)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), {args.dtype}, {args.tokens} tokens, {args.head} head, semhitok-{args.semhitok}")
    results = []
    for name in args.models.split(","):
        results.append(bench_model(name, args, device))
        print(f"  {results[-1]['model']}: {json.dumps(results[-1]['seconds'])}", flush=True)
    print_table(results)
    if args.json:
        info = {"device": str(device), "where": where, "dtype": args.dtype, "head": args.head}
        args.json.write_text(json.dumps({**info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
