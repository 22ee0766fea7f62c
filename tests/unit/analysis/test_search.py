"""gpl compare --search: the nested cross-validation on synthetic collections whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from gpl_cli.analysis import search
from gpl_cli.errors import GplError

CLASSES, PER_CLASS, DIM = 6, 20, 24


def collection(seed: int = 0) -> tuple[np.ndarray, list[str], np.random.Generator]:
    """Class centres, and each image's class: 6 classes of 20 images."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLASSES, DIM))
    codes = np.repeat(np.arange(CLASSES), PER_CLASS)
    return centres[codes], [f"class{c}" for c in codes], rng


def views(poolings: dict[str, np.ndarray]) -> search.Views:
    return search.Views({("crop", 1.0, key): x.astype(np.float32) for key, x in poolings.items()})


def plain_space(pools: list[str], whiten: bool = False) -> list[search.Pipeline]:
    return search.search_space(pools, ["crop"], [(1.0,)], [], whiten=whiten)


def loo_ap(x: np.ndarray, labels: list[str]) -> np.ndarray:
    """Each image's AP against all the others, from the definition (full cosine matrix)."""
    labels = np.array(labels)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    out = []
    for q in range(len(x)):
        relevant = labels[np.argsort(-sims[q], kind="stable")[:-1]] == labels[q]
        out.append((np.cumsum(relevant)[relevant] / (np.flatnonzero(relevant) + 1)).mean())
    return np.array(out)


def test_stratified_folds_partition_each_class_evenly():
    codes = np.array([0] * 7 + [1] * 5 + [2] * 13)
    folds = search.stratified_folds(codes, 4)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(codes)))
    for c in range(3):
        sizes = [np.count_nonzero(codes[f] == c) for f in folds]
        assert max(sizes) - min(sizes) <= 1
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert [f.tolist() for f in folds] == [f.tolist() for f in search.stratified_folds(codes, 4)]  # fixed seed


def test_a_pooling_of_pure_noise_is_never_chosen_and_no_gain_is_reported():
    signal, labels, rng = collection()
    result = search.nested_search(views({"avg": signal + rng.standard_normal(signal.shape),
                                         "noise": rng.standard_normal(signal.shape)}), plain_space(["avg", "noise"]),
                                  labels, folds=5)
    noise = next(c for c in result.candidates if c.pipeline.pool == "noise")
    assert noise.chosen == 0 and result.winner == search.DEFAULT
    assert result.fold_choices == [search.DEFAULT] * 5
    assert result.gain == 0 and result.gain_ci == (0.0, 0.0)
    assert "the default" in result.verdict() and "noise" not in result.verdict()
    assert noise.cv_map < 0.3 < next(c for c in result.candidates if c.pipeline.pool == "avg").cv_map


def test_the_nested_gain_is_not_the_best_of_many_noisy_tries():
    """Sixteen variants that add a little noise to the default's vectors (so none is truly better), on ten
    collections: the best of their cross-validated mAPs beats the default's every time, by chance alone, which
    is what a search reporting its best try would call a gain; the nested gain is never reported as one."""
    best_of_many, nested = [], []
    for seed in range(10):
        signal, labels, rng = collection(10 + seed)
        base = signal + 1.6 * rng.standard_normal(signal.shape)
        poolings = {"avg": base, **{f"noisy{i}": base + 0.05 * rng.standard_normal(signal.shape) for i in range(16)}}
        result = search.nested_search(views(poolings), plain_space(list(poolings)), labels, folds=5)
        best_of_many.append(max(c.cv_map for c in result.candidates) - result.candidates[0].cv_map)
        nested.append(result.gain)
        assert result.gain_ci[0] <= 0 and " gains +" not in result.verdict(), result.verdict()
    print(f"best of many {np.mean(best_of_many):+.4f}, nested {np.mean(nested):+.4f}")
    assert min(best_of_many) > 0
    assert np.mean(nested) < np.mean(best_of_many) / 3


def test_a_real_improvement_is_found_and_measured_on_held_out_queries():
    signal, labels, rng = collection(2)
    noisy = signal + 1.4 * rng.standard_normal(signal.shape)
    clean = signal + 0.9 * rng.standard_normal(signal.shape)
    result = search.nested_search(views({"avg": noisy, "clean": clean}), plain_space(["avg", "clean"]), labels)
    assert result.fold_choices == [search.Pipeline(pool="clean")] * 5 and result.winner.pool == "clean"
    # chosen in every fold and nothing fitted: each held-out AP is the plain leave-one-out AP
    expected = loo_ap(clean, labels) - loo_ap(noisy, labels)
    assert result.gain == pytest.approx(expected.mean(), abs=1e-9)
    assert result.default_map == pytest.approx(loo_ap(noisy, labels).mean(), abs=1e-9)
    assert result.gain_ci[0] > 0.02 and "gains" in result.verdict()


