"""Re-ranking for retrieval over an embeddings file: database-side augmentation (dba), alpha query
expansion (aqe) and k-reciprocal re-ranking (krr), numpy only, on float32 vectors that are
L2-normalised on entry. The maths, with references, is in docs/retrieval.md.

A pipeline is written as specs, `dba:k=2,aqe:k=2,alpha=3,krr` (`parse_rerank_list`), and run by a
`Reranker`: dba steps rewrite the database once, in the order given; then, for every query, aqe steps
replace the query vector; a last krr step turns the final search into a re-scored shortlist.

Queries may be rows of the database (leave-one-out retrieval) or outside vectors. `exclude[i]` names
the row that *is* query i (-1: none): that row is left out of query i's expansion, of its k-reciprocal
candidates and of its results, as if it were not in the database. Database-side augmentation is done
once for the whole database, so with leave-one-out the query's own vector is part of its neighbours'
augmented vectors; that is how dba is used (the database is fixed before any query comes).

Cost and memory. The k-NN lookups of dba and aqe go through `neighbors.top_k` (blockwise exact
search, or exact FAISS on large searches), so memory holds the vectors and N x (k + 1) results,
never an N x N matrix: dba costs one all-rows search, O(N^2 D) work; aqe one search of the queries
per step, O(Q N D). krr re-ranks each query's first n candidates of the plain ranking (the
shortlist) with the query itself as a collection of m = n + 1 vectors: O(m^2 D + m^3) work and a few
m x m arrays per query. Candidates beyond the shortlist keep their plain order, below it. n is
capped at MAX_CANDIDATES, where one query of 1280-dimensional vectors takes about a second on one CPU
core and 130 MiB at its peak (measured); beyond it one query would cost seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from gpl_cli.analysis.metrics import unit_rows
from gpl_cli.analysis.neighbors import top_k_excluding
from gpl_cli.errors import GplError
from gpl_cli.pooling.spec import fmt_number, parse_number, spec_pieces

MAX_CANDIDATES = 2000  # krr shortlist: m x m arrays of 16 MiB each and ~1 s per query at the cap


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    help: str
    low: float = 0.0  # inclusive bounds
    high: float = math.inf
    integer: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    reference: str
    params: tuple[Param, ...]

    def usage(self) -> str:
        return f"{self.name}:" + ",".join(f"{p.name}={fmt_number(p.default)}" for p in self.params)


METHODS = {m.name: m for m in (
    Method("dba", "every database vector becomes the L2-normalised sum of itself and its k nearest others, "
           "weighted by max(similarity, 0)^alpha (alpha 0: the plain mean)",
           "Arandjelovic & Zisserman 2012, Three things everyone should know to improve object retrieval (CVPR)",
           (Param("k", 2, "neighbours added to each database vector", low=1, integer=True),
            Param("alpha", 0, "weight exponent; 0 weighs every neighbour 1"))),
    Method("aqe", "the query becomes the L2-normalised sum of itself and its k nearest database vectors, "
           "weighted by max(similarity, 0)^alpha, and is searched again",
           "Radenovic, Tolias & Chum 2018, Fine-tuning CNN image retrieval with no human annotation (TPAMI)",
           (Param("k", 2, "neighbours added to the query", low=1, integer=True),
            Param("alpha", 3, "weight exponent; 0 weighs every neighbour 1 (average query expansion)"))),
    Method("krr", "the first n candidates re-scored by (1 - lambda) Jaccard similarity of their k-reciprocal "
           "neighbour sets + lambda cosine",
           "Zhong, Zheng, Cao & Li 2017, Re-ranking person re-identification with k-reciprocal encoding (CVPR)",
           (Param("k1", 20, "neighbourhood size of the k-reciprocal sets", low=1, integer=True),
            Param("k2", 6, "neighbours averaged in the local query expansion (1: none)", low=1, integer=True),
            Param("lambda", 0.3, "weight of the cosine in the final score", high=1),
            Param("n", 100, "candidates re-ranked per query", low=1, high=MAX_CANDIDATES, integer=True))),
)}


@dataclass(frozen=True)
class RerankSpec:
    """A method with all its parameter values (defaults filled in)."""

    method: str
    params: dict[str, float]

    def __str__(self) -> str:
        defaults = {p.name: p.default for p in METHODS[self.method].params}
        changed = [f"{k}={fmt_number(v)}" for k, v in self.params.items() if v != defaults[k]]
        return f"{self.method}:{','.join(changed)}" if changed else self.method


def _value(spec: str, param: Param, text: str) -> float:
    what = f"parameter {param.name} of re-ranking {spec!r}"
    number = parse_number(text, what, param.integer)
    if not param.low <= number <= param.high:
        bound = f">= {fmt_number(param.low)}" if param.high == math.inf else \
            f"between {fmt_number(param.low)} and {fmt_number(param.high)}"
        raise GplError(f"{what} must be {bound}, got {text!r}")
    return number


def parse_rerank_spec(text: str) -> RerankSpec:
    """'aqe', 'aqe:k=2,alpha=3', 'krr:k1=20,lambda=0.3' into a RerankSpec, with clear errors."""
    spec = text.strip()
    name, _, arg_text = spec.partition(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise GplError(f"unknown re-ranking {text!r}; valid: {', '.join(m.usage() for m in METHODS.values())}")
    method = METHODS[name]
    known = {p.name: p for p in method.params}
    values = {p.name: p.default for p in method.params}
    given: set[str] = set()
    for item in (s.strip() for s in arg_text.split(",")) if arg_text.strip() else ():
        key, eq, value = (part.strip() for part in item.partition("="))
        if key not in known or not eq:
            valid = ", ".join(f"{p.name} (default {fmt_number(p.default)})" for p in method.params)
            raise GplError(f"bad parameter {item!r} in re-ranking {spec!r}; its parameters: {valid}")
        if key in given:
            raise GplError(f"parameter {key} given twice in re-ranking {spec!r}")
        given.add(key)
        values[key] = _value(spec, known[key], value)
    return RerankSpec(name, values)


def parse_rerank_list(values: Iterable[str]) -> list[RerankSpec]:
    """Repeated/comma-joined --rerank values, in order: 'dba,aqe' is two, 'aqe:k=3,alpha=2' is one
    (a piece with '=' but no ':' continues the previous spec's parameters)."""
    pieces = spec_pieces(values, "--rerank", "specs such as dba,aqe:k=2")
    steps = [parse_rerank_spec(p) for p in pieces]
    check_order(steps)
    return steps


def check_order(steps: list[RerankSpec]) -> None:
    """dba changes the database every query searches, so it comes first; krr yields scores, not a
    query vector to search with, so it comes last."""
    names = [s.method for s in steps]
    if "dba" in names and any(n != "dba" for n in names[: len(names) - names[::-1].index("dba")]):
        raise GplError("--rerank: dba rewrites the database, so it comes before aqe and krr "
                       f"(got {', '.join(map(str, steps))})")
    if "krr" in names[:-1]:
        raise GplError("--rerank: krr ranks the final candidates, so it comes last and once "
                       f"(got {', '.join(map(str, steps))})")


# --- the maths ------------------------------------------------------------------------


def _weighted_sums(base: np.ndarray, db: np.ndarray, sims: np.ndarray, rows: np.ndarray, alpha: float) -> np.ndarray:
    """L2-normalised base + sum_j max(sims_j, 0)^alpha db[rows_j]; columns with row -1 add nothing."""
    weights = np.where(rows >= 0, np.maximum(sims, 0) ** np.float32(alpha), 0).astype(np.float32)
    return unit_rows(base + np.einsum("qk,qkd->qd", weights, db[np.maximum(rows, 0)]), norm_dtype=np.float32)


def dba(db: np.ndarray, k: int = 2, alpha: float = 0.0, backend: str = "auto") -> np.ndarray:
    """Database-side augmentation: every row becomes the L2-normalised weighted sum of itself (weight 1)
    and its k nearest other rows (weights max(similarity, 0)^alpha), all from the rows as given.
    k is capped at N - 1; ties go to the lower row."""
    db = unit_rows(db, norm_dtype=np.float32)
    n = len(db)
    if n < 2:
        return db
    sims, rows = top_k_excluding(db, db, min(k, n - 1), np.arange(n), backend)
    return _weighted_sums(db, db, sims, rows, alpha)


def aqe(db: np.ndarray, queries: np.ndarray, k: int = 2, alpha: float = 3.0, exclude=None,
        backend: str = "auto") -> np.ndarray:
    """Alpha query expansion: each query becomes the L2-normalised weighted sum of itself (weight 1)
    and its k nearest rows of `db` (weights max(similarity, 0)^alpha), exclude[i] left out.
    `db` must be L2-normalised already. k is capped at the rows available; ties go to the lower row."""
    queries = unit_rows(queries, norm_dtype=np.float32)
    sims, rows = top_k_excluding(db, queries, k, exclude, backend)
    return _weighted_sums(queries, db, sims, rows, alpha)


def krr_jaccard(collection: np.ndarray, k1: int = 20, k2: int = 6) -> np.ndarray:
    """Jaccard similarity of the k-reciprocal encodings of collection[0] (the query) and each other
    row, over this collection only (m rows, L2-normalised): a vector of m - 1 values in [0, 1].

    Each row's neighbour list ranks the collection by cosine, itself first, ties to the lower index.
    R(x, k) = {g in N(x, k): x in N(g, k)}, N(x, k) the first k + 1 of x's list (itself included);
    R*(x) adds R(c, ceil(k1/2)) for each c in R(x, k1) whose R(c, ceil(k1/2)) has at least 2/3 of its
    members in R(x, k1). V_x holds exp(-(1 - cos(x, g))) on R*(x), normalised to sum 1; the local query expansion
    averages V over the first k2 of x's list. k1 and k2 are capped at the collection.
    """
    x = np.asarray(collection, dtype=np.float32)
    m = len(x)
    k1 = min(k1, m - 1)
    half = (k1 + 1) // 2
    k2 = min(k2, m)
    sims = x @ x.T
    key = -sims
    np.fill_diagonal(key, -np.inf)  # a row is its own first neighbour, even beside an exact duplicate
    order = np.argsort(key, axis=1, kind="stable")[:, : max(k1, k2 - 1) + 1]  # stable: ties keep index order
    rows = np.arange(m)[:, None]

    def reciprocal(k: int) -> tuple[np.ndarray, np.ndarray]:
        """N(x, k) as m x (k + 1) rows, and which of them have x in their own N(., k)."""
        near = order[:, : k + 1]
        listed = np.zeros((m, m), bool)
        listed[rows, near] = True
        return near, listed[near, rows]

    near, in_r = reciprocal(k1)
    near_half, in_r_half = reciprocal(half)
    member = np.zeros((m, m), bool)  # member[x, g]: g in R(x, k1)
    member[rows, near] = in_r
    # For each c = near[x, j] in R(x, k1): its R(c, half), and how much of it lies in R(x, k1).
    c_near, c_in = near_half[near], in_r_half[near]  # m x (k1 + 1) x (half + 1)
    shared = (c_in & member[rows[:, :, None], c_near]).sum(axis=2)
    joins = in_r & (3 * shared >= 2 * c_in.sum(axis=2))
    r_star = member
    xs, js, ts = np.nonzero(joins[:, :, None] & c_in)
    r_star[xs, c_near[xs, js, ts]] = True
    weights = np.where(r_star, np.exp(sims - 1), 0).astype(np.float32)
    v = weights / weights.sum(axis=1, keepdims=True)  # R*(x) holds x itself: never empty
    v = sum(v[order[:, t]] for t in range(k2)) / np.float32(k2)  # local query expansion
    return np.minimum(v[0], v[1:]).sum(axis=1) / np.maximum(v[0], v[1:]).sum(axis=1)


class Reranker:
    """A database prepared for re-ranked search with `steps` (see the module docstring).

    `top_k` gives each query's best rows, `scores` a query x row score matrix for metrics such as
    leave-one-out mAP (call it on blocks of queries). Scores: the cosine of the (expanded) query to the
    (augmented) rows; with krr, (1 - lambda) J + lambda cosine for the shortlist and lambda cosine
    beyond it (J = 0 there), so a plain cosine ranking is kept outside the shortlist.
    """

    def __init__(self, db: np.ndarray, steps: list[RerankSpec], backend: str = "auto"):
        check_order(steps)
        self.backend = backend
        self.db = unit_rows(db, norm_dtype=np.float32)
        for step in (s for s in steps if s.method == "dba"):
            self.db = dba(self.db, int(step.params["k"]), step.params["alpha"], backend)
        self.expansions = [s for s in steps if s.method == "aqe"]
        self.krr = next((s.params for s in steps if s.method == "krr"), None)

    def expand(self, queries: np.ndarray, exclude=None) -> np.ndarray:
        """The query vectors after the aqe steps, L2-normalised."""
        q = unit_rows(queries, norm_dtype=np.float32)
        for step in self.expansions:
            q = aqe(self.db, q, int(step.params["k"]), step.params["alpha"], exclude, self.backend)
        return q

    def top_k(self, queries: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """(scores Q x k, rows Q x k), best first, ties to the lower row; k is capped at N, and a query
        that lost its excluded row to a k that large has row -1, score -inf in its last column."""
        q = self.expand(queries, exclude)
        if self.krr is None:
            return top_k_excluding(self.db, q, k, exclude, self.backend)
        cosines, rows = top_k_excluding(self.db, q, max(k, int(self.krr["n"])), exclude, self.backend)
        scores = self._krr_scores(q, cosines, rows)
        order = np.lexsort((np.where(rows < 0, len(self.db), rows), -scores), axis=1)[:, : min(k, len(self.db))]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def scores(self, queries: np.ndarray, exclude=None) -> np.ndarray:
        """Q x N scores, higher is better; exclude[i] scores -inf for query i."""
        q = self.expand(queries, exclude)
        out = q @ self.db.T
        if self.krr is not None:
            out *= np.float32(self.krr["lambda"])
            cosines, rows = top_k_excluding(self.db, q, int(self.krr["n"]), exclude, self.backend)
            rescored = self._krr_scores(q, cosines, rows)
            valid = rows >= 0
            out[np.nonzero(valid)[0], rows[valid]] = rescored[valid]
        if exclude is not None:
            exclude = np.asarray(exclude, dtype=np.int64)
            out[np.flatnonzero(exclude >= 0), exclude[exclude >= 0]] = -np.inf
        return out

    def _krr_scores(self, q: np.ndarray, cosines: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Scores for candidates in plain order (row -1: none): the first n re-scored, the rest lambda cosine."""
        lam = np.float32(self.krr["lambda"])
        n = int(self.krr["n"])
        out = np.where(rows >= 0, lam * cosines, -np.inf).astype(np.float32)
        for i in range(len(q)):
            short = rows[i][rows[i] >= 0][:n]
            by_row = np.argsort(short, kind="stable")  # the collection in row order: ties go to the lower row
            jaccard = np.empty(len(short), np.float32)
            jaccard[by_row] = krr_jaccard(np.vstack([q[i : i + 1], self.db[short[by_row]]]),
                                          int(self.krr["k1"]), int(self.krr["k2"]))
            out[i, : len(short)] += (1 - lam) * jaccard
        return out


def searcher(steps: list[RerankSpec], backend: str = "auto"):
    """`search` for neighbors.nearest: the steps over the file's vectors, each query in the file excluded."""

    def search(db: np.ndarray, queries: np.ndarray, k: int, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return Reranker(db, steps, backend).top_k(queries, k, own)

    return search
