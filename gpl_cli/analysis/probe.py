"""Linear probes for `gpl compare --probe`: how well a linear classifier on each pooling's vector
predicts the user's labels, and what that head costs in parameters.

Protocol (scikit-learn, `gpl_cli.analysis.probe_model`): stratified k-fold (default 5, shuffled with seed 0,
the same folds for every pooling); in each fold, standardise, multinomial logistic regression,
C chosen by a 3-fold stratified CV inside the training folds only. Test accuracy is the mean
over folds of the accuracy on the held-out fold, train accuracy the same on the training folds
(the gap between the two is the overfitting).

Intervals: Student t over the k fold accuracies (mean +- t(k-1) sd / sqrt(k)); the difference
between two poolings is paired by fold (the folds are the same for every pooling). Measured on
simulated data where the truth is known (tests/test_probe.py, 600 runs of 3 classes x 20
images): coverage 0.92 for an accuracy and 0.95 for a difference, at a nominal 0.95. A
percentile bootstrap over the held-out predictions, which treats them as independent and so
leaves out the variation between training sets, covered 0.90 and 0.92 there; the
Nadeau-Bengio corrected t, 0.98 and 0.99 (1.5 times as wide).

Parameters of a linear head on K classes: D*K + K for a D-dimensional pooled vector, C*H*W*K + K
for the flattened C x H x W map. The probe on the flattened map runs when the maps of all images
fit in MAP_LIMIT_BYTES (float32); they come from a second forward pass, only with --probe.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gpl_cli.errors import GplError, missing

DEFAULT_FOLDS = 5
LEVEL = 0.95
MAP_KEY = "flattened map"
MAP_LIMIT_BYTES = 512 << 20  # N x C*H*W float32 held for the flattened-map probe (the fits take a few copies)


def model_module():
    """gpl_cli.analysis.probe_model, or a GplError with the install line when scikit-learn is missing."""
    try:
        from gpl_cli.analysis import probe_model
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "sklearn":
            raise
        raise GplError(missing("this needs scikit-learn", "scikit-learn", "probe")) from None
    return probe_model


def head_parameters(dim: int, classes: int) -> int:
    """Weights and biases of a linear head from `dim` inputs to `classes` outputs."""
    return dim * classes + classes


@dataclass
class ClassPlan:
    names: list[str]
    codes: np.ndarray
    folds: int
    notes: list[str]


def fold_interval(values: np.ndarray, bounds: tuple[float, float], level: float = LEVEL) -> tuple[float, float]:
    """Student t interval of the mean of per-fold values (k - 1 degrees of freedom), clipped to `bounds`
    (an accuracy lies in [0, 1], a difference of two in [-1, 1])."""
    from scipy import stats  # a scikit-learn dependency

    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(max(bounds[0], values.mean() - half)), float(min(bounds[1], values.mean() + half))


def plan_folds(labels: list[str], folds: int = DEFAULT_FOLDS, what: str = "--probe") -> ClassPlan:
    """Classes and the number of folds; a GplError for one class or a class of one image.

    A class with fewer images than folds cannot be in every test fold: the folds drop to the
    smallest class's size (with a note).
    """
    names, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    counts = np.bincount(codes, minlength=len(names))
    listing = ", ".join(f"{c} {k}" for c, k in zip(names, counts))
    if len(names) < 2:
        raise GplError(f"{what} needs two or more classes; all {len(codes)} images are in class {names[0]}")
    if counts.min() < 2:
        singles = ", ".join(str(c) for c, k in zip(names, counts) if k < 2)
        raise GplError(f"{what} needs at least 2 images in every class (one to learn from, one to test); "
                       f"only one in: {singles} (images per class: {listing})")
    notes = []
    used = int(min(folds, counts.min()))
    if used < folds:
        small = names[int(np.argmin(counts))]
        notes.append(f"the smallest class ({small}, {counts.min()} images) has fewer images than {folds} folds: "
                     f"{used} folds are used")
    return ClassPlan([str(c) for c in names], codes, used, notes)


@dataclass
class ProbeScore:
    key: str
    dim: int
    parameters: int
    test_accuracy: float
    test_ci: tuple[float, float]
    train_accuracy: float  # mean over folds of the accuracy on the training folds
    fold_test: list[float]
    fold_train: list[float]
    chosen_c: list[float]  # per fold

    def as_dict(self) -> dict:
        return {
            "dim": self.dim,
            "head_parameters": self.parameters,
            "test_accuracy": self.test_accuracy,
            "test_accuracy_ci95": list(self.test_ci),
            "train_accuracy": self.train_accuracy,
            "fold_test_accuracy": self.fold_test,
            "fold_train_accuracy": self.fold_train,
            "fold_c": self.chosen_c,
        }


@dataclass
class ProbePair:
    a: str
    b: str
    diff: float  # test accuracy of a minus b
    ci: tuple[float, float]

    @property
    def significant(self) -> bool:
        return self.ci[0] > 0 or self.ci[1] < 0

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "test_accuracy_diff": self.diff, "test_accuracy_diff_ci95": list(self.ci),
                "significant": self.significant}


@dataclass
class ProbeReport:
    classes: int
    folds: int
    inner_folds: int
    cs: tuple[float, ...]
    scores: list[ProbeScore]
    pairs: list[ProbePair]
    map_shape: tuple[int, int, int] | None = None  # C, H, W of the feature map, when known
    notes: list[str] = field(default_factory=list)

    @property
    def map_parameters(self) -> int | None:
        return None if self.map_shape is None else head_parameters(int(np.prod(self.map_shape)), self.classes)

    def method(self) -> str:
        choice = (f"C from {', '.join(f'{c:g}' for c in self.cs)} by {self.inner_folds}-fold CV inside the training "
                  "folds" if self.inner_folds else f"C = {self.cs[0] if len(self.cs) == 1 else 1:g} (no inner CV)")
        return (f"multinomial logistic regression on standardised vectors; {self.folds}-fold stratified CV (seed 0); "
                f"{choice}; accuracy: mean over folds; 95 % CI: t interval over the {self.folds} folds "
                "(paired by fold between poolings)")

    def as_dict(self) -> dict:
        return {
            "method": self.method(),
            "classes": self.classes,
            "folds": self.folds,
            "inner_folds": self.inner_folds,
            "c_grid": list(self.cs),
            "feature_map_shape": None if self.map_shape is None else list(self.map_shape),
            "flattened_map_head_parameters": self.map_parameters,
            "scores": {s.key: s.as_dict() for s in self.scores},
            "pairs": [p.as_dict() for p in self.pairs],
            "notes": self.notes,
        }

    def csv_rows(self) -> list[tuple[str, str, str, object]]:
        """(pooling, versus, metric, value) rows for compare's long CSV, metrics prefixed 'probe.'."""
        rows = []
        for s in self.scores:
            rows += [(s.key, "", "probe.dim", s.dim), (s.key, "", "probe.head_parameters", s.parameters),
                     (s.key, "", "probe.test_accuracy", s.test_accuracy),
                     (s.key, "", "probe.test_accuracy_ci95.low", s.test_ci[0]),
                     (s.key, "", "probe.test_accuracy_ci95.high", s.test_ci[1]),
                     (s.key, "", "probe.train_accuracy", s.train_accuracy)]
        if self.map_parameters is not None and all(s.key != MAP_KEY for s in self.scores):
            rows.append((MAP_KEY, "", "probe.head_parameters", self.map_parameters))
        for p in self.pairs:
            rows += [(p.a, p.b, "probe.test_accuracy_diff", p.diff),
                     (p.a, p.b, "probe.test_accuracy_diff_ci95.low", p.ci[0]),
                     (p.a, p.b, "probe.test_accuracy_diff_ci95.high", p.ci[1])]
        return rows

    def table_rows(self) -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
        """(per-pooling rows, pair rows) for compare's aligned table."""
        shown = list(self.scores)
        cols = [s.key for s in shown]
        params = [f"{s.parameters:,}" for s in shown]
        if self.map_parameters is not None and MAP_KEY not in cols:
            cols.append(MAP_KEY)
            params.append(f"{self.map_parameters:,}")
        pad = [""] * (len(cols) - len(shown))
        rows = [
            ("linear probe", cols),
            ("test acc %", [f"{100 * s.test_accuracy:.1f}" for s in shown] + ["-"] * len(pad)),
            ("  95 % CI", [f"{100 * s.test_ci[0]:.1f}-{100 * s.test_ci[1]:.1f}" for s in shown] + pad),
            ("train acc %", [f"{100 * s.train_accuracy:.1f}" for s in shown] + pad),
            ("head parameters", params),
            ("C per fold", [",".join(f"{c:g}" for c in s.chosen_c) for s in shown] + pad),
        ]
        pair_rows = [("probe", ["acc diff", "95 % CI", ""])]
        for p in self.pairs:
            ci = f"{100 * p.ci[0]:+.1f} to {100 * p.ci[1]:+.1f}"
            pair_rows.append((f"{p.a} - {p.b}", [f"{100 * p.diff:+.1f}", ci, "significant" if p.significant else ""]))
        return rows, pair_rows


