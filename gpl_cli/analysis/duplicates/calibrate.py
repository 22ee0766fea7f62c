"""A duplicate threshold fitted to the user's own images: edited copies of a sample of the file's images,
embedded exactly as the file was, measured against the file's own nearest-neighbour scores.

Two sets of scores:

- positives: each edited copy against its original's row (one copy of every kind in `edits.EDITS` per
  sampled image, so the kinds weigh alike);
- negatives: for each sampled image, the highest similarity of it or any of its copies to anything of
  another image: another row of the file, or a copy of another sampled image. Copies count because a
  collection that holds copies holds them on both sides: a copy of A that comes close to B, or to a copy of
  B, merges two groups.

A row of the file that comes as close to a sampled image (or to one of its copies) as the image's own
weakest edited copy comes to it is a copy of that image already in the file, not another image: it is
passed over, and so are its edited copies when it was sampled too (`copy_level`, `nearest_distinct`);
exact copies (the same vector) are the plainest case. Counted as a distinct image, one duplicate already in
the file would push the threshold above itself, and above the very copies the user wants found (with 64
images, one such negative alone is a false-match rate of 1.6 %). The level is never below the median of
the sampled images' weakest copies: an image whose weakest copy is very weak (a quarter-size or greyscale
copy can score 0.5) would otherwise pass over distinct photos of the same subject, and the threshold would
fall to meet them. The image itself stays among the negatives, measured against the rows that remain.

Precision is estimated per image, for a collection in which every image comes with copies like these: at
threshold t a copy is found with probability r(t) (the share of positives >= t) and an image or one of its
copies meets another image or copy at or above t with probability q(t) (the share of negatives >= t), so
precision(t) = r / (r + q). Both are rates, so the estimate needs no guess at the collection's size; it
does assume that copies are as common as images. Where they are rarer, false matches weigh more: with
copies of one image in k, precision is r / (r + k q). `false_matches` (q at the threshold) is reported
beside it so that the reader can judge, and the resolution is one image in `negatives` (the images
sampled): with 64, q is 0 or at least 1.6 %, so a target of 0.99 puts the threshold above every distinct
pair measured.

The threshold is the lowest candidate whose precision reaches the target (candidates: the positive scores,
rounded down to 3 decimals so that the value shown is the one used). When none does, the one of highest
precision is taken (and `met` is False). The file's other poolings come from the same forward pass (a Job
returns every pooling at once) and are calibrated alike, so the report can say which separates copies
better. The result is saved beside the file (FILE.duplicates.json) and reused while the file, its pooling
and its weights are unchanged.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np

from gpl_cli.analysis import metrics
from gpl_cli.analysis.duplicates.edits import EDITS
from gpl_cli.analysis.duplicates.model import Threshold
from gpl_cli.analysis.neighbors import choose_pooling, embed_all_like, searchable, top_k
from gpl_cli.atomic import atomic_file
from gpl_cli.embedding.sources import MadeImage
from gpl_cli.errors import GplError
from gpl_cli.store.formats import read_embeddings, read_metadata

TARGET = 0.99  # the precision asked for by default
SAMPLE = 64  # images edited: one copy of each kind per image, 512 copies
MIN_IMAGES = 20  # fewer reachable images give a threshold too coarse to trust
NEIGHBOURS = 16  # nearest rows looked at per image or copy, so that its copies in the file can be passed over
EXACT = 1 - 1e-6  # a cosine this close to 1 is the same vector: an exact copy, not a distinct image
REPRODUCED = 0.999  # a re-embedded original must score at least this against its own row
ADVICE_MARGIN = 0.02  # recall another pooling must gain before gpl suggests it
SUFFIX = ".duplicates.json"
FORMAT = "gpl duplicates calibration"
VERSION = 1


@dataclass
class Pooling:
    """One pooling's calibration figures: its threshold and what it achieves there."""

    key: str
    threshold: float
    met: bool  # the threshold reaches the target precision
    precision: float
    recall: float
    false_matches: float  # the share of sampled images whose nearest distinct image or copy reaches the threshold


