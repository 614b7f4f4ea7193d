"""Install-time step of `make`: verify the Inception-v3 weights, convert SmolLM2 and build the Qwen2.5 tokenizer once.

Usage: python scripts/setup_assets.py [--force]
"""

import argparse
import sys
import time

from mllm.assets import convert_smollm2, smollm2_path
from mllm.text_tokenizer import ensure_qwen2_tokenizer
from semhitok.runtime import AssetError, inception_path


def main() -> int:
    parser = argparse.ArgumentParser(description="Verify and prepare the real pretrained assets.")
    parser.add_argument("--force", action="store_true", help="re-convert SmolLM2 even if a verified copy exists")
    args = parser.parse_args()
    try:
        print(f"assets: Inception-v3 ok: {inception_path()}")
        try:
            path = None if args.force else smollm2_path()
        except AssetError as err:
            print(f"assets: {err}: converting now")
            path = None
        if path is None:
            start = time.perf_counter()
            path = convert_smollm2()
            print(f"assets: converted SmolLM2-135M-Instruct in {time.perf_counter() - start:.0f}s")
        print(f"assets: SmolLM2-135M-Instruct ok: {path}")
        print(f"assets: Qwen2.5 tokenizer ok: {ensure_qwen2_tokenizer()}")
    except AssetError as err:
        print(f"assets: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
