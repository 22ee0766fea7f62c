"""`OutputLock`: one run at a time writes a file; `OutputLocks`: one run at a time writes any file of an output.

flock is released by the kernel when the process dies, so a killed run never leaves a stale
lock. Child processes never hold it: a forked child closes its copy of the descriptor at
once (`_forget_in_child`), so a loader worker that outlives a killed run cannot block the
resume. The file is unlinked on release; a run that locked a file which was unlinked (or
replaced) meanwhile sees that the path no longer names its file and locks again, so two
runs can never hold locks on two different files of the same name.

An output of several files (an NPY output's arrays, paths and metadata) claims each of them
(`OutputLocks`): two outputs of different names that share a file (`-o col.npy -p avg,max` and
`-o col.avg.npy`) cannot be written at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import weakref

from gpl_cli.atomic import reporting
from gpl_cli.errors import GplError

LOCK_SUFFIX = ".lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class OutputLock:
    """An exclusive lock on `<output>.lock`, so two runs never write the same output (see the module docstring)."""

    def __init__(self, output: str):
        self.path = output + LOCK_SUFFIX
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        while True:
            with reporting(self.path):  # a full disk or a read-only folder: one line naming the lock file
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                raise GplError(self._busy_message(holder)) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # released and unlinked by its holder between our open and flock: try again
        try:
            with reporting(self.path):
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
        except BaseException:
            os.unlink(self.path)  # ours: locked and checked to be the file at this path
            os.close(fd)
            raise
        self.fd = fd
        _HELD.add(self)
        return self

    def _busy_message(self, holder: str) -> str:
        output = self.path[: -len(LOCK_SUFFIX)]
        if holder.isdigit() and pid_alive(int(holder)):
            who = f"another gpl run (pid {holder})"
        else:  # the recorded writer is gone, yet the lock is held: a process it started is exiting
            who = "a process of an earlier gpl run that is still exiting"
        return f"{who} is writing {output}; wait for it or choose another output"

    def __exit__(self, *exc) -> None:
        _HELD.discard(self)
        if self.fd is None:
            return
        if _same_file(self.fd, self.path):  # never remove a lock file another run created
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def _forget_in_child(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class OutputLocks:
    """An OutputLock on each of `files`, taken in sorted order (two runs that want overlapping sets can never
    each hold a part and wait for the other), all or none: a refusal releases those already taken."""

    def __init__(self, files: list[str]):
        self.locks = [OutputLock(f) for f in sorted(set(files))]

    def __enter__(self) -> OutputLocks:
        with contextlib.ExitStack() as taken:
            for one in self.locks:
                taken.enter_context(one)
            taken.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        for one in reversed(self.locks):
            one.__exit__(*exc)


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


_HELD: weakref.WeakSet[OutputLock] = weakref.WeakSet()


def _close_locks_after_fork() -> None:
    for lock in list(_HELD):
        lock._forget_in_child()
    _HELD.clear()


os.register_at_fork(after_in_child=_close_locks_after_fork)
