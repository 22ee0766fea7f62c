"""gpl neighbors --clusters and --mislabels: clusters against scipy's connected components on the full similarity
matrix, likely mislabels against a hand-made labelled set whose answer is worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_gpl

from gpl_cli.analysis.duplicates.clusters import LOOSER, cluster_threshold, components, find_clusters
from gpl_cli.analysis.duplicates.mislabels import find_mislabels, vote
from gpl_cli.analysis.duplicates.model import Threshold
from gpl_cli.analysis.duplicates.pairs import similar_pairs
from gpl_cli.errors import GplError
from gpl_cli.store.formats.h5 import H5Writer


def write_h5(path, names: list[str], vectors: np.ndarray, root=None) -> str:
    writer = H5Writer(str(path), {"avg": vectors.shape[1]})
    writer.write(names, {"avg": vectors.astype(np.float32)})
    writer.close({"pool_keys": ["avg"], "backbone": "test", **({"root": str(root)} if root else {})})
    return str(path)


def chained(seed: int, n: int = 240, d: int = 16) -> np.ndarray:
    """Rows in tight bunches and chains (A~B, B~C with A and C further apart), and lone rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    for start in range(0, 120, 12):  # bunches of 4 near one random row, chains of 4 steps
        x[start + 1 : start + 4] = x[start] + 0.25 * rng.standard_normal((3, d))
        for step in range(4, 8):
            x[start + step] = x[start + step - 1] + 0.45 * rng.standard_normal(d)
    return x.astype(np.float32)


@pytest.mark.parametrize("seed,threshold", [(0, 0.8), (1, 0.7), (2, 0.9)])
def test_clusters_are_the_connected_components_of_the_similarity_graph(seed, threshold):
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    x = chained(seed)
    paths = [f"img{i:03d}.jpg" for i in range(len(x))]
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    linked = sims >= threshold
    _, label = connected_components(csr_matrix(linked), directed=False)
    expected = [sorted(np.flatnonzero(label == c).tolist()) for c in np.unique(label) if (label == c).sum() > 1]
    expected.sort(key=lambda rows: (-len(rows), rows[0]))  # largest first, then by first row

    groups = components(paths, similar_pairs(x, threshold))
    assert [[m.row for m in g.members] for g in groups] == expected and len(expected) > 3
    for g in groups:
        rows = [m.row for m in g.members]
        assert [m.path for m in g.members] == [paths[r] for r in rows]
        inside = sims[np.ix_(rows, rows)]
        np.testing.assert_allclose([m.score for m in g.members], inside.max(axis=1), atol=1e-5)
        want = {(rows[i], rows[j]) for i, j in zip(*np.nonzero(np.triu(inside >= threshold, 1)))}
        assert {(rows[a], rows[b]) for a, b, _ in g.pairs} == want
        for a, b, s in g.pairs:
            assert s == pytest.approx(sims[rows[a], rows[b]], abs=1e-5)


def test_the_default_cluster_threshold_is_looser_than_the_duplicate_one():
    t = cluster_threshold(None, Threshold(0.95, "default (not calibrated)"))
    assert t.value == pytest.approx(0.95 - LOOSER) and "0.950" in t.source and "default (not calibrated)" in t.source
    assert cluster_threshold(0.7, Threshold(0.95, "x")) == Threshold(0.7, "--cluster-threshold")


def test_find_clusters_names_the_images_and_refuses_a_threshold_out_of_range(tmp_path):
    x = chained(3)
    names = [f"d/{i}.jpg" for i in range(len(x))]
    emb = write_h5(tmp_path / "e.h5", names, x)
    found = find_clusters(emb, 0.8)
    assert found.key == "avg" and found.groups and found.threshold == Threshold(0.8, "--cluster-threshold")
    assert [[m.path for m in g.members] for g in found.groups] == [
        [names[m.row] for m in g.members] for g in components(names, similar_pairs(x, 0.8))]
    with pytest.raises(GplError, match="between -1 and 1"):
        find_clusters(emb, 1.5)
    assert find_clusters(emb).threshold.value == pytest.approx(0.95 - LOOSER)  # no calibration beside the file


# --- mislabels ---------------------------------------------------------------------------------------

# Two classes on a circle: cats around 0 degrees, dogs around 180. "cat/odd" sits among the dogs: all of its 3
# nearest are dogs, so it is listed with "dog" proposed and score 1. "dog/edge" sits between the classes, nearer
# the cats: its 3 nearest are cat/c3 (68 degrees away), dog/d3 (72) and cat/c1 (78), so 2 of 3 carry another label
# and "cat" is proposed. Every other image has at least 2 of its 3 nearest in its own class.
ANGLES = {"cat/c0": 0, "cat/c1": 10, "cat/c2": -10, "cat/c3": 20, "cat/c4": -20,
          "dog/d0": 180, "dog/d1": 170, "dog/d2": 190, "dog/d3": 160, "dog/d4": 200,
          "cat/odd": 183, "dog/edge": 88}


