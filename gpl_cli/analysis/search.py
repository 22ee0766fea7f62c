"""`gpl compare --search`: the retrieval pipeline that suits these images, chosen and measured by nested
cross-validation.

A pipeline is an input size (the resize mode and the scales each image is run at), a pooling, PCA
whitening or not, and a re-ranking or none. Every forward pass (one per resize mode and scale) is paid
once: a pipeline's vectors are its scales' pooled vectors combined (pooling.scales.combine_scales, as
`gpl embed --scales` combines them), whitened and re-ranked in numpy.

What is held out. Retrieval is scored as `gpl compare` scores it: a query is an image whose class has
another image, its average precision (AP) is over the ranking of every other image. Outer folds,
stratified by class, split the queries. In an outer fold:

- the pipeline is chosen on the training part only: the collection minus the fold's queries. Each
  training query searches that reduced collection (its own row excluded); a whitening is fitted by
  inner folds, on the reduced collection minus the inner fold's queries, so that no query is ever
  whitened by a fit that saw it. The pipeline with the best mean AP over the training queries is chosen
  (ties: the first in the search's order, which starts with the default).
- the chosen pipeline then scores the fold's queries, each searching the whole collection (its own row
  excluded), with a whitening fitted on the training part. The whole collection is what a user's query
  searches; a fold alone would hold a fifth of each class, and its mAP would measure another task.

The selection never sees the fold's images (not their labels, not their vectors: the training
collection does not hold them), so each query's held-out AP comes from a pipeline chosen without it.
The nested-CV gain is the mean over queries of held-out AP minus the default's AP (crop, scale 1, avg,
no whitening, no re-ranking: what `gpl embed` does without options), with a percentile bootstrap
interval over the queries (paired; 2000 resamples, seed 0). That interval treats the folds' choices as
fixed, so it leaves out the variation between training sets.

Each pipeline's own cross-validated mAP (every query scored in its outer fold, whitening fitted
without it) is reported too: it is an honest estimate for that pipeline alone, but the largest of many
such estimates is biased upwards, which is why the gain is the nested one.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from gpl_cli.analysis import metrics
from gpl_cli.analysis.rerank import Reranker, parse_rerank_list
from gpl_cli.errors import GplError
from gpl_cli.pooling.scales import combine_scales, scale_label
from gpl_cli.pooling.whiten import fit_whitening

DEFAULT_POOLS = ("avg", "max", "gem")
DEFAULT_RESIZES = ("crop",)  # --resize keep-aspect adds its forward passes (as many again)
DEFAULT_SCALE_SETS = ((1.0,), (1.0, 1.414, 2.0))
DEFAULT_RERANKS = ("dba", "aqe", "dba,aqe")
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
SEED = 0  # fold assignment


@dataclass(frozen=True)
class Pipeline:
    resize: str = "crop"
    scales: tuple[float, ...] = (1.0,)
    pool: str = "avg"
    whiten: bool = False
    rerank: str = ""  # re-ranking steps as --rerank takes them; "" for none

    def label(self) -> str:
        """'keep-aspect 1+1.414+2 gem, whitened, dba,aqe'."""
        return ", ".join([f"{self._size()} {self.pool}", *self._steps()])

    def describe(self) -> str:
        """In words: 'crop at scales 1, 1.414 and 2, avg pooling, re-ranked with dba,aqe'."""
        scales = [scale_label(x) for x in self.scales]
        size = f"{self.resize} at scale {scales[0]}" if len(scales) == 1 else \
            f"{self.resize} at scales {', '.join(scales[:-1])} and {scales[-1]}"
        return ", ".join([size, f"{self.pool} pooling", *(["PCA-whitened"] if self.whiten else []),
                          *([f"re-ranked with {self.rerank}"] if self.rerank else [])])

    def row_label(self) -> str:
        """All but the pooling: 'keep-aspect 1+1.414+2, whitened, dba,aqe'."""
        return ", ".join([self._size(), *self._steps()])

    def _size(self) -> str:
        return f"{self.resize} {'+'.join(map(scale_label, self.scales))}"

    def _steps(self) -> list[str]:
        return [*(["whitened"] if self.whiten else []), *([self.rerank] if self.rerank else [])]

    def as_dict(self) -> dict:
        return {"resize": self.resize, "scales": list(self.scales), "pool": self.pool, "whiten": self.whiten,
                "rerank": self.rerank or None}

    def commands(self, inputs: list[str], embed_options: list[str], query: str) -> list[str]:
        """The gpl commands that embed a collection with this pipeline and search it."""
        options = ["--pool", self.pool, *embed_options]
        if self.resize != "crop":
            options += ["--resize", self.resize]
        if self.scales != (1.0,):
            options += ["--scales", ",".join(map(scale_label, self.scales))]
        lines = []
        if self.whiten:
            lines += [shlex.join(["gpl", "embed", *inputs, "-o", "plain.h5", *options]),
                      shlex.join(["gpl", "whiten", "fit", "plain.h5", "-o", "whiten.npz"])]
            options += ["--whiten", "whiten.npz"]
        search = ["gpl", "neighbors", "pipeline.h5", query, "-k", "10"] + (["--rerank", self.rerank] if self.rerank else [])
        return lines + [shlex.join(["gpl", "embed", *inputs, "-o", "pipeline.h5", *options]), shlex.join(search)]


DEFAULT = Pipeline()


def search_space(pools, resizes, scale_sets, reranks, whiten: bool = True) -> list[Pipeline]:
    """Every combination of the axes, the default first (it is always measured: the gains are over it)."""
    out = [DEFAULT]
    for resize in resizes:
        for scales in scale_sets:
            for pool in pools:
                for white in (False, True) if whiten else (False,):
                    for rerank in ("", *reranks):
                        p = Pipeline(resize, tuple(scales), pool, white, rerank)
                        if p not in out:
                            out.append(p)
    return out


@dataclass
class Views:
    """The raw pooled vectors of every forward pass, N x D each, rows in one order: (resize, scale, pool) ->
    vectors; `seconds`: each pass's model time, (resize, scale) -> seconds (absent: not measured)."""

    vectors: dict[tuple[str, float, str], np.ndarray]
    seconds: dict[tuple[str, float], float] = field(default_factory=dict)

    def of(self, p: Pipeline) -> np.ndarray:
        return combine_scales([self.vectors[(p.resize, s, p.pool)] for s in p.scales])

    def model_seconds(self, p: Pipeline) -> float | None:
        times = [self.seconds.get((p.resize, s)) for s in p.scales]
        return None if None in times else float(sum(times))


