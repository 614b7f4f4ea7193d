"""The web demo (mllm/app): its functions on the tiny world (tiny random LLM, tiny SemHiTok: 4x4 grid), and the page
served by gradio, driven through gradio's Python client. The real-browser test is tests/test_app_browser.py (slow)."""

import socket
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import save_tiny_world
from PIL import Image

from mllm.app import core
from mllm.sampling import ChatSession, SamplingConfig, load_for_inference
from mllm.synthetic import render, sample_geneval_entry, scene_for_entry
from semhitok import TokenGrid
from semhitok.metrics import psnr
from semhitok.runtime import to_pil, to_tensor

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = save_tiny_world(tmp_path_factory.mktemp("app"))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "red.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def run(world):
    return load_for_inference(world / "mllm")


@pytest.fixture(scope="module")
def size(run):
    return run.semhitok.config.image_size


def test_upload_is_resized_to_the_tokenizer(world, size):
    image = core.load_upload(world / "red.png", size)
    assert image.size == (size, size) and image.mode == "RGB"


@pytest.mark.parametrize(
    "name, limits, message",
    [
        ("broken.png", {}, "cannot use broken.png"),
        ("notes.txt", {}, "cannot use notes.txt"),
        ("missing.png", {}, "cannot use missing.png"),
        ("red.png", {"MAX_UPLOAD_BYTES": 10}, "the limit is"),
        ("red.png", {"MAX_UPLOAD_PIXELS": 100}, "cannot use red.png"),
        (None, {}, "upload an image first"),
    ],
)
def test_bad_upload_is_one_line_message(world, size, monkeypatch, name, limits, message):
    for key, value in limits.items():
        monkeypatch.setattr(core, key, value)
    with pytest.raises(core.AppError, match=message) as err:
        core.load_upload(None if name is None else world / name, size)
    assert "\n" not in str(err.value)


def test_examples_are_synthetic_scenes_at_the_tokenizer_size(size, tmp_path):
    images = core.example_images(size, scenes=3, real_dir=tmp_path)  # no real images there
    assert len(images) == 3 and all(x.size == (size, size) for x in images)


def test_chat_streams_a_growing_answer_and_keeps_the_history(run, world, size):
    image = core.load_upload(world / "red.png", size)
    steps = list(core.stream_answer(run, image, [], "what is it", GREEDY))
    assert steps and all(isinstance(s, str) for s in steps) and len(set(steps)) == len(steps)
    assert steps[-1] == ChatSession(run.model, run.tokenizer, core.encode_ids(run, image), GREEDY).ask("what is it")
    second = list(core.stream_answer(run, image, [("what is it", steps[-1])], "and the colour", GREEDY))
    assert second


def test_chat_stops_sampling_when_the_reader_leaves(run):
    answer = core.stream_answer(run, None, [], "what", replace(GREEDY, max_new_tokens=40))
    next(answer)
    answer.close()  # joins the worker: it stopped at its next token


def test_chat_refuses_an_empty_question(run):
    with pytest.raises(ValueError, match="the question is empty"):
        list(core.stream_answer(run, None, [], "  ", GREEDY))


def test_generate_gives_each_image_its_seed_and_reports_progress(run, size):
    steps = []

    def progress(it):
        for t in it:
            steps.append(t)
            yield t

    cfg = core.sampling_settings(2, 2.0, "linear", 1.0, 5, 0.9, 11)
    made = core.generate(run, "a red cat", cfg, progress=progress)
    assert [g.seed for g in made] == [11, 12] and all(g.image.size == (size, size) for g in made)
    assert steps == list(range(16))  # the tiny grid: 4 x 4 image tokens
    alone = core.generate(run, "a red cat", core.sampling_settings(1, 2.0, "linear", 1.0, 5, 0.9, 12))
    assert np.array_equal(np.asarray(alone[0].image), np.asarray(made[1].image))  # the shown seed re-makes it


@pytest.mark.parametrize(
    "settings, message",
    [
        ((1, 3.0, "constant", 1.0, 0, 0.0, 0), "top_p"),
        ((1, 3.0, "constant", -1.0, 0, 1.0, 0), "temperature"),
        ((1, 3.0, "cosine", 1.0, 0, 1.0, 0), "cfg_schedule"),
        ((0, 3.0, "constant", 1.0, 0, 1.0, 0), "num_images"),
    ],
)
def test_bad_settings_are_one_line_messages(settings, message):
    with pytest.raises(core.AppError, match=message) as err:
        core.sampling_settings(*settings)
    assert "\n" not in str(err.value) and "SamplingConfig(" not in str(err.value)


