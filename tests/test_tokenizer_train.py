"""Tokenizer training on the tiny preset: the script through stages 1 -> 2 -> 2b, exact resume, crash safety,
torchrun, checkpoints, the baselines and every bad input named in the issue."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from semhitok.config import PRESETS, TeacherConfig
from semhitok.model import SemHiTok
from semhitok.runtime.checkpoint import (
    COMPLETE,
    flatten_state,
    latest_checkpoint,
    load_checkpoint,
    restore_optimizer,
    save_checkpoint,
    unflatten_state,
)
from semhitok.runtime.configio import ConfigError
from semhitok.teachers import build_teacher
from semhitok.train import (
    CachedTeacher,
    TokenizerRunConfig,
    TokenizerTrainer,
    build_model,
    in_holdout,
    load_run_config,
    train,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_tokenizer.py"
TINY_YAML = REPO / "configs" / "tokenizer" / "tiny.yaml"
SEMANTIC_PREFIXES = ("semantic_encoder.", "semantic_head.", "semantic_decoder.", "quantizer.semantic.")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is faster, and the cores are shared
FAST = ["train.steps=4", "train.log_every=2", "train.ckpt_every=2", "train.sample_every=4", "train.keep_last=1",
        "train.data.batch_size=4", "train.data.holdout_fraction=0.2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """16 smooth 48x40 PNGs and one corrupt file (skipped and counted), in a flat folder."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        low = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
        Image.fromarray(low).resize((48, 40), Image.Resampling.BILINEAR).save(root / f"img{i:02d}.png")
    (root / "zz_bad.png").write_bytes(b"not a png")
    return root


def tiny(images: Path, out: Path, *overrides: str) -> TokenizerRunConfig:
    return load_run_config(TINY_YAML, [f"train.data.train=[{images}]", f"out_dir={out}", *FAST, *overrides])


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(TINY_YAML), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


def script_args(images: Path, out: Path, *overrides: str) -> list[str]:
    return [f"train.data.train=[{images}]", f"out_dir={out}", *FAST, *overrides]


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def stages(images, tmp_path_factory) -> dict[str, Path]:
    """The script run for stage 1, then 2 from 1's export, then 2b from 2's: {stage: out_dir}."""
    root = tmp_path_factory.mktemp("stages")
    outs = {s: root / f"stage{s}" for s in ("1", "2", "2b")}
    previous = {"2": outs["1"], "2b": outs["2"]}
    for stage, out in outs.items():
        init = [f"train.init_from={previous[stage] / 'model'}"] if stage in previous else []
        result = run_script(*script_args(images, out, f"train.stage={stage}", *init))
        assert result.returncode == 0, result.stderr
    return outs


# ------------------------------------------------------------------------------------------ stages via the script


def test_script_trains_three_stages_with_logs_and_samples(stages, images):
    bad_in_train = not in_holdout("zz_bad.png", 0.2, 0)
    for stage, out in stages.items():
        assert (out / "model" / "config.json").is_file() and (out / "config.yaml").is_file()
        saved = load_run_config(out / "config.yaml")  # the resolved config, loadable as it is
        assert saved.train.stage == stage and saved.model == PRESETS["semhitok-tiny"]
        train_logs = [r for r in log_records(out) if "loss" in r]
        assert [r["step"] for r in train_logs] == [2, 4]
        assert all(np.isfinite(r["loss"]) for r in train_logs)
        assert train_logs[-1]["num_skipped_total"] == int(bad_in_train)
        assert [c.name for c in (out / "checkpoints").iterdir()] == ["step-000004"]  # keep_last=1
    s1, s2 = log_records(stages["1"])[-2], log_records(stages["2"])[-2]
    assert {"semantic/cosine", "semantic/usage", "semantic/perplexity"} <= set(s1)
    assert {"l1", "texture/usage", "texture/perplexity", "semantic/perplexity", "d_loss", "g_loss"} <= set(s2)
    assert "holdout/semantic_cosine" in log_records(stages["1"])[-1]
    assert not (stages["1"] / "samples").exists()  # stage 1: no meaningful pixel decoder
    for stage in ("2", "2b"):
        grid = Image.open(stages[stage] / "samples" / "step-000004.png")
        assert grid.size[1] == 2 * 32  # originals over reconstructions
    assert SemHiTok.from_pretrained(stages["2b"] / "model").config.pixel.use_enhance_decoder