def circle(names: list[str]) -> np.ndarray:
    radians = np.deg2rad([ANGLES[n] for n in names])
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def test_mislabels_on_a_hand_made_labelled_set(tmp_path):
    names = list(ANGLES)
    emb = write_h5(tmp_path / "e.h5", names, circle(names))
    notes = []
    found = find_mislabels(emb, k=3, on_note=notes.append)
    assert [(m.path, m.label, m.proposed, round(m.score, 4)) for m in found.items] == [
        ("cat/odd", "cat", "dog", 1.0), ("dog/edge", "dog", "cat", 0.6667)]
    assert [m.rank for m in found.items] == [1, 2] and found.source == "the class folders" and notes == []
    odd = found.items[0]
    assert [n.path for n in odd.neighbors] == ["dog/d0", "dog/d2", "dog/d1"]  # 3, 7 and 13 degrees away
    assert [found.labels[n.row] for n in odd.neighbors] == ["dog"] * 3


def test_labels_from_a_csv_take_the_place_of_the_folders(tmp_path):
    names = list(ANGLES)
    emb = write_h5(tmp_path / "e.h5", names, circle(names))
    # the CSV relabels cat/odd as a dog: then it is right, and nothing else changes
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(
        f"{n},{'dog' if n == 'cat/odd' else n.split('/')[0]}\n" for n in names))
    found = find_mislabels(emb, k=3, labels_csv=str(tmp_path / "labels.csv"))
    assert [m.path for m in found.items] == ["dog/edge"] and found.source.startswith("--labels ")


def test_a_tie_goes_to_the_more_similar_label_and_a_half_is_not_mostly():
    labels = np.array([0, 1, 2, 1, 2])
    # row 0's neighbours: two of label 1 and two of label 2, label 2's the more similar: proposed 2, share 1
    # row 1's neighbours: its own label twice of four: a half is not a majority, not listed
    neighbors = np.array([[1, 2, 3, 4], [3, 0, 3, 2], [4, 4, 4, 4], [1, 1, 1, 1], [2, 2, 2, 2]])
    scores = np.array([[0.5, 0.9, 0.5, 0.9], [0.9, 0.8, 0.7, 0.6], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    assert vote(labels, neighbors, scores) == [(0, 1.0, 2)]


def test_mislabels_refusals_and_the_small_class_warning(tmp_path):
    names = list(ANGLES)
    vectors = circle(names)
    loose = write_h5(tmp_path / "loose.h5", [n.replace("/", "_") for n in names], vectors)
    with pytest.raises(GplError, match="no labels.*--labels"):
        find_mislabels(loose, k=3)
    one = write_h5(tmp_path / "one.h5", [f"cat/{i}" for i in range(len(names))], vectors)
    with pytest.raises(GplError, match="every image carries the label 'cat'"):
        find_mislabels(one, k=3)
    notes = []
    find_mislabels(write_h5(tmp_path / "e.h5", names, vectors), k=11, on_note=notes.append)
    assert len(notes) == 1 and "-k 11" in notes[0] and "2 labels" in notes[0]  # 6 images each: at most 5 alike


def test_the_commands_print_clusters_and_mislabels(tmp_path):
    names = list(ANGLES)
    emb = write_h5(tmp_path / "e.h5", names, circle(names))
    out = run_gpl("neighbors", emb, "--mislabels", "-k", "3", check=True).stdout.decode()
    assert out.splitlines() == ["1\t1.0000\tcat/odd\tcat\tdog", "2\t0.6667\tdog/edge\tdog\tcat"]
    doc = json.loads(run_gpl("neighbors", emb, "--mislabels", "-k", "3", "--json", check=True).stdout)
    assert doc[0]["path"] == "cat/odd" and doc[0]["proposed"] == "dog"
    assert [(n["path"], n["label"]) for n in doc[0]["neighbors"]] == [("dog/d0", "dog"), ("dog/d2", "dog"), ("dog/d1", "dog")]
    # 10 degrees apart: cosine 0.985; 20 degrees: 0.940
    proc = run_gpl("neighbors", emb, "--clusters", "--cluster-threshold", "0.98", check=True)
    lines = [line.split("\t") for line in proc.stdout.decode().splitlines()]
    clusters = {}
    for c, _, path in lines:
        clusters.setdefault(c, []).append(path)
    # neighbours on each side of the circle are 10 degrees apart: two chains, the larger (with cat/odd) first
    assert clusters == {"1": ["dog/d0", "dog/d1", "dog/d2", "dog/d3", "dog/d4", "cat/odd"],
                        "2": ["cat/c0", "cat/c1", "cat/c2", "cat/c3", "cat/c4"]}
    assert b"cluster threshold 0.980" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (("--cluster-threshold", "0.8"), "--cluster-threshold applies to --clusters only"),
    (("--labels", "{csv}"), "--labels applies to --mislabels only"),
    (("--clusters", "--mislabels"), "--duplicates, --outliers, --clusters and --mislabels are alternatives; give one"),
    (("--clusters", "--duplicates"), "--duplicates, --outliers, --clusters and --mislabels are alternatives; give one"),
    (("--clusters", "-k", "3"), "-k applies to queries, --outliers and --mislabels, not to --clusters"),
    (("--mislabels", "cat/c0"), "--mislabels searches the whole file: give no QUERY with it"),
    (("--mislabels", "--rerank", "aqe"), "--rerank applies to queries only, not to --mislabels"),
])
def test_misuse_is_one_line_and_exit_2(tmp_path, args, message):
    names = list(ANGLES)
    emb = write_h5(tmp_path / "e.h5", names, circle(names))
    (tmp_path / "l.csv").write_text("".join(f"{n},x\n" for n in names))
    proc = run_gpl("neighbors", emb, *(a.format(csv=tmp_path / "l.csv") for a in args))
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode().strip().splitlines() == [f"gpl: error: {message}"]
