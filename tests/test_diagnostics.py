"""Learning diagnostics (mllm.diagnostics, eval/diagnose.py): the AUC / derangement arithmetic, constructed scorers
whose answers do or do not read the image and whose image NLL does or does not read the caption, a tiny random MLLM
(SmolLM2's tokenizer, so "Yes" and "No" are distinct tokens) whose image input is switched off, and the command line.
The trainer's periodic diagnostics are tested in test_mllm_train.py."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mllm.data.mixture import collate_lm
from mllm.diagnostics import (
    LOG_KEYS,
    DiagnosticsError,
    auc,
    balanced_questions,
    build_diagnostic_set,
    count_questions,
    derangement,
    object_cells,
    read_scenes,
    score,
    score_image_tokens,
)
from mllm.model import MLLMConfig, SemHiTokLM
from mllm.synthetic.dataset import write_dataset
from mllm.synthetic.scene import SHAPES, Scene
from mllm.synthetic.text import describe, mirror_regions, plural
from mllm.text_tokenizer import load_text_tokenizer
from mllm.vocab import VisualVocab
from semhitok import PRESETS, SemHiTok

REPO = Path(__file__).resolve().parents[1]
TINY = PRESETS["semhitok-tiny"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """root: the tiny SemHiTok, 12 held-out synthetic scenes at its 32 px, a tiny random Llama with SmolLM2's
    tokenizer (llm/) and an MLLM around it (mllm/)."""
    from mllm.assets import smollm2_path

    root = tmp_path_factory.mktemp("diagnose")
    torch.manual_seed(0)
    SemHiTok(TINY).save_pretrained(root / "semhitok")
    write_dataset(root / "heldout", 12, size=TINY.image_size, seed=3)
    tokenizer = load_text_tokenizer(smollm2_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    tiny_mllm(root).save_pretrained(root / "mllm")
    return root


def tiny_mllm(root: Path) -> SemHiTokLM:
    torch.manual_seed(0)
    config = MLLMConfig(llm=str(root / "llm"), semhitok=str(root / "semhitok"), adapter_width_sem=16,
                        adapter_width_pix=8)  # fmt: skip
    return SemHiTokLM.from_config(config).eval()


def diagnostic_set(world: Path, questions: int = 12, captions: int = 6, counts: int = 0):
    tokenizer = load_text_tokenizer(world / "llm")
    vocab = VisualVocab.create(tokenizer, TINY.K, TINY.m, len(tokenizer))
    semhitok = SemHiTok.from_pretrained(world / "semhitok")
    return build_diagnostic_set(world / "heldout", semhitok, tokenizer, vocab, questions=questions, captions=captions,
                                template="chat_template", system="", counts=counts)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- arithmetic


def test_auc_and_derangement():
    assert auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auc([1.0, 1.0, 1.0, 1.0], [False, True, False, True]) == 0.5  # ties count one half
    assert auc([0.5, 0.1, 0.3], [True, False, False]) == 1.0 and auc([0.2, 0.1, 0.3], [True, False, False]) == 0.5
    with pytest.raises(DiagnosticsError, match="both positive and negative"):
        auc([1.0, 2.0], [True, True])
    assert derangement(4) == [1, 2, 3, 0] and all(k != j for k, j in enumerate(derangement(7)))
    with pytest.raises(DiagnosticsError, match="at least 2 scenes"):
        derangement(1)


# ---------------------------------------------------------------------------------------------------- constructed


class Cheat:
    """A scorer that reads the answer off the image it is shown (true category present: "Yes" costs 0.1 nats, "No"
    2.1, else the reverse) and whose image NLL is 1 nat per token after the image's own caption, 2 otherwise.
    With `image=False` / `caption=False` it ignores the image / the caption instead."""

    def __init__(self, diag, image: bool = True, caption: bool = True):
        self.diag, self.image, self.caption = diag, image, caption
        codes, vocab = diag.builder.codes, diag.builder.vocab
        self.scene_of = {tuple(vocab.to_ids(codes.grid(s.image))[0].tolist()): s for s in diag.scenes}
        self.tokenizer, self.yes = diag.builder.tokenizer, diag.builder.tokenizer("Yes")["input_ids"][0]

    def sequence_nll(self, input_ids, attention_mask, labels) -> dict[str, torch.Tensor]:
        rows = [self._row(ids[mask.bool()], lab[mask.bool()]) for ids, mask, lab in zip(input_ids, attention_mask, labels, strict=True)]
        return {k: torch.tensor([r[k] for r in rows]) for k in ("text", "n_text", "image", "n_image")}

    def _row(self, ids, labels) -> dict[str, float]:
        vocab = self.diag.builder.vocab
        image = vocab.is_image_id(ids)
        text = self.tokenizer.decode(ids[~image & (labels == -100)])
        targets = labels[labels != -100]
        if not vocab.is_image_id(targets).any() and "Describe" in text:  # a description: 1 nat per token if of the image
            scene = self.scene_of[tuple(ids[image].tolist())]
            own = scene.caption in self.tokenizer.decode(targets) and self.image
            return {"text": (1.0 if own else 3.0) * len(targets), "n_text": len(targets), "image": 0.0, "n_image": 0}
        if not vocab.is_image_id(targets).any() and "How many" in text:  # a count: right if the shown scene's count
            scene = self.scene_of[tuple(ids[image].tolist())]
            shape = next(s for s in SHAPES if f"How many {plural(s)} are" in text)
            count = sum(o.shape == shape for o in scene.scene.objects) if self.image else 0
            right = self.tokenizer.decode(targets, skip_special_tokens=True).strip() == str(count)
            return {"text": 0.1 if right else 2.1, "n_text": len(targets), "image": 0.0, "n_image": 0}
        if not vocab.is_image_id(targets).any():  # an answer: which one, and is its category shown?
            scene = self.scene_of[tuple(ids[image].tolist())]
            shown = any(f"Is there {'an' if c[0] in 'aeiou' else 'a'} {c} in" in text
                        for c in {o.category for o in scene.scene.objects})  # fmt: skip
            says_yes = bool((targets == self.yes).any())
            nll = 0.1 if says_yes == (shown if self.image else True) else 2.1
            return {"text": nll, "n_text": len(targets), "image": 0.0, "n_image": 0}
        n = int(vocab.is_image_id(targets).sum())
        scene = self.scene_of[tuple(targets[vocab.is_image_id(targets)].tolist())]
        per_token = 1.0 if (scene.caption in text or not self.caption) else 2.0
        return {"text": 0.5, "n_text": 1, "image": per_token * n, "n_image": n}


def test_a_model_that_reads_the_image_and_caption_scores_above_one_that_ignores_them(world):
    diag = diagnostic_set(world)
    assert len(diag.questions) == 12 and [q.answer for q in diag.questions] == [True, False] * 6
    worded = balanced_questions(diag.scenes, 12, ask=lambda category: f"Can you see the {category}?")
    assert [(q.scene, q.answer) for q in worded] == [(q.scene, q.answer) for q in diag.questions]
    assert [q.question.split("the ")[1][:-1] for q in worded] == [q.question.split("Is there ")[1].split(" in the")[0].split(" ", 1)[1]
                                                          for q in diag.questions]  # fmt: skip
    reads = diag.image_dependence(Cheat(diag))
    assert reads["auc"] == 1.0 and reads["auc_swapped"] < 0.9
    assert reads["margin_yes"] == pytest.approx(2.0) and reads["margin_no"] == pytest.approx(-2.0)
    ignores = diag.image_dependence(Cheat(diag, image=False))
    assert ignores["auc"] == ignores["auc_swapped"] == 0.5
    assert ignores["margin_yes"] == ignores["margin_yes_swapped"] == ignores["margin_no"] == pytest.approx(2.0)
    captions = diag.caption_dependence(Cheat(diag))
    assert captions["scenes"] == 6 and captions["nll_true"] == 1.0 and captions["nll_empty"] == 2.0
    assert captions["gap"] == captions["gap_swapped"] == 1.0
    assert captions["gap_per_image"] == diag.builder.codes.grid(diag.scenes[0].image).semantic.numel()  # 1 nat a token
    blind = diag.caption_dependence(Cheat(diag, caption=False))
    assert blind["gap"] == blind["gap_swapped"] == 0.0
    described = diag.description_dependence(Cheat(diag))
    assert described == {"scenes": 6, "nll_real": 1.0, "nll_swapped": 3.0, "gap": 2.0, "share_real_lower": 1.0}
    blind = diag.description_dependence(Cheat(diag, image=False))
    assert blind["gap"] == 0.0 and blind["share_real_lower"] == 0.0


def test_count_accuracy_reads_the_count_off_the_image(world):
    """Balanced count questions (a held shape, then a lacked one, per scene); a scorer that counts what it is shown
    is always right with the real image and wrong on held shapes with most swapped ones; one that ignores the image
    (always "0") is right on every lacked shape and no held one."""
    diag = diagnostic_set(world, counts=12)
    asked = diag.counts
    assert len(asked) == 12 and [q.scene for q in asked] == [k // 2 for k in range(12)]
    assert all(q.answer != "0" for q in asked[::2]) and all(q.answer == "0" for q in asked[1::2])
    for q in asked:
        shape = next(s for s in SHAPES if f"How many {plural(s)} are" in q.question)
        assert q.answer == str(sum(o.shape == shape for o in diag.scenes[q.scene].scene.objects))
    assert [q.question for q in count_questions(diag.scenes, 12)] == [q.question for q in asked]  # seeded
    reads = diag.count_accuracy(Cheat(diag))
    assert reads["questions"] == 12 and reads["accuracy"] == reads["accuracy_held"] == reads["accuracy_lacked"] == 1.0
    assert reads["accuracy_held_swapped"] < 1.0 and 0 < reads["chance_held"] <= 1
    blind = diag.count_accuracy(Cheat(diag, image=False))
    assert blind["accuracy_held"] == blind["accuracy_held_swapped"] == 0.0 and blind["accuracy_lacked"] == 1.0
    with pytest.raises(DiagnosticsError, match="holds no count questions"):
        diagnostic_set(world).count_accuracy(Cheat(diag))
    with pytest.raises(DiagnosticsError, match="count questions an even number >= 0, got 12, 6 and 3"):
        diagnostic_set(world, counts=3)


def test_a_real_model_without_image_input_has_equal_real_and_swapped_margins(world):
    """The tiny random MLLM's margins move with the image it is shown; with the adapter's output zeroed every image
    embeds the same, and the real and swapped images give the same margins and AUC."""
    diag, model = diagnostic_set(world, questions=8, captions=2), tiny_mllm(world)
    seeing = diag.image_dependence(model)
    assert seeing["margin_yes"] != seeing["margin_yes_swapped"]
    with torch.no_grad():
        model.adapter.proj.weight.zero_()
        model.adapter.proj.bias.zero_()
    blind = diag.image_dependence(model)
    assert blind["auc"] == blind["auc_swapped"] and diag.description_dependence(model)["gap"] == pytest.approx(0, abs=1e-5)
    assert blind["margin_yes"] == pytest.approx(blind["margin_yes_swapped"], abs=1e-5)
    assert blind["margin_no"] == pytest.approx(blind["margin_no_swapped"], abs=1e-5)
    record = diag.log_record(model.train())
    assert set(record) == set(LOG_KEYS) and model.training  # the trainer's record; the mode is restored


@pytest.mark.parametrize("head", ["flat", "factorized"])
def test_image_token_nll_splits_each_tokens_nll_by_level_and_cell(world, head):
    """Per image target, semantic + texture NLL = the token's NLL: their sums per row are `sequence_nll`'s image sum
    for either head. The caption split's object / background means average back to the per-token NLL."""
    diag = diagnostic_set(world, questions=2, captions=3)
    torch.manual_seed(0)
    config = MLLMConfig(llm=str(world / "llm"), semhitok=str(world / "semhitok"), adapter_width_sem=16,
                        adapter_width_pix=8, head=head, head_width=16)  # fmt: skip
    model = SemHiTokLM.from_config(config).eval()
    samples = [diag._build(lambda s=s: diag.builder.generation(s.caption, s.image), s.image) for s in diag.scenes[:3]]
    per_token = score_image_tokens(model, samples, torch.device("cpu"), batch_size=2)
    sums = score(model, samples, torch.device("cpu"))
    grid = diag.builder.codes.grid(diag.scenes[0].image).semantic
    assert all(t.shape == (grid.numel(), 2) and (t >= 0).all() for t in per_token)
    assert [float(t.sum()) for t in per_token] == pytest.approx([x.image for x in sums], rel=1e-4)
    result = diag.caption_dependence(model, cells=True)
    share = result["object_cell_share"]
    assert 0 < share < 1
    for name in ("true", "empty"):
        mixed = sum((share if where == "object" else 1 - share) * result[f"nll_{name}_{where}_{level}"]
                    for where in ("object", "background") for level in ("semantic", "texture"))  # fmt: skip
        assert mixed == pytest.approx(result[f"nll_{name}"], rel=1e-4)
    assert "object_cell_share" not in diag.caption_dependence(model)  # opt-in: the trainer's cheap record skips it


