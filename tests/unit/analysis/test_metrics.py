"""Metrics against values worked out by hand or by direct numpy formulas written here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gpl_cli.analysis import metrics

# A Golomb ruler: all pairwise differences between marks are distinct, so points on a circle at
# these angles (x 2 degrees, all within 68 degrees) have no ties in cosine similarity.
RULER = np.array([0, 1, 4, 9, 15, 22, 32, 34])
RULER_LABELS = np.array([0, 0, 1, 0, 1, 1, 0, 1])  # A A B A B B A B


def on_circle(marks: np.ndarray, degrees_per_mark: float = 2.0) -> np.ndarray:
    theta = np.deg2rad(marks * degrees_per_mark)
    return np.stack([np.cos(theta), np.sin(theta)], axis=1).astype(np.float32)


def brute_force_ap(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP per query from the definition: rank the others by cosine, average precision at each hit."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    aps = []
    for q in range(len(x)):
        others = [j for j in range(len(x)) if j != q]
        ranked = sorted(others, key=lambda j: -float(unit[q] @ unit[j]))
        hits, precisions = 0, []
        for rank, j in enumerate(ranked, start=1):
            if labels[j] == labels[q]:
                hits += 1
                precisions.append(hits / rank)
        aps.append(np.mean(precisions) if precisions else np.nan)
    return np.array(aps)


def test_unit_rows_in_either_precision():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((40, 33)) * 1e3).astype(np.float32)
    x[5] = 0  # an all-zero row stays zero
    wide, narrow = metrics.unit_rows(x), metrics.unit_rows(x, norm_dtype=np.float32)
    assert wide.dtype == narrow.dtype == np.float32
    # float64 norms and one rounding to float32 (the metrics): within half a float32 ulp of the exact
    # value; float32 arithmetic throughout (gpl neighbors): within a few.
    x64 = x.astype(np.float64)
    exact = x64 / np.maximum(np.sqrt((x64 * x64).sum(axis=1, keepdims=True)), 1e-12)
    np.testing.assert_allclose(wide, exact, rtol=2.0**-24 * 1.001, atol=0)
    np.testing.assert_allclose(narrow, exact, rtol=2.0**-20, atol=0)
    assert not wide[5].any() and not narrow[5].any()
    np.testing.assert_allclose(np.linalg.norm(np.delete(wide, 5, axis=0), axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="norm_dtype"):
        metrics.unit_rows(x, norm_dtype=np.float16)


def test_perfect_ranking_gives_map_one():
    rng = np.random.default_rng(0)
    centres = np.eye(4, dtype=np.float32)[:3] * 10
    labels = np.repeat([0, 1, 2], 4)
    x = centres[labels] + rng.normal(0, 0.1, (12, 4)).astype(np.float32)
    result = metrics.leave_one_out_pass(x, labels)
    np.testing.assert_allclose(result.ap, 1.0)
    for k in (1, 5):
        assert result.knn_correct[k].all()
    np.testing.assert_allclose(result.precision[1], 1.0)
    # Three other same-class images exist, so precision@5 is 3/5 at best.
    np.testing.assert_allclose(result.precision[5], 3 / 5)


def test_average_precision_of_a_known_ranking():
    # Relevant at ranks 1, 3 and 6: AP = (1/1 + 2/3 + 3/6) / 3.
    expected = (1 + 2 / 3 + 3 / 6) / 3
    got = metrics.average_precision(np.array([[1, 0, 1, 0, 0, 1]], dtype=bool))
    assert got[0] == pytest.approx(expected)
    assert np.isnan(metrics.average_precision(np.zeros((1, 4), dtype=bool))[0])


def test_pass_gives_the_hand_computed_ap_of_a_constructed_ranking():
    # Query at angle 0; the others at increasing angles rank in index order.
    # Relevance of ranks 1..6 for the query (label 0): 1 0 1 0 0 1 -> AP (1 + 2/3 + 3/6) / 3.
    x = on_circle(np.arange(7), degrees_per_mark=10)
    labels = np.array([0, 0, 1, 0, 1, 1, 0])
    result = metrics.leave_one_out_pass(x, labels)
    assert result.ap[0] == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    np.testing.assert_allclose(result.ap, brute_force_ap(x, labels))


def test_knn_accuracy_on_a_constructed_set():
    # Nearest neighbours by mark distance (label of each mark in brackets: A A B A B B A B):
    #   0: 1A | 1A 4B 9A -> A   right for A (k=1 and k=3)
    #   1: 0A | 0A 4B 9A -> A   right, right
    #   4: 1A | 1A 0A 9A -> A   wrong (B), wrong
    #   9: 4B | 4B 15B 1A -> B  wrong (A), wrong
    #  15: 9A | 9A 22B 4B -> B  wrong (B), right
    #  22: 15B | 15B 32A 34B -> B  right, right
    #  32: 34B | 34B 22B 15B -> B  wrong (A), wrong
    #  34: 32A | 32A 22B 15B -> B  wrong (B), right
    expected_k1 = [True, True, False, False, False, True, False, False]
    expected_k3 = [True, True, False, False, True, True, False, True]
    result = metrics.leave_one_out_pass(on_circle(RULER), RULER_LABELS, ks=(1, 3))
    assert result.knn_correct[1].tolist() == expected_k1
    assert result.knn_correct[3].tolist() == expected_k3
    assert result.knn_correct[1].mean() == 3 / 8 and result.knn_correct[3].mean() == 5 / 8
    # precision@1 is the 1-NN hit; precision@3 counts same-label neighbours among the three.
    assert result.precision[1].tolist() == [float(v) for v in expected_k1]
    assert result.precision[3].tolist() == pytest.approx([2 / 3, 2 / 3, 0, 1 / 3, 2 / 3, 2 / 3, 0, 2 / 3])


def test_knn_vote_majority_then_nearest():
    assert metrics.knn_vote(np.array([[1, 0, 0]]), 3).tolist() == [0]  # majority wins over nearest
    assert metrics.knn_vote(np.array([[1, 0]]), 3).tolist() == [1]  # tie: the nearest
    assert metrics.knn_vote(np.array([[0, 1, 1, 0]]), 3).tolist() == [0]  # tie: the class seen first
    assert metrics.knn_vote(np.array([[2, 1, 1, 2, 0]]), 3).tolist() == [2]


def test_chance_ap_matches_enumeration_of_all_rankings():
    # Every placement of R relevant items among M positions is equally likely under a random ranking.
    for m, r in [(5, 1), (5, 2), (6, 3), (7, 7), (2, 1)]:
        aps = []
        for hits in itertools.combinations(range(1, m + 1), r):
            aps.append(np.mean([(i + 1) / rank for i, rank in enumerate(hits)]))
        assert metrics.chance_average_precision(m, r) == pytest.approx(np.mean(aps))


def test_results_do_not_depend_on_the_block_size(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(37, 6)).astype(np.float32)
    labels = rng.integers(0, 4, 37)
    whole = metrics.leave_one_out_pass(x, labels)
    monkeypatch.setattr(metrics, "BLOCK_BYTES", 64 * 37 * 5)  # five query rows per block
    assert metrics.block_rows(37) == 5
    blocked = metrics.leave_one_out_pass(x, labels)
    np.testing.assert_array_equal(whole.ap, blocked.ap)
    np.testing.assert_array_equal(whole.neighbors, blocked.neighbors)
    np.testing.assert_array_equal(whole.pair_sims, blocked.pair_sims)
    np.testing.assert_array_equal(whole.hist_same, blocked.hist_same)
    np.testing.assert_allclose(blocked.ap, brute_force_ap(x, labels))


def test_pairs_neighbors_and_histograms_against_direct_formulas():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 5)).astype(np.float32)
    labels = np.repeat([0, 1, 2, 3], 5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = unit @ unit.T
    result = metrics.leave_one_out_pass(x, labels)
    i, j = np.triu_indices(20, k=1)
    np.testing.assert_allclose(result.pair_sims, cos[i, j], atol=1e-6)
    np.fill_diagonal(cos, -np.inf)
    np.testing.assert_array_equal(result.neighbors, np.argsort(-cos, axis=1)[:, :10])
    same_pairs = 4 * (5 * 4 // 2)
    assert result.hist_same.sum() == same_pairs
    assert result.hist_other.sum() == 20 * 19 // 2 - same_pairs
    # Label-free pass: the same neighbours, all pairs in one histogram.
    free = metrics.leave_one_out_pass(x)
    np.testing.assert_array_equal(free.neighbors, result.neighbors)
    assert free.hist_other.sum() == 20 * 19 // 2 and free.ap is None


def test_singleton_classes_are_not_queries():
    x = on_circle(np.array([0, 1, 5, 6, 20]), 3)
    labels = np.array([0, 0, 1, 1, 2])
    result = metrics.leave_one_out_pass(x, labels)
    assert result.queries.tolist() == [True, True, True, True, False]
    assert np.isnan(result.ap[4]) and np.all(result.ap[:4] == 1.0)


def paired_difference_interval(a: np.ndarray, b: np.ndarray, seed: int, n_resamples: int = 2000):
    """The interval `gpl compare` gives a difference of mAP: paired resamples, then a percentile interval."""
    means = metrics.bootstrap_means(np.stack([a, b]), n_resamples, seed)
    return metrics.percentile_interval(means[0] - means[1])


def test_bootstrap_interval_contains_the_true_difference_and_is_reproducible():
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 0.05, 200)
    b = rng.uniform(0.3, 0.7, 400)
    a = b + 0.1 + np.concatenate([noise, -noise])  # per-query differences average exactly 0.1
    low, high = paired_difference_interval(a, b, seed=7)
    assert low < 0.1 < high
    # Close to the normal-theory interval 0.1 +- 1.96 sd / sqrt(n) of the paired differences.
    half = 1.96 * np.std(a - b) / np.sqrt(len(a))
    assert low == pytest.approx(0.1 - half, abs=0.3 * half)
    assert high == pytest.approx(0.1 + half, abs=0.3 * half)
    assert paired_difference_interval(a, b, seed=7) == (low, high)
    assert paired_difference_interval(a, b, seed=8) != (low, high)
    # No difference: the interval straddles zero.
    c = b + np.concatenate([noise, -noise])
    low0, high0 = paired_difference_interval(c, b, seed=7)
    assert low0 < 0 < high0


def test_bootstrap_means_pairs_the_resamples():
    values = np.array([[1.0, 2.0, 3.0, 10.0], [0.0, 1.0, 2.0, 9.0]])  # second = first - 1 per query
    means = metrics.bootstrap_means(values, n_resamples=50, seed=0)
    np.testing.assert_allclose(means[0] - means[1], 1.0)  # the same queries in each resample
    assert means.shape == (2, 50) and means[0].std() > 0


def test_norm_stats_sparsity_and_mean_cosine():
    rng = np.random.default_rng(4)
    x = np.maximum(rng.normal(size=(50, 8)), 0).astype(np.float32)
    x[3] = 0  # an all-zero row: cosine 0 to everything
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    stats = metrics.norm_stats(x)
    assert stats["mean"] == pytest.approx(norms.mean())
    assert stats["std"] == pytest.approx(norms.std())
    assert (stats["min"], stats["max"]) == pytest.approx((0.0, norms.max()))
    assert metrics.sparsity(x) == pytest.approx(np.mean(x == 0))
    unit = x / np.maximum(norms, 1e-12)[:, None]
    cos = unit @ unit.T
    off_diagonal = cos[~np.eye(50, dtype=bool)]
    assert metrics.mean_pairwise_cosine(x) == pytest.approx(off_diagonal.mean(), rel=1e-6)


def test_effective_rank():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 6)) * np.array([3.0, 2, 1, 1, 0.5, 0.1])
    eig = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    p = eig / eig.sum()
    assert metrics.effective_rank(x.astype(np.float32)) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-5)
    line = np.outer(rng.normal(size=100), [1.0, 2.0, 3.0])
    assert metrics.effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    assert metrics.effective_rank(np.ones((5, 3))) == 0.0


def test_rankdata_and_spearman():
    np.testing.assert_array_equal(metrics.rankdata(np.array([10, 20, 20, 30])), [1, 2.5, 2.5, 4])
    rng = np.random.default_rng(6)
    a = rng.normal(size=500)
    b = a + rng.normal(size=500)
    d = np.argsort(np.argsort(a)) - np.argsort(np.argsort(b))
    expected = 1 - 6 * np.sum(d.astype(float) ** 2) / (500 * (500**2 - 1))  # no ties
    assert metrics.spearman(a, b) == pytest.approx(expected)
    assert metrics.spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert metrics.spearman(a, -a) == pytest.approx(-1.0)


def test_knn_jaccard():
    a = np.array([[1, 2, 3], [4, 5, 6]])
    b = np.array([[3, 2, 9], [7, 8, 9]])
    expected = np.mean([len({1, 2, 3} & {3, 2, 9}) / len({1, 2, 3} | {3, 2, 9}), 0.0])
    assert metrics.knn_jaccard(a, b) == pytest.approx(expected)
    assert metrics.knn_jaccard(a, a) == 1.0


def test_pair_sample_all_or_sampled():
    i, j = metrics.pair_sample(6)
    assert sorted(zip(i.tolist(), j.tolist())) == list(itertools.combinations(range(6), 2))
    i, j = metrics.pair_sample(1000, max_pairs=5000, seed=1)
    assert len(i) == 5000 and np.all(i < j) and np.all(np.diff(i) >= 0) and j.max() < 1000
    again = metrics.pair_sample(1000, max_pairs=5000, seed=1)
    np.testing.assert_array_equal(again[1], j)