def test_the_choice_of_a_fold_never_depends_on_that_fold():
    """Scrambling one pipeline's vectors of the images of outer fold 1 changes that fold's held-out scores but
    not which pipeline fold 1 chose (its selection sees the other folds only); whitening included."""
    signal, labels, rng = collection(3)
    poolings = {"avg": signal + 1.2 * rng.standard_normal(signal.shape),
                "max": signal + 1.1 * rng.standard_normal(signal.shape)}
    space = plain_space(["avg", "max"], whiten=True)
    first = search.nested_search(views(poolings), space, labels, folds=4)
    codes = np.unique(labels, return_inverse=True)[1]
    held_out = search.stratified_folds(codes, 4)[0]
    scrambled = dict(poolings, max=poolings["max"].copy())
    scrambled["max"][held_out] = rng.standard_normal((len(held_out), DIM))
    again = search.nested_search(views(scrambled), space, labels, folds=4)
    assert again.fold_choices[0] == first.fold_choices[0]
    assert [c.cv_map for c in again.candidates] != [c.cv_map for c in first.candidates]


def test_whitening_is_fitted_on_the_rows_given_only():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 6))
    fit = np.arange(25)
    changed = x.copy()
    changed[30:] = 100 * rng.standard_normal((10, 6))
    np.testing.assert_allclose(search._whitened(x, fit)[:30], search._whitened(changed, fit)[:30])


def test_commands_that_reproduce_a_pipeline():
    p = search.Pipeline("keep-aspect", (1.0, 1.414, 2.0), "gem", True, "dba,aqe:k=3")
    assert p.commands(["my photos"], ["--backbone", "resnet50"], "cats/a b.jpg") == [
        "gpl embed 'my photos' -o plain.h5 --pool gem --backbone resnet50 --resize keep-aspect --scales 1,1.414,2",
        "gpl whiten fit plain.h5 -o whiten.npz",
        "gpl embed 'my photos' -o pipeline.h5 --pool gem --backbone resnet50 --resize keep-aspect --scales 1,1.414,2 "
        "--whiten whiten.npz",
        "gpl neighbors pipeline.h5 'cats/a b.jpg' -k 10 --rerank dba,aqe:k=3",
    ]
    assert search.DEFAULT.commands(["photos"], [], "a.jpg") == [
        "gpl embed photos -o pipeline.h5 --pool avg", "gpl neighbors pipeline.h5 a.jpg -k 10"]
    assert p.label() == "keep-aspect 1+1.414+2 gem, whitened, dba,aqe:k=3"


def test_the_space_starts_with_the_default_and_the_table_has_a_row_per_setting():
    space = search.search_space(["max", "avg"], ["crop", "keep-aspect"], [(1.0,), (1.0, 2.0)], ["dba"])
    assert space[0] == search.DEFAULT and len(space) == len(set(space)) == 2 * 2 * 2 * 2 * 2
    signal, labels, rng = collection(5)
    raw = {key: signal + rng.standard_normal(signal.shape) for key in ("avg", "max")}
    vectors = search.Views({(r, s, k): (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
                            for r in ("crop", "keep-aspect") for s in (1.0, 2.0) for k, x in raw.items()},
                           {(r, s): 0.5 * s for r in ("crop", "keep-aspect") for s in (1.0, 2.0)})
    result = search.nested_search(vectors, space, labels, folds=3)
    rows = result.table_rows()
    assert rows[0][1][:2] == ["avg", "max"] and len(rows) == 1 + 2 * 2 * 2 * 2
    assert rows[1][0] == "crop 1" and rows[2][0] == "crop 1, dba"
    keep = dict(rows)["keep-aspect 1+2, whitened, dba"]
    assert keep[2:4] == ["2", f"{1e3 * 1.5 / len(labels):.1f}"]  # passes, model ms per image
    assert sum(c.chosen for c in result.candidates) == 3 == len(result.fold_choices)


def test_labels_the_search_cannot_use_are_refused():
    with pytest.raises(GplError, match="needs labels"):
        search.check_labels(None)
    with pytest.raises(GplError, match="two or more classes with at least two images each; images per class: a 3, b 1"):
        search.check_labels(["a", "a", "a", "b"])
