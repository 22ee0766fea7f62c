"""npy shards plus parquet paths: the folder layout embedding readers and FAISS index builders read.

    OUT/
      avg_emb/emb_00000.npy, emb_00001.npy, ...      one folder per pooling, N_i x D float32 each
      metadata/metadata_00000.parquet, ...           column "path": the names of the same rows (then one
                                                     string column per field kept, --keep-fields)
      gpl.json                                       gpl's metadata, the pooling -> folder map, failures

Shard i of every pooling and metadata shard i hold the same rows in the same order, and the
files sort in row order, which is what embedding-reader's `parquet_npy` format and
autofaiss (`--embeddings OUT/avg_emb --file_format npy`) expect. Folder names end in `_emb`
so that no pooling's folder name is a prefix of another's (those tools glob `<folder>**`).
Paths that are not valid UTF-8 cannot be parquet strings: their stray bytes are written
as \\xNN escapes. Needs pyarrow (pip install pyarrow). Its writer and its reader.
"""

from __future__ import annotations

import json
import os

import numpy as np

from gpl_cli.atomic import AtomicPath, reporting
from gpl_cli.errors import GplError, missing
from gpl_cli.store.embeddings import Embeddings, check_rows, require, wanted
from gpl_cli.store.sink import NpyStream, safe_key

DEFAULT_SHARD_ROWS = 100_000
META_FILE = "gpl.json"
PATHS_FOLDER = "metadata"


def import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise GplError(missing("the parquet layout needs pyarrow", "pyarrow", "parquet")) from None
    return pyarrow, pyarrow.parquet


def is_shard_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def files_below(path: str) -> list[str]:
    """Every file of the shard folder at `path`, at any depth."""
    return [os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names]


class ShardWriter:
    """Writes the layout above; rows stream into the open shard, paths are held one shard at a time."""

    keeps_failures = True

    def __init__(self, path: str, dims: dict[str, int], overwrite: bool = False, shard_rows: int = DEFAULT_SHARD_ROWS):
        self.pa, self.pq = import_pyarrow()
        if os.path.exists(path):
            if not overwrite:
                raise GplError(f"output exists: {path} (use --overwrite to replace it)")
            if not is_shard_folder(path):  # --overwrite replaces an earlier output, never another folder
                raise GplError(f"{path} exists and is not a gpl parquet output (no {META_FILE}); refusing to replace it")
        self.path, self.dims, self.shard_rows = path, dims, shard_rows
        self.target = AtomicPath(path, overwrite=True)  # refused above unless it may be replaced
        self.partial = self.target.partial
        self.target.discard()  # left by an interrupted run
        self.folders = {key: f"{safe_key(key)}_emb" for key in dims}
        self.streams: dict[str, NpyStream] = {}
        with self._reported():
            for folder in [*self.folders.values(), PATHS_FOLDER]:
                os.makedirs(os.path.join(self.partial, folder))
        self.shard = -1
        self.names: list[str] = []
        self.fields: dict[str, list[str]] = {}  # of the open shard's rows
        self.failures: list[dict[str, str]] = []

    def _reported(self):
        """Any failure discards the folder; the system's refusals name the output (write_failed)."""
        return reporting(self.path, self.abort)

    def _open_shard(self) -> None:
        self.shard += 1
        for key, folder in self.folders.items():
            name = os.path.join(self.partial, folder, f"emb_{self.shard:05d}.npy")
            self.streams[key] = NpyStream(name, self.dims[key], name=self.path)
        self.names = []
        self.fields = {name: [] for name in self.fields}

    def _close_shard(self) -> None:
        for stream in self.streams.values():
            stream.close()
        names = [n.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for n in self.names]
        table = self.pa.table({"path": self.pa.array(names, type=self.pa.string()),
                               **{name: self.pa.array(values, type=self.pa.string()) for name, values in self.fields.items()}})
        self.pq.write_table(table, os.path.join(self.partial, PATHS_FOLDER, f"metadata_{self.shard:05d}.parquet"))
        self.streams = {}

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats=None,
              fields: dict[str, list[str]] | None = None) -> None:
        with self._reported():
            start = 0
            while start < len(names):
                if not self.streams:
                    self._open_shard()
                take = min(len(names) - start, self.shard_rows - len(self.names))
                for key, rows in vectors.items():
                    self.streams[key].append(rows[start : start + take])
                self.names.extend(names[start : start + take])
                for name, values in (fields or {}).items():
                    self.fields.setdefault(name, []).extend(values[start : start + take])
                start += take
                if len(self.names) == self.shard_rows:
                    self._close_shard()

    def fail(self, name: str, reason: str) -> None:
        self.failures.append({"path": name, "reason": reason})

    def close(self, metadata: dict) -> list[str]:
        with self._reported():
            if self.streams:
                self._close_shard()
            doc = dict(metadata, layout="npy shards + parquet paths", shards=self.shard + 1,
                       folders=self.folders, failures=self.failures)
            with open(os.path.join(self.partial, META_FILE), "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
        return [self.target.commit()]  # a failure there discards the folder (gpl_cli.atomic)

    def abort(self) -> None:
        for stream in self.streams.values():
            stream.abandon()
        self.streams = {}
        self.target.discard()


def read_shard_folder(path: str, keys: list[str] | None = None) -> Embeddings:
    """A parquet output folder: shards concatenated in file order."""
    _, pq = import_pyarrow()
    with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
        doc = json.load(f)
    require(isinstance(doc, dict), f"{META_FILE} is not a JSON object")
    folders = doc.pop("folders")
    require(isinstance(folders, dict), f"{META_FILE}: 'folders' is not a map of pooling to folder")
    failures = [(d["path"], d["reason"]) for d in doc.pop("failures")]
    doc.pop("layout", None)
    shards = doc.pop("shards", None)

    def files(folder: str, ext: str) -> list[str]:
        full = os.path.join(path, folder)
        return [os.path.join(full, n) for n in sorted(os.listdir(full)) if n.endswith(ext)]

    tables = [pq.read_table(f).to_pydict() for f in files(PATHS_FOLDER, ".parquet")]
    parts = [table.pop("path") for table in tables]
    fields = {name: [v for table in tables for v in table[name]] for name in (tables[0] if tables else {})}
    require(shards is None or len(parts) == shards, f"{PATHS_FOLDER}/ holds {len(parts)} parts, {META_FILE} records {shards}")
    loading, vectors = wanted(list(folders), keys, path), {}
    for key, folder in folders.items():  # shard i of every pooling must hold the rows of paths part i
        pieces = files(folder, ".npy")
        require(len(pieces) == len(parts), f"{folder}/ holds {len(pieces)} shards but {PATHS_FOLDER}/ holds {len(parts)} parts")
        loaded = [np.load(f, mmap_mode="r") for f in pieces]
        for piece, rows, names in zip(pieces, loaded, parts):
            check_rows(rows, len(names), os.path.relpath(piece, path), "its paths part holds")
        if key in loading:
            vectors[key] = np.concatenate(loaded) if loaded else np.zeros((0, doc["pools"][key]["dim"]), np.float32)
    return Embeddings([p for part in parts for p in part], vectors, doc, failures, fields=fields)
