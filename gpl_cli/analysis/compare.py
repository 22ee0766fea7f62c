"""`gpl compare`: which pooling suits these images? Quality, agreement and cost, side by side.

Embeddings come from one run of the backbone with every pooling (through the embed pipeline,
so they are exactly what `gpl embed` writes) or from saved gpl files. Labels come from the
class folders or a CSV. `compare` turns them into a `Report`; the metrics live in
`gpl_cli.analysis.metrics`, the drawing in `gpl_cli.report.plots`. With --rerank every pooling is
ranked again through gpl_cli.analysis.rerank (RerankedBlocks); --search (gpl_cli.analysis.search)
adds its result to the report.

Verdicts are judged on the numbers they print (one decimal of a mAP point), so an interval shown as
0.0 to 1.0 is never called significant; a difference under MATTERS is called too small to matter, and
the recommendation weighs the pooling time against the time to embed an image (NEGLIGIBLE).
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from gpl_cli.analysis import metrics
from gpl_cli.errors import GplError
from gpl_cli.store.embeddings import Embeddings, finite
from gpl_cli.store.formats import read_embeddings

if TYPE_CHECKING:  # the engine pulls in torch; saved files are compared without it
    from collections.abc import Callable

    from gpl_cli.analysis.gem_auto import GemAutoResult
    from gpl_cli.analysis.probe import ProbeReport
    from gpl_cli.analysis.rerank import RerankSpec
    from gpl_cli.analysis.search import SearchResult
    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.engine import Summary
    from gpl_cli.embedding.images import Failure
    from gpl_cli.embedding.inputs import InputList
    from gpl_cli.models.backbones import Backbone
    from gpl_cli.store.output import Output

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
KS = (1, 5)
MIN_IMAGES = 3
MATTERS = 0.01  # a mAP difference under one point is called too small to matter (a convention, stated in docs)
NEGLIGIBLE = 0.05  # a pooling cost difference under 5 % of the time to embed an image does not decide


# --- embeddings --------------------------------------------------------------------------


def embed_images(
    config: EmbedConfig,
    inputs: InputList,
    options: RunOptions,
    backbone: Backbone | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_failure: Callable[[Failure], None] | None = None,
) -> tuple[Embeddings, Summary]:
    """Embed the inputs once into memory (all poolings of `config` from one forward pass). The Summary
    carries each pooling's time."""
    from gpl_cli.embedding.job import Job

    job = Job(config, options, len(inputs.items), backbone=backbone, on_progress=on_progress, on_failure=on_failure)
    emb = job.embeddings(inputs)
    return emb, emb.summary


def save_embeddings(emb: Embeddings, save: Output) -> None:
    """`emb` written to `save` (its location checked), as `gpl embed` would have written the same run."""
    from gpl_cli.store.export import write_all

    save = replace(save, keys=tuple(emb.vectors))  # the files of an NPY output follow the poolings
    write_all(emb, save.open_writer({key: rows.shape[1] for key, rows in emb.vectors.items()}), emb.metadata)


def _file_tags(files: list[str]) -> list[str]:
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    return stems if len(set(stems)) == len(stems) else [f"file{i + 1}" for i in range(len(files))]


def _align(first: Embeddings, other: Embeddings, names: tuple[str, str]) -> np.ndarray:
    """Row order that puts `other` in `first`'s path order; an error when they hold different images."""
    if other.paths == first.paths:
        return np.arange(len(other))
    a, b = set(first.paths), set(other.paths)
    if a != b:
        only_a, only_b = sorted(a - b), sorted(b - a)
        parts = [f"{len(s)} only in {n}" + (f" (e.g. {s[0]})" if s else "") for s, n in ((only_a, names[0]), (only_b, names[1]))]
        raise GplError(f"{names[0]} and {names[1]} hold different images: {', '.join(parts)}; "
                       "compare files embedded from the same inputs")
    if len(a) != len(first.paths) or len(b) != len(other.paths):
        raise GplError(f"{names[0]} and {names[1]} list the same path more than once in different orders; "
                       "rows cannot be matched")
    where = {p: i for i, p in enumerate(other.paths)}
    return np.array([where[p] for p in first.paths])


