"""`Output`: one object per thing a command writes, resolved once from what the user gave.

It knows its format (from --format or the extension: the one place an output's format is resolved),
the files it consists of and the one renamed into place last (its marker), whether it is stdout,
its journal and lock, and it checks its location before any work: the folder exists and is writable,
no directory stands where a file goes, none of its files is one of the inputs, no other kind of output
replaces a gpl embeddings file, its name leaves room for the names written beside it (`.partial`,
`.lock`, the journal), and an existing file is
replaced only with --overwrite (gpl_cli.atomic.refuse_existing words that refusal for every command). Embeddings outputs
open their writer through the format registry (gpl_cli.store.formats); single-file outputs (pages,
figures, JSON, whitening files, predictions) are written through the atomic helper (gpl_cli.atomic).

Torch-free: every command builds its Output before the model loads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

from gpl_cli.atomic import PARTIAL, REPLACED, atomic_file, refuse_existing, write_failed
from gpl_cli.defaults import FORMAT_ALIASES, OUTPUT_EXTENSIONS, OUTPUT_FORMATS, STDOUT_FORMATS
from gpl_cli.errors import EXIT_FAILURE, GplError
from gpl_cli.store.formats import FORMATS, is_embeddings_file, read_metadata, shards
from gpl_cli.store.journal import BUILDING_SUFFIX, JOURNAL_SUFFIX, TRASH_SUFFIX
from gpl_cli.store.lock import LOCK_SUFFIX, OutputLocks
from gpl_cli.store.sink import STDOUT, Writer


@dataclass(frozen=True)
class Kind:
    """What sort of thing an output holds, and which formats (and extensions) it can be written in."""

    what: str  # in messages: "output", "figure", ...
    extensions: dict[str, str]  # extension -> format it implies
    formats: tuple[str, ...]  # what --format accepts
    stdout: tuple[str, ...] = ()  # formats that can go to stdout ("-")
    fallback: str | None = None  # the format of a file whose extension implies none (None: refuse)
    aliases: dict[str, str] = field(default_factory=dict)  # --format names that write another format


EMBEDDINGS = Kind("output", OUTPUT_EXTENSIONS, OUTPUT_FORMATS, STDOUT_FORMATS, aliases=FORMAT_ALIASES)
PREDICTIONS = Kind("output", {".jsonl": "jsonl", ".csv": "csv"}, ("text", "jsonl", "csv"), ("text", "jsonl", "csv"))
FIGURE = Kind("figure", {".png": "png", ".pdf": "pdf", ".svg": "svg"}, ("png", "pdf", "svg"))
PAGE = Kind("page", {}, ("html",), fallback="html")
JSON = Kind("JSON file", {}, ("json",), ("json",), fallback="json")
WHITENING = Kind("whitening file", {}, ("npz",), fallback="npz")


def format_for(path: str, fmt: str | None, kind: Kind = EMBEDDINGS) -> str:
    """The format of an output: --format as given, else the one its extension implies; on stdout the
    kind's first stdout format."""
    if path == STDOUT:
        if not kind.stdout:
            raise GplError(f"a {kind.what} cannot be written to stdout; give a file name")
        fmt = fmt or kind.stdout[0]
        if fmt not in kind.stdout:
            raise GplError(f"--format {fmt} cannot be written to stdout; use one of {', '.join(kind.stdout)}, or -o FILE")
        return fmt
    if fmt:
        if fmt not in kind.formats:
            raise GplError(f"unknown format {fmt!r}; valid: {', '.join(kind.formats)}")
        return kind.aliases.get(fmt, fmt)
    ext = os.path.splitext(path)[1].lower()
    if ext in kind.extensions:
        return kind.extensions[ext]
    if kind.fallback:
        return kind.fallback
    choices = " ".join(sorted(kind.extensions))
    hint = f", or --format {'|'.join(kind.formats)}" if kind is not FIGURE else ""
    raise GplError(f"cannot tell the {kind.what} format from {path!r}; use one of {choices}{hint}")


