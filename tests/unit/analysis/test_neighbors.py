"""gpl neighbors: the maths against an independent numpy brute force, and the command on real photos."""

from __future__ import annotations

import json
import shutil
from collections import deque

import h5py
import numpy as np
import pytest
from conftest import REPO, SAMPLE_IMAGES, embed_to, run_gpl

from gpl_cli.analysis import neighbors as nb
from gpl_cli.analysis.duplicates import groups as dg
from gpl_cli.analysis.duplicates.model import Threshold
from gpl_cli.errors import GplError

LABELED = REPO.parent / "shared" / "data" / "labeled_photos"


# --- independent references -------------------------------------------------------------


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb_ = np.linalg.norm(b, axis=1, keepdims=True)
    return (a / np.where(na == 0, 1, na)) @ (b / np.where(nb_ == 0, 1, nb_)).T


def brute_top_k(index, queries, k):
    sims = cosine_matrix(queries, index)
    rows = np.array([np.lexsort((np.arange(len(index)), -s))[:k] for s in sims])
    return np.take_along_axis(sims, rows, axis=1), rows


def brute_groups(vectors, threshold):
    sims = cosine_matrix(vectors, vectors)
    n = len(vectors)
    linked = (sims >= threshold) & ~np.eye(n, dtype=bool)
    seen, groups = set(), []
    for start in range(n):
        if start in seen or not linked[start].any():
            continue
        queue, members = deque([start]), []
        seen.add(start)
        while queue:
            i = queue.popleft()
            members.append(i)
            for j in np.flatnonzero(linked[i]):
                if j not in seen:
                    seen.add(j)
                    queue.append(int(j))
        best = {i: sims[i][linked[i]].max() for i in members}
        groups.append(sorted((i, best[i]) for i in members))
    return sorted(groups, key=lambda g: g[0][0])


def random_vectors(n, d, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32)


# --- the maths ----------------------------------------------------------------------------


def test_top_k_blockwise_equals_brute_force(monkeypatch):
    index = random_vectors(503, 17, 0)
    index[10] = index[3]  # an exact tie: the lower row comes first
    index[40] = 0.0  # a zero row scores 0 against everything
    queries = np.concatenate([random_vectors(6, 17, 1), index[3:4]])
    monkeypatch.setattr(nb, "BLOCK_FLOATS", 7 * 50)  # 50-row blocks: the running top-k is merged 11 times
    scores, rows = nb.top_k(index, queries, 9, backend="numpy")
    want_scores, want_rows = brute_top_k(index, queries, 9)
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert rows[-1][:2].tolist() == [3, 10]
    assert nb.top_k(index, index[40:41], 3, backend="numpy")[0].tolist() == [[0.0, 0.0, 0.0]]


def test_top_k_caps_k_at_the_number_of_rows():
    index = random_vectors(4, 5, 2)
    scores, rows = nb.top_k(index, index[:2], 10, backend="numpy")
    assert rows.shape == (2, 4) and sorted(rows[0].tolist()) == [0, 1, 2, 3]


def test_faiss_backend_finds_the_same_neighbors(monkeypatch):
    pytest.importorskip("faiss", reason="FAISS is optional (pip install faiss-cpu)")
    index = random_vectors(2000, 32, 3)
    queries = random_vectors(5, 32, 4)
    want_scores, want_rows = brute_top_k(index, queries, 7)
    scores, rows = nb.top_k(index, queries, 7, backend="faiss")
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    used = []
    monkeypatch.setattr(nb, "_top_k_faiss", lambda *a: used.append(True) or (scores, rows))
    monkeypatch.setattr(nb, "FAISS_MIN_PAIRS", 2000 * 5)
    nb.top_k(index, queries, 7)  # auto: a large enough search, FAISS installed
    nb.top_k(index[:1999], queries, 7)  # auto: too small, numpy
    assert used == [True]


