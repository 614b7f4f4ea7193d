"""Image-generation speed of `mllm.sampling` against transformers' `generate`, a LlamaGen-GPT-B-shaped model and the
memory roofline, side by side in one run (never asserted in tests).

    python bench/generate.py [--models smollm2] [--tokens N] [--prompts 4] [--sweep 1,2,4,8] [--precisions fp32,bf16]
                             [--baseline llamagen-gpt-b-shape] [--head flat] [--layers N] [--iters 2]
                             [--device cpu|cuda] [--threads N] [--sync-check] [--json PATH]

Every run samples one image of `--tokens` ids per prompt with classifier-free guidance (a conditional and an
unconditional row per prompt: "x4" = 4 prompts = 8 rows), KV cache, temperature 1, from the same synthetic prompt
ids (48 and 24 ids: speed does not depend on the words, and no tokenizer is needed), decoding only (no pixels):
  ours         `sample_image_ids` on the model as `load_for_inference` prepares it (`prepare_for_decoding`: on a CPU
               every linear weight packed for oneDNN), with the image head of a random SemHiTok of K·m = 1024·8 codes
  ours unfused the same with HF's decoder layers (packed) instead of the fused decoder (`mllm.kernels.FusedDecoder`,
               CPU only): what the fusion gives
  ours plain   the same without the packing (CPU only): what the packing gives
  HF generate  transformers' `generate` on the same causal LM (plain), same rows and precision, `--tokens` sampled ids
               with its cache and a processor keeping K·m ids: equal work at the LLM level, not the same computation
               (it runs its full-vocabulary lm_head each step; our image ids cannot go through it)
  LlamaGen     `--baseline`: a random plain Llama decoder of LlamaGen GPT-B's shape (12 layers, hidden 768, 12 heads,
               MLP 2048, 16384 image codes: 97.5 M weights per step), fp32, one prompt, under our sampler and
               prepared as ours is (packed on a CPU too: the baseline gets every speed-up but batching and bf16)
for each model of `--models`: "smollm2" = SmolLM2-135M-Instruct's real weights (the assets); random, needing no
asset: "smollm2-shape", "qwen2.5-0.5b-shape", "qwen2.5-1.5b-shape" (`--layers` cuts their depth).
Columns: seconds per image, ms per decoding step (past the prefill: a 1-token call's time subtracted), image tokens
per second, and the fraction of the memory roofline = bytes a step must read (the weights it runs: decoder body
without its embedding table + image head + adapter, or + lm_head for HF; the KV cache at the mean length) / step
time / the bandwidth this run measures (the fastest sum over 1 GiB, 4 GiB on CUDA, timed among the runs). The "kernel" line times one (2 x hidden) @ (hidden x 4 hidden) bf16 product alone, plain and packed:
the fraction a step made only of such matmuls could reach; "decoder products" replays the bf16 x1 step's own
products (the fused decoder's packed weights, 2 rows) back to back: the cap of that step's matmuls. The sweep gives ours' seconds per image vs prompts per call
(bf16). The #15 targets are checked on this run's numbers at the end. `--sync-check` (CUDA): host syncs per step.
Times are the fastest of `--iters` interleaved runs after an 8-token warm-up. Default `--tokens`: 256 on CUDA, 32 on
a CPU (ms per step and ratios are what compare; a CPU step takes 40-80 ms for SmolLM2). On a CPU shared with other
jobs use `--threads 1`: with more threads than free cores every op waits for a time slice.
"""

import argparse
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from timing import best_seconds, read_probe
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LogitsProcessor, LogitsProcessorList, Qwen2Config
from transformers.utils import logging as hf_logging

from mllm.kernels import PackedLinear, can_pack
from mllm.model import MLLMConfig, SemHiTokLM
from mllm.sampling import SamplingConfig, kv_cache_bytes, left_pad, sample_image_ids
from mllm.vocab import BOI_TOKEN, EOI_TOKEN, VisualVocab
from semhitok import PRESETS, SemHiTok
from semhitok.runtime import resolve_precision

