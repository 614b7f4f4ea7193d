"""`make demo`'s script, end to end as a user runs it, on the shipped demo checkpoints (small evaluation sizes)."""

import json
import subprocess
import sys
from importlib.util import find_spec, module_from_spec, spec_from_file_location
from pathlib import Path

import pytest

from mllm.synthetic.dataset import write_dataset

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
    assert report["geneval_expanded"]["images"] == 6
    pope = {task: scores for task, scores in report["lmms_eval"].items() if task.startswith("demo_pope_")}
    assert set(pope) == {"demo_pope_random", "demo_pope_popular", "demo_pope_adversarial"}
    assert all(0.0 <= s["pope_f1_score,none"] <= 1.0 for s in pope.values())
    assert "mme_perception_score,none" in report["lmms_eval"]["demo_mme"]
    tokenizer = report["tokenizer"]
    attributes = {k for k in tokenizer["detector"] if not k.startswith("shape_")}  # + per shape present, shape_<name>
    assert 10.0 < tokenizer["psnr"] < 60.0 and attributes == {"count", "shape", "color", "position"}


def test_a_failing_demo_step_is_one_line_naming_the_step_and_cause(tmp_path, monkeypatch, capsys):
    """The failure a fresh machine hit (lmms-eval importing a module a floating dependency removed): `make demo`
    must end with one line naming the step and the cause, keep the subprocess's output in a log, and keep what the
    earlier steps measured in report.json. Step 5's real commands run; the steps before it are skipped."""
    fake = tmp_path / "fake" / "lmms_eval"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'filelock._api'\")\n")
    (fake / "tasks").symlink_to(Path(find_spec("lmms_eval").origin).parent / "tasks")  # task files stay readable
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    demo = load_script("demo")
    heldout = write_dataset(tmp_path / "heldout", 2, 64, seed=5)

    def earlier_steps_then_lmms(args, prog, report, start):
        report["geneval"] = {"overall": 0.5}
        demo.lmms_step(demo.checkpoint_dir(None), heldout, args.out, 8)

    monkeypatch.setattr(demo, "run_steps", earlier_steps_then_lmms)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.split(": error: ", 1)[1].startswith("step 5 (POPE/MME through lmms-eval): run_lmms.py exited with status 1: "
                          "ModuleNotFoundError: No module named 'filelock._api' (full output: "), err  # fmt: skip
    assert "Traceback" in (tmp_path / "out" / "logs" / "run_lmms.log").read_text()  # the whole story is kept
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == {"geneval": {"overall": 0.5}}


def load_script(name: str):
    spec = spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
