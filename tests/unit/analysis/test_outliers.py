"""gpl neighbors --outliers: scores against a brute-force numpy computation, and the command's output and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_gpl

from gpl_cli.analysis import neighbors as nb
from gpl_cli.analysis.outliers import find_outliers
from gpl_cli.errors import GplError
from gpl_cli.store.formats.h5 import H5Writer


def brute_kth_similarity(x: np.ndarray, k: int) -> np.ndarray:
    """Each row's cosine to its k-th most similar other row, from the full matrix in float64."""
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    return -np.sort(-sims, axis=1)[:, k - 1]


def kth_similarity(x: np.ndarray, k: int, backend: str) -> np.ndarray:
    """Each row's outlier score as `find_outliers` takes it: the similarity to its k-th nearest other row."""
    return nb.nearest_others(x, k, backend=backend)[0][:, k - 1]


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Rows around a few centres, plus a handful of lone rows far from them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, d)) * 3
    x = centres[rng.integers(0, 4, n)] + rng.standard_normal((n, d))
    return x.astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_scores_equal_brute_force_in_small_blocks(monkeypatch, k):
    x = clustered(301, 24, k)
    x[7] = x[200]  # an exact duplicate pair: each is the other's nearest, at similarity 1
    monkeypatch.setattr(nb, "BLOCK_FLOATS", 40 * 24)  # many blocks for the blockwise top-k
    np.testing.assert_allclose(kth_similarity(x, k, "numpy"), brute_kth_similarity(x, k), atol=2e-6)


def test_faiss_gives_the_same_scores():
    pytest.importorskip("faiss")
    x = clustered(200, 16, 5)
    np.testing.assert_allclose(kth_similarity(x, 4, "faiss"), kth_similarity(x, 4, "numpy"), atol=2e-6)


def test_nearest_others_never_returns_the_row_itself():
    x = np.repeat(clustered(20, 8, 1), 3, axis=0)  # every row has two exact copies: ties with itself
    rows = np.array([0, 5, 59])
    scores, found = nb.nearest_others(x, 4, rows, backend="numpy")
    assert not (found == rows[:, None]).any()
    np.testing.assert_allclose(scores[:, :2], 1.0, atol=1e-6)  # its two copies first
    with pytest.raises(GplError, match="at least 61 images"):
        nb.nearest_others(x, 60)


def write_file(path, vectors: np.ndarray, names: list[str]) -> str:
    writer = H5Writer(str(path), {"avg": vectors.shape[1]})
    writer.write(names, {"avg": vectors})
    writer.close({"pool_keys": ["avg"], "backbone": "test"})
    return str(path)


@pytest.fixture(scope="module")
def outlier_file(tmp_path_factory):
    x = clustered(60, 12, 2)
    rng = np.random.default_rng(9)
    x[[11, 42]] = rng.standard_normal((2, 12)).astype(np.float32) * 0.3  # far from every centre
    names = [f"img{i:02d}.jpg" for i in range(len(x))]
    return write_file(tmp_path_factory.mktemp("out") / "emb.h5", x, names), x, names


def test_find_outliers_ranks_lowest_scores_first(outlier_file):
    path, x, names = outlier_file
    want = brute_kth_similarity(x, 3)
    order = np.lexsort((np.arange(len(x)), want))[:6]
    found = find_outliers(path, k=3, top=6)
    assert [o.path for o in found] == [names[i] for i in order]
    assert {found[0].row, found[1].row} == {11, 42}
    np.testing.assert_allclose([o.score for o in found], want[order], atol=2e-6)
    for o in found:
        assert len(o.neighbors) == 3 and o.neighbors[-1].score == pytest.approx(o.score)


def test_cli_text_json_and_errors(outlier_file):
    path, x, names = outlier_file
    want = brute_kth_similarity(x, 5)
    order = np.lexsort((np.arange(len(x)), want))
    text = run_gpl("neighbors", path, "--outliers", "--top", "4", check=True).stdout.decode()
    lines = [line.split("\t") for line in text.splitlines()]
    assert [r for r, _, _ in lines] == ["1", "2", "3", "4"]
    assert [p for _, _, p in lines] == [names[i] for i in order[:4]]  # default k = 5
    np.testing.assert_allclose([float(s) for _, s, _ in lines], want[order[:4]], atol=1e-4)
    doc = json.loads(run_gpl("neighbors", path, "--outliers", "-k", "2", "--json", check=True).stdout)
    assert len(doc) == 20 and [len(o["neighbors"]) for o in doc] == [2] * 20  # default --top 20
    assert doc[0]["score"] == pytest.approx(float(brute_kth_similarity(x, 2).min()), abs=2e-6)
    for args, message in [
        (("--outliers", "img00.jpg"), "give no QUERY"),
        (("--outliers", "--duplicates"), "alternatives"),
        (("--top", "3", "img00.jpg"), "--top applies to --outliers only"),
        (("--outliers", "--threshold", "0.9"), "--threshold applies to --duplicates only"),
        (("--outliers", "-k", "60"), "at least 61 images"),
    ]:
        proc = run_gpl("neighbors", path, *args)
        assert proc.returncode == 2 and message in proc.stderr.decode(), (args, proc.stderr)
        assert b"Traceback" not in proc.stderr