def test_later_stages_keep_frozen_parts_bit_identical(stages):
    w1, w2, w2b = (weights(stages[s] / "model") for s in ("1", "2", "2b"))
    semantic = [k for k in w1 if k.startswith(SEMANTIC_PREFIXES)]
    assert semantic and all(torch.equal(w1[k], w2[k]) for k in semantic)
    kept = [k for k in w2 if not k.startswith("pixel_decoder.")]
    assert all(torch.equal(w2[k], w2b[k]) for k in kept)
    assert any(not torch.equal(w1[k], w2[k]) for k in w2 if k.startswith("pixel_encoder."))  # stage 2 did train


def test_stage_2b_continues_an_enhance_decoder_of_the_same_shape_with_a_fixed_gan_weight(stages, images, tmp_path):
    src = weights(stages["2b"] / "model")
    run = tiny(images, tmp_path / "more", "train.stage=2b", f"train.init_from={stages['2b'] / 'model'}", "train.steps=2",
               "model.loss.gan_adaptive_weight=false", "model.loss.gan_weight=0.25")
    model = build_model(run, resuming=False)
    model.use_enhance_decoder()  # what stage 2b's objective does first: the same shape keeps the weights
    kept = {k: v for k, v in model.state_dict().items() if k.startswith("pixel_decoder.")}
    assert kept and all(torch.equal(v, src[k]) for k, v in kept.items())
    train(run)
    logged = [r for r in log_records(tmp_path / "more") if "adaptive_weight" in r]
    assert logged and all(r["adaptive_weight"] == 1.0 for r in logged)  # LlamaGen's fixed weight: gan_weight alone
    after = weights(tmp_path / "more" / "model")
    assert any(not torch.equal(after[k], src[k]) for k in kept)  # and it trains on from there


# ----------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stage", ["1", "2"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(stage, stages, images, tmp_path):
    extra = ["train.sample_every=0", "train.ckpt_every=0", "train.log_every=100"]
    if stage == "2":
        extra += ["train.stage=2", f"train.init_from={stages['1'] / 'model'}"]
    train(tiny(images, tmp_path / "straight", "train.steps=7", *extra))  # crosses an epoch (3 batches each)
    train(tiny(images, tmp_path / "resumed", "train.steps=4", *extra))
    train(tiny(images, tmp_path / "resumed", "train.steps=7", *extra))
    a, meta_a = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    b, meta_b = load_checkpoint(latest_checkpoint(tmp_path / "resumed"))
    assert meta_a["step"] == meta_b["step"] == 7 and meta_a["batches_seen"] == meta_b["batches_seen"]
    for group in a:
        if group != "rng":
            assert a[group].keys() == b[group].keys()
            assert all(torch.equal(a[group][k], b[group][k]) for k in a[group]), group
    assert all(torch.equal(v, weights(tmp_path / "resumed" / "model")[k])
               for k, v in weights(tmp_path / "straight" / "model").items())