def load_embedding_files(files: list[str], pools: list[str] | None = None) -> Embeddings:
    """One gpl file (its poolings), or two over the same images (rows matched by path).

    With two files whose pooling keys collide, each key is prefixed by its file's name
    ('resnet50/avg'). `pools` selects poolings by key (from either file); default: all.
    """
    if not 1 <= len(files) <= 2:
        raise GplError(f"compare takes one or two embedding files, got {len(files)}")
    loaded = [read_embeddings(f) for f in files]
    wanted = _selected_keys(pools, files, loaded)
    first = loaded[0]
    clash = len(loaded) == 2 and bool(set(loaded[0].vectors) & set(loaded[1].vectors))
    vectors: dict[str, np.ndarray] = {}
    for tag, file, emb in zip(_file_tags(files), files, loaded):
        rows = _align(first, emb, (files[0], file))
        for key, matrix in emb.vectors.items():
            if wanted is None or key in wanted:
                vectors[f"{tag}/{key}" if clash else key] = matrix[rows]
    metadata = dict(first.metadata, compared_files=list(files))
    made = [how_made(emb.metadata) for emb in loaded]
    if len(set(made)) > 1:  # another precision or runtime: the comparison is of the two, so it says so
        metadata["compared_runs"] = made
    return Embeddings(first.paths, vectors, metadata, first.failures)


def how_made(metadata: dict) -> str:
    """A file's precision and runtime, in words ('int8 on openvino'); files from before runtimes ran on torch."""
    return f"{metadata.get('config', {}).get('precision', 'fp32')} on {metadata.get('runtime', 'torch')}"


def _selected_keys(pools: list[str] | None, files: list[str], loaded: list[Embeddings]) -> set[str] | None:
    if not pools:
        return None
    from gpl_cli.pooling.spec import parse_pool_list

    wanted = {s.key for s in parse_pool_list(pools)}
    available = {k for emb in loaded for k in emb.vectors}
    missing = sorted(wanted - available)
    if missing:
        raise GplError(f"{' and '.join(files)} hold no pooling {', '.join(missing)}; available: {', '.join(sorted(available))}")
    return wanted


# --- labels ------------------------------------------------------------------------------


def folder_labels(names: list[str]) -> list[str] | None:
    """Each image's class: the folder directly under the root. None when no image is in a folder."""
    parts = [name.replace(os.sep, "/").split("/") for name in names]
    in_folder = [len(p) > 1 and p[0] not in ("", ".", "..") for p in parts]
    if not any(in_folder):
        return None
    if not all(in_folder):
        loose = names[in_folder.index(False)]
        raise GplError(f"{loose} is not inside a class folder; put every image in a folder named after its "
                       "class, or give --labels FILE.csv")
    return [p[0] for p in parts]


def read_labels_csv(csv_path: str, names: list[str], root: str | None,
                    on_note: Callable[[str], None] | None = None) -> list[str]:
    """Labels of `names` from a CSV of path,label rows (a 'path,label' header is allowed).

    A path may be written as stored in the embeddings (relative to the input folder) or as a
    path to the file (relative to the current directory, or absolute). Rows that match none of
    `names` are left out, with a warning through `on_note`; when no row matches, that is the error.
    """
    by_path: dict[str, str] = {}
    written: list[tuple[str, set[str]]] = []  # each row's path as written, and the names it may stand for
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise GplError(f"cannot read labels file {csv_path}: {exc}") from None
    for line, row in enumerate(rows, start=1):
        if not row or (line == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise GplError(f"{csv_path}:{line}: expected 'path,label', got {','.join(row)!r}")
        path, label = row[0].strip(), row[1].strip()
        keys = {os.path.normpath(path)}
        if root:
            keys.add(os.path.relpath(os.path.abspath(path), root))
        written.append((path, keys))
        for key in keys:
            if by_path.setdefault(key, label) != label:
                raise GplError(f"{csv_path}:{line}: {path} is labelled both {by_path[key]!r} and {label!r}")
    known = {os.path.normpath(n) for n in names}
    unmatched = [path for path, keys in written if not keys & known]
    if written and len(unmatched) == len(written):
        raise GplError(f"none of the {len(written)} paths in {csv_path} is one of the {len(names)} images "
                       f"(e.g. {unmatched[0]} against {names[0]}); write them relative to the input folder, "
                       "the current directory, or absolute")
    missing = [n for n in names if os.path.normpath(n) not in by_path]
    if missing:
        raise GplError(f"{csv_path} has no label for {len(missing)} of the {len(names)} images (e.g. {missing[0]})")
    if unmatched and on_note:
        on_note(f"warning: {len(unmatched)} of the {len(written)} paths in {csv_path} match no image and are "
                f"ignored (first {min(5, len(unmatched))}: {', '.join(unmatched[:5])})")
    return [by_path[os.path.normpath(n)] for n in names]


def image_labels(names: list[str], labels_csv: str | None, root: str | None,
                 on_note: Callable[[str], None] | None = None) -> list[str] | None:
    """Labels from the CSV when one is given (`on_note`: see read_labels_csv), else from the class folders
    (None: no labels)."""
    return read_labels_csv(labels_csv, names, root, on_note) if labels_csv else folder_labels(names)


# --- the report --------------------------------------------------------------------------


@dataclass
class PoolingResult:
    key: str
    dim: int
    norms: dict[str, float]
    sparsity: float
    mean_cosine: float
    effective_rank: float
    pool_seconds: float | None  # None for saved files: pooling was not timed here
    map: float | None = None
    map_ci: tuple[float, float] | None = None
    precision: dict[int, float] | None = None
    knn_accuracy: dict[int, float] | None = None
    class_ap: dict[str, float] | None = None
    hist_same: np.ndarray | None = field(default=None, repr=False)
    hist_other: np.ndarray | None = field(default=None, repr=False)
    # Per image, for the HTML report: its metrics.JACCARD_K nearest others (N x K) and its AP (NaN: not a query).
    neighbors: np.ndarray | None = field(default=None, repr=False)
    ap: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self, images: int) -> dict:
        doc = {
            "dim": self.dim,
            "norm": self.norms,
            "sparsity": self.sparsity,
            "mean_pairwise_cosine": self.mean_cosine,
            "effective_rank": self.effective_rank,
            "pool_seconds": self.pool_seconds,
            "pool_us_per_image": None if self.pool_seconds is None else 1e6 * self.pool_seconds / images,
        }
        if self.map is not None:
            doc.update(label_metrics(self))
        return doc