SHAPES = {  # random decoders built in code (no asset): the shapes of the real models
    "smollm2-shape": (LlamaConfig, {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                                    "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                                    "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 1e5}),
    "qwen2.5-0.5b-shape": (Qwen2Config, {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                                         "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
                                         "tie_word_embeddings": True, "max_position_embeddings": 32768,
                                         "rope_theta": 1e6}),
    "qwen2.5-1.5b-shape": (Qwen2Config, {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                                         "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
                                         "tie_word_embeddings": True, "max_position_embeddings": 32768,
                                         "rope_theta": 1e6}),
    "llamagen-gpt-b-shape": (LlamaConfig, {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                           "num_key_value_heads": 12, "intermediate_size": 2048, "vocab_size": 1024,
                                           "max_position_embeddings": 4096, "tie_word_embeddings": False}),
}  # fmt: skip
CODES = {"llamagen-gpt-b-shape": (2048, 8)}  # (K, m) of the image head; others: the demo's 1024 x 8
PROMPT_IDS, UNCOND_IDS = 48, 24  # synthetic prompt lengths (a rendered caption is ~40-50 ids)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Run:
    """One timed configuration: `kind` ours | unfused | plain | hf, on LLM `llm`, `prompts` prompts per call (2 rows
    each)."""

    kind: str
    llm: str
    precision: str
    prompts: int

    @property
    def label(self) -> str:
        name = {"ours": "ours", "unfused": "ours unfused", "plain": "ours plain", "hf": "HF generate"}[self.kind]
        return f"{name} {self.precision} x{self.prompts}"


class KeepRange(LogitsProcessor):
    """Scores outside [start, stop) -> -inf (the image-id restriction, for HF generate)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        keep[self.start : self.stop] = True
        return scores.masked_fill(~keep, float("-inf"))


# ---------------------------------------------------------------------------------------------------- models


def build_llm(name: str, layers: int | None, device: torch.device) -> nn.Module:
    """An fp32 causal LM on `device`: SmolLM2-135M's real weights ("smollm2") or a random one of SHAPES[name]."""
    if name == "smollm2":
        from mllm.assets import smollm2_path

        return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).to(device)
    config_cls, shape = SHAPES[name]
    depth = {"num_hidden_layers": layers} if layers and name != "llamagen-gpt-b-shape" else {}
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config_cls(**{**shape, **depth}), dtype=torch.float32)


def hidden_size(name: str) -> int:
    """The hidden size of model `name` (`build_llm`), read without building it."""
    if name == "smollm2":
        from transformers import AutoConfig

        from mllm.assets import smollm2_path

        return AutoConfig.from_pretrained(smollm2_path()).hidden_size
    return SHAPES[name][1]["hidden_size"]


def wrap(llm: nn.Module, codes: tuple[int, int], head: str) -> SemHiTokLM:
    """A SemHiTokLM around an in-memory LLM: random adapter/head for a SemHiTok of K·m = codes (the tiny one with
    that codebook), the three specials on the LLM's last embedding rows (no text tokenizer needed)."""
    tiny, (K, m) = PRESETS["semhitok-tiny"], codes  # noqa: N806
    torch.manual_seed(0)
    cfg = replace(tiny, semantic=replace(tiny.semantic, codebook_size=K), pixel=replace(tiny.pixel, sub_codebook_size=m))
    rows = llm.get_input_embeddings().num_embeddings
    vocab = VisualVocab(K, m, rows, BOI_TOKEN, EOI_TOKEN, "<image>", rows - 3, rows - 2, rows - 1, True)
    config = MLLMConfig(llm="<in memory>", semhitok="<random>", head=head)
    return SemHiTokLM(config, llm, vocab, SemHiTok(cfg)).to(llm.device)


def streamed_bytes(*modules: nn.Module) -> int:
    """Bytes of the parameters a decoding step reads: those of `modules`, except embedding tables (a step gathers
    one row of them), each tensor once (tied weights)."""
    params = {id(p): p for mod in modules for sub in mod.modules() if not isinstance(sub, nn.Embedding)
              for p in sub.parameters(recurse=False)}  # fmt: skip
    return sum(p.numel() * p.element_size() for p in params.values())


