"""Output writers: rows streamed as they are made, the file made visible only when complete.

Every writer works on `<target>.partial` files (gpl_cli.atomic) and renames them into place in `close`,
so a crash never leaves a file that looks finished; `abort` removes them. Row i always belongs to name i;
failures go to a separate record and never take a row.

This module holds gpl's own formats (HDF5, NPY with sidecars) and `open_writer`, the one
place a format name becomes a writer; the formats made for other tools (JSON Lines,
CSV/TSV, a bare .npy on stdout) live in gpl_cli.stream_writers, npy shards + parquet in
gpl_cli.shards. What they all share (the Writer protocol, the npy header) is in gpl_cli.outputs.
"""

from __future__ import annotations

import json
import os

import numpy as np

from gpl_cli import shards, stream_writers
from gpl_cli.atomic import AtomicPath, atomic_file, refuse_existing
from gpl_cli.defaults import FORMAT_ALIASES, OUTPUT_EXTENSIONS, OUTPUT_FORMATS, STDOUT_FORMATS
from gpl_cli.errors import GplError
from gpl_cli.outputs import STDOUT, NpyStream, Writer, encode_name, safe_key


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


def check_output_location(path: str, fmt: str | None, keys: list[str], input_paths: list[str] = ()) -> None:
    """Refuse, before any work, an output that cannot be written or must not be: its folder missing,
    a directory where a file goes, or a file that is one of the inputs (whatever --overwrite says)."""
    files = output_files(path, fmt, keys)  # an unknown or unfit format fails here
    if path == STDOUT:
        return
    check_output_folder(path)
    if format_for(path, fmt) != "parquet":
        for f in files:
            if os.path.isdir(f):
                raise GplError(f"cannot write {f}: it is a directory")
    existing = {os.path.realpath(f) for f in files if os.path.isfile(f)}
    names = {os.path.basename(f) for f in existing}  # resolve only inputs that could be one of them
    clash = next((p for p in input_paths if os.path.basename(p) in names and os.path.realpath(p) in existing), None)
    if clash is not None:
        raise GplError(f"the output {path} is one of the inputs ({clash}); choose another output")


