"""gpl_cli.atomic: a file appears whole under its name, or not at all."""

from __future__ import annotations

import os

import pytest

from gpl_cli.atomic import PARTIAL, AtomicPath, atomic_file
from gpl_cli.errors import GplError


def test_the_content_appears_under_the_name_only_when_the_block_ends(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_file(str(target)) as f:
        f.write(b"abc")
        f.flush()
        assert not target.exists() and (tmp_path / ("out.bin" + PARTIAL)).read_bytes() == b"abc"
    assert target.read_bytes() == b"abc" and os.listdir(tmp_path) == ["out.bin"]


def test_a_failing_body_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_file(str(target), "w", overwrite=True, encoding="utf-8") as f:
            f.write("new, half")
            raise ZeroDivisionError("the body failed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_an_existing_target_is_refused_unless_overwrite(tmp_path):
    target = tmp_path / "out.npz"
    target.write_bytes(b"keep")
    with pytest.raises(GplError, match=f"output exists: {target} \\(use --overwrite"):
        with atomic_file(str(target)) as f:
            f.write(b"x")
    assert target.read_bytes() == b"keep" and os.listdir(tmp_path) == ["out.npz"]
    with atomic_file(str(target), overwrite=True, suffix=".tmp") as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.npz"]


def test_a_folder_replaces_a_folder_and_discard_removes_a_partial_folder(tmp_path):
    old = tmp_path / "shards"
    old.mkdir()
    (old / "stale.npy").write_bytes(b"old")
    target = AtomicPath(str(old), overwrite=True)
    os.makedirs(os.path.join(target.partial, "avg_emb"))
    with open(os.path.join(target.partial, "avg_emb", "emb_00000.npy"), "wb") as f:
        f.write(b"new")
    target.commit()
    assert sorted(os.listdir(tmp_path)) == ["shards"] and os.listdir(old) == ["avg_emb"]
    again = AtomicPath(str(old), overwrite=True)
    os.makedirs(again.partial)
    again.discard()
    assert sorted(os.listdir(tmp_path)) == ["shards"]