@dataclass
class Prepared:
    """A run ready to time: fn(tokens) samples one call; `step_bytes(tokens)` what a step reads on average."""

    fn: Callable[[int], object]
    step_bytes: Callable[[int], float]
    params_M: float  # noqa: N815  the LLM's decoder, millions


def load_model(kind: str, llm_name: str, precision: str, args: argparse.Namespace, device: torch.device):
    """(model, bytes of the weights a step runs, decoder parameters in millions): the plain causal LM for "hf", else
    a SemHiTokLM (prepared for decoding for "ours", without the fused decoder for "unfused", merely cast for
    "plain")."""
    llm, dtype = build_llm(llm_name, args.layers, device), DTYPES[precision]
    params = sum(p.numel() for p in llm.get_decoder().parameters()) / 1e6
    if kind == "hf":
        llm = llm.to(dtype).eval()
        return llm, streamed_bytes(llm.get_decoder(), llm.get_output_embeddings()), params
    model = wrap(llm, CODES.get(llm_name, (1024, 8)), args.head).to(device, dtype).eval()
    weights = streamed_bytes(model.causal_lm.get_decoder(), model.head, model.adapter)  # before packing hides them
    if kind in ("ours", "unfused"):
        model.prepare_for_decoding(device, dtype, fuse=kind == "ours")
    return model, weights, params


def prepare(run: Run, model, weights: int, params: float, device: torch.device) -> Prepared:
    """`run` on its loaded model: one call of `run.prompts` prompts (synthetic ids) with CFG."""
    lm = model if run.kind == "hf" else model.causal_lm
    rows, dtype = 2 * run.prompts, DTYPES[run.precision]
    gen = torch.Generator().manual_seed(0)
    cond, uncond = (torch.randint(0, lm.get_input_embeddings().num_embeddings - 3, (n,), generator=gen)
                    for n in (PROMPT_IDS, UNCOND_IDS))  # fmt: skip

    def step_bytes(tokens: int) -> float:  # the weights + the KV cache at the mean length
        return weights + rows * kv_cache_bytes(lm.config, PROMPT_IDS + 1 + tokens // 2, dtype)

    if run.kind == "hf":
        return Prepared(hf_generate(lm, cond, uncond, run.prompts, CODES.get(run.llm, (1024, 8)), device), step_bytes,
                        params)  # fmt: skip
    cfg = SamplingConfig(temperature=1.0, cfg_scale=3.0)
    return Prepared(lambda n: sample_image_ids(model, [cond] * run.prompts, uncond, n, cfg), step_bytes, params)


def hf_generate(lm: nn.Module, cond, uncond, prompts: int, codes: tuple[int, int], device) -> Callable[[int], None]:
    """fn(n): transformers' `generate` sampling n tokens for `prompts` cond + as many uncond left-padded rows."""
    pad = lm.get_input_embeddings().num_embeddings - 3
    ids, mask = (t.to(device) for t in left_pad([cond] * prompts + [uncond] * prompts, pad))
    keep = LogitsProcessorList([KeepRange(0, min(codes[0] * codes[1], pad))])

    def fn(n: int) -> None:
        out = lm.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                          max_new_tokens=n, min_new_tokens=n, logits_processor=keep, pad_token_id=pad)  # fmt: skip
        assert out.shape[1] == ids.shape[1] + n, "HF generate stopped early"

    return fn


# ---------------------------------------------------------------------------------------------------- measuring