@dataclass
class Candidate:
    pipeline: Pipeline
    cv_map: float  # each query's AP from its outer fold (whitening fitted without the fold)
    chosen: int  # outer folds that chose it
    passes: int  # forward passes per image
    model_seconds: float | None  # the forward passes and poolings it needs, over the whole collection
    rerank_seconds: float  # re-ranking every query of the collection (0: none)


@dataclass
class SearchResult:
    images: int
    folds: int
    inner_folds: int
    queries: int
    candidates: list[Candidate]
    fold_choices: list[Pipeline]
    winner: Pipeline
    default_map: float
    held_out_map: float
    held_out_ci: tuple[float, float]
    gain: float
    gain_ci: tuple[float, float]
    seconds: float  # the search itself, after the forward passes
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def default(self) -> Pipeline:
        return DEFAULT

    def method(self) -> str:
        return (f"nested {self.folds}-fold CV over {self.queries} queries stratified by class (seed {SEED}): in each "
                "fold the pipeline is chosen on the other folds' images alone (whitening by "
                f"{self.inner_folds}-fold inner CV), then the fold's queries search the whole collection with it; "
                f"95 % CI: paired percentile bootstrap over queries ({BOOTSTRAP_RESAMPLES} resamples)")

    def verdict(self) -> str:
        from gpl_cli.analysis.compare import excludes_zero, shown

        lo, hi = (shown(v) for v in self.gain_ci)
        gain = f"{shown(self.gain):+.1f} mAP points over the default (nested CV, 95 % CI {lo:+.1f} to {hi:+.1f})"
        if self.winner == DEFAULT:
            return f"search: the default ({DEFAULT.describe()}) was chosen most often; held-out gain {gain}"
        if excludes_zero(self.gain_ci) and self.gain > 0:
            return f"search: {self.winner.describe()} gains {gain}"
        return f"search: no pipeline gains reliably: {gain}; chosen most often: {self.winner.describe()}"

    def table_rows(self) -> list[tuple[str, list[str]]]:
        """Each pipeline's cross-validated mAP %: a row per input size, whitening and re-ranking, a column per
        pooling, then the row's costs (header row first)."""
        pools = list(dict.fromkeys(c.pipeline.pool for c in self.candidates))
        rows: dict[str, dict[str, Candidate]] = {}
        for c in self.candidates:
            rows.setdefault(c.pipeline.row_label(), {})[c.pipeline.pool] = c
        out = [("CV mAP %", [*pools, "passes", "model ms/image", "re-rank ms"])]
        for label, by_pool in rows.items():
            some = next(iter(by_pool.values()))
            model = some.model_seconds
            rerank = max(c.rerank_seconds for c in by_pool.values())
            out.append((label, [*(f"{100 * by_pool[k].cv_map:.1f}" if k in by_pool else "-" for k in pools),
                                str(some.passes), "-" if model is None else f"{1e3 * model / self.images:.1f}",
                                f"{1e3 * rerank:.0f}" if some.pipeline.rerank else ""]))
        return out

    def summary_lines(self) -> list[str]:
        from gpl_cli.analysis.compare import shown

        lo, hi = self.held_out_ci
        return [
            f"search: {self.method()}",
            f"  chosen per fold: {'; '.join(p.label() for p in self.fold_choices)}",
            f"  winner (chosen most often): {self.winner.describe()}",
            f"  held-out mAP {100 * self.held_out_map:.1f} % (95 % CI {100 * lo:.1f}-{100 * hi:.1f}) against "
            f"{100 * self.default_map:.1f} % for the default ({DEFAULT.describe()}): gain {shown(self.gain):+.1f} points "
            f"(95 % CI {shown(self.gain_ci[0]):+.1f} to {shown(self.gain_ci[1]):+.1f})",
            f"  searched {len(self.candidates)} pipelines in {self.seconds:.1f} s after the forward passes",
            *(f"  reproduce: {c}" for c in self.commands),
            *(f"  search note: {n}" for n in self.notes),
        ]

    def table_lines(self) -> list[str]:
        from gpl_cli.analysis.compare import _aligned

        return [*_aligned(self.table_rows()), *self.summary_lines()]

    def as_dict(self) -> dict:
        return {
            "method": self.method(),
            "folds": self.folds,
            "inner_folds": self.inner_folds,
            "queries": self.queries,
            "default": DEFAULT.as_dict(),
            "winner": self.winner.as_dict(),
            "fold_choices": [p.as_dict() for p in self.fold_choices],
            "default_map": self.default_map,
            "held_out_map": self.held_out_map,
            "held_out_map_ci95": list(self.held_out_ci),
            "gain": self.gain,
            "gain_ci95": list(self.gain_ci),
            "verdict": self.verdict(),
            "seconds": self.seconds,
            "candidates": [{**c.pipeline.as_dict(), "cv_map": c.cv_map, "chosen": c.chosen, "passes": c.passes,
                            "model_seconds": c.model_seconds, "rerank_seconds": c.rerank_seconds}
                           for c in self.candidates],
            "commands": self.commands,
            "notes": self.notes,
        }

    def csv_rows(self) -> list[tuple[str, str, str, object]]:
        rows = [("search", "", "search.gain", self.gain), ("search", "", "search.gain_ci95.low", self.gain_ci[0]),
                ("search", "", "search.gain_ci95.high", self.gain_ci[1]),
                ("search", "", "search.held_out_map", self.held_out_map),
                ("search", "", "search.default_map", self.default_map),
                ("search", "", "search.winner", self.winner.label())]
        rows += [("search", "", f"search.fold{i + 1}", p.label()) for i, p in enumerate(self.fold_choices)]
        rows += [(c.pipeline.label(), "", "search.cv_map", c.cv_map) for c in self.candidates]
        return rows


