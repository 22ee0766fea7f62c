"""How good and how alike embedding spaces are: retrieval metrics and label-free statistics, numpy only.

Similarity is cosine. Every pairwise quantity is computed in row blocks of the similarity
matrix (`similarity_blocks`), so memory grows with N x block, never with N x N; per-image
results are kept as vectors of length N. Retrieval follows the usual leave-one-out protocol:
every image is a query against all the others, itself left out; images whose class has no
other member cannot be queries (they stay in the gallery as distractors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

BLOCK_BYTES = 1 << 27  # working memory one similarity block may take (128 MiB)
CHUNK_ROWS = 4096  # rows per step of the O(N x D) statistics
HIST_BINS = np.linspace(-1.0, 1.0, 101)  # cosine histogram edges for the distribution plots
JACCARD_K = 10
MAX_PAIRS = 1_000_000  # pairwise-similarity rank correlation: all pairs up to this many, else a sample


def row_chunks(n: int, rows: int) -> Iterator[slice]:
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def unit_rows(x: np.ndarray, norm_dtype: type[np.floating] = np.float64) -> np.ndarray:
    """Rows scaled to unit L2 norm as float32; an all-zero row stays zero (cosine 0 to everything).

    `norm_dtype` is the precision of the norms and the division: float64 (the metrics) divides the float32
    rows by float64 norms and rounds once to float32; float32 (`gpl neighbors`) stays in float32 throughout.
    """
    x = np.asarray(x, dtype=np.float32)
    if np.dtype(norm_dtype) == np.float64:
        norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))[:, None]
    elif np.dtype(norm_dtype) == np.float32:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
    else:
        raise ValueError(f"norm_dtype must be float32 or float64, not {np.dtype(norm_dtype)}")
    return (x / np.maximum(norms, norms.dtype.type(1e-12))).astype(np.float32, copy=False)


def block_rows(n: int, bytes_per_cell: int = 64) -> int:
    """Query rows per similarity block so that a block and its sort fit in BLOCK_BYTES."""
    return int(max(1, min(n, BLOCK_BYTES // max(1, n * bytes_per_cell))))


def similarity_blocks(unit: np.ndarray, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(start, S) for consecutive row blocks: S = cosine of unit[start:start+b] to all rows (b x N float32),
    with each query's similarity to itself set to -inf so it ranks last."""
    n = len(unit)
    rows = rows or block_rows(n)
    for block in row_chunks(n, rows):
        sims = unit[block] @ unit.T
        local = np.arange(block.stop - block.start)
        sims[local, block.start + local] = -np.inf
        yield block.start, sims


# --- retrieval ---------------------------------------------------------------------------


def average_precision(relevant: np.ndarray) -> np.ndarray:
    """AP of each row of a ranked relevance matrix (b x M, best first); NaN where a row has nothing relevant.

    AP = mean over the relevant positions r of precision@r.
    """
    relevant = np.asarray(relevant, dtype=bool)
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(relevant, hits / ranks, 0.0).sum(axis=1) / hits[:, -1]