def label_metrics(result) -> dict:
    """The label metrics of a pooling's or a re-ranking's result, as --json and --save write them."""
    return {"map": result.map, "map_ci95": list(result.map_ci),
            "precision": {f"@{k}": v for k, v in result.precision.items()},
            "knn_accuracy": {f"k={k}": v for k, v in result.knn_accuracy.items()}, "class_ap": result.class_ap}


def shown(value: float) -> float:
    """A fraction as the percentage shown in reports (one decimal; never -0.0): verdicts are judged on the
    numbers shown, so an interval printed as 0.0 to 1.0 is never called significant."""
    return round(100 * value, 1) + 0.0


def excludes_zero(ci: tuple[float, float]) -> bool:
    """Whether an interval of differences, as shown, lies wholly on one side of zero."""
    return shown(ci[0]) > 0 or shown(ci[1]) < 0


def difference_verdict(a: str, b: str, diff: float, ci: tuple[float, float]) -> str:
    """One line on mAP(a) - mAP(b) with its 95 % interval: which wins, and whether it is large enough to matter
    (MATTERS), all judged on the rounded numbers the line shows."""
    d, lo, hi = shown(diff), shown(ci[0]), shown(ci[1])
    limit = f"{100 * MATTERS:g} point"
    if not excludes_zero(ci):
        text = f"{a} vs {b}: no significant difference in mAP ({d:+.1f} points, 95 % CI {lo:+.1f} to {hi:+.1f})"
        return text + (", too small to matter either way" if max(-lo, hi) <= 100 * MATTERS else "")
    if d < 0:
        a, b, d, lo, hi = b, a, -d, -hi, -lo
    text = f"{a} beats {b} by {d:.1f} mAP points, 95 % CI {lo:.1f} to {hi:.1f}"
    if hi < 100 * MATTERS:
        return text.replace(" by ", " by only ", 1) + f": too small to matter (under {limit})"
    return text + (f": likely too small to matter (under {limit})" if d < 100 * MATTERS else "")


