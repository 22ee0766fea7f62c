"""gpl compare --pool gem:p=auto: GeM's p chosen on the labels by nested cross-validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO, run_gpl

from gpl_cli.analysis import compare as cmp, gem_auto
from gpl_cli.errors import GplError
from gpl_cli.pooling.ops import gem_pool
from gpl_cli.pooling.spec import parse_pool_list

PHOTOS = REPO / "tests" / "data" / "labeled_photos"


def _maps_with_best_p(p0: float, classes: int = 4, per_class: int = 12, channels: int = 32, seed: int = 0):
    """Maps whose GeM at p0 is exactly a class prototype plus small noise, while other p mix in noise.

    Each channel's cells are v * z with z random positive and scaled so that mean(z^p0) = 1: GeM
    at p0 gives v exactly; any other p gives v * M_p(z) / M_p0(z), a random factor per image and
    channel. So p0 is the best p by construction.
    """
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 2.0, size=channels)
    prototypes = base * (1 + 0.1 * rng.normal(size=(classes, channels)))  # classes 10 % apart
    y = np.repeat(np.arange(classes), per_class)
    v = prototypes[y] * (1 + 0.05 * rng.normal(size=(len(y), channels)))
    z = rng.lognormal(0.0, 1.0, size=(len(y), channels, 5, 5))
    z /= np.mean(z**p0, axis=(2, 3), keepdims=True) ** (1 / p0)
    return torch.tensor(v[:, :, None, None] * z, dtype=torch.float32), [f"c{c}" for c in y]


@pytest.mark.parametrize("p0", [1.5, 4.0])
def test_the_known_best_p_is_chosen(p0):
    maps, labels = _maps_with_best_p(p0)
    vectors = {p: gem_pool(maps, p=p).numpy() for p in gem_auto.GRID}
    result = gem_auto.choose_p(vectors, labels)
    # Near p0: at most one step of the grid away (at large p every mean approaches the max, so
    # neighbours of a large p0 retrieve almost as well).
    step = {p: i for i, p in enumerate(gem_auto.GRID)}
    assert all(abs(step[p] - step[p0]) <= 1 for p in [result.best_p, *result.fold_p]), result.fold_p
    assert result.grid_map[step[p0]] > 0.99 and min(result.grid_map) < 0.7
    assert result.held_out_ci[0] <= result.held_out_map <= result.held_out_ci[1]
    assert result.option() == f"--pool gem:p={result.best_p:g}"


def test_held_out_score_is_each_query_scored_by_a_p_chosen_without_it():
    """The protocol recomputed from the definition (AP of every query for every p, folds from sklearn)."""
    from sklearn.model_selection import StratifiedKFold

    maps, labels = _maps_with_best_p(3.0, seed=1)
    blur = np.random.default_rng(7).random(maps.shape, dtype=np.float32)
    maps = maps + 0.5 * torch.from_numpy(blur)  # blur the construction so the folds can disagree
    vectors = {p: gem_pool(maps, p=p).numpy() for p in gem_auto.GRID}
    result = gem_auto.choose_p(vectors, labels)
    y = np.unique(labels, return_inverse=True)[1]

    def ap_of(x):
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        sims = unit @ unit.T
        np.fill_diagonal(sims, -np.inf)
        out = []
        for q in range(len(x)):
            relevant = y[np.argsort(-sims[q], kind="stable")[:-1]] == y[q]
            out.append(np.mean(np.cumsum(relevant)[relevant] / (np.flatnonzero(relevant) + 1)))
        return np.array(out)

    ap = np.stack([ap_of(vectors[p]) for p in gem_auto.GRID])
    held = np.empty(len(y))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(y, y):
        held[test] = ap[np.argmax(ap[:, train].mean(axis=1)), test]
    # float32 cosines computed another way can swap two near-equal neighbours: over 40 random blurs
    # the mAPs differed by at most 3e-4 (most by 0 or 1e-16).
    assert result.held_out_map == pytest.approx(held.mean(), abs=1e-3)
    assert result.grid_map == pytest.approx(ap.mean(axis=1).tolist(), abs=1e-3)


@pytest.fixture(scope="module")
def grid_run(lite0):
    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs

    config = EmbedConfig(pools=tuple(gem_auto.grid_keys()))
    emb, _ = cmp.embed_images(config, collect_inputs([str(PHOTOS)]), RunOptions(batch_size=30, workers=0), backbone=lite0)
    return emb, cmp.folder_labels(emb.paths)


def test_held_out_map_on_the_photos_is_within_the_fixed_p_interval(grid_run):
    emb, labels = grid_run
    result = gem_auto.choose_p({p: emb.vectors[k] for p, k in zip(gem_auto.GRID, gem_auto.grid_keys())}, labels)
    chosen = parse_pool_list([f"gem:p={result.best_p:g}"])[0].key
    fixed = cmp.compare(emb, labels, keys=[chosen]).poolings[0]  # the ordinary compare run at that p
    assert fixed.map_ci[0] <= result.held_out_map <= fixed.map_ci[1]
    print(f"photos: p per fold {result.fold_p}, held-out mAP {result.held_out_map:.4f}, "
          f"fixed p={result.best_p:g} mAP {fixed.map:.4f} CI {fixed.map_ci}")


def test_split_auto_and_refusals():
    assert gem_auto.split_auto(["avg,gem:p=auto", "max"]) == (["avg", "max"], True)
    assert gem_auto.split_auto(["gem:p=4"]) == (["gem:p=4"], False)
    with pytest.raises(GplError, match="only GeM's p can be chosen"):
        gem_auto.split_auto(["lse:r=auto"])
    with pytest.raises(GplError, match="exists only in gpl compare"):
        parse_pool_list(["gem:p=auto"])
    assert gem_auto.grid_keys() == ["gem:p=1", "gem:p=1.5", "gem:p=2", "gem", "gem:p=4", "gem:p=6", "gem:p=8"]


def test_cli_gem_auto(tmp_path):
    proc = run_gpl("compare", str(PHOTOS), "--pool", "avg", "--pool", "gem:p=auto", "--json", "-q", check=True)
    doc = json.loads(proc.stdout)
    auto = doc["gem_auto"]
    assert len(auto["fold_p"]) == 5 and auto["option"] == f"--pool gem:p={auto['chosen_p']:g}"
    chosen_key = parse_pool_list([f"gem:p={auto['chosen_p']:g}"])[0].key
    assert set(doc["poolings"]) == {"avg", chosen_key}  # the grid itself stays out of the main table
    assert doc["poolings"][chosen_key]["map"] == pytest.approx(auto["grid_map"][f"{auto['chosen_p']:g}"], abs=1e-12)


def test_cli_refuses_auto_without_labels_or_images(tmp_path):
    from conftest import make_photo_like
    from PIL import Image

    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(3):
        Image.fromarray(make_photo_like((40, 40), seed=i)).save(loose / f"{i}.png")
    proc = run_gpl("compare", str(loose), "--pool", "gem:p=auto")
    assert proc.returncode == 2
    assert "--pool gem:p=auto needs labels" in proc.stderr.decode()
    proc = run_gpl("embed", str(loose), "-o", str(tmp_path / "x.h5"), "--pool", "gem:p=auto")
    assert proc.returncode == 2 and "exists only in gpl compare" in proc.stderr.decode()
    (tmp_path / "saved.h5").write_bytes(b"")  # refused before it is read
    proc = run_gpl("compare", str(tmp_path / "saved.h5"), "--pool", "gem:p=auto")
    assert proc.returncode == 2 and "give the images" in proc.stderr.decode()
