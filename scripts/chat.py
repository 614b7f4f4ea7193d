"""Ask a SemHiTok MLLM about an image.

    python scripts/chat.py --image FILE --question "What colour is the circle?" [--checkpoint DIR]   one answer
    python scripts/chat.py --image FILE [--checkpoint DIR]          interactive: one question per line, until EOF or
                                                                     "exit"; the conversation history is kept
Greedy by default (--temperature 0). Bad input (empty or over-long question, unreadable image, missing or non-MLLM
checkpoint) prints one line on stderr and exits with status 2; in the interactive session a bad question only prints
the line and the session goes on. `<boi>`, `<eoi>`, `<image>` typed in a question are plain text. Code shipped with a
checkpoint runs only with --trust-remote-code.
"""

import sys
from pathlib import Path

from mllm.cli import USER_ERRORS, add_sampling_args, load, one_line, one_line_errors, sampling_config
from mllm.sampling import ChatSession
from semhitok.runtime import Parser, positive_int


def interact(session: ChatSession, prog: str) -> None:
    """Answer stdin line by line until EOF or "exit"; a bad question prints one line and the session goes on."""
    if sys.stdin.isatty():
        print("Ask about the image, one question per line; 'exit' or Ctrl-D ends.", file=sys.stderr)
    for line in sys.stdin:
        question = line.strip()
        if question == "exit":
            return
        if not question:
            continue
        try:
            print(session.ask(question), flush=True)
        except USER_ERRORS as err:
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--question", help="ask once and exit; without it the session is interactive")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    add_sampling_args(p, temperature=0.0)
    args = p.parse_args(argv)
    with one_line_errors(p.prog):
        cfg = sampling_config(args, max_new_tokens=args.max_new_tokens)
        run = load(args)
        session = ChatSession(run.model, run.tokenizer, run.encode_image(args.image), cfg, args.template)
        if args.question is not None:
            print(session.ask(args.question))
            return
    try:
        interact(session, p.prog)
    except KeyboardInterrupt:
        print(file=sys.stderr)


if __name__ == "__main__":
    main()