@dataclass
class PairResult:
    a: str
    b: str
    knn_jaccard: float  # mean Jaccard of the JACCARD_K-nearest-neighbour sets
    similarity_spearman: float  # rank correlation of pairwise cosines
    map_diff: float | None = None  # mAP(a) - mAP(b)
    map_diff_ci: tuple[float, float] | None = None

    @property
    def significant(self) -> bool:
        return self.map_diff_ci is not None and excludes_zero(self.map_diff_ci)

    def matters(self) -> bool:
        """Significant and at least MATTERS apart (as shown)."""
        return self.significant and abs(shown(self.map_diff)) >= 100 * MATTERS

    def verdict(self) -> str:
        if self.map_diff is None:
            return (f"{self.a} and {self.b}: no label metrics, so no verdict on quality; their {metrics.JACCARD_K} "
                    f"nearest neighbours overlap with mean Jaccard {self.knn_jaccard:.2f} (1 = the same neighbours)")
        return difference_verdict(self.a, self.b, self.map_diff, self.map_diff_ci)

    def as_dict(self) -> dict:
        doc = {
            "a": self.a,
            "b": self.b,
            f"knn_jaccard@{metrics.JACCARD_K}": self.knn_jaccard,
            "similarity_spearman": self.similarity_spearman,
        }
        if self.map_diff is not None:
            doc.update(map_diff=self.map_diff, map_diff_ci95=list(self.map_diff_ci), significant=self.significant)
        doc["verdict"] = self.verdict()
        return doc


@dataclass
class RerankResult:
    """One pooling searched with one re-ranking (`gpl compare --rerank`), leave-one-out as the plain pooling."""

    key: str  # the pooling
    rerank: str  # the steps, as parse_rerank_list reads them ('dba,aqe:k=3')
    knn_jaccard: float  # overlap of the JACCARD_K nearest with those of the plain pooling
    seconds: float  # re-ranking every image of the collection against all the others
    map: float | None = None
    map_ci: tuple[float, float] | None = None
    precision: dict[int, float] | None = None
    knn_accuracy: dict[int, float] | None = None
    class_ap: dict[str, float] | None = None
    map_diff: float | None = None  # mAP with the re-ranking minus without
    map_diff_ci: tuple[float, float] | None = None
    neighbors: np.ndarray | None = field(default=None, repr=False)
    ap: np.ndarray | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.key} + {self.rerank}"

    def verdict(self) -> str:
        if self.map_diff is None:
            return (f"{self.name}: no label metrics; its {metrics.JACCARD_K} nearest neighbours overlap those of "
                    f"{self.key} with mean Jaccard {self.knn_jaccard:.2f}")
        return difference_verdict(self.name, self.key, self.map_diff, self.map_diff_ci)

    def as_dict(self) -> dict:
        doc = {"pooling": self.key, "rerank": self.rerank, f"knn_jaccard@{metrics.JACCARD_K}": self.knn_jaccard,
               "seconds": self.seconds}
        if self.map is not None:
            doc.update(
                label_metrics(self),
                map_diff=self.map_diff,
                map_diff_ci95=list(self.map_diff_ci),
                significant=excludes_zero(self.map_diff_ci),
            )
        doc["verdict"] = self.verdict()
        return doc


