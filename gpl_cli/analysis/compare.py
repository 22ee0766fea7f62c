"""`gpl compare`: which pooling suits these images? Quality, agreement and cost, side by side.

Embeddings come from one run of the backbone with every pooling (through the embed pipeline,
so they are exactly what `gpl embed` writes) or from saved gpl files. Labels come from the
class folders or a CSV. `compare` turns them into a `Report`; the metrics live in
`gpl_cli.analysis.metrics`, the drawing in `gpl_cli.report.plots`.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
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
    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.engine import Summary
    from gpl_cli.embedding.images import Failure
    from gpl_cli.embedding.inputs import InputList
    from gpl_cli.models.backbones import Backbone
    from gpl_cli.store.output import Output

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
KS = (1, 5)


# --- embeddings --------------------------------------------------------------------------


def embed_images(
    config: EmbedConfig,
    inputs: InputList,
    options: RunOptions,
    save: Output | None = None,
    backbone: Backbone | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_failure: Callable[[Failure], None] | None = None,
) -> tuple[Embeddings, Summary]:
    """Embed the inputs once (all poolings of `config` from one forward pass): in memory, or into `save`
    and read back. The Summary carries each pooling's time."""
    from gpl_cli.embedding.job import Job

    job = Job(config, options, len(inputs.items), backbone=backbone, on_progress=on_progress, on_failure=on_failure)
    if save:
        summary = job.write(inputs, save)
        return read_embeddings(save.path), summary
    emb = job.embeddings(inputs)
    return emb, emb.summary


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
    return Embeddings(first.paths, vectors, metadata, first.failures)


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


def read_labels_csv(csv_path: str, names: list[str], root: str | None) -> list[str]:
    """Labels of `names` from a CSV of path,label rows (a 'path,label' header is allowed).

    A path may be written as stored in the embeddings (relative to the input folder) or as a
    path to the file (relative to the current directory, or absolute).
    """
    by_path: dict[str, str] = {}
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
        for key in keys:
            if by_path.setdefault(key, label) != label:
                raise GplError(f"{csv_path}:{line}: {path} is labelled both {by_path[key]!r} and {label!r}")
    missing = [n for n in names if os.path.normpath(n) not in by_path]
    if missing:
        raise GplError(f"{csv_path} has no label for {len(missing)} of the {len(names)} images (e.g. {missing[0]})")
    return [by_path[os.path.normpath(n)] for n in names]


