"""CI runs what the README tells a newcomer to run: its two opening commands, verbatim, in that order."""

from __future__ import annotations

import re

from conftest import REPO


def test_ci_runs_the_readme_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    setup, suite = [block.strip() for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)[:2]]
    assert "gpl embed" in setup and "pytest" in suite
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert setup in lines and suite in lines
    assert lines.index(setup) < lines.index(suite) == len(lines) - 1, "the suite is the last thing CI runs"
