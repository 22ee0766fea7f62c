"""Turning command-line inputs into one ordered list of image paths.

Row order is decided here, once: directories are walked recursively and sorted by
relative path, files and stdin lists keep the order they were given in.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO

from gpl_cli.errors import GplError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # in the order messages list them
IMAGE_EXTENSIONS = frozenset(IMAGE_SUFFIXES)


@dataclass(frozen=True)
class InputItem:
    """One image to embed: where to open it and the name it is stored under."""

    path: str  # as the OS opens it
    name: str  # as written to the output: relative to the input root
    error: str | None = None  # a folder (or path) the walk could not read: a failure record, never decoded


@dataclass(frozen=True)
class InputList:
    items: list[InputItem]
    root: str  # what `name` is relative to
    duplicates: list[str] = field(default_factory=list)  # names given more than once (kept once)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(directory: str) -> list[tuple[str, str | None]]:
    """Image files below `directory` as (path relative to it, None), and the folders below it that could
    not be read as (relative path, reason), sorted together: a folder's failure sits where its images
    would have been, and nothing is skipped without a word (the Job records each as a failure).

    The walk keeps its own stack (no recursion limit, however deep the tree). Symlinked directories
    are not followed, so a link loop cannot trap the walk. GplError when `directory` itself cannot be read.
    """
    found: list[tuple[str, str | None]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(directory, rel)) as listing:
                entries = [(entry.name, _is_real_dir(entry)) for entry in listing]
        except OSError as exc:
            if not rel:
                raise GplError(f"cannot read {directory}: {exc.strerror or exc}") from None
            found.append((rel, f"cannot read this folder: {exc.strerror or exc}"))
            continue
        for name, is_dir in entries:
            if is_dir:
                stack.append(os.path.join(rel, name))
            elif is_dir is False and is_image_name(name):
                found.append((os.path.join(rel, name), None))
    # Sort on the path components so "a/b.jpg" < "a.b/c.jpg" the way a listing reads.
    found.sort(key=lambda entry: entry[0].split(os.sep))
    return found


def _is_real_dir(entry: os.DirEntry) -> bool | None:
    """True for a directory to walk, None for a symlink to one, False for anything else (as os.walk judges:
    an entry that cannot be examined is not a directory)."""
    try:
        if not entry.is_dir():
            return False
        return None if entry.is_symlink() else True
    except OSError:
        return False


def read_path_list(stream: IO[bytes], nul_separated: bool = False) -> list[str]:
    """Paths from a byte stream, one per line (or NUL-terminated); blank entries skipped.

    Names are kept byte for byte (spaces, tabs, a CR inside a name, bytes that are not
    UTF-8); only a line's final CR is dropped so CRLF lists work. A name that holds a
    newline can only come NUL-separated.
    """
    data = stream.read()
    if nul_separated:
        parts = data.split(b"\0")
    else:
        parts = [line.removesuffix(b"\r") for line in data.split(b"\n")]
    return [os.fsdecode(p) for p in parts if p.strip()]


def collect_inputs(args: Iterable[str], stdin: IO[bytes] | None = None, nul_separated: bool = False) -> InputList:
    """Expand CLI arguments (directories, files, or "-" for stdin) into an ordered InputList.

    Names are relative to the directory when exactly one directory is given, and
    otherwise are the paths as given. No image at all is an error (GplError).
    """
    args = list(args)
    if not args:
        raise GplError("no inputs given: pass image files, directories, or - to read paths from stdin")
    single_dir = len(args) == 1 and args[0] != "-" and os.path.isdir(args[0])
    root = os.path.abspath(args[0]) if single_dir else os.getcwd()
    items: list[InputItem] = []
    for arg in args:
        if arg == "-":
            stream = stdin if stdin is not None else sys.stdin.buffer
            # Listed paths are taken as given: a bad one becomes a per-file failure later.
            items.extend(InputItem(p, p) for p in read_path_list(stream, nul_separated))
        elif os.path.isdir(arg):
            for rel, error in walk_images(arg):
                name = rel if single_dir else os.path.join(arg, rel)
                items.append(InputItem(os.path.join(arg, rel), name, error))
        elif os.path.lexists(arg):
            items.append(InputItem(arg, arg))
        else:
            raise GplError(f"input not found: {arg}")
    unique: dict[str, InputItem] = {}
    duplicates = []
    for item in items:
        if item.name in unique:
            duplicates.append(item.name)
        else:
            unique[item.name] = item
    if not unique:
        extensions = " ".join(e.lstrip(".") for e in IMAGE_SUFFIXES)
        raise GplError(f"no images found in the inputs (extensions: {extensions})")
    return InputList(items=list(unique.values()), root=root, duplicates=duplicates)

