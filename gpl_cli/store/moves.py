"""Moving user files aside into a folder, and back, so that no kill at any moment loses one.

Every step is written to a journal in the folder (`JOURNAL`, one JSON object a line, synced) before it
happens, and again once it is done: `move` (the intent: from where, to which path below the folder, the
size and time the file had when it was embedded), then `moved`; `undo`, then `restored`. A step whose
intent has no outcome was cut off, and the next run in that folder finishes it first, judging by which of
the two places holds the file.

A move within one filesystem is a rename, which happens whole or not at all. Across filesystems the file
is copied under a temporary name beside its destination (`PARTIAL`), synced, compared byte for byte with
the original, renamed into place, and only then is the original unlinked: at every moment at least one
whole copy exists. A destination that exists is never replaced, and a file that differs from what was
embedded is not moved. Nothing here deletes a file of the user's: the only unlinks are of an original
whose verified copy is in place, and of gpl's own temporary copies of a step the journal says was cut off.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field

from gpl_cli.atomic import sync
from gpl_cli.errors import GplError
from gpl_cli.store.lock import OutputLock

JOURNAL = ".gpl-moves.jsonl"
PARTIAL = ".gpl-partial"
UNKNOWN = (-1, -1)  # stats of a file whose size and time were not recorded when it was embedded


@dataclass(frozen=True)
class Move:
    source: str  # the file, as an absolute path
    target: str  # its relative path below the folder it goes to (its name in the embeddings file)
    stats: tuple[int, int] = UNKNOWN  # (size, mtime_ns) when it was embedded


@dataclass
class Outcome:
    done: list[tuple[str, str]] = field(default_factory=list)  # (from, to): moved by this run
    earlier: list[tuple[str, str]] = field(default_factory=list)  # (from, to): already done by an earlier run
    refused: list[tuple[str, str]] = field(default_factory=list)  # (file, why it stayed where it is)


@dataclass
class _Entry:
    source: str
    state: str  # the last record's op: move, moved, undo, restored or dropped
    stats: tuple[int, int]


class Journal:
    """The journal of the moves into one folder."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, JOURNAL)

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def entries(self) -> dict[str, _Entry]:
        """Each target's latest state, replayed from the journal. A last line cut off by a kill is no record:
        it was never synced, so its step had not begun."""
        found: dict[str, _Entry] = {}
        if not self.exists():
            return found
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                target, op = record["to"], record["op"]
            except (ValueError, KeyError, TypeError):
                if number == len(lines):
                    break
                raise GplError(f"{self.path}: line {number} is not a gpl move record; "
                               "this journal cannot be trusted, so nothing is moved") from None
            if op == "move":
                found[target] = _Entry(record["from"], op, tuple(record.get("stats", UNKNOWN)))
            elif target in found:
                found[target].state = op
        return found

    def moved(self) -> dict[str, str]:
        """Where each file the journal moved into the folder is now: {original path: path in the folder}."""
        return {e.source: os.path.join(self.folder, target) for target, e in self.entries().items() if e.state == "moved"}

    def write(self, op: str, target: str, **fields) -> None:
        """Append one record and sync it (and, for a new journal, the folder that holds it)."""
        new = not self.exists()
        if new:
            os.makedirs(self.folder, exist_ok=True)
        else:
            _drop_torn_line(self.path)
        line = json.dumps({"op": op, "to": target, **fields}, ensure_ascii=True) + "\n"
        with open(self.path, "a", encoding="ascii") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new:
            sync(self.folder)


def _drop_torn_line(path: str) -> None:
    """Cut a last line that a kill left without its newline, so the next record starts a line of its own."""
    with open(path, "rb+") as f:
        if f.seek(0, os.SEEK_END) == 0 or (f.seek(-1, os.SEEK_END), f.read(1))[1] == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


def _digest(path: str) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def _transfer(source: str, destination: str) -> None:
    """Put `source` at `destination` (which does not exist), by rename or, across filesystems, by a verified copy."""
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    try:
        os.rename(source, destination)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across(source, destination)
    sync(os.path.dirname(destination))
    sync(os.path.dirname(source))


