"""Files that appear whole or not at all: written under a temporary name beside the target, synced, renamed.

Every file gpl writes goes through here: the output formats (through gpl_cli.store.output), the run
journal, pages, figures, whitening files and the tuning and catalog caches. The temporary is `<path>.partial` (or another suffix the caller
names); `commit` syncs it to disk, renames it over the target and syncs the folder, so a crash at any
moment leaves the old file or the new one, never half of one. An output of several files is committed
by `commit_all`: every temporary is complete and synced before the first rename, so a failed write
leaves the whole earlier output. A replaced file keeps its permissions (and owner, where allowed).
After a failure, `discard` removes the temporary, so an unfinished write leaves nothing behind (a
killed process cannot; its temporary is overwritten by the next write).

A write that the system refuses (a full disk, an I/O error) becomes one line naming the file it was
writing (`write_failed`, exit status 1), never a traceback: `reporting` around the calls, or a
`ReportingFile` around an open file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO

from gpl_cli.errors import EXIT_FAILURE, GplError

PARTIAL = ".partial"
REPLACED = ".replaced"  # a folder being replaced: renamed away whole before the new one takes its name


def refuse_existing(paths: list[str], overwrite: bool, hint: str = "") -> None:
    """The one refusal of an existing output: every command words it alike."""
    existing = next((p for p in paths if os.path.lexists(p)), None)
    if existing is not None and not overwrite:
        raise GplError(f"output exists: {existing}{hint} (use --overwrite to replace it)")


def write_failed(exc: OSError, path: str) -> GplError:
    """`exc`, raised while writing `path`, as one line: 'no space left on device while writing PATH'."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return GplError(f"{reason[:1].lower()}{reason[1:]} while writing {path}", EXIT_FAILURE)


@contextmanager
def reporting(path: str, on_failure: Callable[[], None] | None = None) -> Iterator[None]:
    """An OSError in the block was raised while writing `path` (see write_failed); `on_failure` runs first
    when the block fails in any way (a writer discards its temporaries there)."""
    try:
        yield
    except BaseException as exc:
        if on_failure is not None:
            on_failure()
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):  # a closed stdout has its own status
            raise write_failed(exc, path) from None
        raise


class ReportingFile:
    """An open file whose write, flush, seek and close name `path` when the system refuses them (write_failed);
    everything else is the file's own. `on_failure` runs first (a Destination discards its temporary there,
    whoever wrote through it)."""

    def __init__(self, file: IO, path: str, on_failure: Callable[[], None] | None = None):
        self._file, self._path, self._on_failure = file, path, on_failure

    def _reported(self):
        return reporting(self._path, self._on_failure)

    def write(self, data):
        with self._reported():
            return self._file.write(data)

    def flush(self) -> None:
        with self._reported():
            self._file.flush()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        with self._reported():  # writes out the buffer first
            return self._file.seek(offset, whence)

    def close(self) -> None:
        with self._reported():
            self._file.close()

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def __enter__(self) -> ReportingFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AtomicPath:
    """A file or folder `path`, written at `partial` and renamed into place by `commit`."""

    def __init__(self, path: str, overwrite: bool = False, suffix: str = PARTIAL):
        refuse_existing([path], overwrite)
        self.path = path
        self.partial = path + suffix

    def commit(self) -> str:
        """Sync the finished temporary, rename it over `path` (a folder replaces a folder), sync the parent;
        a failure discards the temporary and names `path`."""
        commit_all([self])
        return self.path

    def discard(self) -> None:
        """Remove the temporary, whatever it holds."""
        _remove(self.partial)


def commit_all(targets: list[AtomicPath]) -> None:
    """Commit several temporaries as one output, the last (its marker) renamed last. Each is synced (and
    takes the permissions of the file it replaces) before the first rename, so a failure up to there
    discards them all and leaves the earlier output whole; readers refuse the mixed set that a kill
    between two renames could leave (an NPY output's .json records each part)."""
    try:
        for t in targets:
            with reporting(t.path):
                _sync_tree(t.partial)
                _keep_permissions(t.path, t.partial)
    except BaseException:
        for t in targets:
            t.discard()
        raise
    try:
        for t in targets:
            with reporting(t.path):
                if os.path.isdir(t.partial) and os.path.isdir(t.path):
                    # rename cannot replace a folder that holds files; moved away whole, never half deleted
                    remove_whole(t.path, REPLACED, keep=True)
                    os.replace(t.partial, t.path)
                    _remove(t.path + REPLACED)
                else:
                    os.replace(t.partial, t.path)
    except BaseException:
        for t in targets:
            t.discard()
        raise
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(t.path)) for t in targets):
        with reporting(folder):
            sync(folder)


def _keep_permissions(path: str, partial: str) -> None:
    """The replacement gets the mode of the file it replaces, and its owner where this process may set it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    os.chmod(partial, st.st_mode & 0o7777)
    with suppress(PermissionError):
        os.chown(partial, st.st_uid, st.st_gid)
        os.chmod(partial, st.st_mode & 0o7777)  # chown clears set-id bits


def remove_whole(path: str, suffix: str, keep: bool = False) -> None:
    """Remove a file or folder so that it is gone at once for any reader: renamed to `path + suffix`
    first, deleted after (a kill mid-way leaves only those remains, which the next removal clears).
    `keep`: leave the renamed remains for the caller to delete."""
    trash = path + suffix
    _remove(trash)
    os.rename(path, trash)
    if not keep:
        _remove(trash)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            os.remove(path)


@contextmanager
def atomic_file(path: str, mode: str = "wb", overwrite: bool = False, suffix: str = PARTIAL,
                encoding: str | None = None) -> Iterator[IO]:
    """The open temporary of `path`; when the block ends it is committed, or discarded if the block raised.
    The system's refusals (a full disk) name `path` (write_failed)."""
    target = AtomicPath(path, overwrite, suffix)
    with reporting(path):
        file = open(target.partial, mode, encoding=encoding)
    try:
        with ReportingFile(file, path) as f:
            yield f
    except BaseException:
        with suppress(OSError):
            file.close()  # the block raised before its close; a close that failed has released the descriptor
        target.discard()
        raise
    target.commit()


def sync(path: str) -> None:
    """fsync one file or folder (a folder: the names in it, after a rename or unlink)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(path: str) -> None:
    """fsync a file, or every file and folder under a folder."""
    if not os.path.isdir(path):
        sync(path)
        return
    for folder, _, files in os.walk(path):
        for name in files:
            sync(os.path.join(folder, name))
        sync(folder)
