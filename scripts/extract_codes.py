"""Encode a dataset's images once with SemHiTok into a code cache (DESIGN §4); re-running resumes a killed run.

python scripts/extract_codes.py --tokenizer runs/tok/model --images data/synthetic/scenes.jsonl --out codes/synth
--images: an image folder, a LLaVA .json/.jsonl, or any JSONL with an image path field (COCO annotations.jsonl,
a synthetic dataset's scenes.jsonl). Bad images are skipped and counted; when none can be encoded, that is an error.
Errors print one line and exit 2.
"""

from mllm.codes import CodeCache, extract_codes
from semhitok.runtime import Parser, int_in, positive_int, resolve_device


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="SemHiTok checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--images", required=True, help="image folder, LLaVA .json/.jsonl, or JSONL with an image field")
    p.add_argument("--out", required=True, help="cache folder (created; an unfinished one is resumed)")
    p.add_argument("--image-root", help="folder relative image paths resolve against (default: the file's folder)")
    p.add_argument("--image-key", default="image", help="record field holding the image path")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--shard-size", type=positive_int, default=4096, help="images per shard (the unit of resuming)")
    p.add_argument("--size", type=positive_int, help="check: the tokenizer's input size in pixels (images are resized "
                   "to it)")
    p.add_argument("--workers", type=int_in(0), default=4, help="image-loading worker processes")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device, option="--device")
        out = extract_codes(args.tokenizer, args.images, args.out, image_root=args.image_root, size=args.size,
                            image_key=args.image_key, batch_size=args.batch_size, shard_size=args.shard_size,
                            device=device, num_workers=args.workers, log=print)  # fmt: skip
        cache = CodeCache(out, tokenizer=args.tokenizer)
    except (ValueError, FileNotFoundError) as err:  # CodeCacheError, ConfigError, bad JSON lines
        p.error(str(err))
    print(f"{out}: {len(cache)} images encoded, {len(cache.skipped)} skipped")


if __name__ == "__main__":
    main()
