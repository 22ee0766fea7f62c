"""`Embeddings`, the central record (paths, vectors per pooling, metadata, failures), its checks and
`MemorySink`, which collects a run's rows into one.

The readers themselves live with their writers in gpl_cli.store.formats, whose `read_embeddings` is the one
entry: it passes whatever a reader returns through `check` and turns `Damaged` into a GplError.
"""

from __future__ import annotations

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
    summary: object | None = None  # how the run went (embedding.engine.Summary), when embedded in memory; None when read
    fields: dict[str, list[str]] = field(default_factory=dict)  # kept from the inputs (--keep-fields): one string a row

    def __len__(self) -> int:
        return len(self.paths)


class Damaged(ValueError):
    """What is wrong with a file that looks like a gpl output but cannot be read as one."""


def require(condition: bool, what: str) -> None:
    if not condition:
        raise Damaged(what)


def check(emb: Embeddings) -> Embeddings:
    """Every path and failure text, every pooling a 2-D float matrix of vectors at least one number wide with
    one row per path, stats one pair per path: rows never shift, and nothing downstream meets a path that is
    a number or a vector that is empty."""
    require(isinstance(emb.metadata, dict), "its metadata is not a JSON object")
    require(all(isinstance(p, str) for p in emb.paths), "its paths are not all names (text)")
    require(all(isinstance(p, str) and isinstance(r, str) for p, r in emb.failures),
            "its failures are not all a name and a reason (text)")
    n = len(emb.paths)
    for key, rows in emb.vectors.items():
        require(isinstance(rows, np.ndarray) and rows.dtype.kind == "f", f"pooling {key!r} is not stored as numbers")
        check_rows(rows, n, f"pooling {key!r}", "there are")
    if emb.stats is not None:
        require(emb.stats.shape == (n, 2), f"stats hold {len(emb.stats)} rows for {n} paths")
    for name, values in emb.fields.items():
        require(isinstance(values, list) and len(values) == n and all(isinstance(v, str) for v in values),
                f"kept field {name!r} is not one string per path")
    pools = emb.metadata.get("pools", {})
    keys = emb.metadata.get("pool_keys", list(pools) if isinstance(pools, dict) else None)
    require(isinstance(pools, dict) and isinstance(keys, list), "its metadata's pools are not a map and a list")
    require(not pools or all(k in pools for k in keys), "its metadata's pool_keys and pools disagree")
    return emb


def finite(emb: Embeddings, key: str, where: str) -> np.ndarray:
    """The pooling's vectors, refused when a row is not finite: a NaN has no place in a ranking or a metric."""
    vectors = emb.vectors[key]
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise GplError(f"{where}: {len(bad)} row(s) of {key} are not finite (NaN or inf), the first for "
                       f"{emb.paths[bad[0]]}; re-embed those images")
    return vectors


def check_rows(rows: np.ndarray, paths: int, name: str, where: str) -> None:
    """One vector per path, of at least one number (readers check every pooling's shape, loaded or not)."""
    require(rows.ndim == 2, f"{name} is {rows.ndim}-D (shape {rows.shape}), not one vector per row")
    require(len(rows) == paths, f"{name} holds {len(rows)} rows but {where} {paths} paths")
    require(rows.shape[1] > 0, f"{name} holds vectors of 0 numbers")


def decode(values) -> list[str]:
    return [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in values]


def wanted(available: list[str], keys: list[str] | None, path: str) -> list[str]:
    """The poolings to load: all (None), or the ones asked for, each checked to exist."""
    if keys is None:
        return list(available)
    missing = [k for k in keys if k not in available]
    if missing:
        raise GplError(f"{path} has no pooling {missing[0]!r}; it holds: {', '.join(available)}")
    return list(keys)


class MemorySink:
    """A Sink that keeps every row and failure in memory, to become an Embeddings."""

    def __init__(self, keys: list[str]):
        self.names: list[str] = []
        self.vectors: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        self.stats: list[tuple[int, int]] = []
        self.failures: list[tuple[str, str]] = []

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats=None) -> None:
        self.names.extend(names)
        for key, rows in vectors.items():
            self.vectors[key].append(rows)
        self.stats.extend(stats or [(-1, -1)] * len(names))

    def fail(self, name: str, reason: str) -> None:
        self.failures.append((name, reason))

    def embeddings(self, dims: dict[str, int], metadata: dict, summary: object = None) -> Embeddings:
        vectors = {k: np.concatenate(v) if v else np.zeros((0, dims[k]), np.float32) for k, v in self.vectors.items()}
        return Embeddings(self.names, vectors, metadata, self.failures,
                          np.array(self.stats, dtype=np.int64).reshape(-1, 2), summary)
