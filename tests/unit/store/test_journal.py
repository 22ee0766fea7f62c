"""The output lock and the journal's lifecycle: one writer at a time, nothing held by a dead run; finished
rows kept in atomic chunks, read back exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpl_cli import atomic
from gpl_cli.errors import GplError
from gpl_cli.store import journal, lock
from gpl_cli.store.journal import TMP, Journal
from gpl_cli.store.lock import OutputLock


def test_a_run_that_locked_a_file_being_released_locks_again(tmp_path, monkeypatch):
    """A releases while B sits between open and flock: B must not end up holding a lock on the
    unlinked file while a third run C locks a new file of the same name (two writers at once)."""
    out = str(tmp_path / "x.h5")
    a = OutputLock(out).__enter__()
    real_flock = lock.fcntl.flock
    calls = []

    def flock_after_a_releases(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            a.__exit__(None, None, None)  # A releases (and unlinks) right after B's open
        return real_flock(fd, op)

    monkeypatch.setattr(lock.fcntl, "flock", flock_after_a_releases)
    b = OutputLock(out).__enter__()
    monkeypatch.setattr(lock.fcntl, "flock", real_flock)
    assert len(calls) == 2  # B saw that its file was gone and locked again
    with pytest.raises(GplError, match=r"another gpl run \(pid \d+\) is writing"):
        OutputLock(out).__enter__()  # C
    b.__exit__(None, None, None)
    assert not os.path.exists(out + ".lock")


def test_a_lock_file_deleted_during_the_run_is_no_error(tmp_path):
    out = str(tmp_path / "x.h5")
    with OutputLock(out):
        os.remove(out + ".lock")  # a user cleaning up what looks like a stray file


def test_release_never_removes_another_runs_lock_file(tmp_path):
    out = str(tmp_path / "x.h5")
    first = OutputLock(out).__enter__()
    os.remove(out + ".lock")
    with OutputLock(out):  # a second run now holds a new file of that name
        first.__exit__(None, None, None)
        assert os.path.exists(out + ".lock")


HOLD_AND_DIE = textwrap.dedent("""
    import os, signal, sys, time
    from gpl_cli.store.lock import OutputLock
    lock = OutputLock(sys.argv[1]).__enter__()
    child = os.fork()
    if child == 0:          # a worker that outlives its parent (as a blocked loader worker did)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1), os.dup2(null, 2)
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_forked_child_of_a_killed_run_does_not_hold_the_lock(tmp_path):
    out = str(tmp_path / "x.h5")
    proc = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, out], capture_output=True, timeout=60)
    child = int(proc.stdout)
    try:
        assert proc.returncode == -signal.SIGKILL
        os.kill(child, 0)  # the child is still alive...
        with OutputLock(out):  # ...yet the output can be taken over at once
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_busy_message_names_a_pid_only_when_that_process_is_alive(tmp_path):
    import fcntl

    out = str(tmp_path / "x.h5")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(out + ".lock", "w") as holder:  # held by this test, but recording a process that is gone
        holder.write(str(dead.pid))
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(GplError) as caught:
            OutputLock(out).__enter__()
        assert str(dead.pid) not in str(caught.value)
        assert "still exiting" in str(caught.value)
        holder.seek(0)
        holder.truncate()
        holder.write(str(os.getpid()))
        holder.flush()
        with pytest.raises(GplError, match=f"pid {os.getpid()}"):
            OutputLock(out).__enter__()


def test_a_removed_journal_is_gone_at_once_even_if_deleting_it_is_cut_short(tmp_path, monkeypatch):
    directory = str(tmp_path / "x.h5.gpl-journal")
    j = Journal.create(directory, {"run": 1}, ["avg"])
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)  # as if killed while deleting
    j.remove()
    assert not os.path.exists(directory)  # what a resume looks for is already gone
    assert os.path.isdir(directory + journal.TRASH_SUFFIX)


def test_journal_records_which_existing_output_it_may_replace(tmp_path):
    j = Journal.create(str(tmp_path / "j"), {"run": 1}, ["avg"], replaces=[1, 2, 3, 4])
    assert j.replaces() == [1, 2, 3, 4]
    assert Journal.create(str(tmp_path / "k"), {"run": 1}, ["avg"]).replaces() is None
    assert j.is_empty()


IDENTITY = {"backbone": "efficientnet_lite0", "pools": ["avg", "max"]}


def test_rows_and_failures_come_back_from_their_chunks(tmp_path):
    rng = np.random.default_rng(1)
    journal = Journal.create(str(tmp_path / "j"), IDENTITY, ["avg", "max"], flush_rows=3)
    avg, mx = rng.random((5, 4), np.float32), rng.random((5, 2), np.float32)
    journal.write(["a", "b", "c"], {"avg": avg[:3], "max": mx[:3]}, [(10, 1), (11, 2), (12, 3)])  # a chunk
    journal.fail("bad.jpg", "not a readable image")
    journal.write(["d", "\udcff.jpg"], {"avg": avg[3:], "max": mx[3:]})  # no stats given
    journal.flush()
    assert sorted(n for n in os.listdir(journal.directory) if n.startswith("chunk-")) == [
        "chunk-000001.npz", "chunk-000002.npz"]
    rows, failures = journal.index()
    assert failures == {b"bad.jpg": "not a readable image"}
    names = [b"a", b"b", b"c", b"d", "\udcff.jpg".encode("utf-8", "surrogateescape")]
    for i, name in enumerate(names):
        chunk, row = rows[name]
        data = journal.chunk(chunk)
        np.testing.assert_array_equal(data["avg"][row], avg[i])
        np.testing.assert_array_equal(data["max"][row], mx[i])
    assert journal.chunk(rows[b"c"][0])["stats"][rows[b"c"][1]].tolist() == [12, 3]
    assert journal.chunk(rows[b"d"][0])["stats"][rows[b"d"][1]].tolist() == [-1, -1]


def test_reopening_drops_a_half_written_chunk_and_refuses_other_settings(tmp_path):
    directory = str(tmp_path / "j")
    Journal.create(directory, IDENTITY, ["avg"])
    half = os.path.join(directory, "chunk-000001.npz" + TMP)
    with open(half, "wb") as f:
        f.write(b"PK half a chunk")
    reopened = Journal.reopen(directory, IDENTITY, ["avg"])
    assert not os.path.exists(half) and reopened.index() == ({}, {})
    with pytest.raises(GplError, match="pools: \\['avg', 'max'\\] there, \\['avg'\\] now"):
        Journal.reopen(directory, {**IDENTITY, "pools": ["avg"]}, ["avg"])


def test_a_name_recorded_again_counts_by_its_latest_record(tmp_path):
    """--update embeds a file anew when it changed after its row was saved: the later record (a new row, or
    a failure when the new file cannot be read) is the one that counts, with its own stats."""
    journal = Journal.create(str(tmp_path / "j"), IDENTITY, ["avg"], flush_rows=100)
    one = np.ones((1, 2), np.float32)
    journal.write(["a", "b"], {"avg": np.vstack([one, one])}, [(1, 1), (2, 2)])
    journal.fail("c", "not a readable image")
    journal.flush()
    journal.write(["a"], {"avg": 2 * one}, [(5, 5)])
    journal.fail("b", "truncated file")
    journal.flush()
    rows, failures = journal.index()
    assert set(rows) == {b"a"} and journal.chunk(rows[b"a"][0])["avg"][rows[b"a"][1]].tolist() == [2.0, 2.0]
    assert failures == {b"b": "truncated file", b"c": "not a readable image"}
    assert journal.stats() == {b"a": (5, 5), b"b": (2, 2)}