def linear_probe(
    vectors: dict[str, np.ndarray],
    labels: list[str],
    folds: int = DEFAULT_FOLDS,
    cs: tuple[float, ...] | None = None,
    map_shape: tuple[int, int, int] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> ProbeReport:
    """Probe every matrix of `vectors` (key -> N x D, rows in label order) on the same folds."""
    pm = model_module()
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    with threadpool_limits(1):  # small matrices: BLAS threads only wait on each other (24x slower on 2 cores)
        return _probe(pm, vectors, labels, folds, tuple(cs or pm.CS), map_shape, on_progress)


def _probe(pm, vectors, labels, folds, cs, map_shape, on_progress) -> ProbeReport:
    from sklearn.exceptions import ConvergenceWarning

    plan = plan_folds(labels, folds)
    codes = plan.codes
    splits = pm.outer_splits(codes, plan.folds)
    inner = min(pm.INNER_FOLDS, min(int(np.bincount(codes[train]).min()) for train, _ in splits))
    notes = list(plan.notes)
    if inner < 2 and len(cs) > 1:
        notes.append("a training fold holds a class of one image, so C cannot be chosen by inner CV: C = 1")
    elif inner < pm.INNER_FOLDS and len(cs) > 1:
        notes.append(f"the smallest class in a training fold has {inner} images: C is chosen by {inner}-fold inner CV")
    scores = []
    unconverged = set()
    for key, x in vectors.items():
        if on_progress:
            on_progress(key)
        fold_test, fold_train, chosen = [], [], []
        for train, test in splits:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model = pm.probe_estimator(inner, cs).fit(x[train], codes[train])
            if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                unconverged.add(key)
            fold_test.append(float(np.mean(model.predict(x[test]) == codes[test])))
            fold_train.append(float(np.mean(model.predict(x[train]) == codes[train])))
            chosen.append(pm.chosen_c(model))
        scores.append(ProbeScore(key, x.shape[1], head_parameters(x.shape[1], len(plan.names)),
                                 float(np.mean(fold_test)), fold_interval(np.array(fold_test), (0.0, 1.0)),
                                 float(np.mean(fold_train)), fold_test, fold_train, chosen))
    if unconverged:
        notes.append(f"the solver stopped at its iteration limit on {', '.join(sorted(unconverged))}")
    pairs = [
        ProbePair(a.key, b.key, a.test_accuracy - b.test_accuracy,
                  fold_interval(np.array(a.fold_test) - np.array(b.fold_test), (-1.0, 1.0)))
        for i, a in enumerate(scores) for b in scores[i + 1:]
    ]
    inner_used = inner if inner >= 2 and len(cs) > 1 else 0  # 0: C fixed, no inner CV
    return ProbeReport(len(plan.names), plan.folds, inner_used, cs, scores, pairs, map_shape, notes)


# --- the flattened map ---------------------------------------------------------------------


def map_bytes(images: int, shape: tuple[int, int, int]) -> int:
    return images * int(np.prod(shape)) * 4


def flattened_maps(source: MapSource, names: list[str]) -> tuple[np.ndarray | None, str | None]:
    """The flattened feature maps of the images `names` (rows in that order), or None and why not.

    A second forward pass over the images (the first one wrote the pooled vectors), only for
    --probe, and only when the maps fit in MAP_LIMIT_BYTES.
    """
    from gpl_cli.embedding.embedder import MAP_KEY as FLAT
    from gpl_cli.embedding.job import Job
    from gpl_cli.store.embeddings import MemorySink

    shape = tuple(source.backbone.feature_map)
    size = map_bytes(len(names), shape)
    if size > MAP_LIMIT_BYTES:
        return None, (f"no probe on the flattened map: {len(names)} maps of {' x '.join(map(str, shape))} floats take "
                      f"{size / 2**20:.0f} MiB, over the {MAP_LIMIT_BYTES >> 20} MiB limit")
    wanted = set(names)
    todo = [it for it in source.items if it.name in wanted]
    sink = MemorySink([FLAT])
    Job(source.config, source.options, len(todo), backbone=source.backbone, flattened=True).run(todo, sink)
    row = {name: i for i, name in enumerate(sink.names)}
    if sink.failures or set(row) != set(names):
        return None, "no probe on the flattened map: images read in the first pass failed in the second"
    return np.concatenate(sink.vectors[FLAT])[[row[n] for n in names]], None


@dataclass
class MapSource:
    """What the flattened-map pass needs: the images, and the config and backbone that embedded them."""

    config: object  # embedding.config.EmbedConfig
    backbone: object  # models.backbones.Backbone
    items: list  # embedding.inputs.InputItem
    options: object  # embedding.config.RunOptions


def check_labels(labels: list[str] | None, probe: bool, auto: bool, folds: int = DEFAULT_FOLDS) -> None:
    """--probe and gem:p=auto need labels; the probe also two classes, each of two images or more."""
    what = " and ".join(n for n, on in (("--probe", probe), ("--pool gem:p=auto", auto)) if on)
    if labels is None:
        raise GplError(f"{what} needs labels: put the images in one folder per class, or give --labels FILE.csv")
    if probe:
        plan_folds(labels, folds)


def probe_report(emb, labels: list[str], keys: list[str], folds: int = DEFAULT_FOLDS,
                 maps_from: MapSource | None = None, on_progress: Callable[[str], None] | None = None) -> ProbeReport:
    """The probe over the poolings `keys` of `emb` (readers.Embeddings), plus the flattened map when
    `maps_from` holds the images; otherwise a note says why there is none."""
    if maps_from is None:
        shape = tuple(emb.metadata.get("feature_map_shape") or ()) or None
        maps, why = None, "no probe on the flattened map: saved embeddings hold no feature maps (give the images)"
    else:
        shape = tuple(maps_from.backbone.feature_map)
        maps, why = flattened_maps(maps_from, emb.paths)
    vectors = {k: emb.vectors[k] for k in keys}
    if maps is not None:
        vectors[MAP_KEY] = maps
    report = linear_probe(vectors, labels, folds, map_shape=shape, on_progress=on_progress)
    if why:
        report.notes.append(why)
    return report
