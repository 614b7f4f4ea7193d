"""Learning curves: log.jsonl records grouped by prefix, bookkeeping left out, one PNG per run."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from semhitok.runtime.plots import read_curves

REPO = Path(__file__).resolve().parents[1]


def write_log(path: Path) -> None:
    rows = [{"step": s, "loss": 2.0 / s, "loss_text": 1.0 / s, "lr": 1e-3, "sec_per_step": 0.1} for s in range(1, 6)]
    rows += [{"step": 5, "holdout/psnr": 21.5, "probe/shape": 0.7}, {"step": 5, "loss": float("nan")}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "half a line cut by a kill")


def test_curves_are_grouped_by_prefix_and_skip_bookkeeping(tmp_path):
    write_log(tmp_path / "log.jsonl")
    curves = read_curves(tmp_path / "log.jsonl")
    assert set(curves) == {"train", "holdout", "probe"}
    assert set(curves["train"]) == {"loss", "loss_text"}  # lr and timings left out, the NaN record skipped
    assert curves["train"]["loss"] == ([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 2 / 3, 0.5, 0.4])
    assert curves["probe"]["probe/shape"] == ([5.0], [0.7])


def test_script_writes_a_png_and_names_a_missing_log(tmp_path):
    write_log(tmp_path / "log.jsonl")
    ok = subprocess.run([sys.executable, "scripts/plot_run.py", str(tmp_path)], cwd=REPO, capture_output=True,
                        text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    with Image.open(tmp_path / "curves.png") as png:
        assert png.size[0] >= 600 and png.size[1] >= 3 * 200  # three panels
    bad = subprocess.run([sys.executable, "scripts/plot_run.py", str(tmp_path / "none")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().endswith("or train_mllm.py") and "Traceback" not in bad.stderr


def test_stages_are_drawn_one_after_another(tmp_path):
    """Several runs (a staged recipe): each starts where the one before ended; --groups keeps some panels; a group
    no log has is named."""
    from semhitok.runtime.plots import stage_offsets

    for stage in ("align", "instruct"):
        (tmp_path / stage).mkdir()
        write_log(tmp_path / stage / "log.jsonl")
    stages = [read_curves(tmp_path / s / "log.jsonl") for s in ("align", "instruct")]
    assert stage_offsets(stages) == [0.0, 5.0] and stage_offsets([{}, stages[0]]) == [0.0, 0.0]
    runs = [str(tmp_path / "align"), str(tmp_path / "instruct")]
    ok = subprocess.run([sys.executable, "scripts/plot_run.py", *runs, "--groups", "train", "probe", "--out",
                         str(tmp_path / "stages.png")], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    with Image.open(tmp_path / "stages.png") as png:
        assert 2 * 200 <= png.size[1] < 3 * 200  # two panels
    bad = subprocess.run([sys.executable, "scripts/plot_run.py", *runs, "--groups", "diag"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "no metric records in groups diag" in bad.stderr and "Traceback" not in bad.stderr
