"""The code passes ruff with the project's rule set ([tool.ruff] in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ruff() -> list[str] | None:
    """ruff beside this interpreter (the test extra installs it there), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "ruff")
    if os.path.isfile(here):
        return [here]
    found = shutil.which("ruff")
    return [found] if found else None


def test_ruff_finds_nothing():
    ruff = _ruff()
    if ruff is None:
        pytest.skip(reason="ruff is not installed (pip install -e '.[test]' installs it)")
    done = subprocess.run([*ruff, "check", "--no-cache", "gpl_cli", "tests", "bench", "tools"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"ruff found problems:\n{done.stdout}{done.stderr}"


def test_the_project_rules_are_the_ones_applied(tmp_path):
    """ruff reads [tool.ruff] from pyproject.toml: a planted unsorted, unused import is found."""
    ruff = _ruff()
    if ruff is None:
        pytest.skip(reason="ruff is not installed (pip install -e '.[test]' installs it)")
    planted = tmp_path / "planted.py"
    planted.write_text("import sys\nimport os\n")
    done = subprocess.run([*ruff, "check", "--no-cache", "--config", os.path.join(ROOT, "pyproject.toml"), str(planted)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "I001" in done.stdout and "F401" in done.stdout
