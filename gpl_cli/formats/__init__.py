"""Output formats: one module per format holding its writer and its reader, and the one registry
(`FORMATS`) through which the command line, the embed job, `gpl export`, `gpl compare` and every
reader find them.

Format names and the extensions that imply them are spelled once, torch-free, in gpl_cli.defaults
(the command line builds its choices from them); each `Format` here adds what writes and reads it:

- h5 (gpl_cli.formats.h5), npy (.npy files + sidecars, or one bare array on stdout;
  gpl_cli.formats.npy) and parquet (npy shards + parquet paths, a folder; gpl_cli.formats.shards):
  gpl's own outputs, read back;
- jsonl, csv, tsv (gpl_cli.formats.streams): made for other tools, file or stdout, write-only.

Every writer works on `<target>.partial` files (gpl_cli.atomic) and renames them into place in `close`,
so a crash never leaves a file that looks finished; `abort` removes them. Row i always belongs to name i;
failures go to a separate record and never take a row. What writers share (the Writer protocol, the npy
header) is in gpl_cli.outputs; what readers share (Embeddings, the checks) in gpl_cli.readers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from gpl_cli.atomic import check_output_folder
from gpl_cli.defaults import FORMAT_ALIASES, OUTPUT_EXTENSIONS, OUTPUT_FORMATS, STDOUT_FORMATS
from gpl_cli.errors import GplError
from gpl_cli.formats import h5, npy, shards, streams
from gpl_cli.outputs import STDOUT, Writer
from gpl_cli.readers import Damaged, Embeddings, check


@dataclass(frozen=True)
class Format:
    """One output format: what writes it, what reads it back, and what its name and extensions imply."""

    name: str
    writer: Callable[..., Writer]  # (path, dims, overwrite) -> Writer; sharded ones also take rows per shard
    reader: Callable[[str, list[str] | None], Embeddings] | None = None  # None: written for other tools only
    metadata_reader: Callable[[str], dict] | None = None  # the metadata alone, without reading rows
    files: Callable[[str, list[str]], list[str]] | None = None  # (path, pooling keys) -> its files; None: path alone
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
    Format("npy", npy.open_npy_writer, npy.read_npy, files=npy.output_files, opens_by=(".json",)),
    Format("parquet", shards.ShardWriter, shards.read_shard_folder, sharded=True),
    Format("jsonl", streams.JsonlWriter),
    Format("csv", partial(streams.DelimitedWriter, delimiter=",")),
    Format("tsv", partial(streams.DelimitedWriter, delimiter="\t")),
)}
# The gpl outputs that can be read back, by extension; a sharded output is a folder.
READABLE_EXTENSIONS = {ext: f.name for f in FORMATS.values() if f.reader for ext in (*f.extensions, *f.opens_by)}


# --- writing -----------------------------------------------------------------------------


def format_for(path: str, fmt: str | None) -> str:
    """The output format: as given, else from the extension; stdout defaults to JSON Lines."""
    if path == STDOUT:
        fmt = fmt or "jsonl"
        if fmt not in STDOUT_FORMATS:
            raise GplError(f"--format {fmt} cannot be written to stdout; use one of {', '.join(STDOUT_FORMATS)}, or -o FILE")
        return fmt
    if fmt:
        return FORMAT_ALIASES.get(fmt, fmt)
    ext = os.path.splitext(path)[1].lower()
    if ext not in OUTPUT_EXTENSIONS:
        raise GplError(
            f"cannot tell the output format from {path!r}; use one of {' '.join(sorted(OUTPUT_EXTENSIONS))}, "
            f"or --format {'|'.join(OUTPUT_FORMATS)}"
        )
    return OUTPUT_EXTENSIONS[ext]


def is_sharded(path: str, fmt: str | None) -> bool:
    """Whether the output is a folder of shards (and takes `shard_rows`)."""
    spec = FORMATS.get(format_for(path, fmt))
    return spec is not None and spec.sharded


def check_output_location(path: str, fmt: str | None, keys: list[str], input_paths: list[str] = ()) -> None:
    """Refuse, before any work, an output that cannot be written or must not be: its folder missing,
    a directory where a file goes, or a file that is one of the inputs (whatever --overwrite says)."""
    files = output_files(path, fmt, keys)  # an unknown or unfit format fails here
    if path == STDOUT:
        return
    check_output_folder(path)
    if not is_sharded(path, fmt):
        for f in files:
            if os.path.isdir(f):
                raise GplError(f"cannot write {f}: it is a directory")
    existing = {os.path.realpath(f) for f in files if os.path.isfile(f)}
    names = {os.path.basename(f) for f in existing}  # resolve only inputs that could be one of them
    clash = next((p for p in input_paths if os.path.basename(p) in names and os.path.realpath(p) in existing), None)
    if clash is not None:
        raise GplError(f"the output {path} is one of the inputs ({clash}); choose another output")


def output_files(path: str, fmt: str | None, keys: list[str]) -> list[str]:
    """Every file (or folder) a finished output at `path` consists of; the last one appears last."""
    spec = FORMATS.get(format_for(path, fmt))
    if path == STDOUT:
        return []
    if spec is None or spec.files is None:
        return [path]
    return spec.files(path, keys)


def open_writer(
    path: str, fmt: str | None, dims: dict[str, int], overwrite: bool = False, shard_rows: int | None = None
) -> Writer:
    """The writer for `fmt` (or the format `path` implies); `path` "-" is stdout. `shard_rows`: sharded formats only."""
    fmt = format_for(path, fmt)
    spec = FORMATS.get(fmt)
    if spec is None:
        raise GplError(f"unknown output format {fmt!r}")
    if spec.sharded:
        return spec.writer(path, dims, overwrite, shard_rows or shards.DEFAULT_SHARD_ROWS)
    return spec.writer(path, dims, overwrite)


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
    """A saved gpl output: an .h5 / .npy / .json file, or a shards (parquet) folder."""
    return (os.path.isfile(arg) and os.path.splitext(arg)[1].lower() in READABLE_EXTENSIONS) or shards.is_shard_folder(arg)


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


def describe(path: str) -> dict:
    """What an embeddings file holds, as a JSON-able summary (what `gpl info` shows)."""
    emb = read_embeddings(path, keys=[])
    meta = emb.metadata
    pools = meta.get("pools", {})
    return {
        "file": path,
        "format": file_format(path),
        "count": len(emb),
        "failed": len(emb.failures),
        "poolings": {key: pools[key] for key in meta.get("pool_keys", pools)},
        **{k: v for k, v in meta.items() if k not in ("pools", "pool_keys", "count", "failed")},
        "failures": [{"path": p, "reason": r} for p, r in emb.failures],
    }