@dataclass
class Report:
    source: str
    images: int
    poolings: list[PoolingResult]
    pairs: list[PairResult]
    similarity_pairs: int  # pairs behind the rank correlation
    similarity_pairs_sampled: bool
    classes: dict[str, int] | None = None
    queries: int | None = None
    chance_map: float | None = None
    notes: list[str] = field(default_factory=list)
    reranked: list[RerankResult] = field(default_factory=list)  # --rerank
    probe: ProbeReport | None = None  # --probe (gpl_cli.analysis.probe)
    gem_auto: GemAutoResult | None = None  # --pool gem:p=auto (gpl_cli.analysis.gem_auto)
    search: SearchResult | None = None  # --search (gpl_cli.analysis.search)
    embed_seconds: float | None = None  # the embedding run, when compare ran the model

    @property
    def labelled(self) -> bool:
        return self.chance_map is not None

    def verdicts(self) -> list[str]:
        lines = []
        if self.labelled:
            best = max(self.poolings, key=lambda p: p.map)
            lines.append(f"best mAP: {best.key} {100 * best.map:.1f} (chance level {100 * self.chance_map:.1f})")
        lines += [p.verdict() for p in self.pairs] + [r.verdict() for r in self.reranked]
        return lines + ([self.search.verdict()] if self.search else [])

    def recommendation(self) -> str | None:
        """Which pooling to use, from mAP, whether the differences matter, the pooling cost against the time to
        embed an image, the re-rankings and the probe; None without labels or with one pooling."""
        if not self.labelled or len(self.poolings) < 2:
            return None
        best = max(self.poolings, key=lambda p: p.map)
        pair = {frozenset((p.a, p.b)): p for p in self.pairs}
        close = [p for p in self.poolings if p is not best and not pair[frozenset((best.key, p.key))].matters()]
        if not close:
            text = (f"recommendation: {best.key}: the best mAP ({100 * best.map:.1f}), ahead of every other pooling "
                    "by a difference that matters")
            return text + self._rerank_opinion(best.key) + self._probe_opinion(best.key)

        def us(p: PoolingResult) -> str:
            return f"{1e6 * p.pool_seconds / self.images:.0f} us/image"

        text = (f"recommendation: {best.key}: the best mAP ({100 * best.map:.1f}); {_listing([p.key for p in close])} "
                f"{'is' if len(close) == 1 else 'are'} within what matters of it (no significant lead of "
                f"{100 * MATTERS:g} point or more)")
        choice = best
        if all(p.pool_seconds is not None for p in [best, *close]):
            cheap = min([best, *close], key=lambda p: p.pool_seconds)
            saved = (best.pool_seconds - cheap.pool_seconds) / self.images
            embed = None if self.embed_seconds is None else self.embed_seconds / self.images
            if cheap is best:
                text += f", and {best.key} is also the cheapest of them to pool ({us(best)})"
            elif embed is not None and saved > NEGLIGIBLE * embed:
                choice = cheap
                text = (f"recommendation: {cheap.key}: its mAP ({100 * cheap.map:.1f}) is within what matters of the "
                        f"best ({best.key} {100 * best.map:.1f}), and it pools faster "
                        f"({us(cheap)} against {us(best)}, saving {100 * saved / embed:.0f} % of the time to embed an image)")
            elif embed is not None:
                text += (f"; {cheap.key} pools faster, by {1e6 * saved:.0f} us/image, {100 * saved / embed:.2g} % of "
                         "the time to embed an image: too little to decide")
            else:
                text += f"; {cheap.key} pools faster ({us(cheap)} against {us(best)})"
        else:
            text += "; pooling time was not measured (saved embeddings), so cost does not decide"
        return text + self._rerank_opinion(choice.key) + self._probe_opinion(choice.key)

    def _rerank_opinion(self, choice: str) -> str:
        """The re-ranking of `choice` that gains most, when the gain matters."""
        mine = [r for r in self.reranked if r.key == choice and r.map_diff is not None]
        top = max(mine, key=lambda r: r.map_diff, default=None)
        if top is None or not excludes_zero(top.map_diff_ci) or shown(top.map_diff) < 100 * MATTERS:
            return ""
        lo, hi = (shown(v) for v in top.map_diff_ci)
        return f"; for retrieval, --rerank {top.rerank} adds {shown(top.map_diff):.1f} mAP points (95 % CI {lo:.1f} to {hi:.1f})"

    def _probe_opinion(self, choice: str) -> str:
        """What the linear probe, when it ran, says about `choice`."""
        scores = {s.key: s for s in self.probe.scores} if self.probe else {}
        if choice not in scores:
            return ""
        top = max((s for s in scores.values() if s.key in {p.key for p in self.poolings}), key=lambda s: s.test_accuracy)
        if top.key == choice:
            return f"; the linear probe agrees ({choice}: {100 * top.test_accuracy:.1f} % test accuracy)"
        pair = next(p for p in self.probe.pairs if {p.a, p.b} == {top.key, choice})
        diff, ci = (pair.diff, pair.ci) if pair.a == top.key else (-pair.diff, (-pair.ci[1], -pair.ci[0]))
        numbers = f"{shown(diff):+.1f} points of test accuracy, 95 % CI {shown(ci[0]):+.1f} to {shown(ci[1]):+.1f}"
        if excludes_zero(ci):
            return f"; for a classifier on top, the linear probe prefers {top.key} ({numbers})"
        return f"; the linear probe ranks {top.key} first, not significantly ({numbers})"

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "images": self.images,
            "classes": self.classes,
            "queries": self.queries,
            "chance_map": self.chance_map,
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95},
            "similarity_pairs": {"count": self.similarity_pairs, "sampled": self.similarity_pairs_sampled},
            "poolings": {p.key: p.as_dict(self.images) for p in self.poolings},
            "pairs": [p.as_dict() for p in self.pairs],
            "reranked": {r.name: r.as_dict() for r in self.reranked},
            "verdicts": self.verdicts(),
            "recommendation": self.recommendation(),
            "embed_seconds": self.embed_seconds,
            "notes": self.notes,
            "probe": self.probe.as_dict() if self.probe else None,
            "gem_auto": self.gem_auto.as_dict() if self.gem_auto else None,
            "search": self.search.as_dict() if self.search else None,
        }

    def csv_text(self) -> str:
        """Long format, one number a row: pooling,versus,metric,value (versus empty for one pooling). A re-ranked
        pooling is named 'avg + dba', its gain over the plain pooling is in its rows versus 'avg'."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["pooling", "versus", "metric", "value"])
        for p in self.poolings:
            for metric, value in _flatten(p.as_dict(self.images)):
                writer.writerow([p.key, "", metric, _csv_value(value)])
        for pair in self.pairs:
            for metric, value in _flatten(pair.as_dict()):
                if metric not in ("a", "b", "verdict"):
                    writer.writerow([pair.a, pair.b, metric, _csv_value(value)])
        for r in self.reranked:
            for metric, value in _flatten(r.as_dict()):
                if metric not in ("pooling", "rerank", "verdict"):
                    versus = r.key if metric.startswith(("map_diff", "significant", "knn_jaccard")) else ""
                    writer.writerow([r.name, versus, metric, _csv_value(value)])
        for extra in (self.probe, self.gem_auto, self.search):
            for pooling, versus, metric, value in extra.csv_rows() if extra else ():
                writer.writerow([pooling, versus, metric, _csv_value(value)])
        return out.getvalue()

    def table(self) -> str:
        """The aligned human-readable report: metrics as rows, poolings as columns."""
        head = f"gpl compare: {self.images} images, {self.source}"
        if self.classes:
            head += "\nclasses: " + ", ".join(f"{c} {n}" for c, n in self.classes.items())
        rows, pair_rows = self.table_rows()
        lines = [head, "", *_aligned(rows)]
        if pair_rows:
            lines += ["", *_aligned(pair_rows)]
        if self.reranked:
            lines += ["", *_aligned(self.rerank_rows())]
        if self.probe:
            rows, probe_pairs = self.probe.table_rows()
            lines += ["", *_aligned(rows), *(["", *_aligned(probe_pairs)] if len(probe_pairs) > 1 else []),
                      f"probe: {self.probe.method()}", *(f"probe note: {n}" for n in self.probe.notes)]
        if self.gem_auto:
            lines += ["", *self.gem_auto.table_lines(), *(f"gem:p=auto note: {n}" for n in self.gem_auto.notes)]
        if self.search:
            lines += ["", *self.search.table_lines()]
        recommendation = self.recommendation()
        lines += ["", *self.verdicts(), *([recommendation] if recommendation else []), *(f"note: {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"

    def table_rows(self) -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
        """The table's cells as text: (metric rows, pair rows); each list starts with its header row."""
        rows: list[tuple[str, list[str]]] = [("", [p.key for p in self.poolings])]
        if self.labelled:
            rows += [
                ("mAP %", [f"{100 * p.map:.1f}" for p in self.poolings]),
                ("  95 % CI", [_span(p.map_ci) for p in self.poolings]),
                *[(f"P@{k} %", [f"{100 * p.precision[k]:.1f}" for p in self.poolings]) for k in KS],
                *[(f"kNN k={k} acc %", [f"{100 * p.knn_accuracy[k]:.1f}" for p in self.poolings]) for k in KS],
                *[(f"AP {c} %", [f"{100 * p.class_ap[c]:.1f}" if c in p.class_ap else "-" for p in self.poolings])
                  for c in self.classes],
            ]
        rows += [
            ("dim", [str(p.dim) for p in self.poolings]),
            ("norm mean", [f"{p.norms['mean']:.4g}" for p in self.poolings]),
            ("norm std", [f"{p.norms['std']:.4g}" for p in self.poolings]),
            ("norm min-max", [f"{p.norms['min']:.3g}-{p.norms['max']:.3g}" for p in self.poolings]),
            ("zeros %", [f"{100 * p.sparsity:.1f}" for p in self.poolings]),
            ("mean cosine", [f"{p.mean_cosine:.3f}" for p in self.poolings]),
            ("effective rank", [f"{p.effective_rank:.1f}" for p in self.poolings]),
            ("pool us/image", ["-" if p.pool_seconds is None else f"{1e6 * p.pool_seconds / self.images:.1f}"
                               for p in self.poolings]),
        ]
        pair_rows: list[tuple[str, list[str]]] = []
        if self.pairs:
            sampled = " (sampled)" if self.similarity_pairs_sampled else ""
            quality = ["mAP diff", "95 % CI"] if self.labelled else []
            pair_rows = [("", [*quality, f"Jaccard@{metrics.JACCARD_K}", f"sim. rank corr{sampled}"])]
            for p in self.pairs:
                diff = [f"{shown(p.map_diff):+.1f}", _diff_span(p.map_diff_ci)] if self.labelled else []
                pair_rows.append((f"{p.a} - {p.b}", [*diff, f"{p.knn_jaccard:.3f}", f"{p.similarity_spearman:.3f}"]))
        return rows, pair_rows

    def rerank_rows(self) -> list[tuple[str, list[str]]]:
        """--rerank's table: each pooling, then each of its re-rankings, as rows (header row first)."""
        quality = ["mAP %", "95 % CI", *(f"P@{k} %" for k in KS), *(f"kNN k={k} %" for k in KS), "gain",
                   "95 % CI"] if self.labelled else []
        rows = [("re-ranking", [*quality, f"Jaccard@{metrics.JACCARD_K}", "re-rank ms"])]
        for p in self.poolings:
            variants = [r for r in self.reranked if r.key == p.key]
            for r in [p, *variants]:
                cells = []
                if self.labelled:
                    cells = [f"{100 * r.map:.1f}", _span(r.map_ci), *(f"{100 * r.precision[k]:.1f}" for k in KS),
                             *(f"{100 * r.knn_accuracy[k]:.1f}" for k in KS)]
                    cells += ["", ""] if r is p else [f"{shown(r.map_diff):+.1f}", _diff_span(r.map_diff_ci)]
                cells += ["", ""] if r is p else [f"{r.knn_jaccard:.3f}", f"{1e3 * r.seconds:.0f}"]
                rows.append((r.key if r is p else f"{p.key} + {r.rerank}", cells))
        return rows


