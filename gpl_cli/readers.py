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


class Damaged(ValueError):
    """What is wrong with a file that looks like a gpl output but cannot be read as one."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise Damaged(what)


def _check(emb: Embeddings) -> Embeddings:
    """Every pooling a 2-D float matrix with one row per path, stats one pair per path: rows never shift."""
    _require(isinstance(emb.metadata, dict), "its metadata is not a JSON object")
    n = len(emb.paths)
    for key, rows in emb.vectors.items():
        _require(isinstance(rows, np.ndarray) and rows.dtype.kind == "f", f"pooling {key!r} is not stored as numbers")
        _require(rows.ndim == 2, f"pooling {key!r} is {rows.ndim}-D, not one vector per row")
        _require(len(rows) == n, f"pooling {key!r} has {len(rows)} rows but there are {n} paths")
    if emb.stats is not None:
        _require(emb.stats.shape == (n, 2), f"stats hold {len(emb.stats)} rows for {n} paths")
    pools = emb.metadata.get("pools", {})
    keys = emb.metadata.get("pool_keys", list(pools) if isinstance(pools, dict) else None)
    _require(isinstance(pools, dict) and isinstance(keys, list), "its metadata's pools are not a map and a list")
    _require(not pools or all(k in pools for k in keys), "its metadata's pool_keys and pools disagree")
    return emb


def _check_rows(rows: np.ndarray, paths: int, name: str, where: str) -> None:
    _require(rows.ndim == 2, f"{name} is {rows.ndim}-D (shape {rows.shape}), not one vector per row")
    _require(len(rows) == paths, f"{name} holds {len(rows)} rows but {where} {paths} paths")


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
        meta = _h5_metadata(f)
        available = meta.get("pool_keys", list(f["embeddings"].keys()))
        stored = list(f["embeddings"].keys())
        _require(isinstance(available, list) and all(k in stored for k in available),
                 f"pool_keys name poolings that are not stored (stored: {', '.join(stored) or 'none'})")
        vectors = {key: f["embeddings"][key][...] for key in _wanted(available, keys, path)}
        fail_paths, fail_reasons = _decode(f["failures/paths"][...]), _decode(f["failures/reasons"][...])
        _require(len(fail_paths) == len(fail_reasons), "failures/paths and failures/reasons differ in length")
        # Row counts are checked on every pooling, also those not loaded.
        rows = {key: f["embeddings"][key].shape[0] if f["embeddings"][key].ndim else 0 for key in available}
        paths = _decode(f["paths"][...])
        for key, count in rows.items():
            _require(count == len(paths), f"embeddings/{key} has {count} rows but paths has {len(paths)}")
        return _check(Embeddings(paths, vectors, meta, list(zip(fail_paths, fail_reasons)), f["stats"][...]))


def _h5_metadata(f) -> dict:
    meta = json.loads(f.attrs["gpl_metadata"])
    _require(isinstance(meta, dict), "its gpl_metadata is not a JSON object")
    return meta


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
    _require(isinstance(doc, dict), f"{json_file} is not a JSON object")
    folder = os.path.dirname(json_file)
    files, paths = doc.pop("files"), doc.pop("paths")
    _require(isinstance(files, dict) and all(isinstance(v, str) and os.path.basename(v) == v for v in files.values()),
             f"{json_file}: 'files' is not a map of pooling to a file beside it")
    _require(isinstance(paths, list) and all(isinstance(p, str) for p in paths), f"{json_file}: 'paths' is not a list of names")
    for name in files.values():  # every pooling's row count, also of those not loaded
        _check_rows(np.load(os.path.join(folder, name), mmap_mode="r"), len(paths), name, f"{json_file} lists")
    vectors = {key: np.load(os.path.join(folder, files[key])) for key in _wanted(list(files), keys, path)}
    failures = [(d["path"], d["reason"]) for d in doc.pop("failures")]
    stats = np.array(doc.pop("stats"), dtype=np.int64).reshape(-1, 2)
    return _check(Embeddings(paths, vectors, doc, failures, stats))


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
    _require(isinstance(doc, dict), f"{META_FILE} is not a JSON object")
    folders = doc.pop("folders")
    _require(isinstance(folders, dict), f"{META_FILE}: 'folders' is not a map of pooling to folder")
    failures = [(d["path"], d["reason"]) for d in doc.pop("failures")]
    doc.pop("layout", None)
    shards = doc.pop("shards", None)

    def files(folder: str, ext: str) -> list[str]:
        full = os.path.join(path, folder)
        return [os.path.join(full, n) for n in sorted(os.listdir(full)) if n.endswith(ext)]

    parts = [pq.read_table(f, columns=["path"])["path"].to_pylist() for f in files(PATHS_FOLDER, ".parquet")]
    _require(shards is None or len(parts) == shards, f"{PATHS_FOLDER}/ holds {len(parts)} parts, {META_FILE} records {shards}")
    wanted, vectors = _wanted(list(folders), keys, path), {}
    for key, folder in folders.items():  # shard i of every pooling must hold the rows of paths part i
        pieces = files(folder, ".npy")
        _require(len(pieces) == len(parts), f"{folder}/ holds {len(pieces)} shards but {PATHS_FOLDER}/ holds {len(parts)} parts")
        loaded = [np.load(f, mmap_mode="r") for f in pieces]
        for piece, rows, names in zip(pieces, loaded, parts):
            _check_rows(rows, len(names), os.path.relpath(piece, path), "its paths part holds")
        if key in wanted:
            vectors[key] = np.concatenate(loaded) if loaded else np.zeros((0, doc["pools"][key]["dim"]), np.float32)
    return _check(Embeddings([p for part in parts for p in part], vectors, doc, failures))


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
    except GplError:
        raise
    except Damaged as exc:
        raise GplError(f"{path}: not a readable gpl embeddings file: {exc}") from None
    except (OSError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise GplError(f"{path}: not a readable gpl embeddings file ({type(exc).__name__}: {exc})") from None


def read_metadata(path: str) -> dict:
    """Only the metadata of a gpl output (what made it, its poolings), without rows where the format allows."""
    fmt = file_format(path) if os.path.isfile(path) else None
    if fmt == "h5":
        import h5py

        try:
            with h5py.File(path, "r") as f:
                return _h5_metadata(f)
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
