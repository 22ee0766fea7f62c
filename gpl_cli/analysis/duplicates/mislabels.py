"""Likely label errors: labelled images whose nearest neighbours mostly carry another label.

An image is listed when more than half of its k nearest other images carry a label other than its own
and the most common label among those k is not its own; that label is proposed. Its score is the share
of the k with another label (1: none shares its label). Labels come the way `gpl compare` takes them
(analysis.compare.image_labels): a CSV of path,label rows, else each image's class folder.
A label vote says "look at this image", not "this label is wrong": an atypical photo of its class is
listed as readily as a mislabelled one, which is why the page shows every listed image with its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gpl_cli.analysis.compare import image_labels
from gpl_cli.analysis.neighbors import Neighbor, choose_pooling, nearest_others, searchable
from gpl_cli.errors import GplError
from gpl_cli.store.formats import read_embeddings, read_metadata

DEFAULT_K = 5


@dataclass
class Mislabel:
    rank: int
    score: float  # share of its k nearest other images whose label is not its own
    path: str
    row: int
    label: str  # the label it carries
    proposed: str  # the most common label among its k nearest other images
    neighbors: list[Neighbor]  # its k nearest other images, nearest first


@dataclass
class Mislabels:
    file: str
    key: str
    k: int
    labels: list[str]  # every row's label (the neighbours' labels are shown too)
    source: str  # where the labels came from, in words
    items: list[Mislabel]


def vote(labels: np.ndarray, neighbors: np.ndarray, scores: np.ndarray) -> list[tuple[int, float, int]]:
    """(row, share of neighbours with another label, proposed label code) for each listed row, most
    suspicious first. `labels`: a code per row; `neighbors`/`scores`: each row's k nearest others.

    The proposed label is the most common among the neighbours; a tie goes to the label whose neighbours
    are the more similar in sum, then to the lower code."""
    k = neighbors.shape[1]
    listed = []
    for row, (found, sims) in enumerate(zip(neighbors.tolist(), scores.tolist())):
        own = int(labels[row])
        tally: dict[int, list[float]] = {}
        for i, s in zip(found, sims):
            tally.setdefault(int(labels[i]), []).append(s)
        proposed = min(tally, key=lambda c: (-len(tally[c]), -sum(tally[c]), c))
        share = 1 - len(tally.get(own, ())) / k
        if share > 0.5 and proposed != own:
            listed.append((row, share, proposed, float(np.mean(tally[proposed]))))
    listed.sort(key=lambda t: (-t[1], -t[3], t[0]))  # the more similar the proposed label's images, the likelier
    return [(row, share, proposed) for row, share, proposed, _ in listed]


def find_mislabels(path: str, k: int = DEFAULT_K, key: str | None = None, labels_csv: str | None = None,
                   backend: str = "auto", on_note: Callable[[str], None] = lambda text: None) -> Mislabels:
    """The images of a labelled file whose k nearest others mostly carry another label (see `vote`)."""
    key = choose_pooling(read_metadata(path), key, path)
    emb = read_embeddings(path, keys=[key])
    labels = image_labels(emb.paths, labels_csv, emb.metadata.get("root"), on_note)
    if labels is None:
        raise GplError(f"{path}: its images carry no labels: give --labels FILE.csv (path,label rows), or embed "
                       "a folder with one subfolder per class")
    names, codes, sizes = np.unique(np.asarray(labels, dtype=str), return_inverse=True, return_counts=True)
    if len(names) < 2:
        raise GplError(f"{path}: every image carries the label {str(names[0])!r}: there is no other label to find")
    scores, rows = nearest_others(searchable(emb, key, path), k, backend=backend)
    # an image with fewer than k/2 others of its label always has mostly other labels among its k nearest
    small = [(str(n), int(s)) for n, s in zip(names, sizes) if 2 * (s - 1) < k]
    if small:
        on_note(f"warning: with -k {k}, {len(small)} labels have too few images to be the majority of an image's "
                f"{k} nearest (e.g. {small[0][0]}: {small[0][1]} images), so their images may be listed for that "
                "alone; a smaller -k avoids it")
    items = [
        Mislabel(rank + 1, share, emb.paths[r], r, labels[r], str(names[proposed]),
                 [Neighbor(j + 1, float(s), emb.paths[i], int(i)) for j, (s, i) in enumerate(zip(scores[r], rows[r]))])
        for rank, (r, share, proposed) in enumerate(vote(codes, rows, scores))
    ]
    source = f"--labels {labels_csv}" if labels_csv else "the class folders"
    return Mislabels(path, key, k, labels, source, items)
