"""ruff (lint + import order, configured in pyproject.toml) is clean on v4lab/, kernels/ and tests/."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["v4lab", "kernels", "tests"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_is_the_pinned_version():
    pin = re.search(r"^ruff==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert pin, "requirements.txt must pin ruff"
    got = _ruff("--version")
    assert got.returncode == 0, f"ruff is not installed (pip install -r requirements.txt): {got.stderr.strip()}"
    installed = got.stdout.split()[-1]
    assert installed == pin.group(1), f"ruff {installed} installed, requirements.txt pins {pin.group(1)}"


def test_ruff_check_is_clean():
    got = _ruff("check", "--no-cache", "--output-format", "concise", *PATHS)
    assert got.returncode == 0, f"ruff check {' '.join(PATHS)}:\n{got.stdout}{got.stderr}"


def test_ruff_sees_a_violation(tmp_path):
    """The configuration is the project's and it does flag things: an unsorted, unused import fails."""
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n")
    got = _ruff("check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), "--output-format", "concise",
                str(bad))
    assert got.returncode == 1 and "F401" in got.stdout and "I001" in got.stdout, got.stdout
