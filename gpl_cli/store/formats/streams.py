"""Writers for pipe-friendly formats: JSON Lines, CSV/TSV, and a bare .npy on stdout.

They follow the writer protocol of gpl_cli.store.sink (write / fail / close / abort). The output
is a file (written as `<path>.partial`, renamed when complete) or "-" for stdout. On stdout,
rows leave as each batch is done (the stream is flushed after every batch), and nothing but
data may reach it: the writer takes over file descriptor 1 and points the process's own
stdout, including C libraries' prints, at stderr.

Stream layouts:
- jsonl: one object per image, `{"path": NAME, "embeddings": {POOLING: [floats]}}`, with the fields
  kept from the inputs (--keep-fields) between the two (`"json.url": "..."`); an image
  that could not be embedded is `{"path": NAME, "error": REASON}`, written when its batch is
  done, before that batch's rows.
- csv / tsv: a header `path,<kept field>...,<pooling>_0,...` then one row per embedded image; failures are
  not rows (they are on stderr, and the exit status is 3).
- npy on stdout: one N x D float32 array of the one pooling, rows in input order, failed
  images left out. Its header holds N, known only at the end, so rows are spooled to a
  temporary file (disk, not memory) and streamed out when the run is complete.

Floats are written with 9 significant digits, which read back to the same float32 values.
In csv and tsv, a name is one field of one line, escaped as every line output of gpl writes
names (gpl_cli.store.sink.line_name: backslash, tab, newline, CR as \\\\ \\t \\n \\r, other control
characters as \\xNN); its other bytes are written as they are. In JSON, a name that is not valid
UTF-8 is written with \\udcXX escapes (Python's surrogateescape:
`os.fsencode(json.loads(line)["path"])` gives the original bytes back).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import BinaryIO

import numpy as np

from gpl_cli.atomic import AtomicPath, ReportingFile, reporting
from gpl_cli.errors import GplError
from gpl_cli.store.sink import STDOUT, STDOUT_NAME, line_name, npy_header


def claim_stdout() -> BinaryIO:
    """Standard output as a binary stream for data; later prints of the process go to stderr."""
    sys.stdout.flush()
    data = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    os.dup2(2, 1)
    return data


class Destination:
    """Bytes to stdout ("-"), or to `<path>.partial`, renamed to `path` once complete."""

    def __init__(self, path: str, overwrite: bool):
        self.path = path
        self.target = None if path == STDOUT else AtomicPath(path, overwrite)
        # A full disk (or a full pipe's device, /dev/full) is one line naming where, and a temporary goes at once
        if self.target is None:
            self.file = ReportingFile(claim_stdout(), STDOUT_NAME, on_failure=self.abort)
        else:
            with reporting(path):
                self.file = ReportingFile(open(self.target.partial, "wb"), path, on_failure=self.abort)
        self.aborted = False

    def commit(self) -> list[str]:
        self.file.close()  # a failure aborts (on_failure)
        if self.target is not None:
            self.target.commit()  # a failure there discards the temporary
        return [self.path]

    def abort(self) -> None:
        if self.aborted:
            return
        self.aborted = True
        try:
            self.file.close()
        except (OSError, GplError):
            pass  # a closed pipe or a full disk cannot take the rest of the buffer; the output is not kept
        if self.target is not None:
            self.target.discard()


def _row_formats(dims: dict[str, int], sep: str) -> dict[str, str]:
    """Per pooling, a %-format turning one row (a tuple of D floats) into text."""
    return {key: sep.join(["%.9g"] * dim) for key, dim in dims.items()}


def _json_floats(fmt: str, row: np.ndarray) -> str:
    if np.isfinite(row).all():
        return "[" + fmt % tuple(row.tolist()) + "]"
    return json.dumps(row.tolist())  # NaN / Infinity, as Python's json reads them


def _json_name(name: str) -> str:
    text = json.dumps(name, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes (surrogateescape): keep them as \\udcXX escapes
        return json.dumps(name)
    return text


class JsonlWriter:
    """JSON Lines: one object per image (see the module docstring)."""

    keeps_failures = True

    def __init__(self, path: str, dims: dict[str, int], overwrite: bool = False):
        self.out = Destination(path, overwrite)
        self.formats = _row_formats(dims, ", ")
        self.keys = {key: json.dumps(key) for key in dims}

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats=None,
              fields: dict[str, list[str]] | None = None) -> None:
        lines = []
        for i, name in enumerate(names):
            pools = ", ".join(f"{self.keys[k]}: {_json_floats(self.formats[k], v[i])}" for k, v in vectors.items())
            kept = "".join(f"{json.dumps(f, ensure_ascii=False)}: {json.dumps(v[i], ensure_ascii=False)}, "
                           for f, v in (fields or {}).items())
            lines.append(f'{{"path": {_json_name(name)}, {kept}"embeddings": {{{pools}}}}}\n')
        self.out.file.write("".join(lines).encode("utf-8"))
        self.out.file.flush()

    def fail(self, name: str, reason: str) -> None:
        line = f'{{"path": {_json_name(name)}, "error": {json.dumps(reason)}}}\n'
        self.out.file.write(line.encode("utf-8"))
        self.out.file.flush()

    def close(self, metadata: dict) -> list[str]:
        return self.out.commit()

    def abort(self) -> None:
        self.out.abort()


class DelimitedWriter:
    """CSV or TSV: a header row, then `path` and every pooling's D columns per embedded image.

    Names are escaped by line_name, so no field holds a line break (or, in tsv, a tab); a field is
    quoted the CSV way (in double quotes, inner quotes doubled) only when it holds the delimiter or
    a quote, as Python's csv module and spreadsheets read it; lines end in \\n.
    """

    keeps_failures = False

    def __init__(self, path: str, dims: dict[str, int], overwrite: bool = False, delimiter: str = ","):
        self.out = Destination(path, overwrite)
        self.delimiter = delimiter
        self.formats = _row_formats(dims, delimiter)
        self.columns = [f"{key}_{i}" for key, dim in dims.items() for i in range(dim)]
        self.header = False  # written with the first rows, whose kept fields (if any) are columns of their own

    def _header(self, fields: dict | None) -> None:
        if not self.header:
            self._emit([self.delimiter.join(self._field(h) for h in ["path", *(fields or {}), *self.columns])])
            self.header = True

    def _field(self, text: str) -> str:
        text = line_name(text)
        if self.delimiter in text or '"' in text:
            return '"' + text.replace('"', '""') + '"'
        return text

    def _emit(self, lines: list[str]) -> None:
        self.out.file.write("".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"))
        self.out.file.flush()

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats=None,
              fields: dict[str, list[str]] | None = None) -> None:
        sep = self.delimiter
        self._header(fields)
        self._emit([
            sep.join(self._field(text) for text in [name, *(v[i] for v in (fields or {}).values())]) + sep
            + sep.join(self.formats[k] % tuple(v[i].tolist()) for k, v in vectors.items())
            for i, name in enumerate(names)
        ])

    def fail(self, name: str, reason: str) -> None:
        """Failures are not rows: the embed job reports them on stderr."""

    def close(self, metadata: dict) -> list[str]:
        self._header(None)
        return self.out.commit()

    def abort(self) -> None:
        self.out.abort()


class NpyStreamWriter:
    """One N x D float32 .npy on stdout, rows spooled to a temporary file until N is known."""

    keeps_failures = False

    def __init__(self, path: str, dims: dict[str, int], overwrite: bool = False):
        if len(dims) != 1:
            raise GplError(
                f"--format npy on stdout carries one array, but {len(dims)} poolings were asked for "
                f"({', '.join(dims)}): pick one --pool, or use --format jsonl/csv/tsv, or -o FILE.npy"
            )
        ((self.key, self.dim),) = dims.items()
        self.rows = 0
        self.spool = tempfile.TemporaryFile(prefix="gpl-npy-")
        self.out = Destination(path, overwrite)

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats=None, fields=None) -> None:
        """Vectors only: a bare array has no place for names or kept fields."""
        self.spool.write(np.ascontiguousarray(vectors[self.key], dtype="<f4").tobytes())
        self.rows += len(names)

    def fail(self, name: str, reason: str) -> None:
        """Failed images take no row; the embed job reports them on stderr."""

    def close(self, metadata: dict) -> list[str]:
        self.out.file.write(npy_header(self.rows, self.dim))
        self.spool.seek(0)
        shutil.copyfileobj(self.spool, self.out.file, 1 << 20)
        self.spool.close()
        return self.out.commit()

    def abort(self) -> None:
        self.spool.close()
        self.out.abort()