@dataclass(frozen=True)
class Output:
    """One output of a command, resolved once (see the module docstring).

    `keys` are the pooling keys of an embeddings output (an NPY output has one file per pooling);
    `shard_rows` applies to a folder of shards only.
    """

    path: str
    format: str
    kind: Kind = EMBEDDINGS
    keys: tuple[str, ...] = ()
    overwrite: bool = False
    shard_rows: int | None = None

    @classmethod
    def resolve(cls, path: str, fmt: str | None = None, kind: Kind = EMBEDDINGS, keys: Iterable[str] = (),
                overwrite: bool = False, shard_rows: int | None = None) -> Output:
        out = cls(path, format_for(path, fmt, kind), kind, tuple(keys), overwrite, shard_rows)
        if shard_rows is not None and not out.sharded:
            raise GplError("--shard-rows applies to --format shards (or parquet) only")
        return out

    # --- what it is ---------------------------------------------------------------------

    @property
    def to_stdout(self) -> bool:
        return self.path == STDOUT

    @property
    def holds_embeddings(self) -> bool:
        return self.kind is EMBEDDINGS

    @property
    def sharded(self) -> bool:
        """A folder of shards rather than files."""
        spec = FORMATS.get(self.format) if self.holds_embeddings else None
        return spec is not None and spec.sharded

    @property
    def files(self) -> list[str]:
        """Every file (or folder) a finished output consists of; the marker last."""
        if self.to_stdout:
            return []
        spec = FORMATS.get(self.format) if self.holds_embeddings else None
        return spec.files(self.path, list(self.keys)) if spec is not None and spec.files else [self.path]

    @property
    def marker(self) -> str:
        """The file renamed into place last: it exists only once the whole output does."""
        return self.files[-1]

    @property
    def journal(self) -> str:
        """The folder where an unfinished run keeps its finished rows (gpl_cli.store.journal)."""
        return self.path + JOURNAL_SUFFIX

    def unfinished(self) -> bool:
        """Whether a run into this output was interrupted and left its journal."""
        return os.path.isdir(self.journal)

    def exists(self) -> bool:
        return any(os.path.lexists(f) for f in self.files)

    def lock(self) -> OutputLocks:
        """The locks that keep a second run from writing any file of this output at the same time: one on each
        of its files, and one on its own name, which stands for its journal (named after it)."""
        return OutputLocks([self.path, *self.files])

    # --- checks before any work -----------------------------------------------------------

    def check(self, inputs: Iterable[str] = (), replacing: bool = False) -> Output:
        """Refuse, before any work, an output that cannot or must not be written: its folder missing or
        not writable, a directory where a file goes, a file that is one of the `inputs` (whatever
        --overwrite says), or an existing file without --overwrite (unless `replacing`: --update and
        --resume replace their own output)."""
        if self.to_stdout:
            return self
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise GplError(f"cannot write {self.path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise GplError(f"cannot write {self.path}: the folder {folder} is not writable")
        files = self.files
        if not self.sharded:
            for f in files:
                if os.path.isdir(f):
                    raise GplError(f"cannot write {f}: it is a directory")
        existing = {os.path.realpath(f) for f in files if os.path.exists(f)}
        names = {os.path.basename(f) for f in existing}  # resolve only inputs that could be one of them
        clash = next((p for p in inputs if os.path.basename(p) in names and os.path.realpath(p) in existing), None)
        if clash is not None:
            raise GplError(f"the {self.kind.what} {self.path} is one of the inputs ({clash}); choose another")
        if not self.holds_embeddings:
            embeddings = next((f for f in files if is_gpl_output(f)), None)
            if embeddings is not None:  # a mistyped name must not cost the hours an embeddings file took
                raise GplError(f"{embeddings} is a gpl embeddings file; this command does not replace it, even with "
                               f"--overwrite (choose another name for the {self.kind.what})")
        self._check_name_lengths(folder)
        if not replacing:
            refuse_existing(files, self.overwrite)
        return self

    def _check_name_lengths(self, folder: str) -> None:
        """Refuse a name that the names gpl writes beside it (`.partial`, `.lock`, the journal) would push
        past the file system's limit: found out before the work, not after it."""
        try:
            limit = os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = 255
        names = [f + suffix for f in self.files for suffix in (PARTIAL, REPLACED, LOCK_SUFFIX)]
        if self.holds_embeddings:
            names += [self.journal + suffix for suffix in (BUILDING_SUFFIX, TRASH_SUFFIX)]
        longest = max((os.path.basename(n) for n in names), key=lambda n: len(os.fsencode(n)))
        if len(os.fsencode(longest)) > limit:
            raise GplError(f"cannot write {self.path}: its name is too long; gpl also writes {longest!r} beside "
                           f"it, and a file name holds at most {limit} bytes here")

    # --- writing ----------------------------------------------------------------------------

    def open_writer(self, dims: dict[str, int], replace: bool = False) -> Writer:
        """The format's writer (embeddings outputs); `replace`: this run may replace the output on disk.
        A write the system refuses (write_failed) says how to finish the run where a journal keeps its rows."""
        spec = FORMATS[self.format]
        overwrite = self.overwrite or replace
        with self._resume_hint():
            if spec.sharded:
                writer = spec.writer(self.path, dims, overwrite, self.shard_rows or shards.DEFAULT_SHARD_ROWS)
            else:
                writer = spec.writer(self.path, dims, overwrite)
        return _HintingWriter(writer, self)

    @contextmanager
    def _resume_hint(self) -> Iterator[None]:
        try:
            yield
        except GplError as exc:
            if exc.exit_code != EXIT_FAILURE or not self.unfinished():
                raise
            raise GplError(f"{exc}; the finished rows are kept in {self.journal}: once the disk can take the output, "
                           "run the same command with --resume to write it", exc.exit_code) from None

    @contextmanager
    def open(self, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
        """A single-file output, written whole or not at all (gpl_cli.atomic); its location was checked by
        `check` before the work, so an existing file is replaced here."""
        try:
            with atomic_file(self.path, mode, overwrite=True, encoding=encoding) as f:
                yield f
        except OSError as exc:  # raised through the file by a library writing into it
            raise write_failed(exc, self.path) from None


@dataclass
class _HintingWriter:
    """An output's writer, its failures worded by Output._resume_hint."""

    writer: Writer
    output: Output

    @property
    def keeps_failures(self) -> bool:
        return self.writer.keeps_failures

    def write(self, names: list[str], vectors: dict, stats: list[tuple[int, int]] | None = None,
              fields: dict[str, list[str]] | None = None) -> None:
        with self.output._resume_hint():
            self.writer.write(names, vectors, stats, fields)

    def fail(self, name: str, reason: str) -> None:
        with self.output._resume_hint():
            self.writer.fail(name, reason)

    def close(self, metadata: dict) -> list[str]:
        with self.output._resume_hint():
            return self.writer.close(metadata)

    def abort(self) -> None:
        self.writer.abort()


def is_gpl_output(path: str) -> bool:
    """Whether `path` is a readable gpl embeddings output (what gpl embed or export wrote)."""
    if not is_embeddings_file(path):
        return False
    try:
        return isinstance(read_metadata(path), dict)
    except GplError:
        return False
