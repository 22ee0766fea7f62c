"""The guide covers every command and every option: each `gpl COMMAND` and each of its long options
(`--pool`, ...) appears somewhere in docs/*.md. A new option without a word in the guide fails here."""

from __future__ import annotations

import click
import pytest
from conftest import REPO

from gpl_cli.cli.main import cli

GUIDE = "\n".join(page.read_text(encoding="utf-8") for page in sorted((REPO / "docs").glob("*.md")))


def commands(group: click.Group, prefix: str = "gpl"):
    for name, command in sorted(group.commands.items()):
        yield f"{prefix} {name}", command
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix} {name}")


COMMANDS = list(commands(cli))


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[name for name, _ in COMMANDS])
def test_every_option_is_in_the_guide(name, command):
    assert f"`{name}" in GUIDE, f"{name} is not in the guide"
    missing = [opt for param in command.params if isinstance(param, click.Option)
               for opt in param.opts if opt.startswith("--") and opt != "--help" and opt not in GUIDE]
    assert not missing, f"{name}: options missing from docs/: {', '.join(missing)}"