@pytest.mark.parametrize("head", ["flat", "factorized"])
def test_the_forward_weights_image_targets_by_label_weights_per_level(world, head):
    """Object-cell weights (`SampleBuilder.generation(..., boxes, box_weight)`) reach the forward: image_semantic /
    image_texture are the label_weights-weighted means of the per-token levels (`image_token_nll`); without weights
    they sum to loss_image, which is never weighted (the logged NLL)."""
    diag = diagnostic_set(world, questions=2, captions=3)
    torch.manual_seed(0)
    config = MLLMConfig(llm=str(world / "llm"), semhitok=str(world / "semhitok"), adapter_width_sem=16,
                        adapter_width_pix=8, head=head, head_width=16)  # fmt: skip
    model = SemHiTokLM.from_config(config).eval()
    samples = [diag.builder.generation(s.caption, s.image, [o.bbox for o in s.scene.objects], 3.0) for s in diag.scenes[:3]]
    h, w = diag.builder.codes.grid(diag.scenes[0].image).semantic.shape[-2:]
    for s, sample in zip(diag.scenes, samples, strict=False):
        image = model.vocab.is_image_id(sample.labels)
        assert torch.equal(sample.weights[image], torch.from_numpy(object_cells(s.scene, h, w)) * 2.0 + 1.0)
    batch = collate_lm(samples, pad_id=0)
    inputs = [batch[k] for k in ("input_ids", "attention_mask", "labels")]
    with torch.no_grad():
        weighted, plain = model(*inputs, batch["label_weights"]), model(*inputs)
        per_token = torch.cat(model.image_token_nll(*inputs))  # (N, 2)
    weights = torch.cat([s.weights[model.vocab.is_image_id(s.labels)] for s in samples])
    want = (weights[:, None] * per_token).sum(0) / weights.sum()
    assert float(weighted["image_semantic"]) == pytest.approx(float(want[0]), rel=1e-4)
    assert float(weighted["image_texture"]) == pytest.approx(float(want[1]), rel=1e-4)
    assert float(plain["image_semantic"] + plain["image_texture"]) == pytest.approx(float(plain["loss_image"]), rel=1e-5)
    assert float(weighted["loss_image"]) == pytest.approx(float(plain["loss_image"]), rel=1e-6)
    assert float(plain["loss_image_texture"]) == pytest.approx(float(plain["image_texture"]), rel=1e-5)  # logged
    assert float(weighted["image_semantic"]) != pytest.approx(float(plain["image_semantic"]), rel=1e-4)