def _span(ci: tuple[float, float]) -> str:
    return f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}"


def _diff_span(ci: tuple[float, float]) -> str:
    return f"{shown(ci[0]):+.1f} to {shown(ci[1]):+.1f}"


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _aligned(rows: list[tuple[str, list[str]]]) -> list[str]:
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(rows[0][1]))]
    return [
        (label.ljust(label_width) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths))).rstrip()
        for label, cells in rows
    ]


def _flatten(doc: dict, prefix: str = ""):
    for key, value in doc.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            for bound, v in zip(("low", "high"), value):
                yield f"{prefix}{key}.{bound}", v
        else:
            yield prefix + key, value


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --- comparing ---------------------------------------------------------------------------


def check_image_count(count: int) -> None:
    """Fewer than MIN_IMAGES leaves no image with two others to rank."""
    if count < MIN_IMAGES:
        raise GplError(f"compare needs at least {MIN_IMAGES} images, got {count}")


def check_vectors(emb: Embeddings, keys: list[str]) -> None:
    """What `compare` refuses: too few images, or a pooling with non-finite values."""
    check_image_count(len(emb))
    for key in keys:
        finite(emb, key, "compare")


def compare(
    emb: Embeddings,
    labels: list[str] | None = None,
    keys: list[str] | None = None,
    pool_seconds: dict[str, float] | None = None,
    source: str = "",
    on_progress: Callable[[str, int, int], None] | None = None,
    rerank: list[list[RerankSpec]] | None = None,
) -> Report:
    """Every metric for every pooling in `keys` (default: all in `emb`) and every pair of them; with `rerank`
    (each a list of steps, see gpl_cli.analysis.rerank), every pooling again under each re-ranking.

    `on_progress(f"ranking {key}", done, n)` follows each pooling's leave-one-out pass.
    """
    keys = list(keys or emb.vectors)
    check_vectors(emb, keys)
    n = len(emb)
    notes: list[str] = []
    codes = class_names = None
    if labels is not None:
        class_names, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
        if len(class_names) < 2:
            notes.append(f"only one class ({class_names[0]}): label metrics need two or more")
            codes = None
    pairs = metrics.pair_sample(n)
    no_pairs = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    passes: dict[str, metrics.PassResult] = {}
    results: list[PoolingResult] = []
    reranked: list[RerankResult] = []
    for key in keys:
        x = emb.vectors[key]
        passes[key] = metrics.leave_one_out_pass(x, codes, KS, pairs, on_progress=_counted(on_progress, f"ranking {key}", n))
        results.append(PoolingResult(
            key=key,
            dim=x.shape[1],
            norms=metrics.norm_stats(x),
            sparsity=metrics.sparsity(x),
            mean_cosine=metrics.mean_pairwise_cosine(x),
            effective_rank=metrics.effective_rank(x),
            pool_seconds=(pool_seconds or {}).get(key),
            hist_same=passes[key].hist_same,
            hist_other=passes[key].hist_other,
            neighbors=passes[key].neighbors,
        ))
        for steps in rerank or ():
            spec = ",".join(map(str, steps))
            blocks = RerankedBlocks(x, steps)
            done = metrics.leave_one_out_pass(x, codes, KS, no_pairs, _counted(on_progress, f"re-ranking {key} + {spec}", n),
                                              blocks=blocks)
            result = RerankResult(key, spec, metrics.knn_jaccard(done.neighbors, passes[key].neighbors), blocks.seconds,
                                  neighbors=done.neighbors)
            passes[result.name] = done
            reranked.append(result)
    report = Report(source, n, results, [], len(pairs[0]), len(pairs[0]) < n * (n - 1) // 2, notes=notes,
                    reranked=reranked)
    boot = None
    if codes is not None:
        boot = _label_metrics(report, passes, codes, [str(c) for c in class_names])
    where = {r.key: i for i, r in enumerate(results)}
    for i, a in enumerate(keys):
        for j in range(i + 1, len(keys)):
            b = keys[j]
            pair = PairResult(
                a, b,
                knn_jaccard=metrics.knn_jaccard(passes[a].neighbors, passes[b].neighbors),
                similarity_spearman=metrics.spearman(passes[a].pair_sims, passes[b].pair_sims),
            )
            if boot is not None:
                pair.map_diff = results[i].map - results[j].map
                pair.map_diff_ci = metrics.percentile_interval(boot[i] - boot[j])
            report.pairs.append(pair)
    if boot is not None:
        for i, r in enumerate(reranked, start=len(results)):
            r.map_diff = r.map - results[where[r.key]].map
            r.map_diff_ci = metrics.percentile_interval(boot[i] - boot[where[r.key]])
    return report


