"""What the compare report's galleries show: which queries, their neighbours under every pooling,
and the class pairs each pooling confuses. Numbers only; `gpl_cli.report.html` draws them.

Queries where the poolings disagree most: with labels, per class, the queries whose average
precision differs most between poolings (largest max - min AP over the poolings), plus the
query whose mean AP over the poolings is closest to its class's median (a typical one). With
one pooling there is nothing to disagree on: the lowest-AP queries stand in. Without labels,
the queries whose metrics.JACCARD_K nearest neighbours overlap least between the poolings
(mean Jaccard over pairs of poolings), plus the one with the median overlap.

Confusions: among the JACCARD_K nearest neighbours of every query, the count of (query class,
neighbour class) pairs with different classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpl_cli.analysis import metrics
from gpl_cli.analysis.neighbors import Neighbor, nearest_others

GALLERY_K = 5  # neighbours shown per query and pooling (the largest k of P@k in the report)
DEFAULT_QUERIES = 3  # per class: where the poolings disagree most
CONFUSIONS_SHOWN = 3  # class pairs per pooling
EXAMPLES_SHOWN = 3  # example image pairs per class pair


@dataclass
class QueryView:
    row: int
    reason: str  # "disagree", "typical" (or "hardest" with one pooling, "sample" without labels or pairs)
    ap: dict[str, float] | None  # per pooling
    neighbors: dict[str, list[Neighbor]]  # per pooling, the GALLERY_K nearest other images


@dataclass
class Confusion:
    query_class: str
    neighbor_class: str
    count: int  # (query, neighbour) pairs among each query's JACCARD_K nearest
    share: float  # count / (queries of query_class x JACCARD_K)
    examples: list[tuple[int, int, float]]  # (query row, neighbour row, cosine), nearest ranks first


def _with_typical(candidates: np.ndarray, spread: np.ndarray, centre: np.ndarray, n: int,
                  worst: str) -> list[tuple[int, str]]:
    """The n candidates with the largest spread, then the remaining one closest to the median centre."""
    order = candidates[np.lexsort((candidates, -spread[candidates]))]
    chosen = [(int(r), worst) for r in order[:n]]
    rest = order[n:]
    if len(rest):
        median = np.median(centre[candidates])
        typical = rest[np.lexsort((rest, np.abs(centre[rest] - median)))][0]
        chosen.append((int(typical), "typical"))
    return chosen


def pick_queries(
    ap: dict[str, np.ndarray] | None,
    neighbors: dict[str, np.ndarray],
    codes: np.ndarray | None,
    n: int = DEFAULT_QUERIES,
) -> list[tuple[int, str]]:
    """(row, reason) of the queries to show, class by class (see the module's description)."""
    keys = list(neighbors)
    rows = len(next(iter(neighbors.values())))
    if codes is not None and ap is not None:
        aps = np.stack([ap[k] for k in keys])
        if len(keys) > 1:
            spread, reason = aps.max(axis=0) - aps.min(axis=0), "disagree"
        else:
            spread, reason = -aps[0], "hardest"
        centre = aps.mean(axis=0)
        picked = []
        for c in range(int(codes.max()) + 1):
            candidates = np.flatnonzero((codes == c) & np.isfinite(centre))
            if len(candidates):
                picked += _with_typical(candidates, spread, centre, n, reason)
        return picked
    if len(keys) > 1:
        overlap = neighbor_overlap(neighbors)
        return _with_typical(np.arange(rows), 1 - overlap, overlap, n, "disagree")
    spaced = np.unique(np.linspace(0, rows - 1, n + 1).round().astype(int))
    return [(int(r), "sample") for r in spaced]


def neighbor_overlap(neighbors: dict[str, np.ndarray]) -> np.ndarray:
    """Per image, the Jaccard overlap of its nearest-neighbour sets, averaged over pairs of poolings."""
    keys = list(neighbors)
    return np.mean([metrics.knn_jaccard_rows(neighbors[a], neighbors[b])
                    for i, a in enumerate(keys) for b in keys[i + 1:]], axis=0)


def query_views(
    vectors: dict[str, np.ndarray], paths: list[str], picked: list[tuple[int, str]],
    ap: dict[str, np.ndarray] | None = None, k: int = GALLERY_K,
) -> list[QueryView]:
    """The picked queries with their k nearest other images under every pooling."""
    rows = np.array([r for r, _ in picked], dtype=np.int64)
    found = {key: nearest_others(x, min(k, len(x) - 1), rows) for key, x in vectors.items()}
    views = []
    for i, (row, reason) in enumerate(picked):
        neighbors = {
            key: [Neighbor(rank + 1, float(s), paths[j], int(j)) for rank, (s, j) in enumerate(zip(scores[i], hits[i]))]
            for key, (scores, hits) in found.items()
        }
        views.append(QueryView(row, reason, None if ap is None else {key: float(a[row]) for key, a in ap.items()},
                               neighbors))
    return views


def confusions(
    vectors: np.ndarray, neighbors: np.ndarray, codes: np.ndarray, class_names: list[str],
    shown: int = CONFUSIONS_SHOWN, examples: int = EXAMPLES_SHOWN,
) -> list[Confusion]:
    """The class pairs one pooling confuses most, from each query's nearest neighbours (N x K)."""
    n_classes = len(class_names)
    counts_per_class = np.bincount(codes, minlength=n_classes)
    queries = np.flatnonzero(counts_per_class[codes] >= 2)
    ranked = neighbors[queries]
    q_codes = np.repeat(codes[queries][:, None], ranked.shape[1], axis=1)
    n_codes = codes[ranked]
    table = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(table, (q_codes.ravel(), n_codes.ravel()), 1)
    np.fill_diagonal(table, 0)
    flat = np.lexsort((np.arange(table.size), -table.ravel()))[:shown]
    unit = metrics.unit_rows(vectors)
    out = []
    for cell in flat.tolist():
        a, b = divmod(cell, n_classes)
        if not table[a, b]:
            break
        qi, rank = np.nonzero((q_codes == a) & (n_codes == b))
        order = np.lexsort((queries[qi], rank))  # nearest ranks first, then row
        seen: set[int] = set()
        pairs = []
        for j in order.tolist():
            q, nb = int(queries[qi[j]]), int(ranked[qi[j], rank[j]])
            if q not in seen and len(pairs) < examples:
                seen.add(q)
                pairs.append((q, nb, float(unit[q] @ unit[nb])))
        queries_a = int(np.count_nonzero(codes[queries] == a))
        out.append(Confusion(class_names[a], class_names[b], int(table[a, b]),
                             int(table[a, b]) / (queries_a * ranked.shape[1]), pairs))
    return out