def _copy_across(source: str, destination: str) -> None:
    partial = destination + PARTIAL
    with open(source, "rb") as src, open(partial, "xb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.utime(partial, ns=(os.stat(source).st_atime_ns, os.stat(source).st_mtime_ns))
    if _digest(partial) != _digest(source):
        os.unlink(partial)  # gpl's own incomplete copy
        raise OSError(errno.EIO, f"the copy at {destination} does not match the original")
    os.rename(partial, destination)
    sync(os.path.dirname(destination))
    os.unlink(source)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _stats(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _changed(path: str, recorded: tuple[int, int]) -> str | None:
    """Why `path` may not be moved: it differs from the file that was embedded, or that cannot be told."""
    if tuple(recorded) == UNKNOWN:
        return "its size and time when it was embedded are not recorded, so gpl cannot tell whether it changed since"
    size, mtime = _stats(path)
    if size != recorded[0]:
        return f"changed since it was embedded ({recorded[0]} bytes then, {size} now)"
    if mtime != recorded[1]:
        return "changed since it was embedded (modified since)"
    return None


def _finish(journal: Journal, target: str, entry: _Entry, outcome: Outcome) -> None:
    """Finish a step a kill cut off (`entry.state` is move or undo), judging by where the file is now; what it
    did goes to `outcome.done` as (from, to)."""
    away = os.path.join(journal.folder, target)
    # The step's direction: a move takes `entry.source` to `away`, an undo brings it back.
    start, end = (entry.source, away) if entry.state == "move" else (away, entry.source)
    done, left = ("moved", "dropped") if entry.state == "move" else ("restored", "moved")
    with suppress(FileNotFoundError):
        os.unlink(end + PARTIAL)  # gpl's own copy, cut off before it was complete and verified
    at_start, at_end = os.path.lexists(start), os.path.lexists(end)
    if at_end and not at_start:  # the rename (or the copy and the unlink) happened
        journal.write(done, target)
        outcome.done.append((start, end))
    elif at_start and at_end:  # a copy across filesystems, renamed into place, original not yet unlinked
        if _digest(start) == _digest(end):
            os.unlink(start)
            sync(os.path.dirname(start))
            journal.write(done, target)
            outcome.done.append((start, end))
        else:
            journal.write(left, target, reason="both places hold a file and they differ")
            outcome.refused.append((start, f"{end} exists and differs from it: both left in place"))
    elif at_start:  # the step had not begun: do it now, with the checks a new step gets
        why = _changed(start, entry.stats) if entry.state == "move" else None
        if why:
            journal.write(left, target, reason=why)
            outcome.refused.append((start, why))
            return
        try:
            _transfer(start, end)
        except OSError as exc:
            journal.write(left, target, reason=_reason(exc))
            outcome.refused.append((start, _reason(exc)))
            return
        journal.write(done, target)
        outcome.done.append((start, end))
    else:
        outcome.refused.append((entry.source, f"neither {start} nor {end} exists: it was moved by something else"))


def _recover(journal: Journal, outcome: Outcome, report: str | None = None) -> None:
    """Finish every step a kill cut off, reporting every refusal. Finished undo steps count as done for an
    undo (`report`="undo"); a finished move is not reported here: the plan that follows finds it done earlier,
    or the undo that follows moves it back."""
    for target, entry in journal.entries().items():
        if entry.state in ("move", "undo"):
            finished = Outcome()
            _finish(journal, target, entry, finished)
            outcome.refused += finished.refused
            if entry.state == report:
                outcome.done += finished.done


def recover(folder: str) -> Outcome:
    """Finish the steps a kill cut off in `folder`'s journal (nothing when there is none)."""
    journal = Journal(folder)
    outcome = Outcome()
    if journal.exists():
        with OutputLock(journal.path):
            _recover(journal, outcome)
    return outcome


def move_files(moves: Iterable[Move], folder: str) -> Outcome:
    """Move each file to its target below `folder`, journaled; first finish what an interrupted run left.

    A file is not moved, and the reason is given in `refused`, when it is missing, differs from what was
    embedded (size or modification time), or its destination exists."""
    journal = Journal(folder)
    outcome = Outcome()
    os.makedirs(journal.folder, exist_ok=True)
    with OutputLock(journal.path):
        _recover(journal, outcome)
        entries = journal.entries()
        for move in moves:
            entry = entries.get(move.target)
            destination = os.path.join(journal.folder, move.target)
            if entry is not None and entry.state == "moved" and entry.source == move.source:
                outcome.earlier.append((move.source, destination))
                continue
            why = _refusal(move, destination, os.path.join(folder, move.target))
            if why:
                outcome.refused.append((move.source, why))
                continue
            journal.write("move", move.target, **{"from": move.source, "stats": list(move.stats)})
            try:
                _transfer(move.source, destination)
            except OSError as exc:
                journal.write("dropped", move.target, reason=_reason(exc))
                outcome.refused.append((move.source, _reason(exc)))
                continue
            journal.write("moved", move.target)
            outcome.done.append((move.source, destination))
    return outcome


def _refusal(move: Move, destination: str, shown: str) -> str | None:
    """Why `move` may not begin (None: it may); `shown`: the destination as the user named its folder."""
    if os.path.isabs(move.target) or os.path.normpath(move.target).split(os.sep)[0] == os.pardir:
        return f"its name {move.target} is not a path below the folder that was embedded, so it has no place in the folder"
    if os.path.normpath(move.target) == JOURNAL or move.target.endswith(PARTIAL):
        return f"its name {move.target} is one gpl keeps for its own files in the folder"
    if not os.path.isfile(move.source):
        return "not found"
    if os.path.lexists(destination):
        return f"{shown} exists, and gpl never replaces a file"
    return _changed(move.source, move.stats)


def undo(folder: str) -> Outcome:
    """Put back every file the journal in `folder` moved there, where it was; a file whose original place
    is taken stays in the folder (named in `refused`)."""
    journal = Journal(folder)
    if not journal.exists():
        raise GplError(f"{folder}: no journal of moves ({JOURNAL}) here, so there is nothing gpl moved to undo")
    outcome = Outcome()
    with OutputLock(journal.path):
        _recover(journal, outcome, "undo")
        for target, entry in journal.entries().items():
            if entry.state != "moved":
                continue
            away = os.path.join(journal.folder, target)
            if os.path.lexists(entry.source):
                outcome.refused.append((away, f"its original place {entry.source} is taken"))
                continue
            if not os.path.lexists(away):
                outcome.refused.append((away, "not in the folder any more"))
                continue
            journal.write("undo", target)
            try:
                _transfer(away, entry.source)
            except OSError as exc:
                journal.write("moved", target, reason=_reason(exc))
                outcome.refused.append((away, _reason(exc)))
                continue
            journal.write("restored", target)
            outcome.done.append((away, entry.source))
            _prune(os.path.dirname(away), journal.folder)
    return outcome


def _prune(folder: str, top: str) -> None:
    """Remove the folders below `top` that moves made and an undo left empty (rmdir only removes empty ones)."""
    while folder != top and folder.startswith(os.path.join(top, "")):
        try:
            os.rmdir(folder)
        except OSError:
            return
        folder = os.path.dirname(folder)