@dataclass
class Calibration:
    file: str
    key: str
    threshold: float
    target_precision: float
    met: bool
    precision: float  # estimated at the threshold (module docstring)
    recall: float  # of every copy, at the threshold
    false_matches: float  # the share of sampled images whose nearest distinct image or copy reaches the threshold
    per_kind: dict[str, dict]  # kind -> {"copies", "found", "recall", "median", "scores": each copy's, ascending}
    curve: list[tuple[float, float, float]]  # (threshold, precision, recall), threshold descending
    images: int  # originals edited
    negatives: int  # sampled images whose nearest distinct image or copy was measured
    reproduced: float  # the lowest score of a re-embedded, unedited original against its own row
    poolings: list[Pooling]  # every pooling of the file, this one first
    advice: str  # which pooling separates copies best, in words
    negative_scores: list[float] = field(default_factory=list)  # each sampled image's nearest distinct, ascending
    duplicated: int = 0  # sampled images with a copy already in the file (copy_level): passed over, not a distinct image
    seed: int = 0
    identity: dict = field(default_factory=dict)  # what must be unchanged for the calibration to be reused
    created: str = ""

    @property
    def path(self) -> str:
        return self.file + SUFFIX

    def as_threshold(self) -> Threshold:
        return Threshold(self.threshold, f"calibration {os.path.basename(self.path)} "
                                         f"(target precision {self.target_precision:g})")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        data = dict(data)
        data["curve"] = [tuple(row) for row in data["curve"]]
        data["poolings"] = [Pooling(**p) for p in data["poolings"]]
        return cls(**data)

    def text(self) -> list[str]:
        """The report, as lines for stderr."""
        p = self
        lines = [f"calibration of {p.file} ({p.key}): {p.images} images and {p.images * len(p.per_kind)} edited "
                 "copies, each image with its copies against the nearest distinct image or copy"]
        if p.met:
            lines.append(f"threshold {p.threshold:.3f}: precision {p.precision:.3f} (target {p.target_precision:g}), "
                         f"recall {p.recall:.3f}; {round(p.false_matches * p.negatives)} of {p.negatives} images "
                         "come that close to a distinct one")
        else:
            lines.append(f"no threshold reaches precision {p.target_precision:g} on these images; the best, "
                         f"{p.threshold:.3f}, gives precision {p.precision:.3f} at recall {p.recall:.3f}")
        if p.duplicated:
            lines.append(f"{p.duplicated} of the {p.images} sampled images already have a copy in the file (as close "
                         "as their own weakest edited copy): it is passed over, not counted as a distinct image")
        lines.append("recall per kind of edit: " + ", ".join(
            f"{kind} {k['recall']:.2f}" for kind, k in p.per_kind.items()))
        lines.append("threshold  precision  recall")
        lines += [f"{t:9.3f}  {pr:9.3f}  {r:6.3f}" for t, pr, r in _short_curve(p.curve, p.threshold)]
        if p.reproduced < REPRODUCED:
            lines.append(f"warning: unedited images re-embedded here score as low as {p.reproduced:.4f} against their "
                         "own rows: this machine does not reproduce the file's vectors (another device or precision?)")
        lines.append(p.advice)
        return lines


def _short_curve(curve: list[tuple[float, float, float]], chosen: float) -> list[tuple[float, float, float]]:
    """The rows of the curve near the threshold chosen (every 0.02 within 0.06 of it), it, and 0.95."""
    return [row for row in curve if row[0] in (chosen, 0.95)
            or (0.005 < abs(row[0] - chosen) <= 0.06 + 1e-9 and round(row[0] * 100) % 2 == 0)]


# --- the arithmetic ----------------------------------------------------------------------------------


