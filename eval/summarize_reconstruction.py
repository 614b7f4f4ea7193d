"""Print a Markdown table comparing reconstruction results (results.json files of eval/reconstruction.py).

    python eval/summarize_reconstruction.py NAME=PATH/results.json [NAME=PATH ...] [--probe NAME=PATH/probe.json ...]
"""

import json
from pathlib import Path

from semhitok.probe import REPRESENTATIONS
from semhitok.runtime import Parser

COLUMNS = {
    "psnr": ("PSNR ↑", ".2f"), "ssim": ("SSIM ↑", ".4f"), "rfid": ("rFID ↓", ".2f"),
    "semantic_cosine": ("sem. cos ↑", ".4f"), "semantic_usage": ("sem. usage", ".3f"),
    "texture_usage": ("tex. usage", ".3f"), "joint_perplexity": ("joint ppl", ".0f"),
}


def named_paths(items: list[str], what: str) -> dict[str, Path]:
    pairs = [item.partition("=") for item in items]
    bad = [i for i, (_, sep, _) in zip(items, pairs, strict=True) if not sep]
    if bad:
        raise ValueError(f"{what} must be NAME=PATH, got {bad}")
    return {name: Path(path) for name, _, path in pairs}


def table(rows: dict[str, dict], columns: dict[str, tuple[str, str]]) -> str:
    head = "| | " + " | ".join(label for label, _ in columns.values()) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    body = [f"| {name} | " + " | ".join("-" if r.get(k) is None else format(r[k], fmt)
                                       for k, (_, fmt) in columns.items()) + " |" for name, r in rows.items()]
    return "\n".join([head, rule, *body])


def main() -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="NAME=PATH/results.json")
    p.add_argument("--probe", nargs="*", default=[], help="NAME=PATH/probe.json")
    args = p.parse_args()
    try:
        results = {n: json.loads(path.read_text()) for n, path in named_paths(args.results, "results").items()}
        probes = {n: json.loads(path.read_text()) for n, path in named_paths(args.probe, "--probe").items()}
    except (OSError, ValueError) as err:
        p.error(str(err))
    print(table(results, COLUMNS))
    for name, probe in probes.items():
        rows = {rep: probe[rep] for rep in REPRESENTATIONS}
        print(f"\nsemantic probe, {name} ({probe['num_classes']} classes, {probe['num_test']} test images, "
              f"chance {probe['chance']:.3f}):\n" + table(rows, {k: (k, ".3f") for k in rows[REPRESENTATIONS[0]]}))


if __name__ == "__main__":
    main()