class Placer:
    """A scorer of image tokens that knows where each object is only when told by the right region words: every
    object cell costs 1 nat after the scene's true region description and 3 after any other caption (`knows_where`
    False: 1 after either, a model that draws what is named anywhere); background cells cost 0.5 either way."""

    def __init__(self, diag, knows_where: bool = True):
        self.diag, self.knows_where = diag, knows_where
        codes, vocab = diag.builder.codes, diag.builder.vocab
        self.scene_of = {tuple(vocab.to_ids(codes.grid(s.image))[0].tolist()): s for s in diag.scenes}

    def image_token_nll(self, input_ids, attention_mask, labels) -> list[torch.Tensor]:
        vocab, tokenizer, out = self.diag.builder.vocab, self.diag.builder.tokenizer, []
        for ids, mask, lab in zip(input_ids, attention_mask, labels, strict=True):
            ids, lab = ids[mask.bool()], lab[mask.bool()]
            targets = lab[vocab.is_image_id(lab)]
            s = self.scene_of[tuple(targets.tolist())]
            told = describe(s.scene) in tokenizer.decode(ids[~vocab.is_image_id(ids)]) or not self.knows_where
            h, w = self.diag.builder.codes.grid(s.image).semantic.shape[-2:]
            cells = torch.from_numpy(object_cells(s.scene, h, w))
            nll = torch.where(cells, 1.0 if told else 3.0, 0.5)
            out.append(torch.stack([nll / 2, nll / 2], dim=-1))  # (n_image, 2): the two levels share it
        return out


