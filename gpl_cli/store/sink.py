"""What every output writer shares: the sink and writer protocols, names as bytes, the npy array header.

The writers in gpl_cli.store.formats build on this module; it imports none of them, so they never import
each other in a circle.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

STDOUT = "-"  # as an output path: write to standard output


def encode_name(name: str) -> bytes:
    # surrogateescape keeps names that are not valid UTF-8 (raw bytes on Linux) round-trippable.
    return name.encode("utf-8", "surrogateescape")


class Sink(Protocol):
    """Where finished rows go, in input order: every output writer, the run journal, the embed job's
    feed to either (pipeline), an in-memory collection. Engines call write(names, vectors)."""

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats: list[tuple[int, int]] | None = None) -> None:
        """Append rows; `stats` is each file's (size, mtime_ns), what --update compares."""

    def fail(self, name: str, reason: str) -> None: ...


class Writer(Sink, Protocol):
    """A Sink that becomes an output: `close` makes it visible, `abort` leaves nothing."""

    keeps_failures: bool  # whether `fail` records the image in the output (csv, tsv, a bare npy: rows only)

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
    """An N x D float32 .npy written row by row; the header is fixed-size and rewritten at the end."""

    HEADER_BYTES = 128

    def __init__(self, path: str, dim: int):
        self.path, self.dim, self.rows = path, dim, 0
        self.file = open(path, "wb")
        self._header()

    def _header(self) -> None:
        self.file.seek(0)
        self.file.write(npy_header(self.rows, self.dim))

    def append(self, rows: np.ndarray) -> None:
        self.file.seek(0, os.SEEK_END)
        self.file.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        self._header()
        self.file.close()


def safe_key(key: str) -> str:
    """A pooling key as a file-name part: 'gem:p=4' -> 'gem_p4'."""
    return key.replace(":", "_").replace("=", "").replace(",", "_")