def precision_recall(positives: np.ndarray, negatives: np.ndarray, thresholds: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, false-match rate) at each threshold (module docstring); precision is 1 where
    nothing reaches the threshold."""
    pos, neg = np.sort(positives), np.sort(negatives)
    t = np.asarray(thresholds, np.float64)
    recall = (len(pos) - np.searchsorted(pos, t, side="left")) / max(1, len(pos))
    false = (len(neg) - np.searchsorted(neg, t, side="left")) / max(1, len(neg))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(recall + false > 0, recall / (recall + false), 1.0)
    return precision, recall, false


def choose_threshold(positives: np.ndarray, negatives: np.ndarray, target: float) -> tuple[float, bool]:
    """(threshold, met): the lowest candidate (a positive score, rounded down to 3 decimals) whose precision
    reaches `target`; when none does, the candidate of highest precision (the lowest of those)."""
    candidates = np.unique(np.floor(np.asarray(positives, np.float64) * 1000) / 1000)
    if not len(candidates):
        raise GplError("no edited copy could be measured")
    precision, _, _ = precision_recall(positives, negatives, candidates)
    meets = np.flatnonzero(precision >= target)
    if len(meets):
        return float(candidates[meets[0]]), True
    return float(candidates[np.flatnonzero(precision == precision.max())[0]]), False


def curve(positives: np.ndarray, negatives: np.ndarray, chosen: float) -> list[tuple[float, float, float]]:
    """(threshold, precision, recall) every 0.01 from 1 down to the lowest positive, and at `chosen`."""
    low = max(-1.0, np.floor(float(np.min(positives)) * 100) / 100)
    grid = np.unique(np.round(np.concatenate([np.arange(low, 1.0 + 1e-9, 0.01), [chosen]]), 3))[::-1]
    precision, recall, _ = precision_recall(positives, negatives, grid)
    return [(float(t), round(float(p), 4), round(float(r), 4)) for t, p, r in zip(grid, precision, recall)]


def copy_level(own_copies: np.ndarray) -> np.ndarray:
    """For each sampled image (`own_copies`: its edited copies' scores against its row, one row per image), the
    score at which a row counts as a copy of it: its weakest edited copy's, but no lower than the median of
    every image's weakest (module docstring), and no higher than an exact copy's."""
    weakest = np.min(own_copies, axis=1)
    return np.minimum(EXACT, np.maximum(weakest, np.median(weakest)))


def nearest_distinct(vectors: np.ndarray, chosen: np.ndarray, copies: np.ndarray, level: np.ndarray
                     ) -> tuple[np.ndarray, int]:
    """(for each sampled image, the highest similarity of it or any of its copies to anything of another image,
    how many sampled images have a copy in the file). The images are rows `chosen` of `vectors`; `copies` are
    their edited copies, len(chosen) x kinds rows in that order; `level` is copy_level's.

    Anything of another image: a row of the file, or a copy of another sampled image. A row that the image or
    one of its copies reaches at `level` is a copy of it, not another image, and is passed over; when that row
    is a sampled image too, so are its copies. NaN for an image where every one of the NEIGHBOURS nearest rows
    of it and of each of its copies is passed over."""
    n = len(chosen)
    kinds = len(copies) // max(1, n)
    members = np.concatenate([vectors[chosen], copies])
    source = np.concatenate([np.arange(n), np.repeat(np.arange(n), kinds)])  # the sampled image of each member
    unit = metrics.unit_rows(vectors, norm_dtype=np.float32)
    member_unit = metrics.unit_rows(members, norm_dtype=np.float32)
    # Each image with its copies, to measure how close the image comes to a row: its best member's score.
    group = np.concatenate([member_unit[:n, None], member_unit[n:].reshape(n, kinds, member_unit.shape[1])], axis=1)
    scores, found = top_k(vectors, members, min(NEIGHBOURS + 1, len(vectors)))
    reach = np.einsum("mkd,mgd->mkg", unit[found], group[source]).max(axis=2)
    passed = (reach >= level[source][:, None]) | (found == chosen[source][:, None])
    to_rows = np.where(passed, -np.inf, scores).max(axis=1)
    to_rows[passed.all(axis=1)] = np.nan
    linked = np.einsum("igd,jd->ijg", group, unit[chosen]).max(axis=2) >= level[:, None]  # image i has j's row
    np.fill_diagonal(linked, True)
    cross = member_unit @ member_unit[n:].T
    cross[linked[source][:, source[n:]]] = -np.inf  # a copy of the image's own, or of a row it passes over
    best = np.maximum(to_rows, cross.max(axis=1) if len(copies) else -np.inf)
    out = np.full(n, -np.inf)
    np.fmax.at(out, source, best.astype(np.float64))  # fmax: a NaN member does not hide the others
    out[~np.isfinite(out)] = np.nan
    has_copy = np.zeros(n, bool)
    np.logical_or.at(has_copy, source, (passed & (found != chosen[source][:, None])).any(axis=1))
    return out, int(has_copy.sum())


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b`."""
    return np.einsum("ij,ij->i", metrics.unit_rows(a, norm_dtype=np.float32), metrics.unit_rows(b, norm_dtype=np.float32))


# --- the images --------------------------------------------------------------------------------------


def reachable(emb, images: str | None = None) -> tuple[list[int], str, dict[str, int]]:
    """(rows whose image can be read now, the folder they were looked for in, why the others cannot: reason ->
    count). Stored names are read below `images`, else the file's recorded root (as pages find them); an
    image whose size or time differs from the one recorded when it was embedded has changed since, so its
    row is not its picture any more."""
    folder = os.path.abspath(images or emb.metadata.get("root") or os.curdir)
    rows, why = [], {}
    for row, name in enumerate(emb.paths):
        path = os.path.normpath(os.path.join(folder, name))
        reason = None
        if not path.startswith(os.path.join(folder, "")):
            reason = "not below the folder"
        else:
            try:
                st = os.stat(path)
            except OSError:
                reason = "missing"
            else:
                if emb.stats is not None and tuple(emb.stats[row]) not in ((-1, -1), (st.st_size, st.st_mtime_ns)):
                    reason = "changed since they were embedded"
        if reason:
            why[reason] = why.get(reason, 0) + 1
        else:
            rows.append(row)
    return rows, folder, why


@functools.lru_cache(maxsize=2)
def _original(path: str):
    from gpl_cli.embedding.images import open_rgb

    return open_rgb(path)


def _edited(path: str, kind: str, seed: tuple[int, ...]) -> bytes:
    """One edited copy's file bytes; its own generator, so a copy is the same whichever process makes it."""
    return EDITS[kind](_original(path), np.random.default_rng(list(seed))).encoded()


# --- calibrating -------------------------------------------------------------------------------------


def file_identity(path: str, metadata: dict) -> dict:
    """What identifies this version of the file: a changed or other file has another."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "created": metadata.get("created"),
            "count": metadata.get("count")}


def _pooling_identity(metadata: dict, key: str) -> dict:
    return {"weights_sha256": metadata.get("weights_sha256"), "pool": metadata.get("pools", {}).get(key),
            "config": metadata.get("config")}


def _figures(key: str, positives: np.ndarray, negatives: np.ndarray, target: float) -> Pooling:
    threshold, met = choose_threshold(positives, negatives, target)
    precision, recall, false = (float(v[0]) for v in precision_recall(positives, negatives, np.array([threshold])))
    return Pooling(key, threshold, met, round(precision, 4), round(recall, 4), round(false, 4))


def _advice(poolings: list[Pooling], target: float) -> str:
    mine, *others = poolings
    if not others:
        return f"{mine.key} is the file's only pooling"
    figures = "; ".join(f"{p.key} {p.recall:.2f} (threshold {p.threshold:.3f}{'' if p.met else ', target not met'})"
                        for p in poolings)
    best = max(others, key=lambda p: (p.met, p.recall))
    if (best.met, best.recall) > (mine.met, mine.recall + ADVICE_MARGIN):
        return (f"pooling {best.key} separates copies better: recall at precision {target:g}: {figures}; "
                f"use -p {best.key}")
    return f"{mine.key} separates copies as well as the file's other poolings: recall at precision {target:g}: {figures}"


def calibrate(file: str, key: str | None = None, target_precision: float = TARGET, sample: int = SAMPLE,
              seed: int = 0, device: str = "auto", images: str | None = None, backbone=None,
              save: bool = True, on_start: Callable[[int, int], None] | None = None) -> Calibration:
    """Fit the duplicate threshold of `file`'s pooling `key` (default: its first) to its own images (module
    docstring), save it beside the file unless `save` is False, and return it.

    `images`: the folder the stored names lie below (default: the root recorded in the file). GplError when
    fewer than MIN_IMAGES images can be read there. `on_start(images, copies)` is called once the sample is
    drawn, before the embedding (tens of seconds on a CPU) starts."""
    if not 0 < target_precision < 1:
        raise GplError(f"--target-precision is a share between 0 and 1 (exclusive), got {target_precision:g}")
    if sample < MIN_IMAGES:
        raise GplError(f"a calibration needs a sample of at least {MIN_IMAGES} images, got {sample}")
    metadata = read_metadata(file)
    key = choose_pooling(metadata, key, file)
    emb = read_embeddings(file)
    keys = [key] + [k for k in emb.vectors if k != key]
    vectors = {k: searchable(emb, k, file) for k in keys}
    rows, folder, why = reachable(emb, images)
    if len(rows) < MIN_IMAGES:
        reasons = f" ({', '.join(f'{n} {reason}' for reason, n in why.items())})" if why else ""
        raise GplError(f"cannot calibrate on {file}: {len(rows)} of its {len(emb)} images can be read below "
                       f"{folder}{reasons}; at least {MIN_IMAGES} are needed (--images DIR names their folder)")
    _original.cache_clear()  # a process that calibrates again must not edit an image as it was before
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(rows, size=min(sample, len(rows)), replace=False))
    kinds = list(EDITS)
    paths = [os.path.join(folder, emb.paths[r]) for r in chosen]
    inputs: list = list(paths)  # each original again, unedited: does this machine reproduce the file's rows?
    for row, path in zip(chosen, paths):
        for k, kind in enumerate(kinds):
            make = functools.partial(_edited, path, kind, (seed, int(row), k))
            inputs.append((f"{emb.paths[row]} ({kind})", MadeImage(make, path)))
    if on_start:
        on_start(len(chosen), len(chosen) * len(kinds))
    made = embed_all_like(inputs, emb.metadata, device, backbone)
    n = len(chosen)
    figures, results = [], {}
    for k in keys:
        positives = cosine_rows(made[k][n:], np.repeat(vectors[k][chosen], len(kinds), axis=0))
        nearest, duplicated = nearest_distinct(vectors[k], chosen, made[k][n:],
                                               copy_level(positives.reshape(n, len(kinds))))
        negatives = nearest[np.isfinite(nearest)]
        figures.append(_figures(k, positives, negatives, target_precision))
        results[k] = positives, negatives, duplicated
    positives, negatives, duplicated = results[key]
    mine = figures[0]
    by_kind = positives.reshape(n, len(kinds))
    per_kind = {kind: {"copies": n, "found": int((by_kind[:, k] >= mine.threshold).sum()),
                       "recall": round(float((by_kind[:, k] >= mine.threshold).mean()), 4),
                       "median": round(float(np.median(by_kind[:, k])), 4),
                       "scores": _rounded(by_kind[:, k])} for k, kind in enumerate(kinds)}
    calibration = Calibration(
        file=file, key=key, threshold=mine.threshold, target_precision=target_precision, met=mine.met,
        precision=mine.precision, recall=mine.recall, false_matches=mine.false_matches, per_kind=per_kind,
        curve=curve(positives, negatives, mine.threshold), images=n, negatives=len(negatives), duplicated=duplicated,
        reproduced=round(float(cosine_rows(made[key][:n], vectors[key][chosen]).min()), 6),
        poolings=figures, advice=_advice(figures, target_precision), negative_scores=_rounded(negatives), seed=seed,
        identity={"file": file_identity(file, emb.metadata), **_pooling_identity(emb.metadata, key)},
        created=datetime.now(UTC).isoformat(timespec="seconds"))
    if save:
        save_calibration(calibration)
    return calibration


def _rounded(scores: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in np.sort(scores)]


# --- saved beside the file ---------------------------------------------------------------------------


def _read_saved(path: str) -> tuple[dict | None, str | None]:
    """(the saved calibrations, None), (None, None) when there is no file, (None, why) when the file is not one
    gpl wrote or cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"{path} cannot be read as a gpl calibration ({exc})"
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("calibrations"), dict):
        return None, f"{path} was not written by gpl"
    return data, None


