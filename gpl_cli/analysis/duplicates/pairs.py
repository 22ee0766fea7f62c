"""Pairs of rows whose cosine similarity reaches a threshold: the primitive every duplicate search is made of.

Exact search compares L2-normalised rows block by block, so memory holds the vectors plus one block of
similarities (BLOCK_FLOATS), never an N x N matrix: O(N^2 D) work. Within one set each pair is reported
once (a < b) and a row never pairs with itself; across two sets (`other`), a indexes `vectors` and b `other`.

Past EXACT_MAX_WORK the all-pairs cost is no longer practical, and `index="auto"` switches to an approximate
inverted file (IVF): FAISS's spherical k-means cuts the searched set into ~2 sqrt(N) cells, each row lives in
the cell of its nearest centroid, and each query row is compared, exactly and block by block as above, only
with the rows of the `nprobe` cells nearest to it. Comparing a cell's queries with its rows in one matrix
product keeps the work in BLAS (FAISS's own IVF scan of 8-bit codes took 1.2x the CPU time at 100 000 rows
of 256 here, and stores the codes besides), and memory holds the vectors plus N x nprobe cell numbers.
Scores are exact cosines, so no pair below the threshold is reported; what the index can miss is a pair
whose rows fall in cells far apart (recall: bench/bench_duplicates.py, figures in bench/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gpl_cli.analysis import metrics
from gpl_cli.errors import GplError, missing

BLOCK_FLOATS = 1 << 24  # similarities computed at once: 64 MiB of float32
INDEXES = ("auto", "exact", "ivf")
# Exact search costs about 30 ps of CPU time per multiply-add (7.6 ns per pair of 256-dimension rows, measured
# on a 2-core AMD EPYC, bench/RESULTS.md), so rows x rows x dimensions = 2e12 is about a minute of CPU time:
# ~88 000 rows of 256 dimensions, ~40 000 of 1280. Past it the time grows with the square of N (1 000 000
# rows of 256: two hours of CPU), while the IVF search grows about as N^1.5 (2.3 minutes of CPU there).
EXACT_MAX_WORK = 2e12
# Cells compared per query row: at 1 000 000 rows in random directions (the worst case) 8 kept 98 % of
# planted copies, 16 kept 99.6 % for 1.7x the CPU time; rows in classes lost none at 8 (bench/RESULTS.md).
NPROBE = 8
QUERY_ROWS = 1 << 16  # rows assigned to cells at once; bounds the normalised copies made for FAISS


@dataclass(frozen=True)
class Pairs:
    a: np.ndarray  # int64 rows of `vectors`
    b: np.ndarray  # int64 rows of `vectors` (a < b), or of `other` when two sets are searched
    score: np.ndarray  # float32 cosine similarity of each pair

    def __len__(self) -> int:
        return len(self.a)


def similar_pairs(vectors: np.ndarray, threshold: float, other: np.ndarray | None = None,
                  block_rows: int | None = None, index: str = "auto", nprobe: int = NPROBE) -> Pairs:
    """Every pair with cosine similarity >= threshold, in row order of a then b.

    index: "exact" compares all pairs; "ivf" compares rows only within nearby k-means cells (approximate: it
    may miss pairs, never invents one, and scores what it finds exactly); "auto" is exact up to EXACT_MAX_WORK
    (rows x rows x dimensions), or when FAISS is not installed.
    """
    if index not in INDEXES:
        raise GplError(f"unknown index {index!r}; valid: {', '.join(INDEXES)}")
    if index == "auto":
        index = "exact" if exact_is_practical(vectors, other) or _faiss() is None else "ivf"
    if index == "ivf":
        return _ivf_pairs(vectors, threshold, other, nprobe)
    return _exact_pairs(vectors, threshold, other, block_rows)


def exact_is_practical(vectors: np.ndarray, other: np.ndarray | None = None) -> bool:
    """Whether exact all-pairs search stays within EXACT_MAX_WORK (about a minute of CPU time)."""
    searched = vectors if other is None else other
    return float(len(vectors)) * len(searched) * vectors.shape[1] <= EXACT_MAX_WORK


def _exact_pairs(vectors: np.ndarray, threshold: float, other: np.ndarray | None, block_rows: int | None) -> Pairs:
    x = metrics.unit_rows(vectors, norm_dtype=np.float32)
    y = x if other is None else metrics.unit_rows(other, norm_dtype=np.float32)
    block = block_rows or max(1, int(BLOCK_FLOATS**0.5))
    found_a, found_b, found_s = [], [], []
    for start in range(0, len(x), block):
        a = x[start : start + block]
        for first in range(start if other is None else 0, len(y), block):
            sims = a @ y[first : first + block].T
            if other is None and first == start:  # the diagonal block: each pair once, never a row with itself
                sims[np.tril_indices(len(a), 0, sims.shape[1])] = -np.inf
            ii, jj = np.nonzero(sims >= threshold)
            if len(ii):
                found_a.append(ii + start)
                found_b.append(jj + first)
                found_s.append(sims[ii, jj])
    return _sorted_pairs(found_a, found_b, found_s)


def _sorted_pairs(found_a: list, found_b: list, found_s: list) -> Pairs:
    if not found_a:
        return Pairs(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    a, b, s = (np.concatenate(p) for p in (found_a, found_b, found_s))
    order = np.lexsort((b, a))
    return Pairs(a[order].astype(np.int64), b[order].astype(np.int64), s[order].astype(np.float32))


def _faiss():
    from gpl_cli.analysis.neighbors import _faiss

    return _faiss()


def _nearest_cells(quantizer, x: np.ndarray, k: int) -> np.ndarray:
    """The k cells whose centroids are most cosine-similar to each row of x, nearest first (N x k int64)."""
    cells = np.empty((len(x), k), np.int64)
    for start in range(0, len(x), QUERY_ROWS):
        block = np.ascontiguousarray(metrics.unit_rows(x[start : start + QUERY_ROWS], norm_dtype=np.float32))
        cells[start : start + len(block)] = quantizer.search(block, k)[1]
    return cells


def _ivf_pairs(vectors: np.ndarray, threshold: float, other: np.ndarray | None, nprobe: int) -> Pairs:
    faiss = _faiss()
    if faiss is None:
        raise GplError(missing("the ivf index needs FAISS", "faiss-cpu", "faiss"))
    searched = vectors if other is None else other
    n, dim = searched.shape
    if n == 0 or len(vectors) == 0:
        return _sorted_pairs([], [], [])
    # ~2 sqrt(N) cells balance k-means and the assignment (which grow with the cells) against the comparisons
    # within cells (which shrink with them); k-means sees 40 rows per cell, just above FAISS's minimum of 39.
    cells = max(1, min(int(2 * math.sqrt(n)), n // 40))
    nprobe = min(nprobe, cells)
    sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, 40 * cells), replace=False))
    kmeans = faiss.Kmeans(dim, cells, niter=10, spherical=True, seed=1, min_points_per_centroid=1)
    kmeans.train(np.ascontiguousarray(metrics.unit_rows(searched[sample], norm_dtype=np.float32)))
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(kmeans.centroids)
    probes = _nearest_cells(quantizer, vectors, nprobe)
    home = probes[:, 0] if other is None else _nearest_cells(quantizer, searched, 1)[:, 0]
    # Inverted lists: the searched rows by their cell, and the queries by each cell they probe.
    members = np.argsort(home, kind="stable")
    member_starts = np.searchsorted(home[members], np.arange(cells + 1))
    probed = probes.ravel()
    order = np.argsort(probed, kind="stable")
    queries = order // nprobe
    query_starts = np.searchsorted(probed[order], np.arange(cells + 1))
    del probes, probed, order
    found_a, found_b, found_s = [], [], []
    for cell in range(cells):
        d = members[member_starts[cell] : member_starts[cell + 1]]
        q = queries[query_starts[cell] : query_starts[cell + 1]]
        if not len(d) or not len(q):
            continue
        pairs = _exact_pairs(vectors[q], threshold, searched[d], None)
        a, b = q[pairs.a], d[pairs.b]
        if other is None:  # a pair may be met from either end: order each once, never a row with itself
            keep = a != b
            a, b = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
            pairs = Pairs(a, b, pairs.score[keep])
        found_a.append(a)
        found_b.append(b)
        found_s.append(pairs.score)
    if other is None and found_a:
        keys, first = np.unique(np.concatenate(found_a) * n + np.concatenate(found_b), return_index=True)
        found_a, found_b, found_s = [keys // n], [keys % n], [np.concatenate(found_s)[first]]
    return _sorted_pairs(found_a, found_b, found_s)
