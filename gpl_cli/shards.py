"""npy shards plus parquet paths: the folder layout embedding readers and FAISS index builders read.

    OUT/
      avg_emb/emb_00000.npy, emb_00001.npy, ...      one folder per pooling, N_i x D float32 each
      metadata/metadata_00000.parquet, ...           column "path": the names of the same rows
      gpl.json                                       gpl's metadata, the pooling -> folder map, failures

Shard i of every pooling and metadata shard i hold the same rows in the same order, and the
files sort in row order, which is what embedding-reader's `parquet_npy` format and
autofaiss (`--embeddings OUT/avg_emb --file_format npy`) expect. Folder names end in `_emb`
so that no pooling's folder name is a prefix of another's (those tools glob `<folder>**`).
Paths that are not valid UTF-8 cannot be parquet strings: their stray bytes are written
as \\xNN escapes. Needs pyarrow (pip install pyarrow). gpl_cli.readers.read_shard_folder reads it back.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from gpl_cli.errors import GplError
from gpl_cli.writers import PARTIAL, NpyStream, remove_partial, safe_key

DEFAULT_SHARD_ROWS = 100_000
META_FILE = "gpl.json"
PATHS_FOLDER = "metadata"


def import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise GplError(
            "the parquet layout needs pyarrow, which is not installed: "
            "pip install pyarrow  (or pip install 'gpl-cli[parquet]')"
        ) from None
    return pyarrow, pyarrow.parquet


def is_shard_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


class ShardWriter:
    """Writes the layout above; rows stream into the open shard, paths are held one shard at a time."""

    def __init__(self, path: str, dims: dict[str, int], overwrite: bool = False, shard_rows: int = DEFAULT_SHARD_ROWS):
        self.pa, self.pq = import_pyarrow()
        if os.path.exists(path):
            if not overwrite:
                raise GplError(f"output exists: {path} (use --overwrite to replace it)")
            if not is_shard_folder(path):  # --overwrite replaces an earlier output, never another folder
                raise GplError(f"{path} exists and is not a gpl parquet output (no {META_FILE}); refusing to replace it")
        self.path, self.dims, self.shard_rows = path, dims, shard_rows
        self.partial = path + PARTIAL
        if os.path.exists(self.partial):
            shutil.rmtree(self.partial)  # left by an interrupted run
        self.folders = {key: f"{safe_key(key)}_emb" for key in dims}
        for folder in [*self.folders.values(), PATHS_FOLDER]:
            os.makedirs(os.path.join(self.partial, folder))
        self.shard = -1
        self.streams: dict[str, NpyStream] = {}
        self.names: list[str] = []
        self.failures: list[dict[str, str]] = []

    def _open_shard(self) -> None:
        self.shard += 1
        self.streams = {
            key: NpyStream(os.path.join(self.partial, folder, f"emb_{self.shard:05d}.npy"), self.dims[key])
            for key, folder in self.folders.items()
        }
        self.names = []

    def _close_shard(self) -> None:
        for stream in self.streams.values():
            stream.close()
        names = [n.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for n in self.names]
        table = self.pa.table({"path": self.pa.array(names, type=self.pa.string())})
        self.pq.write_table(table, os.path.join(self.partial, PATHS_FOLDER, f"metadata_{self.shard:05d}.parquet"))
        self.streams = {}

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats=None) -> None:
        start = 0
        while start < len(names):
            if not self.streams:
                self._open_shard()
            take = min(len(names) - start, self.shard_rows - len(self.names))
            for key, rows in vectors.items():
                self.streams[key].append(rows[start : start + take])
            self.names.extend(names[start : start + take])
            start += take
            if len(self.names) == self.shard_rows:
                self._close_shard()

    def fail(self, name: str, reason: str) -> None:
        self.failures.append({"path": name, "reason": reason})

    def close(self, metadata: dict) -> list[str]:
        if self.streams:
            self._close_shard()
        doc = dict(metadata, layout="npy shards + parquet paths", shards=self.shard + 1,
                   folders=self.folders, failures=self.failures)
        with open(os.path.join(self.partial, META_FILE), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.replace(self.partial, self.path)
        return [self.path]

    def abort(self) -> None:
        for stream in self.streams.values():
            stream.file.close()
        remove_partial(self.partial)
