"""Groups of duplicate images in an embeddings file, or across two (`against`): what `gpl neighbors --duplicates`
runs (`find_duplicates`).

Exact copies come first: files of equal size are hashed (BLAKE2b of their bytes), and files with identical
bytes form a group before any vector is compared. Each such set is searched by one representative, its
first row, so a collection full of copies costs no more than its distinct images. Then the close pairs
(pairs.similar_pairs) join rows into groups: the connected components of the pairs at or above the threshold,
so A~B and B~C put A, B and C in one group even when A and C are further apart. Images are found below the
root the file records, or below `images` (the way pages find them); where they cannot be found, groups come
from the vectors alone.

The same pass keeps the pairs a little below the threshold (NEAR_MISS_BAND): the near misses, which show
what a lower threshold would add. Each row's best score to another row (the histogram on the page) is a
separate top-1 search; past the size where exact search stops being practical (pairs.exact_is_practical)
it is measured on a sample of BEST_SAMPLE rows.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict

import numpy as np

from gpl_cli.analysis.duplicates import keep as keeping
from gpl_cli.analysis.duplicates.model import Duplicates, Group, Member, Threshold
from gpl_cli.analysis.duplicates.pairs import exact_is_practical, similar_pairs
from gpl_cli.analysis.neighbors import choose_pooling, nearest_others, searchable, top_k
from gpl_cli.errors import GplError
from gpl_cli.store import moves
from gpl_cli.store.formats import read_embeddings, read_metadata

DEFAULT_THRESHOLD = 0.95
NEAR_MISS_BAND = 0.05  # near misses: pairs at most this far below the threshold
NEAR_MISSES = 20  # ... the best of them
BEST_SAMPLE = 1000  # rows whose best score is measured when exact search is not practical
UNCALIBRATED = "default (not calibrated)"


class _Components:
    """Union-find over row numbers (path halving, union by size)."""

    def __init__(self, n: int):
        self.parent = np.arange(n)
        self.size = np.ones(n, np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]


def duplicate_groups(vectors: np.ndarray, threshold: float, block_rows: int | None = None) -> list[list[tuple[int, float]]]:
    """Groups of rows whose cosine similarity is >= threshold (connected components of those pairs), by the
    vectors alone. Each group is [(row, best score to another member)] in row order; groups are ordered by
    their first row. Only groups of two or more rows are returned."""
    pairs = similar_pairs(vectors, threshold, block_rows=block_rows, index="exact")
    links = list(zip(pairs.a.tolist(), pairs.b.tolist(), pairs.score.tolist()))
    return [[(row, score) for row, score in members] for members, _ in _components(len(vectors), links)]


def _components(n: int, links: list[tuple[int, int, float]]) -> list[tuple[list[tuple[int, float]], list[tuple[int, int, float]]]]:
    """The connected components of `links` (node, node, score) over n nodes, ordered by their first node:
    ([(node, best score of its links)] in node order, the component's links)."""
    components = _Components(n)
    best: dict[int, float] = {}
    for i, j, s in links:
        components.union(i, j)
        best[i] = max(best.get(i, -np.inf), s)
        best[j] = max(best.get(j, -np.inf), s)
    members: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for node in sorted(best):
        members[components.find(node)].append((node, best[node]))
    inside: dict[int, list[tuple[int, int, float]]] = defaultdict(list)
    for link in links:
        inside[components.find(link[0])].append(link)
    return sorted(((m, inside[root]) for root, m in members.items()), key=lambda c: c[0][0][0])


# --- the image files ------------------------------------------------------------------------------


class Images:
    """Where the images of stored names are now: below `folder` (the file's root, or --images), or where a
    journaled move put them (`moved`: {original path: path now})."""

    def __init__(self, folder: str, moved: dict[str, str] | None = None):
        self.folder = os.path.abspath(folder)
        self.moved = moved or {}

    def original(self, name: str) -> str | None:
        """Where the stored name lies below the folder; None for a name that is absolute or climbs out of it."""
        path = os.path.normpath(os.path.join(self.folder, name))
        return path if path.startswith(os.path.join(self.folder, "")) else None

    def path(self, name: str) -> str | None:
        """The file now, None when it is not found."""
        path = self.original(name)
        if path is None:
            return None
        if not os.path.isfile(path):
            path = self.moved.get(path)
        return path if path is not None and os.path.isfile(path) else None


def _digest(path: str) -> bytes | None:
    h = hashlib.blake2b(digest_size=20)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    return h.digest()


def content_classes(files: list[str | None]) -> np.ndarray:
    """For each file, the index of the first file with identical bytes (itself when none; -1 when not found).
    Only files that share their size with another are read."""
    first = np.full(len(files), -1, np.int64)
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, path in enumerate(files):
        if path is None:
            continue
        try:
            by_size[os.stat(path).st_size].append(i)
        except OSError:
            continue
        first[i] = i
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        seen: dict[bytes, int] = {}
        for i in same_size:
            digest = _digest(files[i])
            if digest is not None:
                first[i] = seen.setdefault(digest, i)
    return first


# --- two files ------------------------------------------------------------------------------------


def _recipe(metadata: dict, key: str) -> dict[str, object]:
    """What decides the numbers of pooling `key`: two files compare only when all of it is the same."""
    config = metadata.get("config") or {}
    pool = dict((metadata.get("pools") or {}).get(key) or {})
    pool.pop("dim", None)
    return {
        "backbone": metadata.get("backbone"),
        "weights (sha256)": metadata.get("weights_sha256"),
        "layer": metadata.get("layer"),
        "preprocessing": metadata.get("preprocess"),
        f"pooling {key}": pool,
        "normalisation": (metadata.get("normalize"), metadata.get("power")),
        "whitening": config.get("whiten"),
        "scales": config.get("scales"),
    }


def _difference(what: str, mine: object, theirs: object) -> str:
    """One difference in words: "backbone (a vs b)"; of two settings dicts, only the settings that differ."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        keys = [k for k in dict.fromkeys([*mine, *theirs]) if mine.get(k) != theirs.get(k)]
        return f"{what} (" + ", ".join(f"{k} {mine.get(k)} vs {theirs.get(k)}" for k in keys) + ")"
    def shown(value: object) -> object:  # a sha256 by its first 12 digits
        return value[:12] + "..." if isinstance(value, str) and len(value) > 40 else value

    return f"{what} ({shown(mine)} vs {shown(theirs)})"


def check_comparable(file: str, metadata: dict, other: str, other_metadata: dict, key: str) -> None:
    """Refuse two files whose vectors of `key` were not made alike (their scores would mean nothing together)."""
    keys = list(other_metadata.get("pool_keys") or other_metadata.get("pools", {}))
    if key not in keys:
        raise GplError(f"--against {other} has no pooling {key!r} to compare with {file}; it holds: {', '.join(keys) or 'none'}")
    mine, theirs = _recipe(metadata, key), _recipe(other_metadata, key)
    differ = [_difference(what, mine[what], theirs[what]) for what in mine if mine[what] != theirs[what]]
    if differ:
        raise GplError(f"--against {other} was not embedded like {file}, so their scores cannot be compared: "
                       f"{'; '.join(differ)}; embed both the same way")


# --- the search -----------------------------------------------------------------------------------


def resolve_threshold(file: str, key: str, threshold: Threshold | None, calibration) -> tuple[Threshold, object, str | None]:
    """(the threshold to use, the calibration it came from or None, a note on why no calibration was used)."""
    from gpl_cli.analysis.duplicates.calibrate import calibration_status

    if threshold is not None:
        return threshold, None, None
    if calibration is not None:
        return calibration.as_threshold(), calibration, None
    saved, why = calibration_status(file, key)
    if saved is not None:
        return saved.as_threshold(), saved, None
    return Threshold(DEFAULT_THRESHOLD, UNCALIBRATED), None, why


def _unfound_note(file: str, images: Images, files: list[str | None]) -> str | None:
    missing = sum(f is None for f in files)
    if not missing:
        return None
    if missing == len(files):
        return (f"the images of {file} are not found below {images.folder}, so exact copies cannot be told by their "
                "bytes: groups come from the vectors alone (--images DIR names their folder)")
    return (f"{missing} of the {len(files)} images of {file} are not found below {images.folder}; exact copies among "
            "them cannot be told by their bytes")


def _best_scores(x: np.ndarray, y: np.ndarray | None, unique: np.ndarray) -> np.ndarray:
    """Each row of x's best score to another row (of y with --against), NaN where not measured. Only the
    `unique` rows are searched (an exact copy's best is 1.0); a sample of them past exact search's size."""
    best = np.full(len(x), np.nan, np.float32)
    searched = x[unique] if y is None else y
    if len(searched) < (2 if y is None else 1) or not len(unique):
        return best
    rows = np.arange(len(unique))
    backend = "auto"
    if not exact_is_practical(x[unique], None if y is None else y) and len(rows) > BEST_SAMPLE:
        rows = np.sort(np.random.default_rng(0).choice(rows, BEST_SAMPLE, replace=False))
        backend = "numpy"  # blockwise: memory stays bounded however large the file (a FAISS index would copy it)
    if y is None:
        scores, _ = nearest_others(searched, 1, rows, backend)
    else:
        scores, _ = top_k(y, x[unique[rows]], 1, backend)
    best[unique[rows]] = scores[:, 0]
    return best


def find_duplicates(file: str, threshold: Threshold | None = None, key: str | None = None, against: str | None = None,
                    keep: str | None = None, calibration=None, index: str = "auto", images: str | None = None,
                    move_to: str | None = None) -> Duplicates:
    """The duplicate groups of `file` (or, with `against`, the groups that cross from `file` to `against`).

    threshold: None takes the calibration given, else the one saved beside the file, else DEFAULT_THRESHOLD.
    keep: a rule of keep.RULES marks one member of each group as kept. images: the folder the stored names
    lie below (default: the root the file records). move_to: move every member not kept into that folder,
    keeping its relative path, journaled (gpl_cli.store.moves); needs `keep`. Notes for the user (images not
    found) are in `notes`, the moves in `moves`."""
    if move_to is not None and keep is None:
        raise GplError("--move-to moves what --keep does not keep: give a --keep rule")
    if against is not None and (keep is not None or move_to is not None):
        raise GplError("--keep and --move-to act within one file; with --against, the output lists the pairs "
                       "that cross, and its paths can be cut from it")
    if threshold is not None and not -1.0 <= threshold.value <= 1.0:
        raise GplError(f"--threshold is a cosine similarity between -1 and 1, got {threshold.value}")
    metadata = read_metadata(file)
    key = choose_pooling(metadata, key, file)
    threshold, calibration, why = resolve_threshold(file, key, threshold, calibration)
    emb = read_embeddings(file, keys=[key])
    x = searchable(emb, key, file)
    notes = [why] if why else []
    recovered = moves.recover(move_to) if move_to is not None else None
    located = Images(images or emb.metadata.get("root") or os.curdir,
                     moves.Journal(move_to).moved() if move_to is not None else None)
    names = list(emb.paths)
    files = [located.path(n) for n in names]
    stats = [tuple(s) for s in emb.stats.tolist()] if emb.stats is not None else [moves.UNKNOWN] * len(names)
    notes.append(_unfound_note(file, located, files))
    y = None
    if against is not None:
        other_metadata = read_metadata(against)
        check_comparable(file, metadata, against, other_metadata, key)
        emb2 = read_embeddings(against, keys=[key])
        y = searchable(emb2, key, against)
        located2 = Images(emb2.metadata.get("root") or os.curdir)
        files2 = [located2.path(n) for n in emb2.paths]
        notes.append(_unfound_note(against, located2, files2))
        names += emb2.paths
        files += files2
        stats += [moves.UNKNOWN] * len(emb2.paths)
    n = len(x)
    same = content_classes(files)
    links, near, best = _search(x, y, same, threshold.value, index)
    crossing = {(i, j) for i, j, _ in links if (i < n) != (j < n)}
    groups: list[tuple[Group, list[int]]] = []
    for members, inside in _components(len(files), links):
        if y is not None and not any((i, j) in crossing for i, j, _ in inside):
            continue  # a group within one of the two files
        nodes = [node for node, _ in members]
        at = {node: k for k, node in enumerate(nodes)}
        classes = [int(same[node]) for node in nodes]
        group = Group(
            [Member(names[node], node if node < n else node - n, score, exact=c >= 0 and classes.count(c) > 1,
                    other=node >= n, file=files[node]) for (node, score), c in zip(members, classes)],
            [(at[i], at[j], s) for i, j, s in inside],
            exact=classes[0] >= 0 and classes.count(classes[0]) == len(classes))
        groups.append((group, nodes))
    in_group = {node: g for g, (_, nodes) in enumerate(groups) for node in nodes}
    near_misses = [(names[i], names[j], s) for i, j, s in near
                   if i not in in_group or in_group[i] != in_group.get(j)][:NEAR_MISSES]
    node_of = {id(m): node for g, nodes in groups for m, node in zip(g.members, nodes)}
    found = Duplicates(file, key, threshold, [g for g, _ in groups], best, near_misses, against, calibration,
                       keep_rule=keep, notes=[note for note in notes if note])
    if keep is not None:
        keeping.mark_keep(found.groups, keep, lambda m, pixels: keeping.facts(m.file, stats[node_of[id(m)]], pixels))
    if move_to is not None:
        plan = [moves.Move(located.original(m.path) or m.path, m.path, stats[node_of[id(m)]])
                for g in found.groups for m in g.members if not m.keep]
        found.moves = moves.move_files(plan, move_to)
        found.moves.refused[:0] = recovered.refused
    return found


def _search(x: np.ndarray, y: np.ndarray | None, same: np.ndarray, threshold: float, index: str):
    """(the links at or above the threshold, the near misses best first, each row of x's best score) over the
    nodes: rows of x, then rows of y (`same`: content_classes over them all).

    Identical files link to their first copy at score 1.0. Within one file only the first copy of each set
    is compared by its vector. Across two files (y) only pairs that cross are compared; a copy of an
    earlier row of its own file is left out, and a row of x stands for the copies of it in x."""
    n, nodes = len(x), np.arange(len(same))
    copies = (same >= 0) & (same != nodes)
    links = [(int(same[node]), int(node), 1.0) for node in np.flatnonzero(copies)]
    if y is None:
        unique = np.flatnonzero(~copies)
        pairs = similar_pairs(x[unique], threshold - NEAR_MISS_BAND, index=index)
        a, b = unique[pairs.a], unique[pairs.b]
        best = _best_scores(x, None, unique)
        best[np.flatnonzero(copies)] = 1.0
        best[same[copies]] = 1.0
    else:
        unique_x = np.flatnonzero(~copies[:n])
        unique_y = np.flatnonzero(~copies[n:] | (same[n:] < n))  # a copy of a row of x is compared like any row
        pairs = similar_pairs(x[unique_x], threshold - NEAR_MISS_BAND, other=y[unique_y], index=index)
        a, b = unique_x[pairs.a], n + unique_y[pairs.b]
        best = _best_scores(x, y, unique_x)
        best[same[n:][copies[n:] & (same[n:] < n)]] = 1.0  # first copies in x with an identical file in y
        in_x = np.flatnonzero(copies[:n])
        best[in_x] = best[same[in_x]]  # a copy within x scores as its first copy does
    scores = pairs.score
    known = (same[a] >= 0) & (same[a] == same[b])  # identical files: already linked as such
    close = (scores >= threshold) & ~known
    links += list(zip(a[close].tolist(), b[close].tolist(), scores[close].tolist()))
    below = (scores < threshold) & ~known
    order = np.argsort(-scores[below], kind="stable")
    near = list(zip(a[below][order].tolist(), b[below][order].tolist(), scores[below][order].tolist()))
    return links, near, best
