"""Reading embedding files written by gpl (HDF5 or NPY) back into one shape."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from gpl_cli.errors import GplError


@dataclass
class Embeddings:
    paths: list[str]
    vectors: dict[str, np.ndarray]  # pooling key -> N x D float32, row i belongs to paths[i]
    metadata: dict
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    stats: np.ndarray | None = None  # N x 2 int64: (size, mtime_ns) of each file when it was embedded

    def __len__(self) -> int:
        return len(self.paths)


def _decode(values) -> list[str]:
    return [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in values]


def read_h5(path: str) -> Embeddings:
    import h5py

    with h5py.File(path, "r") as f:
        meta = json.loads(f.attrs["gpl_metadata"])
        vectors = {key: f["embeddings"][key][...] for key in meta.get("pool_keys", f["embeddings"].keys())}
        return Embeddings(
            paths=_decode(f["paths"][...]),
            vectors=vectors,
            metadata=meta,
            failures=list(zip(_decode(f["failures/paths"][...]), _decode(f["failures/reasons"][...]))),
            stats=f["stats"][...],
        )


def read_npy(path: str) -> Embeddings:
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
    vectors = {key: np.load(os.path.join(folder, name)) for key, name in doc.pop("files").items()}
    paths = doc.pop("paths")
    failures = [(d["path"], d["reason"]) for d in doc.pop("failures")]
    stats = np.array(doc.pop("stats"), dtype=np.int64).reshape(-1, 2)
    return Embeddings(paths, vectors, doc, failures, stats)


def read_embeddings(path: str) -> Embeddings:
    """Load a gpl output: .h5/.hdf5, or an NPY output by the name given to -o, any of its .npy files, or its .json."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.exists(path) and ext != ".npy":  # several poolings: OUT.npy names a set of files
        raise GplError(f"no such file: {path}")
    try:
        if ext in (".h5", ".hdf5", ".hdf"):
            return read_h5(path)
        if ext in (".npy", ".json"):
            return read_npy(path)
    except (OSError, KeyError, ValueError) as exc:
        raise GplError(f"{path}: not a readable gpl embeddings file ({exc})") from None
    raise GplError(f"{path}: unknown embeddings format (expected .h5 or .npy)")
