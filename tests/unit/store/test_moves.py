"""The journal of moves (gpl_cli.store.moves): what it refuses before any step, a last line cut off by a kill,
a damaged journal, and a move across filesystems that keeps the file's time. Kills at every step of a real
run: tests/e2e/test_duplicate_moves.py."""

from __future__ import annotations

import errno
import json
import os

import pytest

from gpl_cli.errors import GplError
from gpl_cli.store import moves


def photo(path, data=b"jpeg bytes"):
    """A file, and its move to photos/NAME below a folder, with its size and time as embedded."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    st = os.stat(path)
    return moves.Move(str(path), os.path.relpath(path, os.path.dirname(os.path.dirname(path))),
                      (st.st_size, st.st_mtime_ns))


def records(folder):
    with open(os.path.join(folder, moves.JOURNAL)) as f:
        return [json.loads(line) for line in f]


def test_refusals_come_before_any_step(tmp_path):
    src = tmp_path / "photos" / "a.jpg"
    good = photo(src)
    away = tmp_path / "away"
    cases = {
        "../out.jpg": "is not a path below the folder that was embedded",
        "/etc/x.jpg": "is not a path below the folder that was embedded",
        moves.JOURNAL: "is one gpl keeps for its own files",
        "a.jpg" + moves.PARTIAL: "is one gpl keeps for its own files",
    }
    plan = [moves.Move(good.source, target, good.stats) for target in cases]
    plan.append(moves.Move(good.source, "a.jpg", moves.UNKNOWN))
    plan.append(moves.Move(str(tmp_path / "photos" / "gone.jpg"), "gone.jpg", (1, 1)))
    outcome = moves.move_files(plan, str(away))
    reasons = [reason for _, reason in outcome.refused]
    assert len(reasons) == 6 and not outcome.done
    for reason, want in zip(reasons, cases.values()):
        assert want in reason
    assert reasons[4].startswith("its size and time when it was embedded are not recorded")
    assert reasons[5] == "not found"
    assert src.exists() and not (away / moves.JOURNAL).exists()  # nothing was begun


def test_a_changed_file_and_a_taken_destination_stay(tmp_path):
    first, second = photo(tmp_path / "photos" / "a.jpg"), photo(tmp_path / "photos" / "b.jpg")
    with open(first.source, "ab") as f:
        f.write(b"more")
    taken = tmp_path / "away" / "photos" / "b.jpg"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"mine")
    outcome = moves.move_files([first, second], str(tmp_path / "away"))
    assert outcome.refused == [
        (first.source, "changed since it was embedded (10 bytes then, 14 now)"),
        (second.source, f"{taken} exists, and gpl never replaces a file")]
    assert taken.read_bytes() == b"mine" and os.path.exists(second.source) and os.path.exists(first.source)


def test_a_last_line_cut_off_is_no_record_and_is_cut_before_the_next(tmp_path):
    move = photo(tmp_path / "photos" / "a.jpg")
    away = tmp_path / "away"
    away.mkdir()
    journal = away / moves.JOURNAL
    journal.write_text('{"op": "move", "to": "x.jpg", "from": "/nowhere/x.jpg", "stats": [1, 1]}\n{"op": "mo')
    assert set(moves.Journal(str(away)).entries()) == {"x.jpg"}
    outcome = moves.move_files([move], str(away))
    assert outcome.done == [(move.source, str(away / "photos" / "a.jpg"))]
    lines = journal.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the cut line is gone, every line is whole
    # the cut-off move of x.jpg: neither place holds it, so it is reported, not invented
    assert outcome.refused == [("/nowhere/x.jpg", f"neither /nowhere/x.jpg nor {away / 'x.jpg'} exists: "
                                                  "it was moved by something else")]


def test_a_damaged_journal_is_not_trusted(tmp_path):
    away = tmp_path / "away"
    away.mkdir()
    (away / moves.JOURNAL).write_text('garbage\n{"op": "moved", "to": "a.jpg"}\n')
    with pytest.raises(GplError, match="line 1 is not a gpl move record; this journal cannot be trusted"):
        moves.move_files([photo(tmp_path / "photos" / "a.jpg")], str(away))
    with pytest.raises(GplError, match="no journal of moves"):
        moves.undo(str(tmp_path / "photos"))


def test_a_move_across_filesystems_is_a_verified_copy_that_keeps_the_time(tmp_path, monkeypatch):
    move = photo(tmp_path / "photos" / "a.jpg", b"x" * 100_000)
    mtime = os.stat(move.source).st_mtime_ns
    rename = os.rename

    def across(a, b):
        if os.path.dirname(a) != os.path.dirname(b):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(a, b)

    monkeypatch.setattr(moves.os, "rename", across)
    away = tmp_path / "away"
    outcome = moves.move_files([move], str(away))
    moved = away / move.target
    assert outcome.done == [(move.source, str(moved))] and not os.path.exists(move.source)
    assert moved.read_bytes() == b"x" * 100_000 and os.stat(moved).st_mtime_ns == mtime
    assert [r["op"] for r in records(away)] == ["move", "moved"]
    assert moves.undo(str(away)).done == [(str(moved), move.source)]
    assert open(move.source, "rb").read() == b"x" * 100_000 and os.stat(move.source).st_mtime_ns == mtime
    assert [r["op"] for r in records(away)] == ["move", "moved", "undo", "restored"]
    assert not os.path.exists(moved.parent)  # the folder the move made is gone with it
