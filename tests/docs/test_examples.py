"""Every example in README.md and docs/*.md, run as written, in page order.

Sybil (a well-kept documentation tester: it lexes Markdown, keeps one namespace per page, runs
doctests with their output checks and honours `<!-- skip: next "reason" -->`) finds the blocks;
this module adds the evaluator for shell blocks and gives every page a working folder of its own:

- ```console blocks: each `$ command` line (a trailing backslash continues it) runs in bash; the
  lines after it, up to the next `$`, are its output (stdout and stderr as a terminal shows them),
  checked with doctest's rules: `...` matches anything, trailing spaces do not count. A command
  must exit 0, unless its output ends with `[exit N]`, which checks that status instead.
- ```bash blocks run as one script (`set -euo pipefail`) that must exit 0; their output is not shown,
  so it is not checked.
- ```python blocks run in the page's namespace; `>>>` blocks are doctests with their output checked.
- A block that needs the internet or a GPU is preceded by `<!-- skip: next "needs ...: why" -->`,
  and reported as skipped with that reason.

The working folder holds a copy of sample_images/ and, where the labelled photo set lies beside the
clone (`../shared/data/labeled_photos`), a copy of it at the same relative path; a block naming that set is
skipped with the reason where it is missing. Blocks of other languages (text, toml, json, csv, ...)
are shown output or file contents and are not run; test_fences checks that no runnable language
hides under another name.
"""

from __future__ import annotations

import doctest
import os
import re
import shutil
import subprocess
import sys
import unittest
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE_IMAGES
from sybil import Example, Sybil
from sybil.evaluators.doctest import OutputChecker
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LABELED = REPO.parent / "shared" / "data" / "labeled_photos"
# Block languages that are shown, not run (output, file contents, formulas).
SHOWN = {"text", "toml", "json", "jsonl", "csv", "tsv", "html", "math", "mermaid"}
RUN = {"console", "bash", "python"}
CHECKER = OutputChecker()
EXIT = re.compile(r"\n?\[exit (\d+)\]\s*$")


def workdir(example: Example) -> Path:
    """The page's working folder, made on its first example (the namespace lives as long as the page)."""
    return example.namespace["__workdir__"]


def needs_labeled(source: str) -> None:
    if "shared/data/labeled_photos" in source and not LABELED.is_dir():
        pytest.skip(f"needs the labelled photo set at {LABELED}")


def commands(source: str) -> list[tuple[str, str]]:
    """(command, expected output) for each `$ ` line of a console block."""
    found: list[tuple[str, list[str]]] = []
    lines = iter(source.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command += "\n" + next(lines)  # bash reads backslash-newline as a continuation, as a terminal does
            found.append((command, []))
        elif found:
            found[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"console block must start with a `$ ` command, not {line!r}")
    return [(command, "\n".join(out).strip("\n") + "\n" if any(out) else "") for command, out in found]


def run_bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    # The environment is read at each call, after conftest's isolated_caches has pointed the torch hub,
    # Hugging Face and gpl caches at a temporary folder: the examples never touch the user's caches.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "COLUMNS": "100", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", "-c", f"set -euo pipefail\n{script}"], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)


def evaluate_console(example: Example) -> str | None:
    needs_labeled(example.parsed)
    for command, want in commands(example.parsed):
        status = 0
        if (m := EXIT.search(want)) is not None:
            status, want = int(m.group(1)), want[: m.start()] + ("\n" if m.start() else "")
        proc = run_bash(command, workdir(example))
        if proc.returncode != status:
            return f"$ {command}\nexited {proc.returncode}, not {status}:\n{proc.stdout}"
        if want and not CHECKER.check_output(want, proc.stdout, doctest.ELLIPSIS):
            return f"$ {command}\nwanted:\n{want}got:\n{proc.stdout}"
    return None


def evaluate_bash(example: Example) -> str | None:
    needs_labeled(example.parsed)
    proc = run_bash(example.parsed, workdir(example))
    return None if proc.returncode == 0 else f"exited {proc.returncode}:\n{proc.stdout}"


def in_workdir(evaluate):
    """Python examples run in the page's folder, as a reader's shell would be."""

    def evaluator(example: Example):
        needs_labeled(example.parsed if isinstance(example.parsed, str) else str(example.parsed))
        here = os.getcwd()
        os.chdir(workdir(example))
        try:
            return evaluate(example)
        finally:
            os.chdir(here)

    return evaluator


class Python(PythonCodeBlockParser):
    def __call__(self, document):
        for region in super().__call__(document):
            region.evaluator = in_workdir(region.evaluator)
            yield region


SYBIL = Sybil(parsers=[
    SkipParser(),
    CodeBlockParser("console", evaluate_console),
    CodeBlockParser("bash", evaluate_bash),
    Python(doctest_optionflags=doctest.ELLIPSIS),
])
DOCUMENTS = {page: SYBIL.parse(page) for page in PAGES}
EXAMPLES = [(page, example) for page, document in DOCUMENTS.items() for example in document]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One working folder per page: a copy of sample_images/ and the labelled set at ../shared/data."""
    made = {}

    def folder(page: Path) -> Path:
        if page not in made:
            root = tmp_path_factory.mktemp(page.stem)
            work = root / "work"
            shutil.copytree(SAMPLE_IMAGES, work / "sample_images")
            if LABELED.is_dir():
                # a copy (4.6 MB), not a link: an example that writes into its photos cannot touch the shared set
                shutil.copytree(LABELED, root / "shared" / "data" / "labeled_photos")
            made[page] = work
        return made[page]

    return folder


@pytest.mark.parametrize(("page", "example"), EXAMPLES,
                         ids=[f"{page.relative_to(REPO)}:{example.line}" for page, example in EXAMPLES])
def test_example(page, example, folders):
    example.namespace.setdefault("__workdir__", folders(page))
    try:
        example.evaluate()
    except unittest.SkipTest as skip:  # Sybil's skip directive: reported with its reason, at this test
        pytest.skip(str(skip))


FENCE = re.compile(r"^(`{3,}|~{3,})([^\n`]*)$", re.M)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_fences(page):
    """Every fenced block names its language, and only console, bash and python blocks hold commands or code."""
    text = page.read_text(encoding="utf-8")
    opened = None
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if opened is None:
            language = m.group(2).strip().split(" ")[0]
            assert language, f"{page.name}:{line}: a fenced block without a language"
            assert language in RUN | SHOWN, f"{page.name}:{line}: block language {language!r} is neither run nor shown"
            opened = m.group(1)
        elif m.group(1) == opened and not m.group(2).strip():
            opened = None
    assert opened is None, f"{page.name}: a fenced block is never closed"