def kernel_calls(hidden: int, device: torch.device) -> tuple[dict[str, Callable[[], object]], int]:
    """Calls of one bf16 (2 x hidden) @ (hidden x 4 hidden) product alone, plain and (CPU) packed, over enough
    distinct weights (>= 256 MiB) that none stays in a cache, and the weight bytes one call reads."""
    w_bytes = 4 * hidden * hidden * 2
    layers = [nn.Linear(hidden, 4 * hidden, bias=False, device=device, dtype=torch.bfloat16)
              for _ in range(max(8, 2**28 // w_bytes))]  # fmt: skip
    x = torch.randn(2, hidden, device=device, dtype=torch.bfloat16)
    fns = {"plain": lambda: [layer(x) for layer in layers]}
    if can_pack(device, torch.bfloat16):
        packed = [PackedLinear(layer) for layer in layers]
        fns["packed"] = lambda: [layer(x) for layer in packed]
    return fns, w_bytes * len(layers)


def decoder_products(model: SemHiTokLM, rows: int) -> tuple[Callable[[], object], int] | None:
    """The fused decoder's own products for one decoding step of `rows` rows, back to back with nothing between
    (each layer's q|k|v, o + residual, gate|up, down + residual on its packed weights), and the bytes of those
    weights: what a step's matmuls alone reach. None when the model has no fused decoder."""
    fused = model.fused_decoder
    if fused is None:
        return None
    linear, binary = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._linear_pointwise.binary
    first = fused.layers[0]
    x = torch.randn(rows, 1, fused.norm.numel(), dtype=fused.norm.dtype)
    inner = torch.randn(rows, 1, first.inner, dtype=fused.norm.dtype)

    def fn() -> None:
        for layer in fused.layers:
            linear(x, layer.qkv, layer.qkv_bias, "none", [], "")
            binary(x, x, layer.o, layer.o_bias, "add")
            linear(x, layer.gate_up, layer.gate_up_bias, "none", [], "")
            binary(inner, x, layer.down, layer.down_bias, "add")

    dim, width = x.shape[-1], fused.heads * fused.head_dim
    per_layer = dim * (width + 2 * fused.kv_heads * fused.head_dim) + width * dim + 3 * dim * first.inner
    return fn, per_layer * len(fused.layers) * x.element_size()


def host_syncs_per_step(fn: Callable[[int], object]) -> float:
    """CUDA: the synchronizing calls the sync-debug mode reports per decoding step (a 4- vs a 12-token call)."""
    counts = []
    for n in (4, 12):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn(n)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return (counts[1] - counts[0]) / 8


def plan(args: argparse.Namespace, device: torch.device) -> list[Run]:
    """The runs: per model ours / HF at x1 in every precision, ours / unfused / plain / HF at x`prompts` (unfused at
    x1 too) and the sweep in the
    last precision; then the LlamaGen baseline (fp32, x1)."""
    runs, last = [], args.precisions[-1]
    for llm in args.models:
        for precision in args.precisions:
            runs += [Run("ours", llm, precision, 1), Run("hf", llm, precision, 1)]
        runs += [Run("ours", llm, last, args.prompts), Run("hf", llm, last, args.prompts)]
        if can_pack(device, DTYPES[last]):
            runs += [Run("unfused", llm, last, 1), Run("unfused", llm, last, args.prompts)]
            runs += [Run("plain", llm, last, args.prompts)]
        runs += [Run("ours", llm, last, p) for p in args.sweep]
    runs += [Run("ours", args.baseline, "fp32", 1)] if args.baseline != "none" else []
    return list(dict.fromkeys(runs))  # sweep sizes already planned run once


def measure(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], float, dict[str, float]]:
    """Every planned run, the memory bandwidth (bytes/s) and the kernel's roofline fractions, timed interleaved."""
    runs, models = plan(args, device), {}
    for run in runs:  # one model per (kind, LLM, precision), shared by its batch sizes
        if (run.kind, run.llm, run.precision) not in models:
            models[run.kind, run.llm, run.precision] = load_model(run.kind, run.llm, run.precision, args, device)
    prepared = {run: prepare(run, *models[run.kind, run.llm, run.precision], device) for run in runs}
    fns = {(r, n): lambda p=p, n=n: p.fn(n) for r, p in prepared.items() for n in (1, args.tokens)}
    probe, probe_bytes = read_probe(device, gib=4.0 if device.type == "cuda" else 1.0)
    kernels, kernel_bytes = kernel_calls(hidden_size(args.models[0]), device)
    kernels = {k: (f, kernel_bytes) for k, f in kernels.items()}
    one = next((r for r in runs if (r.kind, r.llm, r.precision, r.prompts) == ("ours", args.models[0], "bf16", 1)), None)
    products = one and decoder_products(models["ours", one.llm, "bf16"][0], 2)
    if products:
        kernels["decoder products"] = products
    fns.update({"bandwidth": probe, **{("kernel", k): f for k, (f, _) in kernels.items()}})
    with torch.inference_mode():
        for p in prepared.values():
            p.fn(8)  # warm-up
        sec = best_seconds(fns, args.iters, device, warmup=0)  # interleaved: every run under the same load
    bandwidth = probe_bytes / sec["bandwidth"]
    kernel = {k: n / sec["kernel", k] / bandwidth for k, (_, n) in kernels.items()}
    results = []
    for run, p in prepared.items():  # a step: the time past the prefill and first draw (a 1-token call)
        s, step = sec[run, args.tokens], (sec[run, args.tokens] - sec[run, 1]) / (args.tokens - 1)
        results.append({**asdict(run), "label": run.label, "params_M": p.params_M, "rows": 2 * run.prompts,
                        "s_per_image": s / run.prompts, "ms_per_step": 1e3 * step,
                        "image_tokens_per_s": args.tokens * run.prompts / s,
                        "gb_per_step": p.step_bytes(args.tokens) / 1e9,
                        "roofline": p.step_bytes(args.tokens) / step / bandwidth})  # fmt: skip
    if args.sync_check and device.type == "cuda":
        for run, p in prepared.items():
            if run.kind == "ours" and run.prompts == args.prompts:
                print(f"  {run.llm} {run.label}: {host_syncs_per_step(p.fn):.2f} host syncs per decoding step")
    return results, bandwidth, kernel


# ---------------------------------------------------------------------------------------------------- report


def print_table(results: list[dict], tokens: int) -> None:
    print(f"\n{'run':<24}{'model':<22}{'rows':>5}{'s/image':>9}{'ms/step':>9}{'img tok/s':>11}{'GB/step':>9}"
          f"{'roofline':>10}{'vs HF':>7}")  # fmt: skip
    for r in results:
        hf = next((h for h in results if h["kind"] == "hf" and h["llm"] == r["llm"] and h["precision"] == r["precision"]
                   and h["prompts"] == r["prompts"]), None)  # fmt: skip
        vs = f"{hf['s_per_image'] / r['s_per_image']:.2f}x" if hf and r["kind"] != "hf" else ""
        print(f"{r['label']:<24}{r['llm']:<22}{r['rows']:>5}{r['s_per_image']:>9.2f}{r['ms_per_step']:>9.1f}"
              f"{r['image_tokens_per_s']:>11.1f}{r['gb_per_step']:>9.3f}{100 * r['roofline']:>9.1f}%{vs:>7}")  # fmt: skip
    print(f"(one image = {tokens} image ids with CFG; ms/step past the prefill; 'vs HF': HF generate's time / this "
          "run's, same rows and precision)")  # fmt: skip
    for llm in dict.fromkeys(r["llm"] for r in results):
        sweep = sorted((r["prompts"], r["s_per_image"]) for r in results if (r["kind"], r["llm"]) == ("ours", llm)
                       and r["precision"] == "bf16")  # fmt: skip
        if len(sweep) > 1:
            print(f"ours bf16, {llm}, s per image vs prompts per call: "
                  + ", ".join(f"x{p} {s:.2f}" for p, s in sweep) + f" ({sweep[0][1] / sweep[-1][1]:.2f}x from x{sweep[0][0]} to x{sweep[-1][0]})")  # fmt: skip


def print_targets(results: list[dict], args: argparse.Namespace, kernel: dict[str, float]) -> dict:
    """The #15 targets on this run, for the first model: ours bf16 x4 per image >= 2.5x faster than LlamaGen fp32 x1
    and >= 1.5x faster than HF generate (same batch, precision); ours bf16 x1 step >= 50 % of the roofline."""

    def find(kind: str, llm: str, precision: str, prompts: int) -> dict | None:
        return next((r for r in results if (r["kind"], r["llm"], r["precision"], r["prompts"])
                     == (kind, llm, precision, prompts)), None)  # fmt: skip

    llm, last, p = args.models[0], args.precisions[-1], args.prompts
    ours, hf, one = find("ours", llm, last, p), find("hf", llm, last, p), find("ours", llm, "bf16", 1)
    base = find("ours", args.baseline, "fp32", 1)
    checks = {}
    if ours and base:
        checks[f"ours {last} x{p} vs LlamaGen-GPT-B fp32 x1, per image"] = (base["s_per_image"] / ours["s_per_image"], 2.5)
    if ours and hf:
        checks[f"ours {last} x{p} vs HF generate {last} x{p}, per image"] = (hf["s_per_image"] / ours["s_per_image"], 1.5)
    if one:
        checks["ours bf16 x1 decode step, fraction of the roofline"] = (one["roofline"], 0.5)
    print(f"\n#15 targets ({llm}, {args.tokens} tokens):")
    for name, (value, target) in checks.items():
        unit = "%" if target < 1 else "x"
        shown = (f"{100 * value:.0f}%", f"{100 * target:.0f}%") if unit == "%" else (f"{value:.2f}x", f"{target}x")
        print(f"  {name}: {shown[0]} (target >= {shown[1]}): {'met' if value >= target else 'NOT met'}")
    cap = ", ".join(f"{k} {100 * v:.0f}%" for k, v in kernel.items() if k != "decoder products")
    print(f"  kernel alone, bf16 (2 x hidden) @ (hidden x 4 hidden): {cap} of the roofline")
    if "decoder products" in kernel:
        print(f"  the x1 step's decoder products alone (its packed weights, 2 rows, nothing between): "
              f"{100 * kernel['decoder products']:.0f}% of the roofline")
    return {name: {"value": v, "target": t, "met": v >= t} for name, (v, t) in checks.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2", help="comma-separated: smollm2, " + ", ".join(SHAPES))
    p.add_argument("--tokens", type=int, default=None, help="image ids per image (default 256 on CUDA, 32 on a CPU)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per call of the batched runs")
    p.add_argument("--sweep", default="1,2,4,8", help="prompts per call for ours' per-image sweep ('' = none)")
    p.add_argument("--precisions", default="fp32,bf16", help="of the x1 runs; the last one also for the batched runs")
    p.add_argument("--baseline", default="llamagen-gpt-b-shape", choices=(*SHAPES, "none"))
    p.add_argument("--head", default="flat", choices=("flat", "factorized"))
    p.add_argument("--layers", type=int, default=None, help="cut the random shapes to this many layers")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sync-check", action="store_true", help="CUDA: count host syncs per decoding step")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.models, args.precisions = args.models.split(","), args.precisions.split(",")
    args.sweep = [int(x) for x in args.sweep.split(",") if x]
    args.tokens = args.tokens or (256 if device.type == "cuda" else 32)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    cut = f", random shapes cut to {args.layers} layers" if args.layers else ""
    print(f"device {device} ({where}), {args.tokens} tokens, {args.head} head{cut}", flush=True)
    if "bf16" in args.precisions and not resolve_precision("auto", device).bf16:
        print("note: this device has no native bf16: the bf16 runs are emulated (slow), and the #15 targets, set on "
              "an avx512_bf16 CPU, do not apply to this run's bf16 numbers", flush=True)  # fmt: skip
    results, bandwidth, kernel = measure(args, device)
    print(f"\nmemory bandwidth {bandwidth / 1e9:.1f} GB/s (the fastest sum over a large tensor, timed among the runs)")
    print_table(results, args.tokens)
    targets = print_targets(results, args, kernel)
    if args.json:
        info = {"device": str(device), "where": where, "bandwidth_GBps": bandwidth / 1e9, "tokens": args.tokens}
        args.json.write_text(json.dumps({**info, "kernel": kernel, "targets": targets, "results": results}, indent=2))


if __name__ == "__main__":
    main()
