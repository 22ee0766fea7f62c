"""Nearest neighbours by cosine similarity over an embeddings file.

Exact brute force: rows are L2-normalised and compared block by block, so memory holds the
vectors of one pooling plus one block of similarities (BLOCK_FLOATS), never an N x N matrix.
With FAISS installed and a large search (rows x queries >= FAISS_MIN_PAIRS), k-NN queries go
through an exact faiss.IndexFlatIP instead (the same neighbours, multi-threaded). Near-duplicate groups are
in gpl_cli.analysis.duplicates.

Query images that are not rows of the file are embedded on the fly with the backbone,
weights, preprocessing, pooling and normalisation recorded in the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gpl_cli.analysis import metrics
from gpl_cli.embedding.sources import MadeImage
from gpl_cli.errors import GplError, missing
from gpl_cli.store.embeddings import Embeddings, finite
from gpl_cli.store.formats import read_embeddings, read_metadata

BLOCK_FLOATS = 1 << 24  # similarities computed at once: 64 MiB of float32
# Building the FAISS index costs a fixed time per row, so FAISS pays off only for many queries.
# Measured (2 shared CPU cores, 200 000 x 256 rows, k=10): 300 queries numpy 2.7 s / faiss 5.4 s,
# 800 queries numpy 8.1 s / faiss 5.6 s, 2000 queries numpy 12.1 s / faiss 7.4 s.
FAISS_MIN_PAIRS = 100_000_000
BACKENDS = ("auto", "numpy", "faiss")


@dataclass
class Neighbor:
    rank: int
    score: float
    path: str
    row: int


@dataclass
class QueryResult:
    query: str
    source: str  # "file": a row of the file; "embedded": an image embedded for this query
    neighbors: list[Neighbor]
    zero: bool = False  # the query's vector is all zero: every score is 0 and the order is row order


# --- the maths ------------------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def top_k(index: np.ndarray, queries: np.ndarray, k: int, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `index` most cosine-similar to each query: (scores Q x k, rows Q x k), best first.

    k is capped at the number of rows. Ties are broken by the lower row number (numpy backend).
    """
    if backend not in BACKENDS:
        raise GplError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    k = min(k, len(index))
    faiss = _faiss() if backend != "numpy" else None
    if backend == "faiss" and faiss is None:
        raise GplError(missing("--backend faiss needs FAISS", "faiss-cpu", "faiss"))
    if faiss is not None and (backend == "faiss" or len(index) * len(queries) >= FAISS_MIN_PAIRS):
        return _top_k_faiss(faiss, index, queries, k)
    return _top_k_numpy(index, queries, k)


