"""The gradio page of the web demo: three tabs around one loaded `Inference` (chat about an image, generate, tokenizer
explorer). Handlers are thin: they call `mllm.app.core` and turn a user mistake into a message in the page
(`gr.Error`), never a stack trace. Every model call shares one queue slot (`concurrency_id="model"`, limit 1), so
two visitors never interleave their sampling. Offline: no analytics, no share link, system fonts, no SSR."""

from __future__ import annotations

import html
from collections.abc import Iterator

import gradio as gr
import numpy as np
from PIL import Image

from mllm.app import core
from mllm.cli import USER_ERRORS, one_line
from mllm.sampling import Inference
from mllm.synthetic import sample_geneval_entries

MODEL = {"concurrency_limit": 1, "concurrency_id": "model"}  # one model call at a time, queued
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def page_error(err: BaseException) -> gr.Error:
    """A user mistake -> the one-line message the page shows."""
    return gr.Error(html.escape(one_line(err)), print_exception=False)  # the page renders it as HTML


def build(run: Inference, psnr: core.Metric, title: str = "SemHiTok-MLLM", template: str = "auto",
          temperature: float = 1.0) -> gr.Blocks:  # fmt: skip
    """The whole page for `run` (its checkpoint's name in `title`); `psnr` is `semhitok.metrics.psnr` (the
    explorer's); `temperature` is Generate's default."""
    size = run.semhitok.config.image_size
    examples = core.example_images(size)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nA SemHiTok tokenizer and one LLM for understanding and generation. "
                    f"Images are {size}×{size} pixels, {run.model.config.image_grid[0]}² tokens.")  # fmt: skip
        with gr.Tab("Chat about an image", id="chat"):
            chat_tab(run, examples, size, template)
        with gr.Tab("Generate", id="generate"):
            generate_tab(run, template, temperature)
        with gr.Tab("Tokenizer explorer", id="explorer"):
            explorer_tab(run, examples, size, psnr)
    return demo.queue(default_concurrency_limit=1)


def launch(demo: gr.Blocks, host: str, port: int, block: bool = True) -> None:
    """Serve `demo` on host:port (no share link, uploads up to MAX_UPLOAD_BYTES)."""
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=False, quiet=True,
                theme=THEME, ssr_mode=False, max_file_size=core.MAX_UPLOAD_BYTES, prevent_thread_lock=not block)  # fmt: skip


def image_picker(examples: list[Image.Image], label: str, name: str) -> tuple[gr.File, gr.Gallery]:
    """An upload box and a gallery of example images to click (elem_ids `<name>-upload`, `<name>-examples`)."""
    upload = gr.File(label=label, file_types=["image"], type="filepath", height=90, elem_id=f"{name}-upload")
    gallery = gr.Gallery([core.view(x, 128) for x in examples], label="...or click an example", columns=6, height=110,
                         allow_preview=False, interactive=False, elem_id=f"{name}-examples")  # fmt: skip
    return upload, gallery


def clicked(examples: list[Image.Image], then):
    """Gallery select handler: `then(the example clicked)`."""

    def pick(evt: gr.SelectData):
        return then(examples[evt.index])

    return pick


# ---------------------------------------------------------------------------------------------------- chat


def chat_tab(run: Inference, examples: list[Image.Image], size: int, template: str) -> None:
    image, history = gr.State(None), gr.State([])
    with gr.Row():
        with gr.Column(scale=2):
            upload, gallery = image_picker(examples, "Upload an image", "chat")
            shown = gr.Image(label="What the model sees", type="pil", interactive=False, height=256, elem_id="chat-image")
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Conversation", height=360, elem_id="chatbot")
            question = gr.Textbox(label="Question", placeholder="How many shapes are there?", elem_id="question")
            with gr.Row():
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                clear = gr.Button("New conversation")
            with gr.Accordion("Sampling", open=False):
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0 = greedy)")
                max_tokens = gr.Slider(1, 256, value=64, step=1, label="max new tokens")

    def use(picture: Image.Image):
        return picture, core.view(picture), [], []

    def on_upload(path):
        try:
            return use(core.load_upload(path, size))
        except USER_ERRORS as err:
            raise page_error(err) from None

    outputs = [image, shown, history, chatbot]
    upload.upload(on_upload, upload, outputs)
    gallery.select(clicked(examples, use), None, outputs)
    clear.click(lambda: ([], []), None, [history, chatbot])

    def answer(picture, past, text, temp, max_new) -> Iterator:
        try:
            cfg = core.sampling_settings(1, 1.0, "constant", temp, 0, 1.0, 0, max_new)
            if picture is None:
                raise core.AppError("upload an image first (or click an example)")
            reply = ""
            for reply in core.stream_answer(run, picture, past, text, cfg, template):
                yield messages([*past, (text, reply)]), past, ""
        except USER_ERRORS as err:
            raise page_error(err) from None
        kept = [*past, (text, reply)] if reply else past
        yield messages([*past, (text, reply or "(no answer)")]), kept, ""

    gr.on([ask.click, question.submit], answer, [image, history, question, temperature, max_tokens],
          [chatbot, history, question], **MODEL)  # fmt: skip


def messages(history: list[tuple[str, str]]) -> list[dict]:
    """(question, answer) pairs -> gradio's chat messages."""
    return [{"role": r, "content": c} for q, a in history for r, c in (("user", q), ("assistant", a))]


