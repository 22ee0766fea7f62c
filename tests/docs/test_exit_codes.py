"""The exit-status table of docs/exit-codes.md against gpl_cli.errors: every status the code defines is
documented under its own constant's name and number, and the page documents no other."""

from __future__ import annotations

import re

from conftest import REPO

from gpl_cli import errors

PAGE = REPO / "docs" / "exit-codes.md"
ROW = re.compile(r"^\| (\d+) \| `(EXIT_[A-Z_]+)` \|", re.M)


def documented() -> dict[str, int]:
    text = PAGE.read_text(encoding="utf-8")
    reference = text[text.index("\n## Reference\n"):]
    rows = ROW.findall(reference)
    names = [name for _, name in rows]
    assert len(names) == len(set(names)), f"a constant is documented twice: {names}"
    return {name: int(status) for status, name in rows}


def test_the_table_lists_every_exit_status_of_the_code_with_its_number():
    defined = {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert documented() == defined