def test_layout_dependence_reads_whether_the_region_words_place_the_objects(world):
    """Object cells after the true vs the mirrored region description: 2 nats apart for a scorer that places objects by
    the region words, 0 for one that ignores them; background cells never move. Scenes whose objects are all centred
    (the mirror changes nothing) are left out."""
    diag = diagnostic_set(world, captions=12)
    placed = diag.layout_dependence(Placer(diag))
    kept = [s for s in diag.scenes if mirror_regions(describe(s.scene)) != describe(s.scene)]
    assert placed["scenes"] == len(kept) >= 2
    assert placed["nll_true_object"] == 1.0 and placed["nll_mirrored_object"] == 3.0 and placed["gap"] == 2.0
    assert placed["gap_background"] == 0.0 and placed["share_true_lower"] == 1.0
    blind = diag.layout_dependence(Placer(diag, knows_where=False))
    assert blind["gap"] == 0.0 and blind["share_true_lower"] == 0.0 and blind["nll_true_object"] == 1.0


def test_mirror_regions_swaps_sides_and_keeps_the_rest():
    d = "There are three objects on a light dotted background: a red circle at the top left, a blue star on the right and a green cross in the center."
    assert mirror_regions(d) == ("There are three objects on a light dotted background: a red circle at the bottom "
                                 "right, a blue star on the left and a green cross in the center.")  # fmt: skip
    assert mirror_regions(mirror_regions(d)) == d
    with pytest.raises(ValueError, match="not a region description"):
        mirror_regions("a red circle at the top left")


