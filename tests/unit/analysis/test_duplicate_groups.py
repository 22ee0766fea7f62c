"""Duplicate groups (gpl_cli.analysis.duplicates.groups): exact copies by their bytes before any vector, near
misses and best scores against a float64 brute force, the keep rules, and --against across two files."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import run_gpl
from PIL import Image

from gpl_cli.analysis.duplicates import groups as dg, pairs
from gpl_cli.analysis.duplicates.model import Threshold
from gpl_cli.errors import GplError
from gpl_cli.store.formats.h5 import H5Writer

AT = Threshold(0.95, "--threshold")
METADATA = {"pool_keys": ["avg"], "pools": {"avg": {"op": "avg", "params": {}, "dim": 32}}, "backbone": "test",
            "weights_sha256": "ab" * 32, "layer": None, "normalize": "none", "power": None,
            "preprocess": {"resize": 256, "crop": 224, "mode": "crop"}, "config": {"whiten": [], "scales": [1.0]}}


def write_h5(path, names, vectors, root, stats=None, **metadata):
    writer = H5Writer(str(path), {"avg": vectors.shape[1]})
    writer.write(list(names), {"avg": np.asarray(vectors, np.float32)}, stats)
    writer.close({**METADATA, "root": str(root), **metadata})
    return str(path)


def unit(d: int, i: int) -> np.ndarray:
    v = np.zeros(d, np.float32)
    v[i] = 1
    return v


def save(path, size, noise=False, seed=0):
    """A PNG: flat grey (a few bytes), or noise (many); `size` in pixels."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = size
    pixels = (np.random.default_rng(seed).integers(0, 256, (h, w, 3)) if noise else np.full((h, w, 3), 128))
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def cosines(x):
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def paths(found):
    return [[m.path for m in g.members] for g in found.groups]


# --- exact copies -----------------------------------------------------------------------------------


