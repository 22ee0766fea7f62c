"""Turning command-line inputs into one ordered list of images.

Row order is decided here, once: the arguments in the order given; a directory walked recursively and
sorted by relative path; a stdin list in its order; a tar shard's samples in stream order and a parquet
file's rows in row order (gpl_cli.embedding.sources). An argument that names no file is expanded as a
pattern: brace ranges and lists as WebDataset writes them (`shards/{00000..00999}.tar`), then globs.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO

from gpl_cli.embedding.sources import (
    IMAGE_SUFFIXES,
    MadeImage,
    ParquetRow,
    SourceOptions,
    TarMember,
    container_kind,
    field_member,
    list_container,
)
from gpl_cli.errors import GplError

IMAGE_EXTENSIONS = frozenset(IMAGE_SUFFIXES)


@dataclass(frozen=True)
class InputItem:
    """One image to embed: where to open it and the name it is stored under."""

    path: str  # as the OS opens it; inside a container, the container's path + "/" + the sample's key (for messages)
    name: str  # as written to the output: relative to the input root; inside a container, CONTAINER/KEY
    error: str | None = None  # a folder (or path) the walk could not read: a failure record, never decoded
    source: TarMember | ParquetRow | MadeImage | None = None  # where its bytes lie: a tar shard, parquet file, memory

    def current_stat(self) -> tuple[int, int]:
        """(size, mtime_ns) now, what --update and --resume compare with the one recorded with a row: the file's,
        or for an image inside a container the one its listing found ((-1, -1): cannot be stat'ed)."""
        if self.source is not None:
            return self.source.stat
        try:
            st = os.stat(self.path)
        except OSError:
            return (-1, -1)
        return (st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class InputList:
    items: list[InputItem]
    root: str  # what `name` is relative to
    duplicates: list[str] = field(default_factory=list)  # names given more than once (kept once)
    fields: tuple[str, ...] = ()  # --keep-fields, stored with each row (sources.keep_fields)
    no_image: list[str] = field(default_factory=list)  # samples of tar shards or parquet files that hold no image
    containers: list[str] = field(default_factory=list)  # the tar shards and parquet files read


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


def expand_pattern(pattern: str) -> list[str]:
    """The paths a pattern names: brace ranges and lists first (`{00000..00999}`, zero-padded as written;
    `{a,b}`), then globs, sorted; each path that names nothing is a GplError."""
    found = []
    for path in expand_braces(pattern):
        if glob.has_magic(path):
            matches = sorted(glob.glob(path))
            if not matches:
                raise GplError(f"input not found: {path} (no file matches)")
            found += matches
        elif os.path.lexists(path):
            found.append(path)
        else:
            raise GplError(f"input not found: {path}" + (f" (from {pattern})" if path != pattern else ""))
    return found


_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """`{N..M}` ranges (zero-padded to the wider end when either is written with a leading zero, as bash does)
    and `{a,b,c}` lists, every group expanded in order; other braces stay as written."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numbers = _RANGE.fullmatch(body)
    if numbers:
        a, b = numbers.groups()
        width = max(len(a), len(b)) if any(n.lstrip("-").startswith("0") and len(n.lstrip("-")) > 1 for n in (a, b)) else 0
        step = 1 if int(b) >= int(a) else -1
        choices = [str(n).zfill(width) for n in range(int(a), int(b) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [head + match.group(0) + rest for rest in expand_braces(tail)]
    return [path for choice in choices for path in expand_braces(head + choice + tail)]


def container_names(paths: list[str]) -> dict[str, str]:
    """The name each tar shard or parquet file gives its rows' names (NAME/KEY): its file name, unless two of
    them share one; then every container is named by its path as given."""
    unique = {os.path.normpath(p) for p in paths}
    names = {os.path.basename(p) for p in unique}
    by_file_name = len(names) == len(unique)
    return {p: os.path.basename(p) if by_file_name else os.path.normpath(p) for p in paths}


def collect_inputs(args: Iterable[str], stdin: IO[bytes] | None = None, nul_separated: bool = False,
                   sources: SourceOptions | None = None) -> InputList:
    """Expand CLI arguments (directories, files, tar shards, parquet files, patterns, or "-" for stdin) into
    an ordered InputList (module docstring).

    Names are relative to the directory when exactly one directory is given, and otherwise are the paths
    as given; an image inside a container is named CONTAINER/KEY (container_names). No image at all is an
    error (GplError). `sources`: how tar shards and parquet files are read.
    """
    options = sources or SourceOptions()
    options.check()
    args = list(args)
    if not args:
        raise GplError("no inputs given: pass image files, directories, tar shards, parquet files, "
                       "or - to read paths from stdin")
    single_dir = len(args) == 1 and args[0] != "-" and os.path.isdir(args[0])
    root = os.path.abspath(args[0]) if single_dir else os.getcwd()
    # Images in order, with (path, kind) standing for each container: listed once all of their names are known.
    pending: list[InputItem | tuple[str, str]] = []

    def add_file(path: str) -> None:
        kind = container_kind(path)
        pending.append((path, kind) if kind else InputItem(path, path))

    for arg in args:
        if arg == "-":
            stream = stdin if stdin is not None else sys.stdin.buffer
            # Listed paths are taken as given: a bad one becomes a per-file failure later.
            for path in read_path_list(stream, nul_separated):
                add_file(path)
            continue
        for path in [arg] if os.path.lexists(arg) else expand_pattern(arg):
            if os.path.isdir(path):
                for rel, error in walk_images(path):
                    name = rel if single_dir else os.path.join(path, rel)
                    pending.append(InputItem(os.path.join(path, rel), name, error))
            else:
                add_file(path)
    items, no_image, containers, found, kinds = _list_containers(pending, options)
    _check_options(options, kinds, found)
    unique: dict[str, InputItem] = {}
    duplicates = []
    for item in items:
        if item.name in unique:
            duplicates.append(item.name)
        else:
            unique[item.name] = item
    if not unique:
        extensions = " ".join(e.lstrip(".") for e in IMAGE_SUFFIXES)
        held = f"; {len(no_image)} sample(s) of the tar shards and parquet files hold no image" if no_image else ""
        raise GplError(f"no images found in the inputs (extensions: {extensions}){held}")
    return InputList(items=list(unique.values()), root=root, duplicates=duplicates, fields=options.keep_fields,
                     no_image=no_image, containers=containers)


def _list_containers(pending: list, options: SourceOptions):
    """`pending` with each container replaced by its samples: (items, samples without an image, containers,
    the --keep-fields some container holds, the kinds of container met)."""
    containers = [entry[0] for entry in pending if isinstance(entry, tuple)]
    names = container_names(containers)
    items: list[InputItem] = []
    no_image: list[str] = []
    found: set[str] = set()
    kinds: set[str] = set()
    for entry in pending:
        if isinstance(entry, InputItem):
            items.append(entry)
            continue
        path, kind = entry
        kinds.add(kind)
        listing = list_container(path, kind, options)
        found |= listing.found
        for e in listing.entries:
            if e.key is None:
                items.append(InputItem(path, names[path], e.error))
            else:
                items.append(InputItem(f"{path}/{e.key}", f"{names[path]}/{e.key}", e.error, e.source))
        no_image += [f"{names[path]}/{key}" for key in listing.no_image]
    return items, no_image, containers, found, kinds


def _check_options(options: SourceOptions, kinds: set[str], found: set[str]) -> None:
    """Options for containers the inputs do not have, and fields no input holds, are refused (a typo would
    otherwise store empty columns)."""
    for flag, value, kind, what in (("--image-key", options.image_key, "tar", "tar shards"),
                                    ("--image-column", options.image_column, "parquet", "parquet files"),
                                    ("--key-column", options.key_column, "parquet", "parquet files")):
        if value is not None and kind not in kinds:
            raise GplError(f"{flag} applies to {what}, and no input is one")
    if options.keep_fields and not kinds:
        raise GplError("--keep-fields applies to tar shards and parquet files, and no input is one")
    for spec in options.keep_fields:
        if spec not in found:
            raise GplError(f"--keep-fields {spec}: no input holds it (no tar sample has a .{field_member(spec)[0]} "
                           f"member, no parquet file a column {spec})")
