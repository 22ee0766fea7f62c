"""Files that appear whole or not at all: written under a temporary name beside the target, synced, renamed.

Every file gpl writes goes through here: the output formats (through gpl_cli.store.output), the run
journal, pages, figures, whitening files and the tuning and catalog caches. The temporary is `<path>.partial` (or another suffix the caller
names); `commit` syncs it to disk, renames it over the target and syncs the folder, so a crash at any
moment leaves the old file or the new one, never half of one. After a failure, `discard` removes the
temporary, so an unfinished write leaves nothing behind (a killed process cannot; its temporary is
overwritten by the next write).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO

from gpl_cli.errors import GplError

PARTIAL = ".partial"


def refuse_existing(paths: list[str], overwrite: bool, hint: str = "") -> None:
    """The one refusal of an existing output: every command words it alike."""
    existing = next((p for p in paths if os.path.lexists(p)), None)
    if existing is not None and not overwrite:
        raise GplError(f"output exists: {existing}{hint} (use --overwrite to replace it)")


class AtomicPath:
    """A file or folder `path`, written at `partial` and renamed into place by `commit`."""

    def __init__(self, path: str, overwrite: bool = False, suffix: str = PARTIAL):
        refuse_existing([path], overwrite)
        self.path = path
        self.partial = path + suffix

    def commit(self) -> str:
        """Sync the finished temporary, rename it over `path` (a folder replaces a folder), sync the parent."""
        _sync_tree(self.partial)
        if os.path.isdir(self.partial) and os.path.isdir(self.path):
            shutil.rmtree(self.path)  # rename cannot replace a folder that holds files
        os.replace(self.partial, self.path)
        _sync(os.path.dirname(os.path.abspath(self.path)))
        return self.path

    def discard(self) -> None:
        """Remove the temporary, whatever it holds."""
        _remove(self.partial)


def remove_whole(path: str, suffix: str) -> None:
    """Remove a file or folder so that it is gone at once for any reader: renamed to `path + suffix`
    first, deleted after (a kill mid-way leaves only those remains, which the next removal clears)."""
    trash = path + suffix
    _remove(trash)
    os.rename(path, trash)
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
    """The open temporary of `path`; when the block ends it is committed, or discarded if the block raised."""
    target = AtomicPath(path, overwrite, suffix)
    try:
        with open(target.partial, mode, encoding=encoding) as f:
            yield f
    except BaseException:
        target.discard()
        raise
    target.commit()


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(path: str) -> None:
    """fsync a file, or every file and folder under a folder."""
    if not os.path.isdir(path):
        _sync(path)
        return
    for folder, _, files in os.walk(path):
        for name in files:
            _sync(os.path.join(folder, name))
        _sync(folder)
