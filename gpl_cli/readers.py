"""Reading embedding files written by gpl (HDF5, NPY, npy shards + parquet) back into one shape."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gpl_cli.defaults import READABLE_EXTENSIONS
from gpl_cli.errors import GplError

if TYPE_CHECKING:
    from gpl_cli.engine import Summary


@dataclass
class Embeddings:
    paths: list[str]
    vectors: dict[str, np.ndarray]  # pooling key -> N x D float32, row i belongs to paths[i]
    metadata: dict
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    stats: np.ndarray | None = None  # N x 2 int64: (size, mtime_ns) of each file when it was embedded
    summary: Summary | None = None  # how the run went (timings, plan), when embedded in memory; None when read

    def __len__(self) -> int:
        return len(self.paths)


def _decode(values) -> list[str]:
    return [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in values]


def _wanted(available: list[str], keys: list[str] | None, path: str) -> list[str]:
    """The poolings to load: all (None), or the ones asked for, each checked to exist."""
    if keys is None:
        return list(available)
    missing = [k for k in keys if k not in available]
    if missing:
        raise GplError(f"{path} has no pooling {missing[0]!r}; it holds: {', '.join(available)}")
    return list(keys)


def read_h5(path: str, keys: list[str] | None = None) -> Embeddings:
    import h5py

    with h5py.File(path, "r") as f:
        meta = json.loads(f.attrs["gpl_metadata"])
        available = meta.get("pool_keys", list(f["embeddings"].keys()))
        vectors = {key: f["embeddings"][key][...] for key in _wanted(available, keys, path)}
        return Embeddings(
            paths=_decode(f["paths"][...]),
            vectors=vectors,
            metadata=meta,
            failures=list(zip(_decode(f["failures/paths"][...]), _decode(f["failures/reasons"][...]))),
            stats=f["stats"][...],
        )


def read_npy(path: str, keys: list[str] | None = None) -> Embeddings:
    stem = path[:-4] if path.lower().endswith(".npy") else path[:-5] if path.lower().endswith(".json") else path
    if not os.path.isfile(stem + ".json"):
        # A single-pooling output is named by the user; a multi-pooling one is <stem>.<key>.npy.
        stem = os.path.splitext(stem)[0]
    json_file = stem + ".json"
    if not os.path.isfile(json_file):
        raise GplError(f"{path}: no metadata file {json_file} beside it (not a gpl output, or an unfinished run)")
    with open(json_file, encoding="utf-8") as f:
        doc = json.load(f)
    folder = os.path.dirname(json_file)
    files = doc.pop("files")
    vectors = {key: np.load(os.path.join(folder, files[key])) for key in _wanted(list(files), keys, path)}
    paths = doc.pop("paths")
    failures = [(d["path"], d["reason"]) for d in doc.pop("failures")]
    stats = np.array(doc.pop("stats"), dtype=np.int64).reshape(-1, 2)
    return Embeddings(paths, vectors, doc, failures, stats)


def file_format(path: str) -> str:
    """h5, npy or parquet (a shard folder), from what `path` is."""
    from gpl_cli.shards import is_shard_folder

    if os.path.isdir(path):
        if is_shard_folder(path):
            return "parquet"
        raise GplError(f"{path} is a folder but not a gpl parquet output (no gpl.json in it)")
    ext = os.path.splitext(path)[1].lower()
    if ext in READABLE_EXTENSIONS:
        return READABLE_EXTENSIONS[ext]
    raise GplError(f"{path}: unknown embeddings format (expected .h5, .npy, or a parquet output folder)")


def read_shard_folder(path: str, keys: list[str] | None = None) -> Embeddings:
    """A parquet output folder (gpl_cli.shards): shards concatenated in file order."""
    from gpl_cli.shards import META_FILE, PATHS_FOLDER, import_pyarrow

    _, pq = import_pyarrow()
    with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
        doc = json.load(f)
    folders = doc.pop("folders")
    failures = [(d["path"], d["reason"]) for d in doc.pop("failures")]
    for layout_key in ("layout", "shards"):
        doc.pop(layout_key, None)

    def files(folder: str, ext: str) -> list[str]:
        full = os.path.join(path, folder)
        return [os.path.join(full, n) for n in sorted(os.listdir(full)) if n.endswith(ext)]

    paths = [p for f in files(PATHS_FOLDER, ".parquet") for p in pq.read_table(f, columns=["path"])["path"].to_pylist()]
    vectors = {}
    for key in _wanted(list(folders), keys, path):
        shards = [np.load(f) for f in files(folders[key], ".npy")]
        vectors[key] = np.concatenate(shards) if shards else np.zeros((0, doc["pools"][key]["dim"]), np.float32)
    return Embeddings(paths, vectors, doc, failures)


def read_embeddings(path: str, keys: list[str] | None = None) -> Embeddings:
    """Load a gpl output: .h5/.hdf5, an NPY output given by any of its .npy files or its .json,
    or a parquet output folder. `keys`: the poolings to load (default all; [] loads none)."""
    # `-o out.npy` with several poolings wrote out.<pooling>.npy and out.json: the name given still opens it
    named_npy = path.lower().endswith(".npy") and os.path.isfile(path[:-4] + ".json")
    if not os.path.exists(path) and not named_npy:
        raise GplError(f"no such file: {path}")
    fmt = file_format(path)
    try:
        if fmt == "h5":
            return read_h5(path, keys)
        if fmt == "npy":
            return read_npy(path, keys)
        return read_shard_folder(path, keys)
    except (OSError, KeyError, ValueError) as exc:
        raise GplError(f"{path}: not a readable gpl embeddings file ({type(exc).__name__}: {exc})") from None


def read_metadata(path: str) -> dict:
    """Only the metadata of a gpl output (what made it, its poolings), without rows where the format allows."""
    fmt = file_format(path) if os.path.isfile(path) else None
    if fmt == "h5":
        import h5py

        try:
            with h5py.File(path, "r") as f:
                return json.loads(f.attrs["gpl_metadata"])
        except (OSError, KeyError, ValueError) as exc:
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