def test_sigkill_during_training_resumes_and_finishes(images, tmp_path):
    out = tmp_path / "run"
    args = script_args(images, out, "train.steps=60", "train.ckpt_every=5", "train.log_every=5",
                       "train.sample_every=0", "train.keep_last=2")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(TINY_YAML), *args], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while latest_checkpoint(out) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    result = run_script(*args)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    steps = [r["step"] for r in log_records(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # no step logged twice
    assert load_checkpoint(latest_checkpoint(out))[1]["step"] == 60


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_are_atomic_pruned_and_pickle_free(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"model": model.state_dict(), "optimizer": flatten_state(opt.state_dict())},
                        {"note": "x"}, keep_last=2)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000003"]
    shutil.copytree(ckpts / "step-000003", ckpts / "step-000009")
    (ckpts / "step-000009" / COMPLETE).unlink()  # half-written: no marker
    shutil.copytree(ckpts / "step-000003", ckpts / ".step-000010-tmp1234")  # a killed writer's temp folder
    assert latest_checkpoint(tmp_path) == ckpts / "step-000003"
    assert all(f.suffix in (".safetensors", ".json") or f.name == COMPLETE for f in ckpts.rglob("*") if f.is_file())
    groups, meta = load_checkpoint(ckpts / "step-000003")
    assert meta == {"note": "x", "step": 3} and set(groups) == {"model", "optimizer", "rng"}
    fresh = torch.optim.AdamW(model.parameters())
    restore_optimizer(fresh, groups["optimizer"])
    assert fresh.param_groups[0]["betas"] == (0.8, 0.95)
    assert all(torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"]) for p in model.parameters())
    (ckpts / "step-000003" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="damaged"):
        load_checkpoint(ckpts / "step-000003")


def test_flatten_state_round_trips_nested_python_and_numpy():
    state = {"a": (1, 2.5, None), 3: [torch.arange(3), {"x": np.arange(4, dtype=np.uint32)}], "s": "t"}
    back = unflatten_state(flatten_state(state))
    assert back["a"] == (1, 2.5, None) and back["s"] == "t" and torch.equal(back[3][0], torch.arange(3))
    assert back[3][1]["x"].dtype == np.uint32 and back[3][1]["x"].tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------- torchrun / DDP


@pytest.mark.parametrize("stage", [pytest.param("1", marks=pytest.mark.slow), "2"])
def test_torchrun_two_processes(stage, stages, images, tmp_path):
    """Stage 1: pixel branch frozen under DDP, k-means init broadcast; stage 2: DDP generator + discriminator."""
    init = [f"train.init_from={stages['1'] / 'model'}"] if stage == "2" else []
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", str(SCRIPT), "--config",
           str(TINY_YAML), *script_args(images, tmp_path, "train.data.batch_size=2", f"train.stage={stage}", *init)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert [r["step"] for r in log_records(tmp_path) if "loss" in r] == [2, 4]


# --------------------------------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("kind", ["flat", "shared"])
def test_baselines_train_stage2_on_the_same_semantic_branch(kind, stages, images, tmp_path):
    model_dir = train(tiny(images, tmp_path, "train.stage=2", f"train.init_from={stages['1'] / 'model'}",
                           f"model.quantizer.kind={kind}", "train.steps=2", "train.sample_every=2"))
    model = SemHiTok.from_pretrained(model_dir)
    assert model.config.quantizer.kind == kind and model.config.vocab_size == PRESETS["semhitok-tiny"].vocab_size
    w1, wb = weights(stages["1"] / "model"), weights(model_dir)
    semantic = {k.replace("quantizer.semantic.", "stage1_quantizer."): v for k, v in w1.items()
                if k.startswith(SEMANTIC_PREFIXES)}
    assert semantic and all(torch.equal(v, wb[k]) for k, v in semantic.items())
    assert "codebook/usage" in log_records(tmp_path)[0]


# ----------------------------------------------------------------------------------------------------- helpers


def test_holdout_split_is_stable_and_about_the_right_size():
    names = [f"class{i % 7}/img{i}.jpg" for i in range(4000)]
    held = [n for n in names if in_holdout(n, 0.1, 0)]
    assert 300 < len(held) < 500
    assert held == [n for n in names + ["new/one.jpg"] if in_holdout(n, 0.1, 0) and n != "new/one.jpg"]
    assert held != [n for n in names if in_holdout(n, 0.1, 1)]


def test_cached_teacher_matches_the_teacher_and_computes_each_image_once():
    inner = build_teacher(TeacherConfig(kind="tiny_vit", dim=32, image_size=32), grid=4)
    calls = []
    original = inner.features
    inner.features = lambda x: calls.append(len(x)) or original(x)
    cached = CachedTeacher(inner)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.allclose(cached.features(x), original(x), atol=1e-6)
    both = torch.cat([x[2:], torch.rand(1, 3, 32, 32)])
    assert torch.allclose(cached.features(both), original(both), atol=1e-6)
    assert calls == [4, 1]


# -------------------------------------------------------------------------------------------------- bad inputs


def test_script_errors_are_one_line_with_exit_code_2(tmp_path):
    result = run_script(f"train.data.train=[{tmp_path / 'missing'}]", f"out_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_inputs_give_clear_errors(stages, images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    SemHiTok.from_pretrained(stages["1"] / "model").save_pretrained(tmp_path / "package", training_only=False)
    cases = [
        (["train.data.train=[]"], "at least one image folder"),
        ([f"train.data.train=[{empty}]"], r"train\.data\.train\[0\].*no image files"),
        (["train.stage=2"], "needs train.init_from"),
        (["train.stage=2", f"train.init_from={tmp_path / 'nope'}"], "not found"),
        (["train.stage=2", f"train.init_from={stages['1'] / 'model'}", "model.semantic.codebook_size=16"],
         r"different architecture.*semantic\.codebook_size: 32 vs 16"),
        (["train.stage=2b", f"train.init_from={stages['2b'] / 'model'}", "model.pixel.enhance_ch=24"],
         r"enhance decoder of another shape.*pixel\.enhance_ch: 32 vs 24"),
        (["train.stage=2", f"train.init_from={tmp_path / 'package'}"],
         "is an inference package without semantic_decoder"),
        (["train.data.batch_size=64"], "training images for batch_size 64"),
        (["model.teacher.kind=inception", "model.teacher.layer=mixed_7", "model.teacher.dim=768",
          "model.teacher.image_size=299", f"model.teacher.path={tmp_path / 'none.pt'}"],
         "model.teacher: Inception-v3 TorchScript not found"),
        (["model.teacher.kind=inception", "model.teacher.layer=mixed_7", "model.teacher.dim=768"],
         r"model.teacher: Inception-v3 needs teacher.image_size >= 75 \(it was trained at 299\), got 32"),
    ]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message):
            train(tiny(images, tmp_path / f"out{i}", *overrides))
    for overrides, message in ((["preset=semhitok-tiny"], "unknown key"), (["train.stage=3"], "train.stage")):
        with pytest.raises(ConfigError, match=message):
            tiny(images, tmp_path, *overrides)


def test_resume_with_a_different_config_is_refused(stages, images):
    out = stages["1"]
    with pytest.raises(ConfigError, match=r"different config.*train\.optim\.lr"):
        train(tiny(images, out, "train.optim.lr=0.5"))


def test_every_shipped_config_loads():
    for path in sorted([*(REPO / "configs" / "tokenizer").rglob("*.yaml"), *(REPO / "configs" / "demo").rglob("tok*.yaml")]):
        run = load_run_config(path)
        assert run.train.stage in ("1", "2", "2b") and (run.train.stage == "1") != bool(run.train.init_from), path


def test_unknown_preset_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: semhitok-huge\nout_dir: x\n")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_run_config(path)


@pytest.mark.parametrize("stage", ["1", "2"])
def test_a_bf16_step_matches_fp32_within_a_stated_tolerance(stage, stages, images, tmp_path):
    """precision bf16 (autocast; DESIGN §8) vs fp32 on the same batch and weights. Stated tolerance: the step's loss
    within 3 %; stage 1: the gradient direction within cosine 0.98; stage 2: >= 85 % of patches get the same code
    (a near-tie between two codes may flip under bf16; the decoder then sees another code there, so its gradient
    direction is not comparable in a random-init model)."""
    init = [f"train.stage={stage}"] + ([f"train.init_from={stages['1'] / 'model'}"] if stage == "2" else [])
    results = {}
    for precision in ("fp32", "bf16"):
        trainer = TokenizerTrainer(tiny(images, tmp_path / precision, *init, f"train.precision={precision}"))
        assert trainer.precision.bf16 == (precision == "bf16")
        batch = torch.stack([item["image"] for item in map(trainer.loader.dataset.__getitem__, range(5))
                             if isinstance(item, dict)][:4])  # fmt: skip
        with torch.no_grad(), trainer.precision.autocast(trainer.device):
            codes = trainer.raw.encode(batch).flat(trainer.cfg.m) if stage == "2" else None
        loss = trainer.train_step(batch)["loss"].item()
        results[precision] = loss, codes, torch.cat([p.grad.flatten() for p in trainer.params if p.grad is not None])
    (loss32, codes32, grad32), (loss16, codes16, grad16) = results["fp32"], results["bf16"]
    assert abs(loss16 - loss32) <= 0.03 * abs(loss32), (loss16, loss32)
    if stage == "1":
        assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.98
    else:
        assert (codes16 == codes32).float().mean() >= 0.85


def test_code_probes_and_learning_curves_during_training(images, tmp_path):
    """train.probe.data (a probe.jsonl as the synthetic dataset writes it): the teacher's probe row at step 0, the
    student's / codes' at every sample step, in log.jsonl; the run draws curves.png at the end."""
    from mllm.synthetic.dataset import write_dataset

    probe = write_dataset(tmp_path / "probe", 24, 32, seed=4) / "probe.jsonl"
    out = tmp_path / "run"
    train(tiny(images, out, f"train.probe.data={probe}", "train.probe.images=20", "train.probe.epochs=2",
               "train.probe.representations=[student,semantic_codes]"))  # fmt: skip
    records = log_records(out)
    teacher = [r for r in records if "probe/teacher/shape" in r]
    live = [r for r in records if "probe/semantic_codes/shape" in r]
    assert [r["step"] for r in teacher] == [0] and [r["step"] for r in live] == [4]
    tasks = {k.rsplit("/", 1)[1] for k in live[0] if k.startswith("probe/student/")}
    assert tasks == {"count", "color", "shape", "position", "category"}
    assert all(0.0 <= v <= 1.0 for k, v in live[0].items() if k.startswith("probe/"))
    assert (out / "curves.png").stat().st_size > 10_000
    with pytest.raises(ConfigError, match="train.probe.data: .*missing.jsonl"):
        train(tiny(images, tmp_path / "bad", f"train.probe.data={tmp_path / 'missing.jsonl'}"))


def test_a_whitened_stage1_fits_its_targets_once_and_keeps_them_on_resume(images, tmp_path):
    """semantic.target whitened: the whitener is fitted on the training images of a fresh run, saved in the model and
    in checkpoints, and a resumed run goes on with the saved one (bit-identical to an uninterrupted run)."""
    extra = ["model.semantic.target=whitened", "model.semantic.target_dims=8", "train.sample_every=0",
             "train.ckpt_every=0", "train.log_every=1"]  # fmt: skip
    train(tiny(images, tmp_path / "straight", "train.steps=5", *extra))
    train(tiny(images, tmp_path / "resumed", "train.steps=3", *extra))
    train(tiny(images, tmp_path / "resumed", "train.steps=5", *extra))
    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "resumed" / "model")
    assert bool(a["target_whitener.fitted"]) and a["target_whitener.basis"].shape == (32, 8)
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert "semantic/mse" in log_records(tmp_path / "straight")[0]
    assert SemHiTok.from_pretrained(tmp_path / "straight" / "model").target_whitener.fitted


# ------------------------------------------------------------------------------------------------------ tensorboard


def tensorboard_events(out: Path) -> list:
    """Every event of out/tensorboard, file by file in name (= time) order, each record's length and data checked
    against their CRCs (tensorboardX's masked crc32c: a TFRecord the writer did not frame fails here)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    events = []
    for path in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (n,), (crc,) = struct.unpack_from("<Q", data, at), struct.unpack_from("<I", data, at + 8)
            body, (body_crc,) = data[at + 12 : at + 12 + n], struct.unpack_from("<I", data, at + 12 + n)
            assert crc == masked_crc32c(data[at : at + 8]) and body_crc == masked_crc32c(body), path
            events.append(Event.FromString(body))
            at += n + 16
    return events


def tensorboard_matches_log(out: Path) -> list[tuple[int, str, float]]:
    """Asserts that out/tensorboard holds exactly the numbers of out/log.jsonl as scalars at their steps (float32, as
    TensorBoard stores them; text and the step itself are not scalars); returns them as (step, tag, value)."""
    board = [(e.step, v.tag, v.simple_value) for e in tensorboard_events(out) for v in e.summary.value]
    logged = [(r["step"], k, float(np.float32(v))) for r in log_records(out) for k, v in r.items()
              if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]  # fmt: skip
    assert board == logged and board
    return board


def test_tensorboard_holds_the_logged_numbers_and_a_resume_writes_each_step_once(images, tmp_path):
    """train.tensorboard: every number of log.jsonl as a scalar at its step. A run killed after step 4's logs but
    before its checkpoint resumes from step 2: the events after 2 are cut (as log.jsonl is), steps 3-6 written once,
    in a new event file that opens with TensorBoard's restart marker (purge from step 3 on)."""
    out = tmp_path / "run"
    train(tiny(images, out, "train.tensorboard=true", "train.keep_last=0"))
    board = tensorboard_matches_log(out)
    tags = {tag for _, tag, _ in board}
    assert {"loss", "lr", "grad_norm", "semantic/cosine", "holdout/semantic_cosine", "epoch"} <= tags
    shutil.rmtree(out / "checkpoints" / "step-000004")  # killed between step 4's log records and its checkpoint
    train(tiny(images, out, "train.tensorboard=true", "train.keep_last=0", "train.steps=6"))
    board = tensorboard_matches_log(out)
    assert [s for s, tag, _ in board if tag == "loss"] == [2, 4, 6]
    assert len(list((out / "tensorboard").iterdir())) == 2
    restart = [e for e in tensorboard_events(out) if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in restart] == [(1, 1), (3, 1)]  # SessionLog.START


def test_tensorboard_without_its_package_is_a_one_line_config_error(images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` raises ImportError
    with pytest.raises(ConfigError, match=r"^train.tensorboard needs the tensorboardX package: `pip install "
                                          r"tensorboardX` \(the `tensorboard` extra[^\n]*$"):  # fmt: skip
        TokenizerTrainer(tiny(images, tmp_path, "train.tensorboard=true"))
    assert not tmp_path.joinpath("tensorboard").exists()
