"""Learning diagnostics of a SemHiTok MLLM on a held-out synthetic folder (DESIGN §9; `mllm.diagnostics`).

    python eval/diagnose.py image-dependence --model DIR --data DIR [--n 400] [--out FILE.json]
        yes/no answer margin log P(Yes) - log P(No) on n balanced questions with the real image and with another
        scene's image: AUC of the margin against the true answer for both, mean margins per true answer
    python eval/diagnose.py caption-dependence --model DIR --data DIR [--n 200] [--out FILE.json]
        image NLL (nats per image token) given the true caption, the empty caption and another scene's caption; the
        gap empty - true per token and per image (0 = the caption is ignored); and, per token, the NLL on the grid
        cells the scene's objects overlap and on the background cells, each at the semantic and the texture level
    python eval/diagnose.py layout-dependence --model DIR --data DIR [--n 100] [--out FILE.json]
        image NLL per token on the cells objects overlap (and on the background) after each scene's region description
        ("a red circle at the top left and ...") and after it with left <-> right and top <-> bottom swapped; gap =
        mirrored - true (0 = generation draws what is named but ignores where), share of scenes lower after the truth
    python eval/diagnose.py description-dependence --model DIR --data DIR [--n 200] [--out FILE.json]
        text NLL (nats per token) of each scene's caption as the answer to "Describe the image concisely." with its
        own and with another scene's image; gap = swapped - real (0 = the description ignores the image)
    python eval/diagnose.py counts --model DIR --data DIR [--n 200] [--out FILE.json]
        "How many stars are there?" per scene about a held and a lacked shape: accuracy of the most likely answer of
        "0".."5" with the real and with a swapped image (overall, held, lacked), and the majority share of held counts
    image-dependence --question "Can you see {object}?" asks in another wording ({object}: "a red circle"; default
        the training data's "Is there {object} in the image?" + LLaVA's short-answer suffix); counts --question
        "How many {shapes} do you see?" likewise ({shapes}: "stars"; default "How many {shapes} are there?" + suffix)
    common options: --template auto --prompt "Generate an image of: {caption}" --device auto --precision auto
                    --seed 0 --trust-remote-code

--data is a folder scripts/render_synthetic.py wrote, rendered with another seed than the training data. Samples are
rendered as training renders them (the template, the checkpoint's system prompt, the generation prompt). Prints the
numbers and writes them as JSON (default: outputs/diagnose/<command>.json). Bad input (missing or non-MLLM checkpoint,
a folder without scenes.jsonl, an --n the folder cannot fill) prints one line on stderr and exits with status 2.
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from mllm.cli import add_trust_remote_code_arg, load, one_line_errors
from mllm.constants import GENERATION_PROMPT
from mllm.diagnostics import DiagnosticsError, build_diagnostic_set, read_scenes
from mllm.sampling import resolve_template
from mllm.synthetic.questions import count_question, existence_question, with_article
from mllm.synthetic.text import plural
from semhitok.runtime import PRECISIONS, Parser, int_in

COMMANDS = {  # command -> (help, default --n, what --n counts)
    "image-dependence": ("yes/no margin AUC with the real vs a swapped image", 400, "balanced questions (even)"),
    "caption-dependence": ("image NLL with the true, empty and a swapped caption", 200, "scenes"),
    "layout-dependence": ("object-cell image NLL after the region description vs its regions mirrored", 100,
                          "scenes (those with every object centred are left out)"),
    "description-dependence": ("description NLL with the real vs a swapped image", 200, "scenes"),
    "counts": ("accuracy of the most likely count (0-5) with the real vs a swapped image", 200,
               "count questions (even; per scene one about a held shape, one about a lacked shape)"),
}


SCENE_COMMANDS = ("caption-dependence", "layout-dependence", "description-dependence")  # --n counts caption scenes
WORDINGS = {  # command -> (the placeholder of its --question, what goes there, an example of it, an example wording)
    "image-dependence": ("{object}", with_article, "a red circle", "Can you see {object}?"),
    "counts": ("{shapes}", plural, "stars", "How many {shapes} do you see?"),
}


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command, (text, n, counted) in COMMANDS.items():
        c = sub.add_parser(command, help=text)
        c.add_argument("--model", dest="checkpoint", metavar="DIR", type=Path, required=True,
                       help="MLLM folder (<train.out_dir>/model)")  # fmt: skip
        c.add_argument("--data", metavar="DIR", type=Path, required=True,
                       help="held-out synthetic folder (scenes.jsonl, images/)")  # fmt: skip
        c.add_argument("--n", type=int_in(2), default=n, help=counted)
        c.add_argument("--out", type=Path, help=f"results JSON (default: outputs/diagnose/{command}.json)")
        c.add_argument("--template", default="auto", help="conversation template the model was trained with")
        c.add_argument("--prompt", default=GENERATION_PROMPT, help="text-to-image prompt it was trained with (data.prompt)")
        c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        c.add_argument("--precision", default="auto", choices=PRECISIONS)
        c.add_argument("--seed", type=int, default=0, help="which categories the questions ask about")
        if command in WORDINGS:
            c.add_argument("--question", metavar="TEMPLATE", help=f'another wording, e.g. "{WORDINGS[command][3]}"')
        add_trust_remote_code_arg(c)
    return p


def wording(command: str, template: str) -> Callable[[str], str]:
    """--question TEMPLATE -> subject -> question ('{object}' becomes 'a red circle', '{shapes}' 'stars')."""
    placeholder, fill, example, _ = WORDINGS[command]
    if template.count(placeholder) != 1:
        raise DiagnosticsError(f"--question needs exactly one {placeholder} (where '{example}' goes), got {template!r}")
    return lambda subject: template.replace(placeholder, fill(subject))


def run(args: argparse.Namespace) -> dict:
    read_scenes(args.data, 2)  # a bad folder fails before the model loads
    question = getattr(args, "question", None)  # image-dependence and counts
    asking = {"ask": existence_question, "count_ask": count_question}  # the training data's wordings
    if question:
        asking["ask" if args.command == "image-dependence" else "count_ask"] = wording(args.command, question)
    inference = load(args)
    model, n = inference.model, {args.command: args.n}
    diag = build_diagnostic_set(args.data, inference.semhitok, inference.tokenizer, model.vocab,
                                questions=n.get("image-dependence", 2), counts=n.get("counts", 0),
                                captions=args.n if args.command in SCENE_COMMANDS else 2,
                                template=resolve_template(args.template, inference.tokenizer),
                                system=model.config.system_prompt, prompt=args.prompt, device=model.code_sem.device,
                                seed=args.seed, **asking)  # fmt: skip
    measure = {"image-dependence": diag.image_dependence,
               "caption-dependence": lambda m: diag.caption_dependence(m, cells=True),
               "layout-dependence": diag.layout_dependence,
               "description-dependence": diag.description_dependence, "counts": diag.count_accuracy}[args.command]  # fmt: skip
    with inference.precision.autocast(model.code_sem.device):
        result = measure(model)
    asked = {"question": question} if question else {}
    return {"command": args.command, "model": str(args.checkpoint), "data": str(args.data), **asked, **result}


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    with one_line_errors(f"{p.prog} {args.command}"):
        result = run(args)
        out = args.out or Path("outputs/diagnose") / f"{args.command}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    for key, value in result.items():
        print(f"{key:<20} {value:.4f}" if isinstance(value, float) else f"{key:<20} {value}")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
