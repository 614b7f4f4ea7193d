"""Issue #11 on the tiny world of tests/helpers.py: a checkpoint never runs its own code unless the caller opts in
(--trust-remote-code); a full-finetune `out_dir/model` loads for inference; `<boi>`, `<eoi>`, `<image>` typed by a
user are plain text (generation prompts, chat, lmms-eval) and never end a chat session; generate.py checks --out
before it loads anything and leaves no stray file."""

import io
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
import transformers.dynamic_module_utils
from helpers import save_tiny_world
from PIL import Image
from test_mllm_model import random_grid
from test_sampling import NUM, REPO, run_in_process

import mllm.evaluation.lmms_model
import mllm.sampling
from mllm.cli import save_images
from mllm.evaluation.lmms_model import SemHiTokLMMS
from mllm.model import CONFIG_NAME, MLLMConfig, RemoteCodeError, SemHiTokLM
from mllm.sampling import ChatSession, SamplingConfig, generate_images, load_for_inference
from mllm.vocab import VocabError

TYPED = "draw <boi> a red <eoi> cat <image> here"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world (LLMs, SemHiTok, root/mllm) and an image."""
    root = save_tiny_world(tmp_path_factory.mktemp("safety"))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "red.png")
    return root


@pytest.fixture(scope="module")
def run(world):
    return load_for_inference(world / "mllm")


def specials(ids: torch.Tensor, vocab) -> dict[str, int]:
    """How often each control token occurs in ids (L,)."""
    return {name: int((ids == i).sum()) for name, i in zip(("boi", "eoi", "image"), vocab.special_ids, strict=True)}


# ---------------------------------------------------------------------------------------------------- remote code


def remote_code_checkpoint(world: Path, folder: Path, marker: Path, trust: bool) -> Path:
    """An exported checkpoint (LLM in the folder itself) whose LLM config points transformers at evil.py, a module
    that writes `marker` when it is imported; mllm_config.json says trust_remote_code = `trust`."""
    SemHiTokLM.from_pretrained(world / "mllm").export_merged(folder)
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                    "from transformers import LlamaForCausalLM\n\n\n"
                                    "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n")  # fmt: skip
    llm_config = json.loads((folder / "config.json").read_text())
    auto_map = {"AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps({**llm_config, "auto_map": auto_map}))
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "trust_remote_code": trust}))
    return folder


def test_a_checkpoint_that_asks_for_remote_code_is_refused_without_the_flag(world, tmp_path, capsys):
    marker = tmp_path / "marker"
    ckpt = remote_code_checkpoint(world, tmp_path / "ckpt", marker, trust=True)
    with pytest.raises(RemoteCodeError, match="pass --trust-remote-code"):
        load_for_inference(ckpt)
    with pytest.raises(ValueError, match="trust_remote_code must be True or False"):
        SemHiTokLMMS(pretrained=str(ckpt), device="cpu", trust_remote_code="yes")
    with pytest.raises(RemoteCodeError):
        SemHiTokLMMS(pretrained=str(ckpt), device="cpu")
    question, _ = ["--image", str(world / "red.png"), "--question", "what"], capsys.readouterr()
    for name, args in (("generate", ["--prompt", "a cat", "--out", str(tmp_path / "g.png")]), ("chat", question)):
        code, _, err = run_in_process(name, ["--checkpoint", str(ckpt), *args], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "pass --trust-remote-code" in err, err
    assert not marker.exists() and not (tmp_path / "g.png").exists()


def test_remote_code_runs_only_when_the_caller_opts_in(world, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    quiet = remote_code_checkpoint(world, tmp_path / "quiet", marker, trust=False)
    load_for_inference(quiet)  # transformers' own Llama class; evil.py is never imported
    assert not marker.exists()
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    run = load_for_inference(quiet, trust_remote_code=True)  # the explicit opt-in: the checkpoint's code runs
    assert marker.read_text() == "ran" and type(run.model.causal_lm).__name__ == "EvilForCausalLM"


def test_run_lmms_passes_the_opt_in_to_the_model_args(world):
    namespace = runpy.run_path(str(REPO / "eval" / "run_lmms.py"), run_name="eval")
    parser, model_args = namespace["build_parser"](), namespace["model_args"]
    base = ["--tasks", "pope", "--model-path", str(world / "mllm")]
    assert "trust_remote_code" not in model_args(parser.parse_args(base))
    assert model_args(parser.parse_args([*base, "--trust-remote-code"])).endswith(",trust_remote_code=True")


# ---------------------------------------------------------------------------------------------------- full finetune


def test_a_full_finetune_export_loads_for_inference(world, tmp_path, capsys):
    torch.manual_seed(0)
    config = MLLMConfig(llm=str(world / "llama"), semhitok=str(world / "semhitok"), adapter_width_sem=16,
                        adapter_width_pix=8, train_llm="full")  # fmt: skip
    model = SemHiTokLM.from_config(config).eval()  # text tokenizer: the llm folder (text_tokenizer "")
    model.save_pretrained(tmp_path / "out" / "model")  # what MLLMTrainer.export writes
    run = load_for_inference(tmp_path / "out" / "model")
    prompt = ChatSession(run.model, run.tokenizer, model.vocab.to_ids(random_grid(1))).prompt_ids("what color")
    with torch.no_grad():
        expected = model.text_logits(model.backbone(model.embed(prompt[None])).last_hidden_state)
        got = run.model.text_logits(run.model.backbone(run.model.embed(prompt[None])).last_hidden_state)
    # load_for_inference packs the linear weights for oneDNN (mllm.kernels): fp32 products within float rounding
    assert torch.allclose(got, expected, atol=1e-5) and len(run.tokenizer) <= run.model.vocab.offset
    args = ["--checkpoint", str(tmp_path / "out" / "model"), "--image", str(world / "red.png"), "--question", "what",
            "--max-new-tokens", "2"]  # fmt: skip
    code, out, err = run_in_process("chat", args, capsys)
    assert code == 0 and len(out.splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------------- typed specials


def test_typed_specials_in_a_generation_prompt_are_plain_text(run, monkeypatch):
    seen = []

    def capture(model, prompts, uncond, num_tokens, cfg, progress=None):
        seen.extend(prompts)
        return model.vocab.index_to_ids(torch.zeros(len(prompts), num_tokens, dtype=torch.long))

    monkeypatch.setattr(mllm.sampling, "sample_image_ids", capture)
    generate_images(run.model, [TYPED, "a cat"], SamplingConfig(cfg_scale=1.0), tokenizer=run.tokenizer)
    assert len(seen) == 2 and all(specials(ids, run.model.vocab) == {"boi": 0, "eoi": 0, "image": 0} for ids in seen)
    assert len(seen[0]) > len(seen[1])  # the typed tokens are still there, as text


def test_typed_specials_in_chat_questions_are_plain_text(run):
    vocab, image = run.model.vocab, run.model.vocab.to_ids(random_grid(1))
    with_image = ChatSession(run.model, run.tokenizer, image, history=[(TYPED, "red")]).prompt_ids(TYPED)
    assert specials(with_image, vocab) == {"boi": 1, "eoi": 1, "image": 0}  # only the image's own segment
    assert vocab.is_image_id(with_image).sum() == NUM
    without = ChatSession(run.model, run.tokenizer, None).prompt_ids(TYPED)
    assert specials(without, vocab) == {"boi": 0, "eoi": 0, "image": 0}


def test_lmms_batched_prompts_keep_typed_specials_as_text(world, monkeypatch):
    lm = SemHiTokLMMS(pretrained=str(world / "mllm"), device="cpu", batch_size=2)
    lm.task_dict = {"t": {"test": {0: "red", 1: None}}}
    seen = []

    def capture(model, prompts, cfg, stop_ids, allowed, done):
        seen.extend(prompts)
        return [torch.zeros(0, dtype=torch.long) for _ in prompts]

    monkeypatch.setattr(mllm.evaluation.lmms_model, "generate_texts", capture)
    visual = lambda doc: [Image.new("RGB", (32, 32), (200, 30, 30))] if doc else []  # noqa: E731
    lm._answer([(f"{TYPED}?", {"until": ["\n"]}, visual, d, "t", "test") for d in (0, 1)])
    assert [specials(ids, lm.run.model.vocab) for ids in seen] == [{"boi": 1, "eoi": 1, "image": 0},
                                                                   {"boi": 0, "eoi": 0, "image": 0}]  # fmt: skip


def test_the_interactive_chat_survives_any_bad_question(world, capsys, monkeypatch):
    lines = "what is <image> here\n<boi> cat <eoi>\n" + "cat " * 80 + "\nwhat color\nexit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    args = ["--checkpoint", str(world / "mllm"), "--image", str(world / "red.png"), "--max-new-tokens", "3"]
    code, out, err = run_in_process("chat", args, capsys)
    assert code == 0 and len(out.splitlines()) == 3, err  # three answers; the over-long question: one error line
    assert err.strip().splitlines() == [err.strip()] and "exceeds the model's context" in err

    class Broken:  # any user error raised while answering (here a VocabError) is one line, then the next question
        def ask(self, question):
            raise VocabError(f"bad\nquestion {question}")

    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n"))
    runpy.run_path(str(REPO / "scripts" / "chat.py"), run_name="scripts")["interact"](Broken(), "chat.py")
    expected = ["chat.py: error: bad question one", "chat.py: error: bad question two"]
    assert capsys.readouterr().err.splitlines() == expected


# ---------------------------------------------------------------------------------------------------- --out


@pytest.mark.parametrize("out, problem", [("{tmp}", "an existing directory"), ("{tmp}/grid", "no .png/.jpg extension"),
                                          ("{tmp}/grid.txt", "no .png/.jpg extension")])  # fmt: skip
def test_generate_checks_out_before_loading(tmp_path, capsys, out, problem):
    out = out.format(tmp=tmp_path)
    args = ["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "a cat", "--out", out]  # loading would fail
    code, _, err = run_in_process("generate", args, capsys)
    assert err.endswith(f".py: error: argument --out: must be a .png/.jpg file path, got {out!r} ({problem})\n")
    assert len(err.splitlines()) == 1, err  # (prog is __main__.py in process, generate.py when run)
    assert code == 2 and list(tmp_path.iterdir()) == []


def test_save_images_leaves_no_stray_file_on_failure(tmp_path):
    (tmp_path / "g-0-1.png").mkdir()  # the second image cannot be written
    with pytest.raises(OSError):
        save_images(torch.zeros(3, 3, 8, 8), tmp_path / "g.png", per_row=3)
    assert [p.name for p in tmp_path.iterdir()] == ["g-0-1.png"]