def _top_k_numpy(index: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    q_all = metrics.unit_rows(queries, norm_dtype=np.float32)
    n = len(index)
    out_scores = np.empty((len(q_all), k), np.float32)
    out_rows = np.empty((len(q_all), k), np.int64)
    q_chunk = 1024
    for qs in range(0, len(q_all), q_chunk):
        q = q_all[qs : qs + q_chunk]
        block = max(k, BLOCK_FLOATS // len(q))
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_r = np.empty((len(q), 0), np.int64)
        for start in range(0, n, block):
            sims = q @ metrics.unit_rows(index[start : start + block], norm_dtype=np.float32).T
            rows = np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)
            cand_s = np.concatenate([best_s, sims], axis=1)
            cand_r = np.concatenate([best_r, rows], axis=1)
            if cand_s.shape[1] > k:
                # Columns are in row order (kept ones first, all below this block), so among scores tied
                # with the k-th highest the first ones are the lowest rows.
                kth = -np.partition(-cand_s, k - 1, axis=1)[:, k - 1 : k]
                above, tied = cand_s > kth, cand_s == kth
                keep = above | tied
                crowded = keep.sum(axis=1) > k  # more scores tied with the k-th than places left
                if crowded.any():
                    room = k - above[crowded].sum(axis=1, keepdims=True)
                    keep[crowded] = above[crowded] | (tied[crowded] & (np.cumsum(tied[crowded], axis=1) <= room))
                columns = np.nonzero(keep)[1].reshape(len(q), k)  # ascending: row order is kept
                cand_s = np.take_along_axis(cand_s, columns, axis=1)
                cand_r = np.take_along_axis(cand_r, columns, axis=1)
            best_s, best_r = cand_s, cand_r
        order = np.lexsort((best_r, -best_s), axis=1)  # score descending, then row ascending
        out_scores[qs : qs + q_chunk] = np.take_along_axis(best_s, order, axis=1)
        out_rows[qs : qs + q_chunk] = np.take_along_axis(best_r, order, axis=1)
    return out_scores, out_rows


def nearest_others(
    vectors: np.ndarray, k: int, rows: np.ndarray | None = None, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `vectors` most similar to each of `rows` (default: all), itself left out:
    (scores R x k, rows R x k), best first."""
    n = len(vectors)
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    if not 1 <= k < n:
        raise GplError(f"-k {k}: {k} nearest other images need at least {k + 1} images, there are {n}")
    return top_k_excluding(vectors, vectors[rows], k, rows, backend)


def top_k_excluding(
    index: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` with one row of `index` left out per query: exclude[i] is the row query i may not find
    (-1: none; None: no query leaves anything out).

    The width is k capped at the number of rows; a query that lost its excluded row to a k that
    large has row -1, score -inf in its last column.
    """
    exclude = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    if exclude is None or not (exclude >= 0).any():
        return top_k(index, queries, k, backend)
    width = min(k, len(index))
    scores, found = top_k(index, queries, k + 1, backend)
    own = found == exclude[:, None]
    # A row is normally its own first hit; with exact duplicates rounding may rank it later or
    # push it out of the k + 1, and then the k best others are the first k columns.
    order = np.argsort(own, axis=1, kind="stable")  # the excluded hit moves to the end, the rest keep their order
    scores = np.take_along_axis(np.where(own, -np.inf, scores), order, axis=1)[:, :width]
    found = np.take_along_axis(np.where(own, -1, found), order, axis=1)[:, :width]
    return scores.astype(np.float32), found


def _top_k_faiss(faiss, index: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    flat = faiss.IndexFlatIP(index.shape[1])
    block = max(1, BLOCK_FLOATS // max(1, index.shape[1]))
    for start in range(0, len(index), block):
        flat.add(np.ascontiguousarray(metrics.unit_rows(index[start : start + block], norm_dtype=np.float32)))
    scores, rows = flat.search(np.ascontiguousarray(metrics.unit_rows(queries, norm_dtype=np.float32)), k)
    return scores.astype(np.float32), rows.astype(np.int64)


# --- files and queries ----------------------------------------------------------------


def choose_pooling(metadata: dict, key: str | None, path: str) -> str:
    """The pooling to compare with: the one asked for, else the file's first."""
    keys = list(metadata.get("pool_keys") or metadata.get("pools", {}))
    if not keys:
        raise GplError(f"{path} records no poolings")
    if key is None:
        return keys[0]
    if key not in keys:
        raise GplError(f"{path} has no pooling {key!r}; it holds: {', '.join(keys)}")
    return key


def searchable(emb: Embeddings, key: str, path: str) -> np.ndarray:
    """The pooling's vectors, refused when a row is not finite (store.embeddings.finite)."""
    return finite(emb, key, path)


def locate(emb: Embeddings, queries: list[str]) -> list[int | None]:
    """The row of each query in the file: by its stored name, or by where it lies below the file's root."""
    rows = {name: i for i, name in enumerate(emb.paths)}
    root = emb.metadata.get("root")

    def row_of(query: str) -> int | None:
        if query in rows:
            return rows[query]
        if root and os.path.exists(query):
            return rows.get(os.path.relpath(os.path.abspath(query), root))
        return None

    return [row_of(q) for q in queries]


def embed_like(images: list[str | tuple[str, MadeImage]], metadata: dict, key: str, device: str = "auto",
               backbone=None) -> np.ndarray:
    """`embed_all_like`, one pooling."""
    return embed_all_like(images, metadata, device, backbone)[key]


def embed_all_like(images: list[str | tuple[str, MadeImage]], metadata: dict, device: str = "auto",
                   backbone=None) -> dict[str, np.ndarray]:
    """Embed images exactly as the file's rows were made (the run configuration recorded in it): every pooling
    of the file, one row per image in the order given.

    An image is a path, or (name, MadeImage) for one made in memory when it is decoded, so that the images
    made are never all held at once (the name is for messages).
    `backbone`: an already loaded one; it must carry the recorded weights.
    """
    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import InputItem, InputList
    from gpl_cli.embedding.job import Job
    from gpl_cli.models.backbones import load_backbone

    try:
        recorded = metadata["config"]
        config = EmbedConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})
        config.check()
    except (KeyError, TypeError) as exc:
        raise GplError(f"the file does not record how it was made ({exc}), so images cannot be embedded like its rows") from None
    backbone = backbone or load_backbone(config.backbone, config.weights, config.layer)
    if backbone.weights_sha256 != metadata.get("weights_sha256"):
        raise GplError(
            f"the weights available now for {config.backbone} (sha256 {backbone.weights_sha256[:12]}...) are "
            f"not the ones the file was made with (sha256 {str(metadata.get('weights_sha256'))[:12]}...), "
            "so images cannot be embedded like its rows; query with paths in the file"
        )
    # A path given twice is embedded once; rows come back in input order, every input or a GplError.
    unique = list(dict.fromkeys(im if isinstance(im, str) else id(im) for im in images))
    made = {id(im): im for im in images if not isinstance(im, str)}
    items = [InputItem(u, u) if isinstance(u, str) else InputItem(made[u][0], made[u][0], source=made[u][1])
             for u in unique]
    # below fp32 each runtime rounds its own way: the file's own (a few query images never repay OpenVINO's start)
    runtime = "auto" if config.precision == "fp32" else metadata.get("runtime", "torch")
    job = Job(config, RunOptions(batch_size=16, workers=0, device=device, runtime=runtime), len(items), backbone=backbone)
    if config.precision == "int8":
        job.quantize_like(metadata.get("int8"))
    emb = job.embeddings(InputList(items, os.getcwd()))
    if emb.failures:
        path, reason = emb.failures[0]
        raise GplError(f"query image {path}: {reason}")
    row = {u: i for i, u in enumerate(unique)}
    order = [row[im if isinstance(im, str) else id(im)] for im in images]
    return {k: v[order] for k, v in emb.vectors.items()}


def nearest(
    path: str,
    queries: list[str],
    k: int = 10,
    key: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    backbone=None,
    search: Callable[[np.ndarray, np.ndarray, int, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[QueryResult]:
    """The k nearest rows of the file for each query (a path in the file, or any image file).

    `search(vectors, queries, k, own)` replaces the plain `top_k` (re-ranking: gpl_cli.analysis.rerank):
    own[i] is the row of query i in the file, -1 for an embedded image; a row -1 in its answer is no result."""
    if not queries:
        raise GplError("no query given: pass image paths (in the file or not), or --duplicates")
    key = choose_pooling(read_metadata(path), key, path)
    emb = read_embeddings(path, keys=[key])
    if not len(emb):
        raise GplError(f"{path} holds no embeddings")
    vectors = searchable(emb, key, path)
    rows = locate(emb, queries)
    outside = [q for q, r in zip(queries, rows) if r is None]
    missing = [q for q in outside if not os.path.isfile(q)]
    if missing:
        raise GplError(f"query {missing[0]}: not a path in {path}, and no such image file")
    embedded = iter(embed_like(outside, emb.metadata, key, device, backbone) if outside else [])
    query_vectors = np.stack([vectors[r] if r is not None else next(embedded) for r in rows])
    if search is None:
        scores, found = top_k(vectors, query_vectors, k, backend)
    else:
        scores, found = search(vectors, query_vectors, k, np.array([-1 if r is None else r for r in rows]))
    return [
        QueryResult(
            q,
            "file" if r is not None else "embedded",
            [Neighbor(rank + 1, float(s), emb.paths[i], int(i)) for rank, (s, i) in enumerate(zip(sc, fr)) if i >= 0],
            zero=not query.any(),
        )
        for q, r, sc, fr, query in zip(queries, rows, scores, found, query_vectors)
    ]