def test_identical_files_are_one_exact_group_whatever_their_vectors(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    save(root / "a.png", (16, 12), noise=True, seed=1)
    (root / "sub").mkdir()
    shutil.copy(root / "a.png", root / "sub" / "b.png")
    save(root / "c.png", (16, 12), noise=True, seed=2)
    save(root / "d.png", (16, 12), noise=True, seed=3)
    shutil.copy(root / "d.png", root / "e.png")
    # a and b are identical files with orthogonal vectors; c has a's vector but other bytes; d and e are
    # identical files whose vectors agree
    x = np.stack([unit(32, 0), unit(32, 1), unit(32, 0), unit(32, 2), unit(32, 2), unit(32, 3)])
    names = ["a.png", "sub/b.png", "c.png", "d.png", "e.png", "f.png"]  # f.png: not on disk
    out = write_h5(tmp_path / "e.h5", names, x, root)
    compared = []
    real = dg.similar_pairs
    monkeypatch.setattr(dg, "similar_pairs", lambda v, *a, **k: compared.append(len(v)) or real(v, *a, **k))
    found = dg.find_duplicates(out, AT)
    assert compared == [4]  # one row per set of identical files: a (for b), c, d (for e), f
    assert paths(found) == [["a.png", "sub/b.png", "c.png"], ["d.png", "e.png"]]
    first, second = found.groups
    assert [m.exact for m in first.members] == [True, True, False] and not first.exact
    assert [m.exact for m in second.members] == [True, True] and second.exact
    assert sorted(first.pairs) == [(0, 1, 1.0), (0, 2, pytest.approx(1.0))]
    assert [m.score for m in first.members] == [1.0, 1.0, pytest.approx(1.0)]
    assert [m.file for m in first.members] == [str(root / n) for n in names[:3]]
    assert found.notes == [f"1 of the 6 images of {out} are not found below {root}; exact copies among them "
                           "cannot be told by their bytes"]
    # best scores: identical files 1.0 whatever their vectors, f's best is its nearest other vector (0)
    np.testing.assert_allclose(found.best, [1, 1, 1, 1, 1, 0])


def test_without_the_images_groups_come_from_the_vectors_alone(tmp_path):
    root = tmp_path / "photos"
    save(root / "a.png", (16, 12), noise=True)
    shutil.copy(root / "a.png", root / "b.png")
    x = np.stack([unit(32, 0), unit(32, 1), unit(32, 0)])  # a and b: identical files, other vectors
    out = write_h5(tmp_path / "e.h5", ["a.png", "b.png", "c.png"], x, root)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    found = dg.find_duplicates(out, AT, images=str(empty))
    assert paths(found) == [["a.png", "c.png"]] and not found.groups[0].exact
    assert found.notes == [f"the images of {out} are not found below {empty}, so exact copies cannot be told by their "
                           "bytes: groups come from the vectors alone (--images DIR names their folder)"]
    assert paths(dg.find_duplicates(out, AT)) == [["a.png", "b.png", "c.png"]]  # below the recorded root


# --- near misses and best scores -----------------------------------------------------------------------


def test_near_misses_and_best_scores_match_a_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 32)).astype(np.float32)
    planted = {(3, 40): 0.99, (7, 8): 0.93, (10, 50): 0.91, (20, 21): 0.85, (40, 41): 0.97}
    for (i, j), cos in planted.items():
        orth = x[j] - (x[j] @ x[i]) / (x[i] @ x[i]) * x[i]
        x[j] = cos * x[i] / np.linalg.norm(x[i]) + np.sqrt(1 - cos**2) * orth / np.linalg.norm(orth)
    names = [f"p{i:02d}.jpg" for i in range(60)]
    out = write_h5(tmp_path / "e.h5", names, x, tmp_path / "nothing")
    found = dg.find_duplicates(out, AT)
    sims = cosines(x)
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_allclose(found.best, sims.max(axis=1), atol=1e-5)
    assert paths(found) == [["p03.jpg", "p40.jpg", "p41.jpg"]]
    grouped = {3, 40, 41}
    want = sorted(((names[i], names[j], sims[i, j]) for i in range(60) for j in range(i + 1, 60)
                   if 0.90 <= sims[i, j] < 0.95 and not {i, j} <= grouped), key=lambda p: -p[2])
    assert [(a, b) for a, b, _ in found.near_misses] == [(a, b) for a, b, _ in want]
    assert [a for a, b, _ in want][:2] == ["p07.jpg", "p10.jpg"]  # the planted ones, best first
    np.testing.assert_allclose([s for *_, s in found.near_misses], [s for *_, s in want], atol=1e-5)


def test_past_exact_search_best_scores_are_measured_on_a_sample(tmp_path, monkeypatch):
    x = np.random.default_rng(3).standard_normal((300, 16)).astype(np.float32)
    monkeypatch.setattr(pairs, "EXACT_MAX_WORK", 1000)  # any file is "too large" for exact search
    monkeypatch.setattr(dg, "BEST_SAMPLE", 50)
    best = dg._best_scores(x, None, np.arange(300))
    measured = np.flatnonzero(np.isfinite(best))
    sims = cosines(x)
    np.fill_diagonal(sims, -np.inf)
    assert len(measured) == 50
    np.testing.assert_allclose(best[measured], sims.max(axis=1)[measured], atol=1e-5)


# --- keep rules -------------------------------------------------------------------------------------


