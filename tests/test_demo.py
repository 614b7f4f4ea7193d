"""`make demo`'s script, end to end as a user runs it, on the shipped demo checkpoints (small evaluation sizes)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_generates_answers_and_evaluates_the_shipped_checkpoint(tmp_path):
    cmd = [sys.executable, "scripts/demo.py", "--out", str(tmp_path), "--geneval-prompts", "6", "--heldout", "4",
           "--questions", "1", "--batch-size", "8"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in range(1, 7):
        assert f"[{step}]" in proc.stdout, proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checkpoint"].endswith("mllm/demo/mllm")
    assert len(list((tmp_path / "generate").glob("grid-*.png"))) == 4  # one image per demo prompt, plus grid.png
    assert len(report["questions"]) == 2 and all(qa["answer"] for qa in report["questions"])
    summary = report["geneval"]
    assert summary["images"] == 6 and set(summary["tags"]) <= {"single_object", "two_object", "counting", "colors",
                                                                "position", "color_attr"}  # fmt: skip
    assert 0.0 <= summary["overall"] <= 1.0
    pope = {task: scores for task, scores in report["lmms_eval"].items() if task.startswith("demo_pope_")}
    assert set(pope) == {"demo_pope_random", "demo_pope_popular", "demo_pope_adversarial"}
    assert all(0.0 <= s["pope_f1_score,none"] <= 1.0 for s in pope.values())
    assert "mme_perception_score,none" in report["lmms_eval"]["demo_mme"]
    tokenizer = report["tokenizer"]
    assert 10.0 < tokenizer["psnr"] < 60.0 and set(tokenizer["detector"]) == {"count", "shape", "color", "position"}
