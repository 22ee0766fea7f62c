"""Row order is decided once: sorted relative paths, case-insensitive extensions, stdin lists."""

from __future__ import annotations

import io

import pytest

from gpl_cli.embedding.inputs import collect_inputs
from gpl_cli.errors import GplError


def touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_directory_is_walked_recursively_and_sorted_by_relative_path(tmp_path):
    touch(tmp_path, "b.jpg", "a/z.PNG", "a/b/c.webp", "a.b/x.jpeg", "notes.txt", "c.TIFF", "d.gif", "e.bmp")
    got = [it.name for it in collect_inputs([str(tmp_path)]).items]
    assert got == ["a/b/c.webp", "a/z.PNG", "a.b/x.jpeg", "b.jpg", "c.TIFF", "d.gif", "e.bmp"]


def test_names_are_relative_to_a_single_directory_and_paths_open(tmp_path):
    touch(tmp_path, "sub/one.jpg")
    inputs = collect_inputs([str(tmp_path)])
    assert inputs.root == str(tmp_path)
    assert inputs.items[0].name == "sub/one.jpg"
    assert open(inputs.items[0].path, "rb").read() == b"x"


def test_stdin_lists_keep_their_order_newline_and_nul(tmp_path):
    got = collect_inputs(["-"], stdin=io.BytesIO(b"b.jpg\na.jpg\n\n")).items
    assert [it.path for it in got] == ["b.jpg", "a.jpg"]
    odd = b"with\nnewline.jpg\0sp ace.png\0caf\xc3\xa9.jpg\0bad\xff.jpg\0"
    got = collect_inputs(["-"], stdin=io.BytesIO(odd), nul_separated=True).items
    assert [it.path for it in got][:3] == ["with\nnewline.jpg", "sp ace.png", "café.jpg"]
    assert got[3].path.encode("utf-8", "surrogateescape") == b"bad\xff.jpg"


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(GplError, match="input not found: .*nope"):
        collect_inputs([str(tmp_path / "nope")])