def check_output_folder(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GplError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise GplError(f"cannot write {path}: the folder {folder} is not writable")


def output_files(path: str, fmt: str | None, keys: list[str]) -> list[str]:
    """Every file (or folder) a finished output at `path` consists of; the last one appears last."""
    fmt = format_for(path, fmt)
    if path == STDOUT:
        return []
    if fmt != "npy":
        return [path]
    stem = _npy_stem(path)
    return [*_npy_files(path, keys).values(), stem + ".paths.txt", stem + ".json"]


def _npy_stem(path: str) -> str:
    return path[:-4] if path.lower().endswith(".npy") else path


def _npy_files(path: str, keys: list[str]) -> dict[str, str]:
    return {key: path if len(keys) == 1 else f"{_npy_stem(path)}.{safe_key(key)}.npy" for key in keys}


def _chunk_rows(dim: int) -> int:
    """Rows per HDF5 chunk: about 1 MiB, at most 1024 rows."""
    return max(1, min(1024, (1 << 20) // (4 * dim)))


class H5Writer:
    """HDF5: embeddings/<pooling> (N x D float32), paths, failures/{paths,reasons}, metadata in attrs."""

    def __init__(self, path: str, dims: dict[str, int], overwrite: bool = False):
        import h5py

        self.target = AtomicPath(path, overwrite)
        self.file = h5py.File(self.target.partial, "w")
        text = h5py.string_dtype("utf-8")
        group = self.file.create_group("embeddings")
        self.vectors = {
            key: group.create_dataset(key, (0, dim), maxshape=(None, dim), dtype="f4", chunks=(_chunk_rows(dim), dim))
            for key, dim in dims.items()
        }
        self.names = self.file.create_dataset("paths", (0,), maxshape=(None,), dtype=text, chunks=(4096,))
        self.stats = self.file.create_dataset("stats", (0, 2), maxshape=(None, 2), dtype="i8", chunks=(4096, 2))
        self.stats.attrs["columns"] = "size_bytes,mtime_ns"
        fails = self.file.create_group("failures")
        self.fail_names = fails.create_dataset("paths", (0,), maxshape=(None,), dtype=text, chunks=(256,))
        self.fail_reasons = fails.create_dataset("reasons", (0,), maxshape=(None,), dtype=text, chunks=(256,))

    @staticmethod
    def _append(dataset, rows) -> None:
        n = dataset.shape[0]
        dataset.resize(n + len(rows), axis=0)
        dataset[n:] = rows

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats: list[tuple[int, int]] | None = None) -> None:
        for key, rows in vectors.items():
            self._append(self.vectors[key], rows)
        self._append(self.names, [encode_name(n) for n in names])
        self._append(self.stats, np.array(stats or [(-1, -1)] * len(names), dtype=np.int64).reshape(-1, 2))

    def fail(self, name: str, reason: str) -> None:
        self._append(self.fail_names, [encode_name(name)])
        self._append(self.fail_reasons, [reason])

    def close(self, metadata: dict) -> list[str]:
        self.file.attrs["gpl_metadata"] = json.dumps(metadata)
        for key, value in metadata.items():
            if isinstance(value, (str, int, float, bool)):
                self.file.attrs[key] = value
        self.file.close()
        return [self.target.commit()]

    def abort(self) -> None:
        self.file.close()
        self.target.discard()


class NpyWriter:
    """NPY: one N x D .npy per pooling, a .paths.txt sidecar and a .json with metadata and failures.

    One pooling writes exactly the named file; several write <stem>.<pooling>.npy each.
    The .json is renamed into place last: its presence marks a complete output.
    """

    def __init__(self, path: str, dims: dict[str, int], overwrite: bool = False):
        stem = _npy_stem(path)
        self.files = _npy_files(path, list(dims))
        self.paths_file, self.json_file = stem + ".paths.txt", stem + ".json"
        refuse_existing([*self.files.values(), self.paths_file, self.json_file], overwrite)
        self.targets = {key: AtomicPath(f, overwrite=True) for key, f in self.files.items()}
        self.streams = {key: NpyStream(t.partial, dims[key]) for key, t in self.targets.items()}
        self.names: list[str] = []
        self.stats: list[tuple[int, int]] = []
        self.failures: list[dict[str, str]] = []

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats: list[tuple[int, int]] | None = None) -> None:
        for key, rows in vectors.items():
            self.streams[key].append(rows)
        self.names.extend(names)
        self.stats.extend([tuple(map(int, s)) for s in stats] if stats else [(-1, -1)] * len(names))

    def fail(self, name: str, reason: str) -> None:
        self.failures.append({"path": name, "reason": reason})

    def close(self, metadata: dict) -> list[str]:
        for key, stream in self.streams.items():
            stream.close()
            self.targets[key].commit()
        with atomic_file(self.paths_file, "wb", overwrite=True) as f:
            # One name per line; backslash and newline are escaped so every name stays one line.
            for name in self.names:
                f.write(encode_name(name).replace(b"\\", b"\\\\").replace(b"\n", b"\\n") + b"\n")
        doc = dict(metadata, files={k: os.path.basename(v) for k, v in self.files.items()},
                   paths=self.names, stats=self.stats, failures=self.failures)
        with atomic_file(self.json_file, "w", overwrite=True, encoding="utf-8") as f:
            json.dump(doc, f, indent=1, ensure_ascii=True)
        return [*self.files.values(), self.paths_file, self.json_file]

    def abort(self) -> None:
        for key, stream in self.streams.items():
            stream.file.close()
            self.targets[key].discard()


def open_writer(
    path: str, fmt: str | None, dims: dict[str, int], overwrite: bool = False, shard_rows: int | None = None
) -> Writer:
    """The writer for `fmt` (or the format `path` implies); `path` "-" is stdout. `shard_rows`: parquet only."""
    fmt = format_for(path, fmt)
    if fmt == "h5":
        return H5Writer(path, dims, overwrite)
    if fmt == "npy" and path != STDOUT:
        return NpyWriter(path, dims, overwrite)
    if fmt == "parquet":
        return shards.ShardWriter(path, dims, overwrite, shard_rows or shards.DEFAULT_SHARD_ROWS)
    return stream_writers.open_stream_writer(path, fmt, dims, overwrite)
