"""`make demo`'s script runs end to end as a user runs it (LLM step excluded here; it has its own slow test)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_script_runs_and_reports(tmp_path):
    cmd = [sys.executable, "scripts/demo.py", "--out", str(tmp_path), "--num", "6", "--size", "64", "--no-llm"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "exact detector on the clean renders" in proc.stdout and "Not done yet" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert min(report["synthetic"]["detector"].values()) >= 0.99
    assert len(list((tmp_path / "synthetic" / "images").glob("*.png"))) == 6