def test_duplicate_groups_are_the_connected_components_of_close_pairs():
    rng = np.random.default_rng(5)
    x = random_vectors(300, 16, 6)
    x[50] = x[7] + 0.01 * rng.standard_normal(16)  # a pair
    x[120] = x[7] + 0.01 * rng.standard_normal(16)  # ... and a third member
    x[299] = x[200] * 3.0  # same direction, another length: cosine 1
    x[201] = x[100] + 0.3 * rng.standard_normal(16)  # a looser pair, found at a lower threshold only
    for threshold in (0.99, 0.9):
        got = dg.duplicate_groups(x, threshold, block_rows=37)  # blocks that do not divide 300
        want = brute_groups(x, threshold)
        assert [[r for r, _ in g] for g in got] == [[r for r, _ in g] for g in want]
        np.testing.assert_allclose([s for g in got for _, s in g], [s for g in want for _, s in g], atol=1e-5)
    assert [[r for r, _ in g] for g in dg.duplicate_groups(x, 0.99)] == [[7, 50, 120], [200, 299]]


# --- the command on real photos -------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory, lite0):
    """sample_images plus two near-copies (half size; JPEG quality 30), embedded with avg and max."""
    from PIL import Image

    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.output import Output

    root = tmp_path_factory.mktemp("nn")
    photos = root / "photos"
    shutil.copytree(SAMPLE_IMAGES, photos, ignore=shutil.ignore_patterns("*.md"))
    (photos / "copies").mkdir()
    panda = Image.open(photos / "panda.jpg")
    panda.resize((panda.width // 2, panda.height // 2)).save(photos / "copies" / "panda_small.jpg", quality=90)
    Image.open(photos / "sheep.jpg").save(photos / "copies" / "sheep_q30.jpg", quality=30)
    out = root / "photos.h5"
    embed_to(EmbedConfig(pools=("avg", "max")), collect_inputs([str(photos)]), Output.resolve(str(out)),
              RunOptions(), backbone=lite0)
    with h5py.File(out) as f:  # read back without gpl's reader
        paths = [p.decode() for p in f["paths"][...]]
        vectors = {k: f["embeddings"][k][...] for k in ("avg", "max")}
    return root, out, paths, vectors


def test_a_photo_finds_itself_first_and_scores_match_numpy(photo_file):
    root, out, paths, vectors = photo_file
    proc = run_gpl("neighbors", str(out), "cat_chelsea.png", "photos/panda.jpg", "-k", "17", "-p", "max", "--json", cwd=root)
    assert proc.returncode == 0, proc.stderr.decode()
    results = json.loads(proc.stdout)
    sims = cosine_matrix(vectors["max"], vectors["max"])
    for result, name in zip(results, ["cat_chelsea.png", "panda.jpg"]):
        assert result["source"] == "file"
        found = result["neighbors"]
        assert found[0]["path"] == name and abs(found[0]["score"] - 1.0) < 1e-5
        assert [n["rank"] for n in found] == list(range(1, 18))
        row = paths.index(name)
        want = np.sort(sims[row])[::-1]
        np.testing.assert_allclose([n["score"] for n in found], want, atol=1e-5)
        assert [paths.index(n["path"]) for n in found][1:] == [int(i) for i in np.argsort(-sims[row], kind="stable")][1:]


def test_text_output_is_rank_score_path(photo_file):
    root, out, paths, vectors = photo_file
    proc = run_gpl("neighbors", str(out), "sheep.jpg", "-k", "3", cwd=root)
    assert proc.returncode == 0 and proc.stderr == b""
    lines = proc.stdout.decode().splitlines()
    sims = cosine_matrix(vectors["avg"], vectors["avg"])[paths.index("sheep.jpg")]
    order = np.argsort(-sims, kind="stable")[:3]
    assert lines == [f"{r}\t{sims[i]:.4f}\t{paths[i]}" for r, i in enumerate(order, 1)]
    assert lines[0] == "1\t1.0000\tsheep.jpg" and lines[1].endswith("\tcopies/sheep_q30.jpg")


def test_images_outside_the_file_are_embedded_like_its_rows(photo_file):
    """Each labeled_photos image is a 320 px version of a sample photo: that photo must come first, far ahead."""
    root, out, paths, vectors = photo_file
    if not LABELED.is_dir():
        pytest.skip(reason=f"{LABELED} is not there (the shared photo set beside the repository)")
    pairs = {
        LABELED / "animal" / "giraffe.webp": "giraffe.jpg",
        LABELED / "animal" / "panda.webp": "panda.jpg",
        LABELED / "animal" / "sheep.webp": "sheep.jpg",
        LABELED / "monument" / "wonders_machu_picchu.webp": "machu_picchu.webp",
    }
    outside = root / "elsewhere"
    outside.mkdir(exist_ok=True)
    shutil.copy(SAMPLE_IMAGES / "coffee.png", outside / "my coffee.png")  # the very same file, another place
    queries = [str(p) for p in pairs] + [str(outside / "my coffee.png")]
    proc = run_gpl("neighbors", str(out), *queries, "-k", "4", "--json", cwd=root)
    assert proc.returncode == 0, proc.stderr.decode()
    results = json.loads(proc.stdout)
    assert [r["source"] for r in results] == ["embedded"] * 5
    copies = {"panda.jpg": "copies/panda_small.jpg", "sheep.jpg": "copies/sheep_q30.jpg"}
    for result, want in zip(results, [*pairs.values(), "coffee.png"]):
        same = {want, copies[want]} if want in copies else {want}
        found = result["neighbors"]
        assert {n["path"] for n in found[: len(same)]} == same, result
        # measured: 0.92-0.99 for the same photo, at most 0.38 for any other
        assert found[len(same) - 1]["score"] - found[len(same)]["score"] > 0.3, result
    coffee = results[-1]["neighbors"][0]
    assert coffee["path"] == "coffee.png" and coffee["score"] > 0.9999  # embedded exactly as the file's row was


def test_duplicates_are_the_two_planted_copies(photo_file):
    root, out, paths, vectors = photo_file
    proc = run_gpl("neighbors", str(out), "--duplicates", "--threshold", "0.95", "--json", cwd=root)
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(proc.stdout)
    assert doc["threshold"] == {"value": 0.95, "source": "--threshold"}
    groups = doc["groups"]
    assert [sorted(m["path"] for m in g["members"]) for g in groups] == [
        ["copies/panda_small.jpg", "panda.jpg"], ["copies/sheep_q30.jpg", "sheep.jpg"],
    ]
    want = brute_groups(vectors["avg"], 0.95)
    assert [[paths[r] for r, _ in g] for g in want] == [[m["path"] for m in g["members"]] for g in groups]
    np.testing.assert_allclose([m["score"] for g in groups for m in g["members"]],
                               [s for g in want for _, s in g], atol=1e-5)


def test_bad_queries_and_options_are_clear_errors(photo_file, lite0):
    root, out, paths, vectors = photo_file
    with pytest.raises(GplError, match="not a path in .* and no such image file"):
        nb.nearest(str(out), ["nope.jpg"])
    with pytest.raises(GplError, match="no pooling 'gem'.*avg, max"):
        nb.nearest(str(out), ["sheep.jpg"], key="gem")
    with pytest.raises(GplError, match="between -1 and 1"):
        dg.find_duplicates(str(out), Threshold(1.5, "--threshold"))
    broken = root / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(GplError, match="query image .*broken.jpg: not a readable image"):
        nb.nearest(str(out), [str(broken)], backbone=lite0)
    meta = nb.read_metadata(str(out))
    with pytest.raises(GplError, match="not the ones the file was made with"):
        nb.embed_like([str(SAMPLE_IMAGES / "coffee.png")], dict(meta, weights_sha256="0" * 64), "avg", backbone=lite0)
    unknown = dict(meta, config=dict(meta["config"], pools=["fancy"]))
    with pytest.raises(GplError, match="unknown pooling 'fancy'"):
        nb.embed_like([str(SAMPLE_IMAGES / "coffee.png")], unknown, "avg", backbone=lite0)


def test_non_finite_rows_are_refused_and_a_zero_query_is_flagged(photo_file, tmp_path):
    root, out, paths, vectors = photo_file
    damaged = tmp_path / "nan.h5"
    shutil.copy(out, damaged)
    with h5py.File(damaged, "r+") as f:
        f["embeddings/avg"][3] = np.nan
        f["embeddings/max"][2] = 0.0
    with pytest.raises(GplError, match=f"1 row.* of avg are not finite .*{paths[3]}"):
        nb.nearest(str(damaged), [paths[0]])
    with pytest.raises(GplError, match="not finite"):
        dg.find_duplicates(str(damaged))
    (result,) = nb.nearest(str(damaged), [paths[2]], k=3, key="max")
    assert result.zero and [n.score for n in result.neighbors] == [0.0, 0.0, 0.0]
    assert [n.row for n in result.neighbors] == [0, 1, 2]  # every score 0: file order, as documented
    proc = run_gpl("neighbors", str(damaged), paths[2], "-p", "max", "-k", "2")
    assert proc.returncode == 0 and b"all-zero vector" in proc.stderr
