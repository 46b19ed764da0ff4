"""The README's `lossd quality` sample runs as the README says, and finds the kinds of errors injected into it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quality_sample_from_the_readme(tmp_path):
    sample = ROOT / "examples" / "quality"
    assert "lossd quality examples/quality/labels.json examples/quality/predictions.json" in \
        (ROOT / "README.md").read_text()
    done = subprocess.run([sys.executable, "-m", "lossd.cli", "quality", str(sample / "labels.json"),
                           str(sample / "predictions.json"), "--out", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    issues = summary["by_issue"]
    assert issues.get("ok", 0) > 100 and sum(v for k, v in issues.items() if k != "ok") > 5, issues
    assert (tmp_path / "out" / "report.html").stat().st_size > 1000
