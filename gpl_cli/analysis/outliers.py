"""Outliers: the images least like any other, the usual first look at a new collection.

An image's outlier score is its cosine similarity to its k-th nearest other image; the
lowest scores come first. With k = 1 an odd pair of images (two near-identical oddities)
would hide each other, so the default looks a few neighbours further. The neighbours come
from `neighbors.nearest_others` (blockwise brute force, or exact FAISS on large files), so
memory holds the vectors plus N x (k + 1) results, never an N x N matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpl_cli.analysis.neighbors import Neighbor, choose_pooling, nearest_others, searchable
from gpl_cli.store.formats import read_embeddings, read_metadata

DEFAULT_K = 5
DEFAULT_TOP = 20


@dataclass
class Outlier:
    rank: int
    score: float  # cosine similarity to its k-th nearest other image
    path: str
    row: int
    neighbors: list[Neighbor]  # its k nearest other images, nearest first


def find_outliers(
    path: str, k: int = DEFAULT_K, top: int = DEFAULT_TOP, key: str | None = None, backend: str = "auto"
) -> list[Outlier]:
    """The `top` images of the file with the lowest similarity to their k-th nearest other image."""
    key = choose_pooling(read_metadata(path), key, path)
    emb = read_embeddings(path, keys=[key])
    scores, rows = nearest_others(searchable(emb, key, path), k, backend=backend)  # a NaN row is refused, not dropped
    order = np.lexsort((np.arange(len(emb)), scores[:, k - 1]))[:top]  # lowest score first, then row
    return [
        Outlier(
            rank + 1,
            float(scores[r, k - 1]),
            emb.paths[r],
            r,
            [Neighbor(j + 1, float(s), emb.paths[i], int(i)) for j, (s, i) in enumerate(zip(scores[r], rows[r]))],
        )
        for rank, r in enumerate(order.tolist())
    ]
