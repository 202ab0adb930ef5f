"""The lint configuration in pyproject.toml ([tool.ruff]) holds: the suite runs `ruff check`."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_ruff_passes_on_the_package_the_tests_and_the_benchmarks():
    res = ruff("check", "--no-cache", "launcher", "tests", "bench", "examples")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_reads_the_projects_rules(tmp_path):
    """A control: the configuration is the one used (a blind except without a reason fails)."""
    bad = tmp_path / "bad.py"
    bad.write_text("try:\n    pass\nexcept Exception:\n    pass\n")
    res = ruff("check", "--no-cache", "--config", os.path.join(ROOT, "pyproject.toml"), str(bad))
    assert res.returncode == 1 and "BLE001" in res.stdout
