"""The README's recipes, run as written, and its exit-code table checked against gpl_cli.errors.

Every fenced block under "## Recipes" runs in bash (-e -o pipefail), in README order, in one
folder holding photos/ (four real photos, one of them twice: full and half size). Each recipe
has a check of its output below; a new recipe without one fails the test, so README and tests
move together.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SAMPLE_IMAGES
from PIL import Image

from gpl_cli import errors

ENV = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def recipes() -> list[tuple[str, str]]:
    """(### heading, the bash of its fenced blocks) under ## Recipes, in README order."""
    found = []
    for part in readme_section("Recipes").split("\n### ")[1:]:
        title = part.splitlines()[0].strip()
        blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", part, flags=re.S)
        found.append((title, "".join(blocks)))
    return found


def check_find(out: str, cwd) -> None:
    assert "images        4 embedded, 0 failed" in out
    assert os.path.isfile(os.path.join(cwd, "photos.h5"))


def check_neighbors(out: str, cwd) -> None:
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0] == "1\t1.0000\tphotos/cat.png"
    assert all(re.fullmatch(r"\d\t[01]\.\d{4}\tphotos/\S+", line) for line in lines)


def check_duplicates(out: str, cwd) -> None:
    rows = [line.split("\t") for line in out.splitlines()]
    assert sorted((g, p) for g, _, p in rows) == [("1", "photos/panda.jpg"), ("1", "photos/panda_half.jpg")]
    assert all(float(s) >= 0.95 for _, s, _ in rows)


def check_jq(out: str, cwd) -> None:
    assert out.splitlines() == [f"{n}\t1280" for n in ("cat.png", "panda.jpg", "panda_half.jpg", "sheep.jpg")]


def check_python(out: str, cwd) -> None:
    # rows in the order find listed the files
    assert sorted(out.splitlines()) == [f"photos/{n}\t1280" for n in ("cat.png", "panda.jpg", "panda_half.jpg", "sheep.jpg")]


def check_parquet(out: str, cwd) -> None:
    assert "emb_00000.npy" in out and "metadata_00000.parquet" in out


def check_compare(out: str, cwd) -> None:
    assert "avg" in out and "max" in out
    from gpl_cli.store.formats import read_metadata

    assert read_metadata(str(cwd / "photos_max.h5"))["pool_keys"] == ["max"]


CHECKS = {
    "Embed the files `find` selects": (check_find, None),
    "Nearest neighbours of a photo": (check_neighbors, None),
    "Near-duplicates in a photo folder": (check_duplicates, None),
    "Stream JSON Lines into jq": (check_jq, lambda: None if shutil.which("jq") else "jq is not installed (apt-get install jq)"),
    "Read any embeddings file as a stream in Python": (check_python, None),
    "Embeddings for FAISS index builders": (
        check_parquet,
        lambda: None if _importable("pyarrow") else "pyarrow is not installed (pip install pyarrow)",
    ),
    "Compare poolings, then embed with the winner": (check_compare, None),
}


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Run every recipe in order in one folder; {title: (CompletedProcess | skip reason)}."""
    cwd = tmp_path_factory.mktemp("recipes")
    photos = cwd / "photos"
    photos.mkdir()
    shutil.copy(SAMPLE_IMAGES / "cat_chelsea.png", photos / "cat.png")
    shutil.copy(SAMPLE_IMAGES / "sheep.jpg", photos / "sheep.jpg")
    shutil.copy(SAMPLE_IMAGES / "panda.jpg", photos / "panda.jpg")
    panda = Image.open(SAMPLE_IMAGES / "panda.jpg")
    panda.resize((panda.width // 2, panda.height // 2)).save(photos / "panda_half.jpg", quality=90)
    results = {}
    for title, script in recipes():
        _, skip = CHECKS.get(title, (None, None))
        reason = skip() if skip else None
        if reason:
            results[title] = reason
            continue
        results[title] = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd,
                                        capture_output=True, env=ENV, timeout=300)
    return cwd, results


def test_every_recipe_has_a_check():
    titles = [t for t, _ in recipes()]
    assert len(titles) >= 6 and all(script for _, script in recipes())
    assert [t for t in titles if t not in CHECKS] == []


@pytest.mark.parametrize("title", list(CHECKS))
def test_recipe(ran, title):
    cwd, results = ran
    if title not in results:
        pytest.fail(f"recipe {title!r} is no longer in README.md: remove its check")
    result = results[title]
    if isinstance(result, str):
        pytest.skip(reason=result)  # why the recipe could not run here (e.g. jq missing)
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0, err
    assert "Traceback" not in err
    CHECKS[title][0](result.stdout.decode(), cwd)


def test_exit_code_table_matches_the_code():
    table = readme_section("Exit codes")
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    defined = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert documented == defined