def test_generate_refuses_an_empty_prompt_and_too_many_images(run):
    with pytest.raises(core.AppError, match="write a prompt"):
        core.generate(run, " ", SamplingConfig())
    with pytest.raises(core.AppError, match="at most"):
        core.generate(run, "a cat", SamplingConfig(num_images=core.MAX_IMAGES + 1))


def test_detector_scores_synthetic_prompts_only():
    entry = sample_geneval_entry(np.random.default_rng(3), "counting")
    good = render(scene_for_entry(entry, np.random.default_rng(0)), 128)
    blank = Image.new("RGB", (128, 128), (128, 128, 128))
    assert [ok for ok, _ in core.score(entry["prompt"].upper(), [good, blank])] == [True, False]
    with pytest.raises(core.AppError, match="synthetic prompts only"):
        core.score("a photo of a cat", [good])
    assert all(core.synthetic_entries()[e["prompt"]]["include"] == e["include"]
               for e in (sample_geneval_entry(np.random.default_rng(s), t) for s in range(5)
                         for t in ("single_object", "two_object", "colors", "position", "color_attr")))  # fmt: skip


def test_explorer_decodes_in_full_and_with_semantic_codes_only(run, world, size):
    image = core.load_upload(world / "red.png", size)
    e = core.explore(run, image, psnr)
    assert e.grid.semantic.shape == (1, 4, 4)
    assert {x.size for x in (e.image, e.reconstruction, e.semantic_only)} == {(size, size)}
    semantic_only = run.decode(TokenGrid(e.grid.semantic, torch.zeros_like(e.grid.texture)))
    assert np.array_equal(np.asarray(e.semantic_only), np.asarray(to_pil(semantic_only[0])))
    x = to_tensor(image)[None]
    assert e.psnr == pytest.approx(float(psnr(run.decode(e.grid), x)[0]), abs=0.05)
    assert e.psnr_semantic == pytest.approx(float(psnr(semantic_only, x)[0]), abs=0.05)


def test_code_map_colours_patches_by_semantic_code_and_a_click_highlights_its_code():
    semantic = torch.tensor([[[3, 3], [5, 3]]])
    grid = TokenGrid(semantic, torch.tensor([[[0, 1], [2, 3]]]))
    picture = np.asarray(core.code_map(semantic[0].numpy(), (64, 64)))  # upscaled to 256
    centre = lambda row, col: tuple(picture[row * 128 + 64, col * 128 + 64])  # noqa: E731
    assert centre(0, 0) == centre(0, 1) == centre(1, 1) != centre(1, 0)
    assert core.patch_at(grid, 200, 30, (256, 256)) == (0, 1, 3, 1)
    e = core.Exploration(*[Image.new("RGB", (64, 64))] * 4, grid=grid, psnr=0.0, psnr_semantic=0.0)
    marked, text = core.highlight(e, 10, 200, (256, 256))  # patch (1, 0): code 5, alone
    assert "i = 5" in text and "j = 2" in text and "1 patch(es) share" in text
    shown = np.asarray(marked)
    faded = tuple(int(c * core.FADE + 255 * (1 - core.FADE)) for c in core.code_colour(3))
    assert tuple(shown[64, 64]) == tuple(shown[64, 192]) == faded  # code 3: faded
    assert tuple(shown[192, 64]) == core.code_colour(5) and tuple(shown[130, 64]) == (0, 0, 0)  # code 5: outlined


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_answers_through_gradio_client(run, world):
    """The served page: a bad upload is a message (and the app keeps serving), a good one gets an answer."""
    gradio_client = pytest.importorskip("gradio_client", reason="the `app` extra is not installed")
    from mllm.app import ui

    demo = ui.build(run, psnr, "tiny")
    port = free_port()
    ui.launch(demo, "127.0.0.1", port, block=False)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(Exception, match="cannot use broken.png"):
            client.predict(gradio_client.handle_file(str(world / "broken.png")), api_name="/on_upload")
        picture, chat = client.predict(gradio_client.handle_file(str(world / "red.png")), api_name="/on_upload")
        assert Image.open(picture).size[0] >= core.VIEW_SIDE and chat == []
        chat, question = client.predict("what is it", 0, 4, api_name="/answer")
        assert [m["role"] for m in chat] == ["user", "assistant"] and question == ""
        gallery, seeds, verdict = client.predict("a red cat", 1, 1.0, "constant", 1.0, 0, 1.0, 3, api_name="/make")
        assert len(gallery) == 1 and seeds.startswith("3") and verdict == ""
    finally:
        demo.close()