def test_object_cells_are_the_cells_a_box_overlaps():
    scene = Scene.from_dict({"objects": [{"shape": "circle", "color": "red", "center": [0.5, 0.5], "size": 0.25},
                                         {"shape": "star", "color": "blue", "center": [0.1, 0.9], "size": 0.16}],
                             "background": {"kind": "noise", "tones": [[130, 121, 128], [154, 145, 152]], "period": 0.12,
                                            "angle": 1.9, "seed": 1}})  # fmt: skip
    cells = object_cells(scene, 8, 8).reshape(8, 8)
    assert cells[3:5, 3:5].all() and cells[6:8, 0:2].all() and cells.sum() == 8  # a box edge on a cell edge: not in


def test_bad_held_out_data_is_named(world, tmp_path):
    with pytest.raises(DiagnosticsError, match="not a synthetic data folder .*render_synthetic.py"):
        read_scenes(tmp_path, 4)
    (tmp_path / "scenes.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(DiagnosticsError, match=r"scenes.jsonl:1: a scene record needs image, scene and captions"):
        read_scenes(tmp_path, 4)
    with pytest.raises(DiagnosticsError, match="yes/no questions must be an even number >= 2.* got 7, 6 and 0"):
        diagnostic_set(world, questions=7)
    with pytest.raises(DiagnosticsError, match=r"heldout holds 12 scenes; 40 yes/no and 0 count questions \(one scene "
                       r"per two\) and 6 caption scenes need 20"):  # fmt: skip
        diagnostic_set(world, questions=40)


# ---------------------------------------------------------------------------------------------------- command line


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    main = runpy.run_path(str(REPO / "eval" / "diagnose.py"), run_name="eval")["main"]
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_both_diagnostics_and_names_bad_input(world, tmp_path, capsys):
    common = ["--model", world / "mllm", "--data", world / "heldout", "--device", "cpu", "--precision", "fp32"]
    code, out, err = run_cli(["image-dependence", *common, "--n", "6", "--out", tmp_path / "image.json"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "image.json").read_text())
    assert result["questions"] == 6 and 0 <= result["auc"] <= 1 and 0 <= result["auc_swapped"] <= 1
    assert "auc_swapped" in out and "margin_no_swapped" in result
    code, out, err = run_cli(["caption-dependence", *common, "--n", "3", "--out", tmp_path / "caption.json"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "caption.json").read_text())
    assert result["scenes"] == 3 and result["gap"] == pytest.approx(result["nll_empty"] - result["nll_true"])
    assert 0 < result["object_cell_share"] < 1 and "nll_true_object_semantic" in result and "gap_background" in out
    code, out, err = run_cli(["image-dependence", *common, "--n", "4", "--question", "Can you see {object}?", "--out",
                              tmp_path / "worded.json"], capsys)  # fmt: skip
    assert code == 0, err
    worded = json.loads((tmp_path / "worded.json").read_text())
    assert worded["question"] == "Can you see {object}?" and worded["questions"] == 4
    code, _, err = run_cli(["image-dependence", *common, "--question", "Can you see it?"], capsys)
    assert code == 2 and "exactly one {object}" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["counts", *common, "--n", "4", "--out", tmp_path / "counts.json"], capsys)
    assert code == 0, err
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert counts["questions"] == 4 and 0 <= counts["accuracy_held_swapped"] <= 1 and "chance_held" in out
    code, out, err = run_cli(["counts", *common, "--n", "4", "--question", "How many {shapes} do you see?", "--out",
                              tmp_path / "counts-worded.json"], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "counts-worded.json").read_text())["question"] == "How many {shapes} do you see?"
    code, _, err = run_cli(["counts", *common, "--question", "How many {object}?"], capsys)
    assert code == 2 and "exactly one {shapes} (where 'stars' goes)" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["counts", *common, "--n", "30"], capsys)
    assert code == 2 and "30 count questions" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["layout-dependence", *common, "--n", "8", "--out", tmp_path / "layout.json"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "layout.json").read_text())
    assert 2 <= result["scenes"] <= 8 and result["gap"] == pytest.approx(result["nll_mirrored_object"] - result["nll_true_object"], abs=1e-5)
    assert "share_true_lower" in out
    code, out, err = run_cli(["description-dependence", *common, "--n", "3", "--out", tmp_path / "d.json"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "d.json").read_text())
    assert result["scenes"] == 3 and result["gap"] == pytest.approx(result["nll_swapped"] - result["nll_real"])
    for args, match in ((["image-dependence", *common, "--n", "5"], "an even number >= 2"),
                        (["image-dependence", *common[:3], tmp_path, "--n", "4"], "not a synthetic data folder"),
                        (["caption-dependence", "--model", tmp_path, "--data", world / "heldout"], "checkpoint"),
                        (["image-dependence", *common, "--n", "1"], "expected an integer >= 2")):  # fmt: skip
        code, _, err = run_cli(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "error:" in lines[0] and match in lines[0], err