def save_calibration(calibration: Calibration) -> str:
    """Write the calibration beside its file, keeping those of the file's other poolings that are still
    current; a file of that name that gpl did not write is never replaced."""
    path = calibration.path
    data, problem = _read_saved(path)
    if problem:
        raise GplError(f"{problem}; gpl will not replace it (move it away to save a calibration)")
    data = data or {}
    kept = {k: c for k, c in data.get("calibrations", {}).items()
            if k != calibration.key and isinstance(c, dict) and
            c.get("identity", {}).get("file") == calibration.identity["file"]}
    document = {"format": FORMAT, "version": VERSION, "calibrations": {**kept, calibration.key: calibration.to_dict()}}
    with atomic_file(path, "w", overwrite=True, encoding="utf-8") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    return path


def calibration_status(file: str, key: str | None = None) -> tuple[Calibration | None, str | None]:
    """(the saved calibration of `file`'s pooling `key`, None) when there is a current one, else (None, why
    not: None when none was ever saved, else a sentence). A calibration is current while the file is the
    same version (size, time, creation, rows) and the pooling's weights, settings and run configuration are
    the ones it was made with."""
    metadata = read_metadata(file)
    key = choose_pooling(metadata, key, file)
    path = file + SUFFIX
    data, problem = _read_saved(path)
    if data is None:
        return None, problem
    saved = data["calibrations"].get(key)
    if not isinstance(saved, dict):
        return None, f"{path} holds no calibration for pooling {key}"
    identity = saved.get("identity", {})
    if identity.get("file") != file_identity(file, metadata):
        return None, f"{path} was made for another version of {file}; calibrate again"
    if {k: v for k, v in identity.items() if k != "file"} != json.loads(json.dumps(_pooling_identity(metadata, key))):
        return None, f"{path} was made with other weights or settings for {key}; calibrate again"
    try:
        return Calibration.from_dict({**saved, "file": file}), None
    except (KeyError, TypeError) as exc:
        return None, f"{path} holds a damaged calibration for {key} ({exc}); calibrate again"


def load_calibration(file: str, key: str | None = None) -> Calibration | None:
    """The current saved calibration of `file`'s pooling `key`, or None (calibration_status says why)."""
    return calibration_status(file, key)[0]