# ---------------------------------------------------------------------------------------------------- generate


def generate_tab(run: Inference, template: str, temperature: float) -> None:
    made = gr.State(([], ""))  # (the last Generated images, the prompt they were made from)
    prompts = [e["prompt"] for e in sample_geneval_entries(np.random.default_rng(0), 12)]
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value=prompts[0], elem_id="prompt")
            gr.Examples([[p] for p in prompts], prompt, label="Synthetic prompts (the detector can score these)")
            with gr.Row():
                num = gr.Slider(1, core.MAX_IMAGES, value=4, step=1, label="number of images", elem_id="num-images")
                seed = gr.Number(0, precision=0, label="seed (image n uses seed + n)", elem_id="seed")
            with gr.Row():
                scale = gr.Slider(0, 10, value=3, step=0.25, label="CFG scale (1 = no guidance)")
                schedule = gr.Radio(["constant", "linear"], value="constant", label="CFG schedule")
            with gr.Row():
                temp = gr.Slider(0, 2, value=temperature, step=0.05, label="temperature (0 = greedy)")
                top_k = gr.Number(0, precision=0, label="top-k (0 = off)")
                top_p = gr.Slider(0, 1, value=1, step=0.01, label="top-p (1 = off)")
            go = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images (caption: the seed that re-makes it)", columns=4, height=380,
                                 object_fit="contain", elem_id="gallery")  # fmt: skip
            seeds = gr.Textbox(label="Seeds", interactive=False, elem_id="seeds")
            judge = gr.Button("Score with the detector", elem_id="score")
            verdict = gr.Textbox(label="Detector", interactive=False, lines=4, elem_id="verdict")

    def make(text, n, s, sched, t, k, p, sd, progress=gr.Progress()):  # noqa: B008
        try:
            cfg = core.sampling_settings(n, s, sched, t, k, p, sd)
            tokens = run.model.config.image_grid[0] * run.model.config.image_grid[1]
            bar = lambda steps: progress.tqdm(steps, total=tokens, desc="image tokens")  # noqa: E731
            images = core.generate(run, text, cfg, template, bar)
        except USER_ERRORS as err:
            raise page_error(err) from None
        line = ", ".join(str(g.seed) for g in images) + "  (one image alone: the same settings, this seed, 1 image)"
        return [(core.view(g.image), f"seed {g.seed}") for g in images], line, (images, text), ""

    go.click(make, [prompt, num, scale, schedule, temp, top_k, top_p, seed], [gallery, seeds, made, verdict], **MODEL)

    def rate(state):
        images, text = state
        try:
            results = core.score(text, [g.image for g in images])
        except USER_ERRORS as err:
            raise page_error(err) from None
        rows = [f"seed {g.seed}: {'correct' if ok else 'wrong'}" + (f" ({why})" if why else "")
                for g, (ok, why) in zip(images, results, strict=True)]  # fmt: skip
        return f"{sum(ok for ok, _ in results)}/{len(results)} correct for {text!r}\n" + "\n".join(rows)

    judge.click(rate, made, verdict)


# ---------------------------------------------------------------------------------------------------- explorer


def explorer_tab(run: Inference, examples: list[Image.Image], size: int, psnr: core.Metric) -> None:
    found = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            upload, gallery = image_picker(examples, "Upload an image to tokenize", "explorer")
            scores = gr.Markdown("PSNR appears here.", elem_id="psnr")
            patch = gr.Textbox(label="Clicked patch", interactive=False, elem_id="patch",
                               placeholder="click a patch of the semantic-code map")  # fmt: skip
        with gr.Column(scale=3):
            with gr.Row():
                original = gr.Image(label="Input", interactive=False, elem_id="original")
                full = gr.Image(label="Reconstruction (semantic + texture codes)", interactive=False, elem_id="recon")
            with gr.Row():
                semantic = gr.Image(label="Semantic codes only (texture codes 0)", interactive=False, elem_id="semantic")
                codes = gr.Image(label="Semantic codes: one colour per code (click a patch)", interactive=False,
                                 elem_id="code-map")  # fmt: skip

    def show(picture: Image.Image):
        e = core.explore(run, picture, psnr)
        text = (f"**PSNR** full decode **{e.psnr:.2f} dB**, semantic codes only **{e.psnr_semantic:.2f} dB**; "
                f"{len(np.unique(e.grid.semantic))} distinct semantic codes in {e.grid.semantic[0].numel()} patches")  # fmt: skip
        return e, core.view(e.image), core.view(e.reconstruction), core.view(e.semantic_only), e.code_map, text, ""

    def on_upload(path):
        try:
            return show(core.load_upload(path, size))
        except USER_ERRORS as err:
            raise page_error(err) from None

    outputs = [found, original, full, semantic, codes, scores, patch]
    upload.upload(on_upload, upload, outputs, **MODEL)
    gallery.select(clicked(examples, show), None, outputs, **MODEL)

    def click(e, evt: gr.SelectData):
        if e is None:
            raise gr.Error("tokenize an image first", print_exception=False)
        return core.highlight(e, evt.index[0], evt.index[1], e.code_map.size)

    codes.select(click, found, [codes, patch])


__all__ = ["build", "launch"]