@pytest.fixture
def keep_file(tmp_path):
    """Three groups. 1: b/big.png (40x30 flat: few bytes) and a/small.png (20x15 noise: more bytes), recorded
    mtimes the other way round from the files' own. 2: two identical files. 3: two 20x20 images, one
    flat, one noise (pixels tie, bytes differ). Rows are in this order, not in path order."""
    root = tmp_path / "photos"
    save(root / "b" / "big.png", (40, 30))
    save(root / "a" / "small.png", (20, 15), noise=True)
    save(root / "y" / "same.png", (20, 20), noise=True, seed=5)
    (root / "x").mkdir()
    shutil.copy(root / "y" / "same.png", root / "x" / "same.png")
    save(root / "p.png", (20, 20))
    save(root / "q.png", (20, 20), noise=True, seed=6)
    names = ["b/big.png", "a/small.png", "y/same.png", "x/same.png", "q.png", "p.png"]
    assert os.path.getsize(root / "a/small.png") > os.path.getsize(root / "b/big.png")
    recorded_mtime = {"b/big.png": 2_000, "a/small.png": 1_000}  # the files on disk: big older than small
    os.utime(root / "b/big.png", ns=(1, 1))
    os.utime(root / "a/small.png", ns=(5, 5))
    stats = [(os.path.getsize(root / n), recorded_mtime.get(n, 3_000 + i)) for i, n in enumerate(names)]
    x = np.stack([unit(32, 0), unit(32, 0), unit(32, 1), unit(32, 1), unit(32, 2), unit(32, 2)])
    return write_h5(tmp_path / "k.h5", names, x, root, stats), root


@pytest.mark.parametrize("rule, kept", [
    ("largest", ["b/big.png", "x/same.png", "q.png"]),  # pixels before bytes; a tie goes to the first path
    ("smallest", ["a/small.png", "x/same.png", "p.png"]),
    ("oldest", ["a/small.png", "y/same.png", "q.png"]),  # the times recorded when embedded, not the files'
    ("newest", ["b/big.png", "x/same.png", "p.png"]),
    ("first", ["b/big.png", "y/same.png", "q.png"]),  # the earliest row
])
def test_each_keep_rule_keeps_one_image_per_group(keep_file, rule, kept):
    out, _ = keep_file
    found = dg.find_duplicates(out, AT, keep=rule)
    assert [[m.path for m in g.members if m.keep] for g in found.groups] == [[k] for k in kept]
    assert found.keep_rule == rule


def test_a_keep_rule_that_needs_an_unreadable_image_is_refused(keep_file):
    out, root = keep_file
    os.unlink(root / "q.png")
    with pytest.raises(GplError, match=r"--keep largest needs each image's size in pixels, and q.png cannot be "
                                       r"read \(not found\).*--keep first needs none"):
        dg.find_duplicates(out, AT, keep="largest")
    assert [m.keep for m in dg.find_duplicates(out, AT, keep="first").groups[2].members] == [True, False]


def test_move_to_needs_a_keep_rule(keep_file, tmp_path):
    with pytest.raises(GplError, match="--move-to moves what --keep does not keep: give a --keep rule"):
        dg.find_duplicates(keep_file[0], AT, move_to=str(tmp_path / "away"))
    assert not (tmp_path / "away").exists()


# --- across two files -------------------------------------------------------------------------------


