"""Converting an embeddings output to another format, through the same writers `gpl embed` uses."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from gpl_cli.errors import EXIT_TERMINATED, GplError
from gpl_cli.store.formats import file_format, npy, read_embeddings, read_metadata
from gpl_cli.store.output import Output

BLOCK_ROWS = 65536  # rows handed to the writer at a time


@dataclass
class ExportSummary:
    rows: int
    failures: int  # failure records in the source
    failures_dropped: bool  # the target format has no place for them
    files: list[str]


def export_embeddings(
    source: str, target: str, fmt: str | None = None, overwrite: bool = False, shard_rows: int | None = None
) -> ExportSummary:
    """Write every row, pooling and failure of `source` to `target` in `fmt` (default: from its extension)."""
    output = Output.resolve(target, fmt, overwrite=overwrite, shard_rows=shard_rows).check([source])
    # The files of an NPY target follow the source's poolings; none may be one of the source's files.
    output = replace(output, keys=tuple(read_metadata(source).get("pool_keys") or ()))
    output.check([source, *(npy.files_of(source) if file_format(source) == "npy" else [])])  # before reading rows
    with _terminated_like_interrupted():
        emb = read_embeddings(source)
        dims = {key: rows.shape[1] for key, rows in emb.vectors.items()}
        writer = output.open_writer(dims)
        return write_all(emb, writer, dict(emb.metadata, exported_from=os.path.abspath(source)))


def write_all(emb, writer, metadata: dict) -> ExportSummary:
    """Every row (with its file's recorded size and time) and failure of `emb` through `writer`, closed with
    `metadata`; any failure aborts it, leaving no partial files."""
    try:
        for start in range(0, len(emb), BLOCK_ROWS):
            stop = start + BLOCK_ROWS
            stats = None if emb.stats is None else [tuple(s) for s in emb.stats[start:stop].tolist()]
            fields = {name: values[start:stop] for name, values in emb.fields.items()} or None
            writer.write(emb.paths[start:stop], {key: rows[start:stop] for key, rows in emb.vectors.items()}, stats, fields)
        for name, reason in emb.failures:
            writer.fail(name, reason)
        files = writer.close(metadata)
    except BaseException:
        writer.abort()
        raise
    return ExportSummary(len(emb), len(emb.failures), bool(emb.failures) and not writer.keeps_failures, files)


@contextmanager
def _terminated_like_interrupted() -> Iterator[None]:
    """SIGTERM stops an export as Ctrl-C does, through the writer's abort: no partial files are left
    (its default action would end the process where it stands)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM acts at once
        raise GplError("terminated", EXIT_TERMINATED)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

