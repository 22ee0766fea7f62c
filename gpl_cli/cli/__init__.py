"""The `gpl` command line: each command parses its options, calls one library function and prints.

`main` (gpl_cli.cli.main) is the console entry point; `options` declares the shared options once;
`console` owns stderr (lines, log records, progress bars). stdout carries data only.
"""

from gpl_cli.cli.main import cli, main

__all__ = ["cli", "main"]