def test_against_lists_only_the_groups_that_cross(tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    save(train / "t3.png", (16, 12), noise=True, seed=9)
    val.mkdir()
    shutil.copy(train / "t3.png", val / "v3.png")  # identical files across the sets, orthogonal vectors
    rng = np.random.default_rng(1)
    xt = rng.standard_normal((5, 32)).astype(np.float32)
    xv = rng.standard_normal((4, 32)).astype(np.float32)
    xv[2] = xt[0] + 0.01 * rng.standard_normal(32)  # a leak
    xt[2] = xt[1]  # a copy within train: not a leak
    xv[1] = xv[0]  # a copy within val: not a leak
    xt[3], xv[3] = unit(32, 5), unit(32, 6)
    a = write_h5(tmp_path / "train.h5", [f"t{i}.png" for i in range(5)], xt, train)
    b = write_h5(tmp_path / "val.h5", [f"v{i}.png" for i in range(4)], xv, val)
    found = dg.find_duplicates(a, AT, against=b)
    assert found.against == b
    assert [[(m.path, m.row, m.other) for m in g.members] for g in found.groups] == [
        [("t0.png", 0, False), ("v2.png", 2, True)], [("t3.png", 3, False), ("v3.png", 3, True)]]
    assert found.groups[1].exact and not found.groups[0].exact
    sims = cosines(np.concatenate([xt, xv]))[:5, 5:]
    best = sims.max(axis=1)
    best[3] = 1.0  # its identical file is in val
    np.testing.assert_allclose(found.best, best, atol=1e-5)


@pytest.mark.parametrize("change, words", [
    ({"backbone": "resnet50"}, "backbone (test vs resnet50)"),
    ({"weights_sha256": "cd" * 32}, "weights (sha256) (abababababab... vs cdcdcdcdcdcd...)"),
    ({"layer": "layer3"}, "layer (None vs layer3)"),
    ({"preprocess": {"resize": 256, "crop": 224, "mode": "keep-aspect"}}, "preprocessing (mode crop vs keep-aspect)"),
    ({"pools": {"avg": {"op": "gem", "params": {"p": 3}, "dim": 32}}}, "pooling avg (op avg vs gem, params {} vs {'p': 3})"),
    ({"normalize": "l2"}, "normalisation (('none', None) vs ('l2', None))"),
])
def test_against_refuses_a_file_embedded_another_way(tmp_path, change, words):
    x = np.random.default_rng(2).standard_normal((3, 32))
    a = write_h5(tmp_path / "a.h5", ["a", "b", "c"], x, tmp_path)
    b = write_h5(tmp_path / "b.h5", ["a", "b", "c"], x, tmp_path, **change)
    with pytest.raises(GplError) as caught:
        dg.find_duplicates(a, AT, against=b)
    assert str(caught.value) == (f"--against {b} was not embedded like {a}, so their scores cannot be compared: "
                                 f"{words}; embed both the same way")


def test_against_needs_the_same_pooling_and_refuses_keep(tmp_path):
    x = np.random.default_rng(2).standard_normal((3, 32))
    a = write_h5(tmp_path / "a.h5", ["a", "b", "c"], x, tmp_path)
    b = write_h5(tmp_path / "b.h5", ["a", "b", "c"], x, tmp_path, pool_keys=["max"], pools={"max": {"op": "max"}})
    with pytest.raises(GplError, match=f"--against {b} has no pooling 'avg' to compare with {a}; it holds: max"):
        dg.find_duplicates(a, AT, against=b)
    with pytest.raises(GplError, match="--keep and --move-to act within one file"):
        dg.find_duplicates(a, AT, against=a, keep="first")


# --- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--keep", "first"], "--keep applies to --duplicates only"),
    (["--duplicates", "--list", "remove"], "--list keep|remove needs a --keep rule"),
    (["--duplicates", "--keep", "first", "--format", "csv"], "--format applies to --list only"),
    (["--duplicates", "--keep", "first", "--list", "keep", "--json"], "--list prints its own format"),
    (["--duplicates", "--move-to", "away"], "--move-to moves what --keep does not keep"),
    (["--against", "k.h5"], "--against applies to --duplicates only"),
    (["--duplicates", "--undo", "."], "--undo . puts back what a --move-to moved there; give it without --duplicates"),
])
def test_the_command_refuses_options_that_do_not_go_together(keep_file, args, message):
    out, root = keep_file
    proc = run_gpl("neighbors", out, *args, cwd=os.path.dirname(out))
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.startswith(f"gpl: error: {message}") and err.count("\n") == 1, err
    assert not proc.stdout and not os.path.exists(os.path.join(os.path.dirname(out), "away"))


def test_undo_needs_no_file_and_a_folder_without_a_journal_is_refused(tmp_path):
    proc = run_gpl("neighbors", "--undo", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.decode() == (f"gpl: error: {tmp_path}: no journal of moves (.gpl-moves.jsonl) here, so there "
                                    "is nothing gpl moved to undo\n")
