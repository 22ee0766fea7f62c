"""The command line stays thin: a command parses, calls one library function and prints.

Measured from the source with `ast`: no command function over 50 lines of code (its docstring is the
command's help text, data rather than code, and does not count) and no module of gpl_cli/cli over 300 lines.
"""

from __future__ import annotations

import ast
import pathlib

import gpl_cli.cli

CLI = pathlib.Path(gpl_cli.cli.__file__).parent
MAX_FUNCTION_LINES = 50
MAX_MODULE_LINES = 300


def code_lines(node: ast.FunctionDef) -> int:
    """Lines from the `def` to the function's end, less its docstring."""
    total = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        total -= first.end_lineno - first.lineno + 1
    return total


def test_code_lines_leave_out_the_docstring_only():
    tree = ast.parse('def f():\n    """one\n    two"""\n    a = 1\n    return a\n')
    assert code_lines(tree.body[0]) == 3


def test_commands_and_modules_stay_small():
    too_long = []
    for path in sorted(CLI.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and code_lines(node) > MAX_FUNCTION_LINES:
                too_long.append(f"{path.name}:{node.name}: {code_lines(node)} lines of code")
    assert not too_long, "the command line grew thick: " + "; ".join(too_long)
