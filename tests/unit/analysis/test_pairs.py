"""similar_pairs: the exact path against a float64 numpy all-pairs reference, the approximate IVF path's recall
of planted copies, and how `index="auto"` chooses."""

from __future__ import annotations

import numpy as np
import pytest

from gpl_cli.analysis.duplicates import pairs as pm
from gpl_cli.errors import GplError

TOL = 1e-5  # float32 search against the float64 reference: pairs this close to the threshold may go either way


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


def pair_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of a with the same row of b."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.einsum("ij,ij->i", a, b) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def with_copies(n: int, dim: int, copies: int, seed: int) -> tuple[np.ndarray, set]:
    """Random rows of random lengths, `copies` of them replaced by a noisy copy of another row (cosine 0.92-0.99)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    dst = rng.choice(n, copies, replace=False)
    src = rng.choice(np.setdiff1d(np.arange(n), dst), copies)
    for s, d in zip(src, dst):
        u = x[s] / np.linalg.norm(x[s])
        w = rng.standard_normal(dim)
        w -= w @ u * u
        c = rng.uniform(0.92, 0.99)
        x[d] = c * u + np.sqrt(1 - c * c) * w / np.linalg.norm(w)
    x *= rng.uniform(0.5, 5.0, (n, 1)).astype(np.float32)
    return x, {(min(s, d), max(s, d)) for s, d in zip(src, dst)}


def as_set(p: pm.Pairs) -> set:
    return set(zip(p.a.tolist(), p.b.tolist()))


def reference(sims: np.ndarray, threshold: float, within: bool) -> tuple[set, set]:
    """(pairs surely at or above the threshold, pairs that may be), from the float64 cosines."""
    ii, jj = np.nonzero(sims >= threshold - TOL)
    keep = ii < jj if within else np.ones(len(ii), bool)
    maybe = set(zip(ii[keep].tolist(), jj[keep].tolist()))
    return {(i, j) for i, j in maybe if sims[i, j] >= threshold + TOL}, maybe


@pytest.mark.parametrize("block_rows", [7, 64, None])
def test_exact_within_one_set_equals_numpy_in_any_block_size(block_rows):
    x, _ = with_copies(157, 12, 20, seed=1)  # 157 rows: no block size above divides it
    sims = cosines(x, x)
    for threshold in (0.3, 0.9):
        found = pm.similar_pairs(x, threshold, block_rows=block_rows, index="exact")
        sure, maybe = reference(sims, threshold, within=True)
        assert sure <= as_set(found) <= maybe
        assert all(a < b for a, b in as_set(found))
        np.testing.assert_allclose(found.score, sims[found.a, found.b], atol=TOL)
        assert list(zip(found.a, found.b)) == sorted(zip(found.a, found.b))


def test_exact_across_two_sets_pairs_every_row_of_one_with_every_row_of_the_other():
    x, _ = with_copies(40, 12, 0, seed=2)
    y = np.concatenate([x[::3] * 2 + 0.01, np.random.default_rng(3).standard_normal((30, 12))]).astype(np.float32)
    sims = cosines(x, y)
    found = pm.similar_pairs(x, 0.5, other=y, block_rows=9, index="exact")
    sure, maybe = reference(sims, 0.5, within=False)
    assert sure <= as_set(found) <= maybe
    assert {(3 * i, i) for i in range(14)} <= as_set(found)  # each scaled copy finds its original, whatever the block
    np.testing.assert_allclose(found.score, sims[found.a, found.b], atol=TOL)


def test_threshold_edges_a_pair_at_the_threshold_counts_and_no_row_pairs_with_itself():
    x = np.array([[3, 4], [5, 0], [0, 2], [-1, 0]], np.float32)  # cos(row 0, row 1) = 0.6
    at = pm.similar_pairs(x, 0.6, index="exact")
    assert as_set(at) == {(0, 1), (0, 2)}  # cos(row 0, row 2) = 0.8
    above = pm.similar_pairs(x, float(np.nextafter(np.float32(0.6), np.float32(1))), index="exact")
    assert as_set(above) == {(0, 2)}
    everything = pm.similar_pairs(x, -1.0, index="exact")
    assert as_set(everything) == {(i, j) for i in range(4) for j in range(i + 1, 4)}
    assert pm.similar_pairs(x, 1.0, index="exact").score.size == 0
    empty = pm.similar_pairs(np.zeros((0, 2), np.float32), 0.5, index="exact")
    assert len(empty) == 0 and empty.a.dtype == np.int64


def test_ivf_finds_the_planted_copies_and_scores_them_like_exact_search():
    pytest.importorskip("faiss", reason="FAISS is optional (pip install faiss-cpu)")
    x, planted = with_copies(12_000, 64, 300, seed=4)
    exact = pm.similar_pairs(x, 0.9, index="exact")
    found = pm.similar_pairs(x, 0.9, index="ivf")
    assert planted <= as_set(exact)
    assert len(planted & as_set(found)) >= 0.95 * len(planted)
    assert as_set(found) <= as_set(exact)  # approximate: it may miss a pair, never invents one
    assert all(a < b for a, b in as_set(found))
    np.testing.assert_allclose(found.score, pair_cosines(x[found.a], x[found.b]), atol=TOL)
    assert found.score.min() >= 0.9


def test_ivf_across_two_sets_finds_the_copies_that_cross():
    pytest.importorskip("faiss", reason="FAISS is optional (pip install faiss-cpu)")
    x, planted = with_copies(6_000, 32, 200, seed=5)
    rows = np.array(sorted(planted))
    a, b = x[rows[:, 0]], x[rows[:, 1]]
    y = np.concatenate([x[:3000], b])
    found = pm.similar_pairs(a, 0.9, other=y, index="ivf")
    crossing = {(i, 3000 + i) for i in range(len(rows))}
    assert len(crossing & as_set(found)) >= 0.95 * len(crossing)
    np.testing.assert_allclose(found.score, pair_cosines(a[found.a], y[found.b]), atol=TOL)


def test_auto_is_exact_up_to_the_practical_size_then_ivf(monkeypatch):
    x, _ = with_copies(300, 16, 10, seed=6)
    used = []
    monkeypatch.setattr(pm, "_ivf_pairs", lambda *a: used.append("ivf") or pm._sorted_pairs([], [], []))
    monkeypatch.setattr(pm, "_exact_pairs", lambda *a, real=pm._exact_pairs: used.append("exact") or real(*a))
    pm.similar_pairs(x, 0.9)
    monkeypatch.setattr(pm, "EXACT_MAX_WORK", 300 * 300 * 16 - 1)
    pm.similar_pairs(x, 0.9)
    pm.similar_pairs(x[:299], 0.9)
    monkeypatch.setattr(pm, "_faiss", lambda: None)  # without FAISS auto stays exact, however large
    pm.similar_pairs(x, 0.9)
    assert used == ["exact", "ivf", "exact", "exact"]


def test_ivf_without_faiss_and_an_unknown_index_are_clear_errors(monkeypatch):
    x, _ = with_copies(50, 4, 0, seed=7)
    with pytest.raises(GplError, match="unknown index 'hnsw'; valid: auto, exact, ivf"):
        pm.similar_pairs(x, 0.9, index="hnsw")
    monkeypatch.setattr(pm, "_faiss", lambda: None)
    with pytest.raises(GplError, match="pip install faiss-cpu"):
        pm.similar_pairs(x, 0.9, index="ivf")
