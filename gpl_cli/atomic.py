"""Files that appear whole or not at all: written under a temporary name beside the target, synced, renamed.

Every file gpl writes goes through here: the output formats, the run journal, whitening files and
the tuning and catalog caches. The temporary is `<path>.partial` (or another suffix the caller
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


def refuse_existing(paths: list[str], overwrite: bool) -> None:
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise GplError(f"output exists: {existing[0]} (use --overwrite to replace it)")


def check_output_folder(path: str) -> None:
    """Refuse, before any work, a path whose folder is missing or not writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GplError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise GplError(f"cannot write {path}: the folder {folder} is not writable")


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
        if os.path.isdir(self.partial):
            shutil.rmtree(self.partial, ignore_errors=True)
        else:
            with suppress(FileNotFoundError):
                os.remove(self.partial)


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
