"""GeM's exponent p fitted to the user's labels: `gpl compare --pool gem:p=auto`.

Every p of GRID is pooled from the same forward pass (the grid is added to compare's poolings).
Each query's average precision is computed for every p as in compare (the query against all
other images, itself left out; images alone in their class are distractors, not queries).
Nested cross-validation over the queries, stratified by class (the probe's folds): in each
outer fold, p is the one with the best mAP over the other folds' queries, and the fold's own
queries are scored with it. Each query is scored once, by a p chosen without it, so the
held-out mAP is not tuned on itself; its 95 % interval is a percentile bootstrap over the
queries, as compare's. The p to use is the one with the best mAP over all queries.

Choosing p has nothing to fit but p itself, so the inner step is the selection on the
training queries (their AP against the whole database, their own image left out).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpl_cli.analysis import metrics
from gpl_cli.errors import GplError
from gpl_cli.pooling.spec import fmt_number, parse_pool_spec, spec_pieces

GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def grid_keys() -> list[str]:
    """The pooling keys of the grid (gem:p=3 is plain 'gem')."""
    return [parse_pool_spec(f"gem:p={fmt_number(p)}").key for p in GRID]


def split_auto(pools: list[str]) -> tuple[list[str], bool]:
    """--pool values without gem:p=auto, and whether it was there."""
    rest, auto = [], False
    for piece in spec_pieces(pools):
        name, _, args = piece.partition(":")
        if "auto" not in args.lower():
            rest.append(piece)
        elif name.strip().lower() == "gem" and args.replace(" ", "").lower() == "p=auto":
            auto = True
        else:
            raise GplError(f"only GeM's p can be chosen on the labels, as gem:p=auto (no other parameter): {piece!r}")
    return rest, auto


@dataclass
class GemAutoResult:
    grid: tuple[float, ...]
    folds: int
    queries: int
    fold_p: list[float]  # p chosen in each outer fold (on the other folds' queries)
    fold_map: list[float]  # mAP of each outer fold's queries with its p
    held_out_map: float
    held_out_ci: tuple[float, float]
    grid_map: list[float]  # each p's mAP over all queries
    grid_ci: list[tuple[float, float]]
    best_p: float  # the p with the best mAP over all queries: the one to use
    notes: list[str] = field(default_factory=list)

    def option(self) -> str:
        return f"--pool gem:p={fmt_number(self.best_p)}"

    def method(self) -> str:
        return (f"nested {self.folds}-fold CV over {self.queries} queries stratified by class (seed 0): in each fold "
                "p is chosen by the mAP of the other folds' queries and scores the fold's own; 95 % CI: percentile "
                f"bootstrap over queries ({BOOTSTRAP_RESAMPLES} resamples)")

    def as_dict(self) -> dict:
        return {
            "method": self.method(),
            "grid": list(self.grid),
            "folds": self.folds,
            "queries": self.queries,
            "fold_p": self.fold_p,
            "fold_map": self.fold_map,
            "held_out_map": self.held_out_map,
            "held_out_map_ci95": list(self.held_out_ci),
            "grid_map": {fmt_number(p): m for p, m in zip(self.grid, self.grid_map)},
            "grid_map_ci95": {fmt_number(p): list(ci) for p, ci in zip(self.grid, self.grid_ci)},
            "chosen_p": self.best_p,
            "option": self.option(),
            "notes": self.notes,
        }

    def csv_rows(self) -> list[tuple[str, str, str, object]]:
        key = "gem:p=auto"
        rows = [(key, "", "gem_auto.held_out_map", self.held_out_map),
                (key, "", "gem_auto.held_out_map_ci95.low", self.held_out_ci[0]),
                (key, "", "gem_auto.held_out_map_ci95.high", self.held_out_ci[1]),
                (key, "", "gem_auto.chosen_p", self.best_p)]
        rows += [(key, "", f"gem_auto.fold{i + 1}.p", p) for i, p in enumerate(self.fold_p)]
        rows += [(f"gem:p={fmt_number(p)}", "", "gem_auto.map", m) for p, m in zip(self.grid, self.grid_map)]
        return rows

    def table_lines(self) -> list[str]:
        lo, hi = self.held_out_ci
        grid = "  ".join(f"p={fmt_number(p)} {100 * m:.1f}" for p, m in zip(self.grid, self.grid_map))
        return [
            f"GeM p chosen on the labels: {self.method()}",
            f"  p per fold: {', '.join(fmt_number(p) for p in self.fold_p)}",
            f"  held-out mAP {100 * self.held_out_map:.1f} % (95 % CI {100 * lo:.1f}-{100 * hi:.1f})",
            f"  mAP % over all queries, per p: {grid}",
            f"  use: {self.option()}",
        ]


def choose_p(vectors: dict[float, np.ndarray], labels: list[str], folds: int = 5) -> GemAutoResult:
    """Nested CV of the choice of p; `vectors` maps each p of the grid to its N x C pooled vectors."""
    from gpl_cli.analysis.probe import model_module, plan_folds

    pm = model_module()
    grid = tuple(sorted(vectors))
    names, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    counts = np.bincount(codes, minlength=len(names))
    queries = np.flatnonzero(counts[codes] >= 2)
    if len(queries) == 0:
        raise GplError("gem:p=auto needs classes of two or more images: no image has another of its class")
    plan = plan_folds([names[c] for c in codes[queries]], folds, what="gem:p=auto")
    notes = list(plan.notes)
    if len(queries) < len(codes):
        notes.append(f"{len(codes) - len(queries)} images are alone in their class: distractors, not queries")
    no_pairs = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    ap = np.stack([metrics.leave_one_out_pass(vectors[p], codes, (1,), no_pairs).ap[queries] for p in grid])
    held = np.empty(len(queries))
    fold_p, fold_map = [], []
    for train, test in pm.outer_splits(plan.codes, plan.folds):
        best = int(np.argmax(ap[:, train].mean(axis=1)))  # ties: the smaller p
        held[test] = ap[best, test]
        fold_p.append(grid[best])
        fold_map.append(float(held[test].mean()))
    boot = metrics.bootstrap_means(np.vstack([held[None], ap]), BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    cis = [metrics.percentile_interval(b) for b in boot]
    grid_map = ap.mean(axis=1)
    return GemAutoResult(grid, plan.folds, len(queries), fold_p, fold_map, float(held.mean()), cis[0],
                         [float(m) for m in grid_map], cis[1:], grid[int(np.argmax(grid_map))], notes)
