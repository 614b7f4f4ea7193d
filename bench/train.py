"""MLLM training-loop overhead: tokens/s of our loop (`MLLMTrainer.train_step`: data loader + collate, micro-step,
loss tally, LR schedule, gradient clipping, AdamW) vs a bare PyTorch loop (forward + backward + AdamW step on
pre-collated batches), same model, same samples, same optimizer, one process. Never asserted in tests.

    python bench/train.py [--stages pretrain joint --hidden 256 --layers 4 --vocab 8000 --batch-size 4
                           --text-len 120 --steps 4 --repeats 3 --threads N --json PATH]

The LLM is a random Llama of the given size (word-level tokenizer of `--vocab` words) around the tiny SemHiTok; the
samples are random token sequences, half understanding (text, image, text answer), half generation (text, image).
Each measurement is `--steps` optimizer steps after one warm-up step; bare and ours alternate `--repeats` times and
the fastest of each is kept (other jobs on a shared machine only ever add time). Ratio = bare / ours tokens/s
(target <= 1.10). On a GPU the loop never waits for the device between log records (losses are summed as tensors).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mllm.codes import CodeCache, extract_codes, list_images
from mllm.constants import IGNORE_INDEX
from mllm.data.mixture import LMSample, collate_lm
from mllm.text_tokenizer import load_text_tokenizer
from mllm.train import MODEL_INPUTS, Launch, MLLMTrainer, Tally, load_run_config, param_groups
from mllm.vocab import VisualVocab
from semhitok import PRESETS, SemHiTok
from semhitok.runtime import load_image, to_tensor

REPO = Path(__file__).resolve().parents[1]
TINY = PRESETS["semhitok-tiny"]


def make_assets(root: Path, hidden: int, layers: int, vocab: int) -> None:
    """A random Llama (+ word-level tokenizer) and the tiny SemHiTok in `root`."""
    words = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", *(f"w{i}" for i in range(vocab - 4))])}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")  # fmt: skip
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128))  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    SemHiTok(TINY).save_pretrained(root / "semhitok")


def samples(vocab, n: int, text_len: int, text_vocab: int) -> list[LMSample]:
    """n random samples of one length: even understanding (labels on the answer), odd generation (labels on the image)."""
    g, out = torch.Generator().manual_seed(0), []
    for i in range(n):
        segment = vocab.segment(vocab.index_to_ids(torch.randint(0, vocab.num_image_ids, (1, 16), generator=g)))[0]
        text = torch.randint(4, text_vocab, (text_len,), generator=g)
        if i % 2:
            ids, labels = torch.cat([text, segment]), torch.cat([torch.full((text_len + 1,), IGNORE_INDEX), segment[1:]])
            out.append(LMSample(ids, labels, "generation"))
        else:
            answer = text[: text_len // 4]
            ids = torch.cat([text[text_len // 4 :], segment, answer])
            labels = torch.cat([torch.full((len(ids) - len(answer),), IGNORE_INDEX), answer])
            out.append(LMSample(ids, labels, "understanding"))
    return out


def bare_steps(model, optimizer, batches: list[dict]) -> int:
    """The bare loop: forward, backward, AdamW step. Returns the tokens processed."""
    for batch in batches:
        loss = model(**{k: batch[k] for k in MODEL_INPUTS})["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(int(b["attention_mask"].sum()) for b in batches)


def our_steps(trainer: MLLMTrainer, steps: int) -> int:
    tally = Tally()
    for _ in range(steps):
        trainer.train_step(tally)
    return int(tally.tokens)


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def bench_stage(root: Path, stage: str, args: argparse.Namespace) -> dict:
    run = load_run_config(REPO / "configs" / "mllm" / "tiny.yaml", [
        f"model.llm={root / 'llm'}", f"model.semhitok={root / 'semhitok'}", f"train.out_dir={root / stage}",
        f"train.stage={stage}", f"train.batch_size={args.batch_size}", "train.steps=1000000", "train.ckpt_every=0",
        "data.codes=''", "data.captions=''", "data.conversations=''"])  # fmt: skip
    tokenizer = load_text_tokenizer(root / "llm")
    vocab = VisualVocab.create(tokenizer, TINY.K, TINY.m, len(tokenizer))  # the ids the model will build
    data = samples(vocab, args.batch_size * (args.steps + 1), args.text_len, args.vocab)
    trainer = MLLMTrainer(run, Launch("single", torch.device("cpu")), dataset=data)
    model = trainer.runner.module
    bare = type(model).from_config(model.config, model.load_text_tokenizer()).train()  # same config, same init
    bare.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(param_groups(bare, run.train.weight_decay), lr=run.train.lr, betas=run.train.betas)
    pad = trainer.loader.collate_fn.keywords["pad_id"]
    batches = [collate_lm(data[i : i + args.batch_size], pad) for i in range(0, len(data), args.batch_size)]
    bare_steps(bare, optimizer, batches[:1]), our_steps(trainer, 1)  # warm-up
    best = {"bare": (float("inf"), 0), "ours": (float("inf"), 0)}
    for _ in range(args.repeats):
        for name, fn in (("bare", lambda: bare_steps(bare, optimizer, batches[1:])),
                         ("ours", lambda: our_steps(trainer, args.steps))):  # fmt: skip
            best[name] = min(best[name], timed(fn))
    tok_s = {name: tokens / seconds for name, (seconds, tokens) in best.items()}
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"stage": stage, "trainable_params": params, "bare_tokens_per_s": tok_s["bare"],
            "ours_tokens_per_s": tok_s["ours"], "ratio": tok_s["bare"] / tok_s["ours"]}  # fmt: skip


def time_encode_vs_cache(
    tokenizer_dir: Path, cache: CodeCache, root: Path, keys: list[str], batch_size: int = 32, device: str = "cpu"
) -> dict[str, float]:
    """Seconds per image to get codes by re-encoding (image decode + `SemHiTok.encode` in batches, after one warm-up
    batch) vs reading the cache one image at a time as the datasets do, and the ratios (`speedup` includes the image
    decoding, `speedup_encode_only` does not)."""
    tok = SemHiTok.from_pretrained(tokenizer_dir).to(device)
    size = tok.config.image_size
    t0 = time.perf_counter()
    images = torch.stack([to_tensor(load_image(root / k, size)) for k in keys])
    tok.encode(images[:batch_size].to(device))  # warm-up (lazy init, allocator)
    t1 = time.perf_counter()
    for batch in images.split(batch_size):
        tok.encode(batch.to(device)).semantic.cpu()
    t2 = time.perf_counter()
    for k in keys:
        cache.grid(k)
    t3 = time.perf_counter()
    n = len(keys)
    decode, encode, read = (t1 - t0) / n, (t2 - t1) / n, (t3 - t2) / n
    return {"decode_s": decode, "encode_s": encode, "cache_s": read,
            "speedup": (decode + encode) / read, "speedup_encode_only": encode / read}  # fmt: skip


def cache_speedup(root: Path, preset: str, num_images: int) -> dict:
    """Codes for `num_images` synthetic scenes: re-encoding with a `preset` SemHiTok vs reading the code cache."""
    from mllm.synthetic.dataset import write_dataset

    config = PRESETS[preset]
    SemHiTok(config).save_pretrained(root / "semhitok-bench")
    data = write_dataset(root / "scenes", num_images, size=config.image_size, seed=0)
    cache = extract_codes(root / "semhitok-bench", data / "scenes.jsonl", root / "cache", log=lambda _: None)
    _, keys = list_images(data / "scenes.jsonl", "image")
    out = time_encode_vs_cache(root / "semhitok-bench", CodeCache(cache), data, keys)
    return {"preset": preset, "num_images": num_images, **out}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", nargs="+", default=["pretrain", "joint"], help="pretrain | instruct | t2i | joint")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000, help="text vocabulary of the random LLM")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--text-len", type=int, default=120, help="text tokens per sample (+ 18 image tokens)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default; 1 is steadiest on a "
                   "shared machine: with more threads than free cores every op waits for a time slice)")
    p.add_argument("--cache-preset", default="semhitok-inception-128", help="SemHiTok preset for the code-cache "
                   "speed-up (random weights; encode cost does not depend on them)")
    p.add_argument("--cache-images", type=int, default=64, help="synthetic images for the code-cache speed-up (0 = skip)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        make_assets(Path(tmp), args.hidden, args.layers, args.vocab)
        rows = [bench_stage(Path(tmp), stage, args) for stage in args.stages]
        cache = cache_speedup(Path(tmp), args.cache_preset, args.cache_images) if args.cache_images else None
    print(f"\ncpu, {torch.get_num_threads()} threads; random Llama hidden {args.hidden} x {args.layers} layers, vocab "
          f"{args.vocab}; batch {args.batch_size} x {args.text_len + 18} tokens; best of {args.repeats} x {args.steps} steps")
    print(f"  {'stage':<10}{'trainable':>12}{'bare tok/s':>12}{'ours tok/s':>12}{'bare/ours':>11}")
    for r in rows:
        print(f"  {r['stage']:<10}{r['trainable_params']:>12,}{r['bare_tokens_per_s']:>12.0f}"
              f"{r['ours_tokens_per_s']:>12.0f}{r['ratio']:>11.3f}")
    if cache:
        print(f"\ncode cache vs re-encoding, {cache['preset']}, {cache['num_images']} images: encode "
              f"{cache['encode_s'] * 1e3:.2f} ms/img (+ decode {cache['decode_s'] * 1e3:.2f}), cache read "
              f"{cache['cache_s'] * 1e3:.3f} ms/img -> {cache['speedup_encode_only']:.0f}x faster "
              f"({cache['speedup']:.0f}x with image decoding)")
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "args": vars(args) | {"json": str(args.json)},
                                         "rows": rows, "code_cache": cache}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
