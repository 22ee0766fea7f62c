"""What the compare report's galleries show: which queries, their neighbours under every pooling,
and the class pairs each pooling confuses. Numbers only; `gpl_cli.report.html` draws them.

Queries where the poolings disagree: what the gallery shows is each query's GALLERY_K nearest
images under every pooling, so a query is said to disagree only when those differ. With labels,
per class, the queries that differ most, in this order: positions where one pooling's neighbour is
of the query's class and another's is not (summed over pairs of poolings), then images in one
pooling's GALLERY_K nearest and not in another's, then the spread of AP (max - min over the
poolings); queries whose GALLERY_K nearest are the same under every pooling are never picked as
disagreeing. Then the query whose mean AP over the poolings is closest to its class's median (a
typical one). With one pooling there is nothing to disagree on: the lowest-AP queries stand in.
Without labels, the queries with the most images in one pooling's GALLERY_K nearest and not in
another's (none with the same GALLERY_K under every pooling), plus the one with the median number
of them. A neighbour that no other pooling shows is marked as such (QueryView.only).

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
    only: dict[str, set[int]]  # per pooling, the rows of its neighbours that no other pooling shows


@dataclass
class Confusion:
    query_class: str
    neighbor_class: str
    count: int  # (query, neighbour) pairs among each query's JACCARD_K nearest
    share: float  # count / (queries of query_class x JACCARD_K)
    examples: list[tuple[int, int, float]]  # (query row, neighbour row, cosine), nearest ranks first


def _with_typical(candidates: np.ndarray, eligible: np.ndarray, order_key: tuple, centre: np.ndarray, n: int,
                  worst: str) -> list[tuple[int, str]]:
    """The first n `eligible` candidates by `order_key` (np.lexsort keys, the last one primary; ties: lower
    row), then the remaining candidate closest to the median `centre` of all of them."""
    order = candidates[np.lexsort((candidates, *(key[candidates] for key in order_key)))]
    chosen = [int(r) for r in order if eligible[r]][:n]
    rest = np.setdiff1d(candidates, chosen)
    out = [(r, worst) for r in chosen]
    if len(rest):
        median = np.median(centre[candidates])
        out.append((int(rest[np.lexsort((rest, np.abs(centre[rest] - median)))][0]), "typical"))
    return out


def shown_differences(neighbors: dict[str, np.ndarray], codes: np.ndarray | None,
                      k: int = GALLERY_K) -> tuple[np.ndarray, np.ndarray]:
    """Per image, summed over pairs of poolings, over their k nearest: (images in one's and not in the other's,
    positions where one's neighbour is of the image's class and the other's is not; zeros without labels)."""
    keys = list(neighbors)
    rows = len(next(iter(neighbors.values())))
    moved, pattern = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            na, nb = neighbors[a][:, :k], neighbors[b][:, :k]
            shared = (na[:, :, None] == nb[:, None, :]).any(axis=2).sum(axis=1)
            moved += 2 * (na.shape[1] - shared)
            if codes is not None:
                pattern += ((codes[na] == codes[:, None]) != (codes[nb] == codes[:, None])).sum(axis=1)
    return moved, pattern


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
        centre = aps.mean(axis=0)
        if len(keys) > 1:
            moved, pattern = shown_differences(neighbors, codes)
            order_key, eligible, reason = (-(aps.max(axis=0) - aps.min(axis=0)), -moved, -pattern), moved > 0, "disagree"
        else:
            order_key, eligible, reason = (aps[0],), np.ones(rows, bool), "hardest"
        picked = []
        for c in range(int(codes.max()) + 1):
            candidates = np.flatnonzero((codes == c) & np.isfinite(centre))
            if len(candidates):
                picked += _with_typical(candidates, eligible, order_key, centre, n, reason)
        return picked
    if len(keys) > 1:
        moved, _ = shown_differences(neighbors, None)
        return _with_typical(np.arange(rows), moved > 0, (-moved,), moved.astype(float), n, "disagree")
    spaced = np.unique(np.linspace(0, rows - 1, n + 1).round().astype(int))
    return [(int(r), "sample") for r in spaced]


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
        found_by = {key: {nb.row for nb in near} for key, near in neighbors.items()}
        only = {key: set() for key in found_by}  # one pooling has nothing to differ from
        if len(found_by) > 1:
            only = {key: mine - set().union(*(theirs for other, theirs in found_by.items() if other != key))
                    for key, mine in found_by.items()}
        views.append(QueryView(row, reason, None if ap is None else {key: float(a[row]) for key, a in ap.items()},
                               neighbors, only))
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