def check_labels(labels: list[str] | None) -> None:
    """What --search needs of the labels, judged before any model runs; GplError otherwise."""
    if labels is None:
        raise GplError("--search needs labels: put the images in one folder per class, or give --labels FILE.csv")
    names, counts = np.unique(np.asarray(labels, dtype=str), return_counts=True)
    if np.count_nonzero(counts >= 2) < 2:
        raise GplError("--search needs two or more classes with at least two images each; images per class: "
                       + ", ".join(f"{c} {k}" for c, k in zip(names, counts)))


# --- folds -----------------------------------------------------------------------------


def stratified_folds(codes: np.ndarray, folds: int, seed: int = SEED) -> list[np.ndarray]:
    """Positions 0..len(codes)-1 in `folds` folds, each class spread evenly: its members, shuffled, are dealt
    to the folds in turn, starting where the previous class stopped (so the folds' sizes differ by one at most)."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(codes), dtype=np.int64)
    dealt = 0
    for c in np.unique(codes):
        members = rng.permutation(np.flatnonzero(codes == c))
        fold_of[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return [np.flatnonzero(fold_of == f) for f in range(folds)]


# --- scoring ---------------------------------------------------------------------------


def _whitened(x: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """Every row of x through a PCA whitening learned on x[fit_rows] alone: L2, centre, project, as
    `gpl embed --whiten` (the last L2 is the Reranker's)."""
    mean, projection, _ = fit_whitening(x[fit_rows])
    unit = metrics.unit_rows(x).astype(np.float64)
    return ((unit - mean) @ projection.T).astype(np.float32)


def query_ap(x: np.ndarray, codes: np.ndarray, db: np.ndarray, queries: np.ndarray, rerank: str) -> np.ndarray:
    """AP of each row in `queries` searching the rows `db` of x (sorted; they hold the queries), its own row
    excluded, re-ranked with `rerank`. NaN for a query with no other image of its class in `db`."""
    vectors = x[db]
    reranker = Reranker(vectors, parse_rerank_list([rerank]) if rerank else [])
    own = np.searchsorted(db, queries)
    out = np.empty(len(queries))
    for rows in metrics.row_chunks(len(queries), metrics.block_rows(len(db))):
        scores = reranker.scores(vectors[own[rows]], exclude=own[rows])
        order = np.argsort(-scores, axis=1, kind="stable")[:, : len(db) - 1]  # the query's own row (-inf) is last
        out[rows] = metrics.average_precision(codes[db][order] == codes[queries[rows], None])
    return out


def nested_search(views: Views, pipelines: list[Pipeline], labels: list[str], folds: int = 5,
                  on_progress: Callable[[str, int, int], None] | None = None) -> SearchResult:
    """Choose among `pipelines` (DEFAULT first) by nested cross-validation on `labels` (see the module)."""
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:
        limits = nullcontext()
    else:
        limits = threadpool_limits(1)  # matrices of a few hundred rows: BLAS threads only wait on each other
    with limits:
        return _search(views, pipelines, labels, folds, on_progress)


def _search(views: Views, pipelines: list[Pipeline], labels: list[str], folds: int, on_progress) -> SearchResult:
    if not pipelines or pipelines[0] != DEFAULT:
        raise ValueError("the search space starts with the default pipeline")
    started = time.perf_counter()
    check_labels(labels)
    names, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    counts = np.bincount(codes, minlength=len(names))
    queries = np.flatnonzero(counts[codes] >= 2)
    notes = []
    smallest = int(counts[counts >= 2].min())
    k = min(folds, smallest)
    if k < folds:
        notes.append(f"the smallest class has {smallest} images: {k} outer folds instead of {folds}")
    if len(queries) < len(codes):
        notes.append(f"{len(codes) - len(queries)} images are alone in their class: distractors, not queries")
    outer = [queries[f] for f in stratified_folds(codes[queries], k)]
    everything = np.arange(len(codes))
    trains = [np.setdiff1d(everything, test) for test in outer]
    selection = np.zeros((len(pipelines), k))  # mean AP of the training queries, per pipeline and outer fold
    held = np.zeros((len(pipelines), len(codes)))  # each query's AP from its outer fold, per pipeline
    rerank_seconds: dict[tuple, float] = {}
    groups: dict[tuple, list[int]] = {}  # pipelines that differ only in re-ranking share vectors and whitenings
    for i, p in enumerate(pipelines):
        groups.setdefault((p.resize, p.scales, p.pool, p.whiten), []).append(i)
    done = 0
    for (resize, scales, pool, whiten), members in groups.items():
        if on_progress:
            on_progress("searching pipelines", done, len(pipelines))
        x = views.of(pipelines[members[0]])
        for f, (test, train) in enumerate(zip(outer, trains)):
            train_queries = np.intersect1d(train, queries)
            if whiten:
                white = _whitened(x, train)
                inner = [(train_queries[part], _whitened(x, np.setdiff1d(train, train_queries[part])))
                         for part in stratified_folds(codes[train_queries], k)]
            for i in members:
                rerank = pipelines[i].rerank
                if whiten:
                    held[i, test] = query_ap(white, codes, everything, test, rerank)
                    ap = np.concatenate([query_ap(w, codes, train, part, rerank) for part, w in inner])
                else:
                    ap = query_ap(x, codes, train, train_queries, rerank)
                selection[i, f] = np.nanmean(ap)
        if not whiten:
            for i in members:  # nothing is fitted: each query's AP is the same in every fold
                start = time.perf_counter()
                held[i, queries] = query_ap(x, codes, everything, queries, pipelines[i].rerank)
                rerank_seconds[(resize, scales, pool, pipelines[i].rerank)] = time.perf_counter() - start
        done += len(members)
    if on_progress:
        on_progress("searching pipelines", done, len(pipelines))
    choice = np.argmax(selection, axis=0)  # per outer fold; ties: the earlier pipeline
    best = np.zeros(len(codes))
    for f, test in enumerate(outer):
        best[test] = held[choice[f], test]
    chosen = np.bincount(choice, minlength=len(pipelines))
    cv_map = held[:, queries].mean(axis=1)
    winner = max(range(len(pipelines)), key=lambda i: (chosen[i], cv_map[i], -i))
    gain = best[queries] - held[0, queries]
    boot = metrics.bootstrap_means(np.vstack([gain, best[queries]]), BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    candidates = [
        Candidate(p, float(cv_map[i]), int(chosen[i]), len(p.scales), views.model_seconds(p),
                  rerank_seconds.get((p.resize, p.scales, p.pool, p.rerank), 0.0) if p.rerank else 0.0)
        for i, p in enumerate(pipelines)
    ]
    return SearchResult(len(codes), k, k, len(queries), candidates, [pipelines[c] for c in choice], pipelines[winner],
                        float(held[0, queries].mean()), float(best[queries].mean()),
                        metrics.percentile_interval(boot[1]), float(gain.mean()), metrics.percentile_interval(boot[0]),
                        time.perf_counter() - started, notes=notes)
