"""Clusters: connected components of the similar pairs at a threshold looser than the duplicates', the
groups of images that are close without being copies (bursts of one scene, one object photographed again).

The default sits LOOSER below the duplicate threshold in effect, so a calibrated duplicate threshold moves
the clusters with it. Why 0.1: with the default backbone and avg pooling, edits that are still copies reach
0.87-0.90 (a half-size copy 0.868, a 5 % crop 0.896), while among the 194 distinct labelled photos no pair
reaches 0.85 (the first two join at 0.80, and by 0.60 one cluster holds 27 photos of one class): 0.1 below
0.95 gathers edited copies and near-identical shots without chaining distinct photos into one component.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpl_cli.analysis.duplicates.groups import _components, resolve_threshold
from gpl_cli.analysis.duplicates.model import Group, Member, Threshold
from gpl_cli.analysis.duplicates.pairs import Pairs, similar_pairs
from gpl_cli.analysis.neighbors import choose_pooling, searchable
from gpl_cli.errors import GplError
from gpl_cli.store.formats import read_embeddings, read_metadata

LOOSER = 0.1  # the default cluster threshold: this far below the duplicate threshold


@dataclass
class Clusters:
    file: str
    key: str
    threshold: Threshold  # the clusters' threshold and where it came from
    groups: list[Group]  # largest first, then by first row; members in row order


def cluster_threshold(given: float | None, duplicates: Threshold) -> Threshold:
    """--cluster-threshold when given, else LOOSER below the duplicate threshold in effect."""
    if given is not None:
        return Threshold(given, "--cluster-threshold")
    value = max(-1.0, round(duplicates.value - LOOSER, 6))
    return Threshold(value, f"{LOOSER:g} below the duplicate threshold {duplicates.value:.3f}, itself from "
                            f"{duplicates.source}")


def components(paths: list[str], pairs: Pairs) -> list[Group]:
    """The connected components of `pairs` over the rows of `paths` that hold two rows or more, largest first
    (then by first row); each member's score is its best pair in the component."""
    links = list(zip(pairs.a.tolist(), pairs.b.tolist(), pairs.score.tolist()))
    groups = []
    for members, inside in _components(len(paths), links):
        at = {row: k for k, (row, _) in enumerate(members)}
        groups.append(Group([Member(paths[row], row, score) for row, score in members],
                            [(at[i], at[j], s) for i, j, s in inside]))
    return sorted(groups, key=lambda g: (-len(g.members), g.members[0].row))


def find_clusters(path: str, threshold: float | None = None, key: str | None = None) -> Clusters:
    """The clusters of the file's images at `threshold`, by default LOOSER below the duplicate threshold in
    effect (the calibration saved beside the file, else the default; groups.resolve_threshold)."""
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise GplError(f"--cluster-threshold is a cosine similarity between -1 and 1, got {threshold:g}")
    key = choose_pooling(read_metadata(path), key, path)
    chosen = cluster_threshold(threshold, resolve_threshold(path, key, None, None)[0])
    emb = read_embeddings(path, keys=[key])
    return Clusters(path, key, chosen, components(emb.paths, similar_pairs(searchable(emb, key, path), chosen.value)))