class RerankedBlocks:
    """Row blocks of re-ranked scores, each image a query against all the others with its own row excluded
    (leave-one-out, as Reranker's `exclude`), in the form metrics.similarity_blocks yields; `seconds` adds
    up the time spent re-ranking."""

    def __init__(self, x: np.ndarray, steps: list[RerankSpec]):
        self.x = x
        self.steps = steps
        self.seconds = 0.0

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        from gpl_cli.analysis.rerank import Reranker

        start = time.perf_counter()
        reranker = Reranker(self.x, self.steps)
        n = len(self.x)
        for rows in metrics.row_chunks(n, metrics.block_rows(n)):
            scores = reranker.scores(self.x[rows], exclude=np.arange(rows.start, rows.stop))
            self.seconds += time.perf_counter() - start
            yield rows.start, scores
            start = time.perf_counter()


def _counted(on_progress, label: str, total: int):
    """A callback taking increments that reports (label, done, total) to `on_progress`; None without one."""
    if on_progress is None:
        return None
    done = 0

    def step(images: int) -> None:
        nonlocal done
        done += images
        on_progress(label, done, total)

    on_progress(label, 0, total)
    return step


def _label_metrics(report: Report, passes: dict, codes: np.ndarray, class_names: list[str]) -> np.ndarray | None:
    """Fill the label metrics into `report`'s poolings and re-rankings; returns the bootstrap mAP resamples
    (pooling, then re-ranking, x resample), the same resampled queries for all."""
    counts = np.bincount(codes, minlength=len(class_names))
    queries = counts[codes] >= 2
    report.classes = dict(zip(class_names, counts.tolist()))
    report.queries = int(queries.sum())
    n = len(codes)
    if report.queries < n:
        singles = [c for c, k in report.classes.items() if k < 2]
        report.notes.append(f"{n - report.queries} images are alone in their class ({', '.join(singles)}): "
                            "they are not queries, only distractors")
    if not report.queries:
        return None
    report.chance_map = float(metrics.chance_average_precision(n - 1, counts[codes[queries]] - 1).mean())
    measured = [*((p.key, p) for p in report.poolings), *((r.name, r) for r in report.reranked)]
    aps = np.stack([passes[name].ap[queries] for name, _ in measured])
    boot = metrics.bootstrap_means(aps, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    for (name, p), ap, means in zip(measured, aps, boot):
        result = passes[name]
        p.map = float(ap.mean())
        p.ap = result.ap
        p.map_ci = metrics.percentile_interval(means)
        p.precision = {k: float(result.precision[k][queries].mean()) for k in KS}
        p.knn_accuracy = {k: float(result.knn_correct[k][queries].mean()) for k in KS}
        p.class_ap = {c: float(result.ap[codes == i].mean()) for i, c in enumerate(class_names) if counts[i] >= 2}
    return boot
