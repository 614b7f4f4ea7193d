"""Code probes (#13): the attribute probe learns what a representation carries and nothing more, the synthetic
targets match the scenes, and eval/probe_codes.py reports every representation side by side."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.synthetic.dataset import sample_dataset_scenes
from mllm.synthetic.probe_targets import probe_targets
from mllm.synthetic.scene import COLORS, SHAPES
from semhitok import PRESETS, SemHiTok
from semhitok.attribute_probe import PROBE_REPRESENTATIONS, code_representations, probe_table

REPO = Path(__file__).resolve().parents[1]


def test_targets_follow_the_scenes():
    scenes, _, _ = sample_dataset_scenes(50, np.random.default_rng(3))
    t = probe_targets(scenes)
    assert t["count"].tolist() == [len(s.objects) - 1 for s in scenes]
    for row, scene in enumerate(scenes):
        assert {COLORS[i] for i in t["color"][row].nonzero().flatten()} == {o.color for o in scene.objects}
        assert {SHAPES[i] for i in t["shape"][row].nonzero().flatten()} == {o.shape for o in scene.objects}
        assert t["category"][row].sum() == len({o.category for o in scene.objects})
        assert 1 <= t["position"][row].sum() <= len(scene.objects)


def test_the_probe_reads_a_planted_signal_and_not_noise():
    """Patches that carry the labels are read: a class and a presence vector spread over every patch (as an
    attribute covering the image), and which patch is bright (as a position); pure noise stays near chance. So the
    probe measures the representation, not itself."""
    g = torch.Generator().manual_seed(0)
    n, patches, dim = 400, 16, 24
    labels = torch.randint(0, 4, (n,), generator=g)
    present = (torch.rand(n, 6, generator=g) < 0.3).float()
    where = torch.randint(0, patches, (n,), generator=g)
    noise = torch.randn(n, patches, dim, generator=g)
    signal = noise.clone()
    signal[:, :, :4] += 1.5 * torch.nn.functional.one_hot(labels, 4)[:, None]
    signal[:, :, 4:10] += 1.5 * present[:, None]
    signal[torch.arange(n), where, 10:] += 3.0
    targets = {"count": labels, "shape": present, "where": where}
    table = probe_table({"signal": signal, "noise": noise}, targets, torch.arange(300), torch.arange(300, n), epochs=30)
    assert table["signal"]["count"] > 0.85 and table["signal"]["shape"] > 0.85 and table["signal"]["where"] > 0.9
    assert table["noise"]["count"] < table["chance"]["count"] + 0.15
    assert table["noise"]["shape"] < table["chance"]["shape"] + 0.08
    assert table["noise"]["where"] < table["chance"]["where"] + 0.1


def test_code_representations_have_one_row_per_patch():
    torch.manual_seed(0)
    model = SemHiTok(PRESETS["semhitok-tiny"]).train()
    reps = code_representations(model, torch.rand(3, 3, 32, 32) * 2 - 1)
    c = model.config
    dims = {"teacher": c.teacher.dim, "student": c.semantic.d_sem, "semantic_codes": c.semantic.d_sem,
            "texture_codes": c.pixel.d_pix, "both_codes": c.semantic.d_sem + c.pixel.d_pix}  # fmt: skip
    assert {k: tuple(v.shape) for k, v in reps.items()} == {k: (3, c.grid**2, d) for k, d in dims.items()}
    assert model.training  # left as it was found
    grid = model.encode(torch.zeros(1, 3, 32, 32))
    assert grid.semantic.shape == (1, c.grid, c.grid)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "model"
    SemHiTok(PRESETS["semhitok-tiny"]).save_pretrained(path)
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "eval/probe_codes.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_script_reports_every_representation_on_synthetic_scenes(tiny_checkpoint, tmp_path):
    proc = run("--checkpoint", str(tiny_checkpoint), "--scenes", "40", "--epochs", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "probe_codes.json").read_text())
    assert (result["images"], result["train"], result["test"]) == (40, 32, 8)
    assert set(result["accuracy"]) == {*PROBE_REPRESENTATIONS, "chance"}
    assert all(set(row) == {"count", "color", "shape", "position", "category"} for row in result["accuracy"].values())
    assert all(0.0 <= v <= 1.0 for row in result["accuracy"].values() for v in row.values())
    assert "both_codes" in proc.stdout and "chance" in proc.stdout


def test_script_on_a_labelled_image_folder_and_bad_input(tiny_checkpoint, tmp_path):
    for c, colour in enumerate(((255, 0, 0), (0, 0, 255))):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40, 40), tuple(max(0, v - 20 * i) for v in colour)).save(tmp_path / "data" / f"class{c}" / f"{i}.png")
    proc = run("--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path / "data"), "--epochs", "2", "--out",
               str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads((tmp_path / "out" / "probe_codes.json").read_text())["accuracy"]["teacher"]) == {"class"}
    bad = run("--checkpoint", str(tmp_path / "nothing"), "--scenes", "40")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
