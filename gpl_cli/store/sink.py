"""What every output writer shares: the sink and writer protocols, names as bytes, the npy array header.

The writers in gpl_cli.store.formats build on this module; it imports none of them, so they never import
each other in a circle.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import suppress
from typing import Protocol

import numpy as np

from gpl_cli.atomic import ReportingFile, reporting
from gpl_cli.errors import GplError

STDOUT = "-"  # as an output path: write to standard output
STDOUT_NAME = "standard output"  # where a failed write to STDOUT happened, in messages


def encode_name(name: str) -> bytes:
    # surrogateescape keeps names that are not valid UTF-8 (raw bytes on Linux) round-trippable.
    return name.encode("utf-8", "surrogateescape")


# What line_name escapes: the backslash (so the escapes stay unambiguous), every control character (C0, DEL,
# C1: tab and newline split fields and lines, others drive terminals) and the Unicode line and paragraph
# separators (Python's str.splitlines and some editors break lines at them).
_LINE_ESCAPES = {
    ord("\\"): "\\\\", ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r",
    **{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if chr(c) not in "\t\n\r"},
    0x2028: "\\u2028", 0x2029: "\\u2029",
}


def line_name(name: str) -> str:
    """A name as one field of one line, the one way every line-oriented output writes names (neighbors,
    classify, info, csv/tsv, paths.txt): backslash, tab, newline and CR as \\\\ \\t \\n \\r, other control
    characters as \\xNN, U+2028/U+2029 as \\uNNNN; everything else as is. A name can then neither add a line
    nor a tab-separated field, and Python's codecs.decode(line, "unicode_escape") undoes it for ASCII names."""
    return name.translate(_LINE_ESCAPES)


class Sink(Protocol):
    """Where finished rows go, in input order: every output writer, the run journal, the embed job's
    feed to either (pipeline), an in-memory collection. Engines call write(names, vectors)."""

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats: list[tuple[int, int]] | None = None) -> None:
        """Append rows; `stats` is each file's (size, mtime_ns), what --update compares."""

    def fail(self, name: str, reason: str) -> None: ...


class Writer(Sink, Protocol):
    """A Sink that becomes an output: `close` makes it visible, `abort` leaves nothing."""

    keeps_failures: bool  # whether `fail` records the image in the output (csv, tsv, a bare npy: rows only)

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats: list[tuple[int, int]] | None = None,
              fields: dict[str, list[str]] | None = None) -> None:
        """Append rows; `fields`: per field kept from the inputs (--keep-fields), one string per row, stored as a
        string column (a bare npy on stdout has no place for them)."""

    def close(self, metadata: dict) -> list[str]: ...

    def abort(self) -> None: ...


def npy_header(rows: int, dim: int) -> bytes:
    """The 128-byte header of an N x D little-endian float32 .npy (format 1.0)."""
    magic = b"\x93NUMPY\x01\x00"
    body = repr({"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}).encode("latin1")
    pad = NpyStream.HEADER_BYTES - len(magic) - 2 - len(body) - 1
    header = body + b" " * pad + b"\n"
    return magic + len(header).to_bytes(2, "little") + header


class NpyStream:
    """An N x D float32 .npy written row by row; the header is fixed-size and rewritten at the end.
    `sha256` digests the array's bytes (after the header) as they are written: what an NPY output's
    .json records of each part, checked against the loaded array (gpl_cli.store.formats.npy)."""

    HEADER_BYTES = 128

    def __init__(self, path: str, dim: int, name: str | None = None):
        self.path, self.dim, self.rows = path, dim, 0
        self.sha256 = hashlib.sha256()
        with reporting(name or path):
            self.file = ReportingFile(open(path, "wb"), name or path)
        self._header()

    def _header(self) -> None:
        self.file.seek(0)
        self.file.write(npy_header(self.rows, self.dim))

    def append(self, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype="<f4").tobytes()
        self.file.seek(0, os.SEEK_END)
        self.file.write(data)
        self.sha256.update(data)
        self.rows += len(rows)

    def close(self) -> None:
        self._header()
        self.file.close()

    def abandon(self) -> None:
        """Close after a failure: the file is discarded, what its buffer held does not matter."""
        with suppress(OSError, GplError):
            self.file.close()


def safe_key(key: str) -> str:
    """A pooling key as a file-name part: 'gem:p=4' -> 'gem_p4'."""
    return key.replace(":", "_").replace("=", "").replace(",", "_")