def knn_vote(neighbor_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Majority class among each row's neighbours (nearest first); a tie goes to the tied class
    whose first member ranks highest."""
    rows, k = neighbor_labels.shape
    index = np.arange(rows)
    votes = np.zeros((rows, n_classes), dtype=np.int64)
    first = np.full((rows, n_classes), k, dtype=np.int64)
    for j in range(k - 1, -1, -1):
        votes[index, neighbor_labels[:, j]] += 1
        first[index, neighbor_labels[:, j]] = j
    return np.argmax(votes * (k + 1) - first, axis=1)


def chance_average_precision(n_items: int, n_relevant: np.ndarray | int) -> np.ndarray:
    """Expected AP of a uniformly random ranking of `n_items` holding `n_relevant` relevant ones.

    With M items and R relevant, position i is relevant with probability R/M and, given that,
    precision@i has mean (1 + (i-1)(R-1)/(M-1)) / i; summing gives
    E[AP] = (H_M + (R-1)/(M-1) * (M - H_M)) / M, H_M the M-th harmonic number.
    """
    m = n_items
    r = np.asarray(n_relevant, dtype=np.float64)
    if m == 1:
        return np.ones_like(r)
    harmonic = np.sum(1.0 / np.arange(1, m + 1))
    return (harmonic + (r - 1) / (m - 1) * (m - harmonic)) / m


@dataclass
class PassResult:
    """Per-image results of one leave-one-out pass over an embedding space."""

    neighbors: np.ndarray  # N x JACCARD_K int: nearest first, self excluded
    pair_sims: np.ndarray  # cosine at the requested pairs (see pair_sample)
    hist_other: np.ndarray  # cosine counts over HIST_BINS: different-class pairs (all pairs without labels)
    queries: np.ndarray | None = None  # N bool: has another image of its class (labels only from here on)
    ap: np.ndarray | None = None  # N float64, NaN for non-queries
    precision: dict[int, np.ndarray] | None = None  # k -> N precision@k
    knn_correct: dict[int, np.ndarray] | None = None  # k -> N bool, leave-one-out k-NN majority vote
    hist_same: np.ndarray | None = None  # cosine counts over HIST_BINS: same-class pairs


def _histogram(cosines: np.ndarray) -> np.ndarray:
    # float32 rounding can put a cosine a hair outside [-1, 1], where np.histogram would drop it.
    return np.histogram(np.clip(cosines, -1.0, 1.0), HIST_BINS)[0]


def pair_sample(n: int, max_pairs: int = MAX_PAIRS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unordered image pairs (I < J, sorted by I): all of them if there are at most `max_pairs`,
    else `max_pairs` drawn uniformly (with replacement) with a fixed seed."""
    total = n * (n - 1) // 2
    if total <= max_pairs:
        i, j = np.triu_indices(n, k=1)
        return i.astype(np.int64), j.astype(np.int64)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, size=max_pairs)
    b = (a + rng.integers(1, n, size=max_pairs)) % n  # uniform over the n - 1 others
    i, j = np.minimum(a, b), np.maximum(a, b)
    order = np.argsort(i, kind="stable")
    return i[order], j[order]


def leave_one_out_pass(
    x: np.ndarray,
    labels: np.ndarray | None = None,
    ks: tuple[int, ...] = (1, 5),
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    on_progress: Callable[[int], None] | None = None,
    blocks: Iterable[tuple[int, np.ndarray]] | None = None,
) -> PassResult:
    """Rank all other images for every image, in blocks, and collect what the metrics need.

    `labels` are class codes 0..C-1 (or None: label-free results only). Ties in similarity
    are broken by row order, so results are deterministic. `blocks` replaces the cosine blocks of
    `similarity_blocks` by other scores in the same form (consecutive row blocks, each query's own
    column -inf), such as re-ranked ones; the histograms and `pair_sims` then hold those scores.
    """
    unit = unit_rows(x)
    n = len(unit)
    pair_i, pair_j = pairs if pairs is not None else pair_sample(n)
    depth = min(n - 1, max(JACCARD_K, *ks))
    neighbors = np.zeros((n, min(JACCARD_K, n - 1)), dtype=np.int64)
    pair_sims = np.empty(len(pair_i), dtype=np.float32)
    hist_other = np.zeros(len(HIST_BINS) - 1, dtype=np.int64)
    result = PassResult(neighbors, pair_sims, hist_other)
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        n_classes = int(labels.max()) + 1
        result.queries = np.bincount(labels, minlength=n_classes)[labels] >= 2
        result.ap = np.full(n, np.nan)
        result.precision = {k: np.zeros(n) for k in ks}
        result.knn_correct = {k: np.zeros(n, dtype=bool) for k in ks}
        result.hist_same = np.zeros_like(hist_other)
    columns = np.arange(n)
    for start, sims in similarity_blocks(unit) if blocks is None else blocks:
        rows = slice(start, start + len(sims))
        if labels is None:
            top = np.argpartition(-sims, depth - 1, axis=1)[:, :depth]  # self (-inf) never among them
            order = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable"), 1)
        else:
            order = np.argsort(-sims, axis=1, kind="stable")[:, : n - 1]  # self (-inf) is last
        neighbors[rows] = order[:, : neighbors.shape[1]]
        in_block = slice(*np.searchsorted(pair_i, [rows.start, rows.stop]))
        pair_sims[in_block] = sims[pair_i[in_block] - start, pair_j[in_block]]
        upper = columns[None, :] > np.arange(rows.start, rows.stop)[:, None]  # each unordered pair once
        if labels is None:
            hist_other += _histogram(sims[upper])
        else:
            same = labels[rows, None] == labels[None, :]
            hist_other += _histogram(sims[upper & ~same])
            result.hist_same += _histogram(sims[upper & same])
            ranked = labels[order]
            relevant = ranked == labels[rows, None]
            result.ap[rows] = np.where(result.queries[rows], average_precision(relevant), np.nan)
            for k in ks:
                kk = min(k, n - 1)
                result.precision[k][rows] = relevant[:, :kk].mean(axis=1)
                result.knn_correct[k][rows] = knn_vote(ranked[:, :kk], n_classes) == labels[rows]
        if on_progress:
            on_progress(len(sims))
    return result


