"""Output formats: one module per format holding its writer and its reader, and the one registry
(`FORMATS`) through which outputs (gpl_cli.store.output.Output, which resolves an output's format and
files) and every reader find them.

Format names and the extensions that imply them are spelled once, torch-free, in gpl_cli.defaults
(the command line builds its choices from them); each `Format` here adds what writes and reads it:

- h5 (gpl_cli.store.formats.h5), npy (.npy files + sidecars, or one bare array on stdout;
  gpl_cli.store.formats.npy) and parquet (npy shards + parquet paths, a folder; gpl_cli.store.formats.shards):
  gpl's own outputs, read back;
- jsonl, csv, tsv (gpl_cli.store.formats.streams): made for other tools, file or stdout, write-only.

Every writer works on `<target>.partial` files (gpl_cli.atomic) and renames them into place in `close`,
so a crash never leaves a file that looks finished; `abort` removes them. Row i always belongs to name i;
failures go to a separate record and never take a row. What writers share (the Writer protocol, the npy
header) is in gpl_cli.store.sink; what readers share (Embeddings, the checks) in gpl_cli.store.embeddings.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from gpl_cli.defaults import OUTPUT_EXTENSIONS, STDOUT_FORMATS
from gpl_cli.errors import GplError
from gpl_cli.store.embeddings import Damaged, Embeddings, check
from gpl_cli.store.formats import h5, npy, shards, streams
from gpl_cli.store.sink import Writer


@dataclass(frozen=True)
class Format:
    """One output format: what writes it, what reads it back, and what its name and extensions imply."""

    name: str
    writer: Callable[..., Writer]  # (path, dims, overwrite) -> Writer; sharded ones also take rows per shard
    reader: Callable[[str, list[str] | None], Embeddings] | None = None  # None: written for other tools only
    metadata_reader: Callable[[str], dict] | None = None  # the metadata alone, without reading rows
    files: Callable[[str, list[str]], list[str]] | None = None  # (path, pooling keys) -> its files; None: path alone
    stored_files: Callable[[str], list[str]] | None = None  # an existing output's path -> all its files; None: path alone
    opens_by: tuple[str, ...] = ()  # extensions of its other files that also open it (an NPY output's .json)
    sharded: bool = False  # a folder of shards: takes `shard_rows`, and the output path is a directory

    @property
    def extensions(self) -> tuple[str, ...]:
        """The output extensions that imply this format (gpl_cli.defaults.OUTPUT_EXTENSIONS)."""
        return tuple(ext for ext, name in OUTPUT_EXTENSIONS.items() if name == self.name)

    @property
    def to_stdout(self) -> bool:
        return self.name in STDOUT_FORMATS


FORMATS = {f.name: f for f in (
    Format("h5", h5.H5Writer, h5.read_h5, h5.read_h5_metadata),
    Format("npy", npy.open_npy_writer, npy.read_npy, files=npy.output_files, stored_files=npy.files_of,
           opens_by=(".json",)),
    Format("parquet", shards.ShardWriter, shards.read_shard_folder, stored_files=shards.files_below, sharded=True),
    Format("jsonl", streams.JsonlWriter),
    Format("csv", partial(streams.DelimitedWriter, delimiter=",")),
    Format("tsv", partial(streams.DelimitedWriter, delimiter="\t")),
)}
# The gpl outputs that can be read back, by extension; a sharded output is a folder.
READABLE_EXTENSIONS = {ext: f.name for f in FORMATS.values() if f.reader for ext in (*f.extensions, *f.opens_by)}


# --- reading -----------------------------------------------------------------------------


def file_format(path: str) -> str:
    """h5, npy or parquet (a shard folder), from what `path` is."""
    if os.path.isdir(path):
        if shards.is_shard_folder(path):
            return "parquet"
        raise GplError(f"{path} is a folder but not a gpl parquet output (no gpl.json in it)")
    ext = os.path.splitext(path)[1].lower()
    if ext in READABLE_EXTENSIONS:
        return READABLE_EXTENSIONS[ext]
    raise GplError(f"{path}: unknown embeddings format (expected .h5, .npy, or a parquet output folder)")


def is_embeddings_file(arg: str) -> bool:
    """A saved gpl output: an .h5 / .npy / .json file, the name an NPY output was written to, or a shards
    (parquet) folder."""
    return ((os.path.isfile(arg) and os.path.splitext(arg)[1].lower() in READABLE_EXTENSIONS)
            or npy.names_an_output(arg) or shards.is_shard_folder(arg))


def read_embeddings(path: str, keys: list[str] | None = None) -> Embeddings:
    """Load a gpl output: .h5/.hdf5, an NPY output given by any of its .npy files or its .json,
    or a parquet output folder. `keys`: the poolings to load (default all; [] loads none).
    The one way gpl reads its files: every reader's result passes through readers.check."""
    if not os.path.exists(path) and not npy.names_an_output(path):
        raise GplError(f"no such file: {path}")
    reader = FORMATS[file_format(path)].reader
    try:
        return check(reader(path, keys))
    except GplError:
        raise
    except Damaged as exc:
        raise GplError(f"{path}: not a readable gpl embeddings file: {exc}") from None
    except (OSError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise GplError(f"{path}: not a readable gpl embeddings file ({type(exc).__name__}: {exc})") from None


def read_metadata(path: str) -> dict:
    """Only the metadata of a gpl output (what made it, its poolings), without rows where the format allows."""
    spec = FORMATS[file_format(path)] if os.path.isfile(path) else None
    if spec is not None and spec.metadata_reader is not None:
        try:
            return spec.metadata_reader(path)
        except Damaged as exc:
            raise GplError(f"{path}: not a readable gpl embeddings file: {exc}") from None
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise GplError(f"{path}: not a readable gpl embeddings file ({type(exc).__name__}: {exc})") from None
    return read_embeddings(path, keys=[]).metadata


def stored_bytes(path: str) -> tuple[int, int]:
    """The bytes of all the files of the existing output at `path`, and how many files they are."""
    spec = FORMATS[file_format(path)]
    files = spec.stored_files(path) if spec.stored_files else [path]
    return sum(os.path.getsize(f) for f in files), len(files)


def describe(path: str) -> dict:
    """What an embeddings file holds, as a JSON-able summary (what `gpl info` shows): its rows' paths in row
    order, and the size of its files on disk."""
    emb = read_embeddings(path, keys=[])
    meta = emb.metadata
    pools = meta.get("pools", {})
    size, files = stored_bytes(path)
    return {
        "file": path,
        "format": file_format(path),
        "size_bytes": size,
        "file_count": files,
        "count": len(emb),
        "failed": len(emb.failures),
        "poolings": {key: pools[key] for key in meta.get("pool_keys", pools)},
        **{k: v for k, v in meta.items() if k not in ("pools", "pool_keys", "count", "failed")},
        "paths": emb.paths,
        "failures": [{"path": p, "reason": r} for p, r in emb.failures],
    }