def image_labels(names: list[str], labels_csv: str | None, root: str | None) -> list[str] | None:
    """Labels from the CSV when one is given, else from the class folders (None: no labels)."""
    return read_labels_csv(labels_csv, names, root) if labels_csv else folder_labels(names)


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
            doc.update(
                map=self.map,
                map_ci95=list(self.map_ci),
                precision={f"@{k}": v for k, v in self.precision.items()},
                knn_accuracy={f"k={k}": v for k, v in self.knn_accuracy.items()},
                class_ap=self.class_ap,
            )
        return doc


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
        return self.map_diff_ci is not None and (self.map_diff_ci[0] > 0 or self.map_diff_ci[1] < 0)

    def verdict(self) -> str:
        if self.map_diff is None:
            return (f"{self.a} and {self.b}: no label metrics, so no verdict on quality; their {metrics.JACCARD_K} "
                    f"nearest neighbours overlap with mean Jaccard {self.knn_jaccard:.2f} (1 = the same neighbours)")
        lo, hi = (100 * v for v in self.map_diff_ci)
        diff = 100 * self.map_diff
        if not self.significant:
            return (f"{self.a} vs {self.b}: no significant difference in mAP "
                    f"({diff:+.1f} points, 95 % CI {lo:+.1f} to {hi:+.1f})")
        winner, loser = (self.a, self.b) if diff > 0 else (self.b, self.a)
        if diff < 0:
            diff, lo, hi = -diff, -hi, -lo
        return f"{winner} beats {loser} by {diff:.1f} mAP points, 95 % CI {lo:.1f} to {hi:.1f}"

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
    probe: ProbeReport | None = None  # --probe (gpl_cli.analysis.probe)
    gem_auto: GemAutoResult | None = None  # --pool gem:p=auto (gpl_cli.analysis.gem_auto)

    @property
    def labelled(self) -> bool:
        return self.chance_map is not None

    def verdicts(self) -> list[str]:
        lines = []
        if self.labelled:
            best = max(self.poolings, key=lambda p: p.map)
            lines.append(f"best mAP: {best.key} {100 * best.map:.1f} (chance level {100 * self.chance_map:.1f})")
        return lines + [p.verdict() for p in self.pairs]

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
            "verdicts": self.verdicts(),
            "notes": self.notes,
            "probe": self.probe.as_dict() if self.probe else None,
            "gem_auto": self.gem_auto.as_dict() if self.gem_auto else None,
        }

    def csv_text(self) -> str:
        """Long format, one number a row: pooling,versus,metric,value (versus empty for one pooling)."""
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
        for extra in (self.probe, self.gem_auto):
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
        if self.probe:
            rows, probe_pairs = self.probe.table_rows()
            lines += ["", *_aligned(rows), *(["", *_aligned(probe_pairs)] if len(probe_pairs) > 1 else []),
                      f"probe: {self.probe.method()}", *(f"probe note: {n}" for n in self.probe.notes)]
        if self.gem_auto:
            lines += ["", *self.gem_auto.table_lines(), *(f"gem:p=auto note: {n}" for n in self.gem_auto.notes)]
        lines += ["", *self.verdicts(), *(f"note: {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"

    def table_rows(self) -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
        """The table's cells as text: (metric rows, pair rows); each list starts with its header row."""
        rows: list[tuple[str, list[str]]] = [("", [p.key for p in self.poolings])]
        if self.labelled:
            rows += [
                ("mAP %", [f"{100 * p.map:.1f}" for p in self.poolings]),
                ("  95 % CI", [f"{100 * p.map_ci[0]:.1f}-{100 * p.map_ci[1]:.1f}" for p in self.poolings]),
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
                diff = [f"{100 * p.map_diff:+.1f}", f"{100 * p.map_diff_ci[0]:+.1f} to {100 * p.map_diff_ci[1]:+.1f}"] \
                    if self.labelled else []
                pair_rows.append((f"{p.a} - {p.b}", [*diff, f"{p.knn_jaccard:.3f}", f"{p.similarity_spearman:.3f}"]))
        return rows, pair_rows


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


def _check_vectors(emb: Embeddings, keys: list[str]) -> None:
    if len(emb) < 3:
        raise GplError(f"compare needs at least 3 images, got {len(emb)}")
    for key in keys:
        finite(emb, key, "compare")


def compare(
    emb: Embeddings,
    labels: list[str] | None = None,
    keys: list[str] | None = None,
    pool_seconds: dict[str, float] | None = None,
    source: str = "",
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Report:
    """Every metric for every pooling in `keys` (default: all in `emb`) and every pair of them.

    `on_progress(f"ranking {key}", done, n)` follows each pooling's leave-one-out pass.
    """
    keys = list(keys or emb.vectors)
    _check_vectors(emb, keys)
    n = len(emb)
    notes: list[str] = []
    codes = class_names = None
    if labels is not None:
        class_names, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
        if len(class_names) < 2:
            notes.append(f"only one class ({class_names[0]}): label metrics need two or more")
            codes = None
    pairs = metrics.pair_sample(n)
    passes: dict[str, metrics.PassResult] = {}
    results: list[PoolingResult] = []
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
    report = Report(source, n, results, [], len(pairs[0]), len(pairs[0]) < n * (n - 1) // 2, notes=notes)
    boot = None
    if codes is not None:
        boot = _label_metrics(report, passes, codes, [str(c) for c in class_names])
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
    return report


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
    """Fill the label metrics into `report`; returns the bootstrap mAP resamples (pooling x resample)."""
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
    aps = np.stack([passes[p.key].ap[queries] for p in report.poolings])
    boot = metrics.bootstrap_means(aps, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    for p, ap, means in zip(report.poolings, aps, boot):
        result = passes[p.key]
        p.map = float(ap.mean())
        p.ap = result.ap
        p.map_ci = metrics.percentile_interval(means)
        p.precision = {k: float(result.precision[k][queries].mean()) for k in KS}
        p.knn_accuracy = {k: float(result.knn_correct[k][queries].mean()) for k in KS}
        p.class_ap = {c: float(result.ap[codes == i].mean()) for i, c in enumerate(class_names) if counts[i] >= 2}
    return boot