def knn_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of |A & B| / |A | B| for their k-nearest-neighbour sets in two spaces (N x k each)."""
    return float(np.sum(knn_jaccard_rows(a, b))) / len(a)


def knn_jaccard_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|A & B| / |A | B| of each image's k-nearest-neighbour sets in two spaces (N x k each)."""
    k = a.shape[1]
    out = np.empty(len(a))
    for rows in row_chunks(len(a), CHUNK_ROWS):
        inter = (a[rows, :, None] == b[rows, None, :]).any(axis=2).sum(axis=1)
        out[rows] = inter / (2 * k - inter)
    return out


# --- bootstrap ---------------------------------------------------------------------------


def bootstrap_means(values: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """Means of `values` (P x Q: P measures over the same Q queries) over `n_resamples` resamples of
    the queries with replacement; every measure sees the same resamples (paired). Returns P x B."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    p, q = values.shape
    rng = np.random.default_rng(seed)
    means = np.empty((p, n_resamples))
    step = max(1, BLOCK_BYTES // (8 * q * (p + 1)))
    for chunk in row_chunks(n_resamples, step):
        picks = rng.integers(0, q, size=(chunk.stop - chunk.start, q))
        means[:, chunk] = values[:, picks].mean(axis=2)
    return means


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


# --- label-free statistics ---------------------------------------------------------------


def norm_stats(x: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation, minimum and maximum of the rows' L2 norms."""
    norms = np.concatenate(
        [np.sqrt(np.einsum("ij,ij->i", x[rows], x[rows], dtype=np.float64)) for rows in row_chunks(len(x), CHUNK_ROWS)]
    )
    return {"mean": float(norms.mean()), "std": float(norms.std()), "min": float(norms.min()), "max": float(norms.max())}


def sparsity(x: np.ndarray) -> float:
    """Share of entries that are exactly zero."""
    zeros = sum(int(np.count_nonzero(x[rows] == 0)) for rows in row_chunks(len(x), CHUNK_ROWS))
    return zeros / x.size


def mean_pairwise_cosine(x: np.ndarray) -> float:
    """Mean cosine over all ordered pairs i != j, from the sum of unit vectors:
    sum_{i != j} u_i . u_j = |sum_i u_i|^2 - sum_i |u_i|^2. No pair is formed."""
    n = len(x)
    total = np.zeros(x.shape[1])
    self_terms = 0.0
    for rows in row_chunks(n, CHUNK_ROWS):
        unit = unit_rows(x[rows]).astype(np.float64)
        total += unit.sum(axis=0)
        self_terms += float(np.einsum("ij,ij->", unit, unit))
    return float((total @ total - self_terms) / (n * (n - 1)))


def effective_rank(x: np.ndarray) -> float:
    """exp of the entropy of the normalised covariance eigenvalues (Roy & Vetterli 2007):
    D for an isotropic cloud, 1 when all variance lies along one direction."""
    mean = np.mean(x, axis=0, dtype=np.float64)
    cov = np.zeros((x.shape[1], x.shape[1]))
    for rows in row_chunks(len(x), CHUNK_ROWS):
        centred = x[rows].astype(np.float64) - mean
        cov += centred.T @ centred
    eig = np.clip(np.linalg.eigvalsh(cov), 0.0, None)
    if eig.sum() == 0:
        return 0.0
    p = eig[eig > 0] / eig.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # ranks start..end-1, 1-based
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = np.sqrt((ra @ ra) * (rb @ rb))
    return float(ra @ rb / denominator) if denominator > 0 else float("nan")
