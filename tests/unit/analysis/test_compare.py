"""gpl compare on real labelled photos: one model run shared by every test here."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_gpl

from gpl_cli.analysis import compare as cmp
from gpl_cli.errors import GplError
from gpl_cli.store.formats.h5 import H5Writer

PHOTOS = REPO / "tests" / "data" / "labeled_photos"  # 5 classes x 12 photos, see README.md there
# Measured: avg mAP 0.704, max 0.695 (efficientnet_lite0, these 60 photos); chance about 0.19.
AVG_MAP_FLOOR = 0.60


@pytest.fixture(scope="module")
def photo_run(lite0, tmp_path_factory):
    """The labelled photos embedded once with avg and max, kept in an .h5 file."""
    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.output import Output

    saved = tmp_path_factory.mktemp("compare") / "photos.h5"
    config = EmbedConfig(pools=("avg", "max"))
    emb, summary = cmp.embed_images(config, collect_inputs([str(PHOTOS)]), RunOptions(batch_size=30, workers=0),
                                    backbone=lite0)
    cmp.save_embeddings(emb, Output.resolve(str(saved)).check())
    labels = cmp.folder_labels(emb.paths)
    report = cmp.compare(emb, labels, pool_seconds=summary.pool_seconds, source="photos")
    return emb, summary, saved, report


def independent_map(x: np.ndarray, labels: list[str]) -> float:
    """mAP from the definition, with the full similarity matrix (fine for 60 images)."""
    labels = np.array(labels)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    aps = []
    for q in range(len(x)):
        relevant = labels[np.argsort(-sims[q])[:-1]] == labels[q]
        precision_at_hits = np.cumsum(relevant)[relevant] / (np.flatnonzero(relevant) + 1)
        aps.append(precision_at_hits.mean())
    return float(np.mean(aps))


def numbers(report: cmp.Report) -> dict:
    """The report's numbers, without what differs between a model run and a file (timing, source)."""
    doc = report.as_dict()
    doc.pop("source")
    doc.pop("recommendation")  # weighs the pooling times
    for p in doc["poolings"].values():
        p.pop("pool_seconds"), p.pop("pool_us_per_image")
    return doc


def test_avg_pooling_retrieves_far_above_chance(photo_run):
    emb, _, _, report = photo_run
    labels = cmp.folder_labels(emb.paths)
    counts = np.array([labels.count(c) for c in sorted(set(labels))])
    assert counts.tolist() == [12] * 5
    n = counts.sum()
    chance = float(np.sum(counts / n * (counts - 1) / (n - 1)))  # class prior of a random neighbour
    avg = next(p for p in report.poolings if p.key == "avg")
    assert avg.map == pytest.approx(independent_map(emb.vectors["avg"], labels), abs=1e-9)
    assert avg.map > AVG_MAP_FLOOR > 3 * chance
    assert avg.map_ci[0] < avg.map < avg.map_ci[1]
    # The reported chance is a random ranking's expected AP: above the prior for small classes.
    assert chance < report.chance_map < 2 * chance
    assert report.classes == {c: 12 for c in ["animal", "fish", "monument", "renewable_energy", "tool"]}
    print("measured mAP: " + ", ".join(f"{p.key} {p.map:.4f}" for p in report.poolings) + f"; chance {chance:.4f}")


def test_report_contents(photo_run):
    emb, summary, _, report = photo_run
    assert [p.key for p in report.poolings] == ["avg", "max"]
    assert set(summary.pool_seconds) == {"avg", "max"} and all(v > 0 for v in summary.pool_seconds.values())
    for p in report.poolings:
        x = emb.vectors[p.key]
        assert p.dim == x.shape[1] == 1280
        assert p.sparsity == pytest.approx(np.mean(x == 0))
        assert p.pool_seconds == summary.pool_seconds[p.key]
        assert set(p.class_ap) == set(report.classes)
        # mAP is the mean of the per-class APs when classes are balanced.
        assert p.map == pytest.approx(np.mean(list(p.class_ap.values())))
    pair = report.pairs[0]
    assert (pair.a, pair.b) == ("avg", "max")
    assert pair.map_diff == pytest.approx(report.poolings[0].map - report.poolings[1].map)
    assert pair.map_diff_ci[0] < pair.map_diff < pair.map_diff_ci[1]
    assert 0 < pair.knn_jaccard < 1 and 0 < pair.similarity_spearman < 1
    table = report.table()
    assert pair.verdict() in table and "best mAP: " in table
    assert table.rstrip().splitlines()[-1] == report.recommendation() == report.as_dict()["recommendation"]
    json.dumps(report.as_dict())  # plain types only


def test_saved_file_gives_the_same_numbers_as_the_folder(photo_run):
    emb, _, saved, report = photo_run
    from_file = cmp.load_embedding_files([str(saved)])
    again = cmp.compare(from_file, cmp.folder_labels(from_file.paths), source="file")
    assert numbers(again) == numbers(report)


def write_h5(path: Path, paths: list[str], vectors: dict[str, np.ndarray]) -> str:
    """An embeddings file through the project's own writer."""
    writer = H5Writer(str(path), {k: v.shape[1] for k, v in vectors.items()})
    writer.write(paths, vectors)
    writer.close({"pool_keys": list(vectors), "backbone": "test"})
    return str(path)


def test_two_files_over_the_same_paths_give_the_same_numbers(photo_run, tmp_path):
    emb, _, _, report = photo_run
    order = np.random.default_rng(0).permutation(len(emb))  # the second file lists the images in another order
    first = write_h5(tmp_path / "a.h5", emb.paths, {"avg": emb.vectors["avg"]})
    second = write_h5(tmp_path / "b.h5", [emb.paths[i] for i in order], {"max": emb.vectors["max"][order]})
    both = cmp.load_embedding_files([first, second])
    again = cmp.compare(both, cmp.folder_labels(both.paths))
    assert numbers(again) == numbers(report)


def test_two_files_with_the_same_pooling_are_told_apart(photo_run, tmp_path):
    emb, _, saved, _ = photo_run
    other = write_h5(tmp_path / "avg_only.h5", emb.paths, {"avg": emb.vectors["max"]})
    both = cmp.load_embedding_files([str(saved), other], ["avg"])
    assert list(both.vectors) == ["photos/avg", "avg_only/avg"]
    np.testing.assert_array_equal(both.vectors["avg_only/avg"], emb.vectors["max"])


def test_mismatched_paths_and_missing_poolings_are_clear_errors(photo_run, tmp_path):
    emb, _, saved, _ = photo_run
    other = write_h5(tmp_path / "other.h5", emb.paths[:-1] + ["elsewhere/new.webp"], {"avg": emb.vectors["avg"]})
    with pytest.raises(GplError, match=r"hold different images: 1 only in .*photos\.h5 \(e\.g\. tool/.*1 only in .*other\.h5"):
        cmp.load_embedding_files([str(saved), other])
    avg_only = write_h5(tmp_path / "avg.h5", emb.paths, {"avg": emb.vectors["avg"]})
    with pytest.raises(GplError, match="hold no pooling max; available: avg"):
        cmp.load_embedding_files([avg_only], ["max"])
    with pytest.raises(GplError, match="one or two embedding files"):
        cmp.load_embedding_files([avg_only] * 3)


def test_labels_from_csv(photo_run, tmp_path, monkeypatch):
    emb, _, saved, report = photo_run
    loaded = cmp.load_embedding_files([str(saved)])
    root = loaded.metadata["root"]
    assert os.path.samefile(root, PHOTOS)
    # Paths as stored, as a path from the current directory, or absolute; a header row.
    monkeypatch.chdir(PHOTOS.parent)
    lines = ["path,label"]
    for i, name in enumerate(loaded.paths):
        written = [name, os.path.join(PHOTOS.name, name), str(PHOTOS / name)][i % 3]
        lines.append(f"{written},{name.split('/')[0]}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    labels = cmp.read_labels_csv(str(tmp_path / "labels.csv"), loaded.paths, root)
    assert labels == cmp.folder_labels(loaded.paths)
    # Other labels change the numbers: animals and fish as one class.
    merged = [("creature" if label in ("animal", "fish") else label) for label in labels]
    regrouped = cmp.compare(loaded, merged)
    assert regrouped.classes["creature"] == 24 and "animal" not in regrouped.classes
    assert regrouped.poolings[0].map != report.poolings[0].map


def test_bad_labels_csv_is_a_clear_error(tmp_path):
    names = ["a/1.jpg", "a/2.jpg", "b/3.jpg"]
    missing = tmp_path / "missing.csv"
    missing.write_text("a/1.jpg,x\na/2.jpg,x\n")
    with pytest.raises(GplError, match=r"missing\.csv has no label for 1 of the 3 images \(e\.g\. b/3\.jpg\)"):
        cmp.read_labels_csv(str(missing), names, None)
    bad = tmp_path / "bad.csv"
    bad.write_text("a/1.jpg,x\na/2.jpg\n")
    with pytest.raises(GplError, match=r"bad\.csv:2: expected 'path,label'"):
        cmp.read_labels_csv(str(bad), names, None)
    twice = tmp_path / "twice.csv"
    twice.write_text("a/1.jpg,x\na/1.jpg,y\n")
    with pytest.raises(GplError, match="labelled both 'x' and 'y'"):
        cmp.read_labels_csv(str(twice), names, None)


def test_folder_labels():
    assert cmp.folder_labels(["cats/a.jpg", "cats/deep/b.jpg", "dogs/c.jpg"]) == ["cats", "cats", "dogs"]
    assert cmp.folder_labels(["a.jpg", "b.jpg"]) is None
    with pytest.raises(GplError, match="b.jpg is not inside a class folder"):
        cmp.folder_labels(["cats/a.jpg", "b.jpg"])


def test_label_free_report(photo_run):
    emb, _, _, report = photo_run
    free = cmp.compare(emb, None)
    assert not free.labelled and free.classes is None
    assert all(p.map is None for p in free.poolings)
    labelled = report.as_dict()["poolings"]["avg"]
    for field in ("norm", "sparsity", "mean_pairwise_cosine", "effective_rank"):
        assert free.as_dict()["poolings"]["avg"][field] == labelled[field]
    pair = free.pairs[0]
    assert pair.knn_jaccard == report.pairs[0].knn_jaccard
    assert "no verdict on quality" in pair.verdict() and "mAP" not in free.table()
    one_class = cmp.compare(emb, ["all"] * len(emb))
    assert not one_class.labelled and "only one class" in one_class.notes[0]


@pytest.mark.parametrize(
    "diff, ci, expected",
    [
        (0.041, (0.012, 0.070), "gem beats max by 4.1 mAP points, 95 % CI 1.2 to 7.0"),
        (-0.041, (-0.070, -0.012), "max beats gem by 4.1 mAP points, 95 % CI 1.2 to 7.0"),
        (0.008, (-0.010, 0.026), "gem vs max: no significant difference in mAP (+0.8 points, 95 % CI -1.0 to +2.6)"),
        # an interval shown as 0.0 to 1.0 touches zero: not called significant
        (0.005, (0.0004, 0.0098), "gem vs max: no significant difference in mAP (+0.5 points, 95 % CI +0.0 to +1.0), "
                                  "too small to matter either way"),
        (-0.002, (-0.0049, -0.0004), "gem vs max: no significant difference in mAP (-0.2 points, 95 % CI -0.5 to +0.0), "
                                     "too small to matter either way"),  # never "-0.0"
        (0.004, (0.0006, 0.0081), "gem beats max by only 0.4 mAP points, 95 % CI 0.1 to 0.8: too small to matter "
                                  "(under 1 point)"),
        (0.007, (0.0012, 0.014), "gem beats max by 0.7 mAP points, 95 % CI 0.1 to 1.4: likely too small to matter "
                                 "(under 1 point)"),
    ],
)
def test_verdicts(diff, ci, expected):
    pair = cmp.PairResult("gem", "max", knn_jaccard=0.5, similarity_spearman=0.9, map_diff=diff, map_diff_ci=ci)
    assert pair.verdict() == expected
    assert pair.as_dict()["significant"] == (" beats " in expected)


def pooling(key: str, map_: float, us: float | None) -> cmp.PoolingResult:
    return cmp.PoolingResult(key, 8, {}, 0.0, 0.0, 1.0, None if us is None else us * 1e-6 * 100, map=map_)


@pytest.mark.parametrize(
    "maps, cis, us, embed, expected",
    [
        # max trails avg by less than a point that matters; pooling costs are a sliver of embedding an image
        ((0.725, 0.718), (0.001, 0.014), (3, 2), 0.01, "recommendation: avg: the best mAP (72.5); max is within what "
         "matters of it (no significant lead of 1 point or more); max pools faster, by 1 us/image, 0.01 % of "
         "the time to embed an image: too little to decide"),
        # the same, but max saves a tenth of the time to embed an image: take max
        ((0.725, 0.718), (0.001, 0.014), (2000, 1000), 0.01, "recommendation: max: its mAP (71.8) is within what "
         "matters of the best (avg 72.5), and it pools faster (1000 us/image against 2000 us/image, "
         "saving 10 % of the time to embed an image)"),
        ((0.725, 0.718), (0.001, 0.014), (2, 3), 0.01, "recommendation: avg: the best mAP (72.5); max is within what "
         "matters of it (no significant lead of 1 point or more), and avg is also the cheapest of them to "
         "pool (2 us/image)"),
        ((0.725, 0.700), (0.015, 0.035), (3, 2), 0.01, "recommendation: avg: the best mAP (72.5), ahead of every other "
         "pooling by a difference that matters"),
        ((0.725, 0.718), (0.001, 0.014), (None, None), None, "recommendation: avg: the best mAP (72.5); max is within "
         "what matters of it (no significant lead of 1 point or more); pooling time was not measured "
         "(saved embeddings), so cost does not decide"),
    ],
)
def test_recommendation_weighs_size_of_difference_and_cost(maps, cis, us, embed, expected):
    report = cmp.Report("x", 100, [pooling("avg", maps[0], us[0]), pooling("max", maps[1], us[1])],
                        [cmp.PairResult("avg", "max", 0.5, 0.9, maps[0] - maps[1], cis)], 10, False, chance_map=0.2,
                        embed_seconds=None if embed is None else embed * 100)
    assert report.recommendation() == expected


def independent_reranked_ap(x: np.ndarray, labels: np.ndarray, dba: tuple[int, float] | None,
                            aqe: tuple[int, float] | None):
    """Leave-one-out AP with database-side augmentation (k neighbours, weights similarity^alpha) then alpha
    query expansion, written from the definitions (docs/retrieval.md) with full float64 matrices."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    db = unit
    if dba:
        k, alpha = dba
        sims = unit @ unit.T
        np.fill_diagonal(sims, -np.inf)
        near = np.argsort(-sims, axis=1)[:, :k]
        db = np.stack([unit[i] + sum(max(sims[i, j], 0.0) ** alpha * unit[j] for j in near[i]) for i in range(len(x))])
        db /= np.linalg.norm(db, axis=1, keepdims=True)
    aps = []
    for q in range(len(x)):
        others = np.delete(np.arange(len(x)), q)
        query = unit[q]
        if aqe:
            k, alpha = aqe
            sims = db[others] @ query
            top = others[np.argsort(-sims)[:k]]
            query = query + sum(max(float(db[j] @ unit[q]), 0.0) ** alpha * db[j] for j in top)
            query /= np.linalg.norm(query)
        ranked = others[np.argsort(-(db[others] @ query))]
        relevant = labels[ranked] == labels[q]
        aps.append((np.cumsum(relevant)[relevant] / (np.flatnonzero(relevant) + 1)).mean())
    return np.array(aps)


def test_rerank_scores_every_pooling_with_each_re_ranking_against_an_independent_computation():
    from gpl_cli.analysis.rerank import parse_rerank_list
    from gpl_cli.store.embeddings import Embeddings

    rng = np.random.default_rng(7)
    labels = np.repeat(["a", "b", "c", "d"], 9)
    centres = {c: rng.standard_normal(16) for c in "abcd"}
    vectors = {k: np.stack([centres[c] + s * rng.standard_normal(16) for c in labels]).astype(np.float32)
               for k, s in (("avg", 1.0), ("max", 1.3))}
    emb = Embeddings([f"{c}/{i}.jpg" for i, c in enumerate(labels)], vectors, {})
    # dba weighs its neighbours by similarity here: with equal weights, two rows that are each other's nearest
    # and share their second become the same vector, and their order would be float32 rounding's
    specs = ["dba:alpha=1", "aqe:k=3,alpha=2", "dba:k=3,alpha=2,aqe"]
    report = cmp.compare(emb, list(labels), rerank=[parse_rerank_list([s]) for s in specs])
    assert [(r.key, r.rerank) for r in report.reranked] == [(k, s) for k in ("avg", "max") for s in specs]
    for r in report.reranked:
        steps = {"dba:alpha=1": ((2, 1.0), None), "aqe:k=3,alpha=2": (None, (3, 2.0)),
                 "dba:k=3,alpha=2,aqe": ((3, 2.0), (2, 3.0))}[r.rerank]
        expected = independent_reranked_ap(vectors[r.key], labels, *steps)
        plain = next(p for p in report.poolings if p.key == r.key)
        assert r.map == pytest.approx(expected.mean(), abs=1e-6)
        assert r.map_diff == pytest.approx(expected.mean() - plain.map, abs=1e-6)
        assert r.map_ci[0] <= r.map <= r.map_ci[1] and r.map_diff_ci[0] <= r.map_diff <= r.map_diff_ci[1]
        assert r.verdict().startswith((f"{r.key} + {r.rerank} beats {r.key}", f"{r.key} beats {r.key} + {r.rerank}",
                                       f"{r.key} + {r.rerank} vs {r.key}"))
    table = report.table()
    assert "avg + dba:k=3,alpha=2,aqe" in table and "re-ranking" in table
    doc = report.as_dict()["reranked"]["max + dba:alpha=1"]
    assert doc["pooling"] == "max" and doc["map"] == report.reranked[3].map
    rows = list(csv.DictReader(io.StringIO(report.csv_text())))
    gain = next(r for r in rows if r["pooling"] == "avg + dba:alpha=1" and r["metric"] == "map_diff")
    assert gain["versus"] == "avg" and float(gain["value"]) == report.reranked[0].map_diff


def test_plot(photo_run, tmp_path):
    from PIL import Image

    from gpl_cli.report.plots import plot_report
    from gpl_cli.store.output import FIGURE, Output

    _, _, _, report = photo_run
    plot_report(report, Output.resolve(str(tmp_path / "report.png"), kind=FIGURE))
    with Image.open(tmp_path / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1]  # three panels side by side
        assert len(np.unique(np.asarray(im.convert("L")))) > 20  # something was drawn
    with pytest.raises(GplError, match="while writing .*dir.png"):
        plot_report(report, Output.resolve(str(tmp_path / "no" / "such" / "dir.png"), kind=FIGURE))


def test_cli_on_a_saved_file(photo_run, tmp_path):
    _, _, saved, report = photo_run
    proc = run_gpl("compare", str(saved), "--json", "-q", check=True)
    doc = json.loads(proc.stdout)
    doc["source"] = None
    untimed = dataclasses.replace(report, poolings=[dataclasses.replace(p, pool_seconds=None) for p in report.poolings])
    expected = untimed.as_dict()  # a saved file has no pooling times
    expected["source"] = None
    assert all(doc["poolings"][key]["pool_seconds"] is None for key in ("avg", "max"))
    assert doc == json.loads(json.dumps(expected))
    proc = run_gpl("compare", str(saved), "--csv", "--plot", str(tmp_path / "r.png"), "-q", check=True)
    rows = list(csv.DictReader(io.StringIO(proc.stdout.decode())))
    value = {(r["pooling"], r["versus"], r["metric"]): r["value"] for r in rows}
    assert float(value[("avg", "", "map")]) == report.poolings[0].map
    assert float(value[("avg", "max", "map_diff_ci95.low")]) == report.pairs[0].map_diff_ci[0]
    assert float(value[("max", "", "class_ap.fish")]) == report.poolings[1].class_ap["fish"]
    assert (tmp_path / "r.png").stat().st_size > 0


def test_cli_errors(photo_run, tmp_path, small_folder):
    _, _, saved, _ = photo_run
    emb = cmp.load_embedding_files([str(saved)])
    other = write_h5(tmp_path / "other.h5", emb.paths[1:], {"gem": emb.vectors["avg"][1:]})
    for args, message in [
        ((str(saved), other), "hold different images"),
        ((str(saved), "--save", str(tmp_path / "x.h5")), "--save applies to images"),
        ((str(saved), "--json", "--csv"), "--json and --csv are alternatives"),
        ((str(small_folder),), "four.webp is not inside a class folder"),  # found before any model is loaded
        ((str(saved), "--search"), "--search embeds the images at each size it tries: give the images"),
        ((str(saved), "--rerank", "aqe,dba"), "dba rewrites the database, so it comes before aqe"),
        ((str(small_folder), "--scales", "1", "--scales", "1,2"), "several values are a search space (add --search)"),
    ]:
        proc = run_gpl("compare", *args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == b""
        assert message in proc.stderr.decode()


def test_cli_on_a_folder(tmp_path):
    """The one model run through the CLI: tiny generated images in two class folders."""
    from conftest import make_photo_like
    from PIL import Image

    for i, name in enumerate(["red/a.png", "red/b.png", "red/c.png", "blue/d.png", "blue/e.png"]):
        (tmp_path / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_photo_like((64, 48), seed=i)).save(tmp_path / "imgs" / name)
    saved = tmp_path / "emb.h5"
    proc = run_gpl("compare", str(tmp_path / "imgs"), "--save", str(saved), "--json", "--workers", "0", check=True)
    doc = json.loads(proc.stdout)  # stdout holds the JSON only
    assert doc["classes"] == {"blue": 2, "red": 3} and list(doc["poolings"]) == ["avg", "max"]
    assert all(doc["poolings"][k]["pool_seconds"] > 0 for k in ("avg", "max"))
    assert doc["embed_seconds"] > 0
    from_file = cmp.load_embedding_files([str(saved)])
    again = cmp.compare(from_file, cmp.folder_labels(from_file.paths), source=doc["source"],
                        pool_seconds={k: doc["poolings"][k]["pool_seconds"] for k in ("avg", "max")})
    again.embed_seconds = doc["embed_seconds"]  # the times the recommendation weighs
    assert doc == json.loads(json.dumps(again.as_dict()))


def class_folder_file(path: Path) -> str:
    """A small embeddings file of six images in two class folders: compare reads it without a model."""
    rng = np.random.default_rng(0)
    names = [f"{c}/{i}.jpg" for c in ("cats", "dogs") for i in range(3)]
    return write_h5(path, names, {k: rng.random((6, 8), dtype=np.float32) for k in ("avg", "max")})


def test_cli_plot_never_replaces_an_existing_file_without_overwrite(tmp_path):
    """Bug: `gpl compare --plot FILE` replaced an existing FILE without --overwrite (the figure was saved with
    matplotlib's savefig directly). It is refused, exit 2, with a message naming the file and --overwrite."""
    saved = class_folder_file(tmp_path / "emb.h5")
    plot = tmp_path / "mine.png"
    plot.write_bytes(b"a user's picture")
    proc = run_gpl("compare", saved, "--plot", str(plot), "-q")
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert str(plot) in err and "--overwrite" in err and "Traceback" not in err
    assert proc.stdout == b""
    assert plot.read_bytes() == b"a user's picture"
    again = run_gpl("compare", saved, "--plot", str(plot), "-q", "--overwrite")
    assert again.returncode == 0, again.stderr.decode()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "mine.png.partial").exists()


def test_cli_plot_over_an_existing_file_is_refused_before_any_image_is_embedded(tmp_path):
    """Bug: `gpl compare DIR --plot FILE` with FILE existing embedded every image first. The refusal comes
    before any work: nothing is embedded, so the --save file never appears."""
    from conftest import make_photo_like
    from PIL import Image

    for i, name in enumerate(["red/a.png", "red/b.png", "blue/c.png", "blue/d.png"]):
        (tmp_path / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_photo_like((48, 40), seed=i)).save(tmp_path / "imgs" / name)
    plot = tmp_path / "mine.png"
    plot.write_bytes(b"a user's picture")
    saved = tmp_path / "emb.h5"
    proc = run_gpl("compare", str(tmp_path / "imgs"), "--plot", str(plot), "--save", str(saved), "-q", "--workers", "0")
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert str(plot) in err and "--overwrite" in err
    assert plot.read_bytes() == b"a user's picture"
    assert sorted(os.listdir(tmp_path)) == ["imgs", "mine.png"]  # no image was embedded: no emb.h5, nor a partial one


def test_too_few_images_are_refused_before_anything_is_written(tmp_path):
    """Bug: `gpl compare DIR --save FILE` over two images wrote FILE, then refused to compare (exit 2), so
    the same command run again failed on "output exists". Now too few images are refused before the model
    loads; and when unreadable images leave too few, after embedding but before --save is written."""
    from conftest import gpl_imports, make_photo_like
    from PIL import Image

    for i, name in enumerate(["red/a.png", "blue/b.png"]):
        (tmp_path / "two" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_photo_like((48, 40), seed=i)).save(tmp_path / "two" / name)
    saved = tmp_path / "t.h5"
    status, heavy, err = gpl_imports("compare", str(tmp_path / "two"), "--save", str(saved), "-q")
    assert status == 2 and "compare needs at least 3 images, got 2" in err
    assert "torch" not in heavy  # refused before the model loaded
    shutil.copytree(tmp_path / "two", tmp_path / "three")
    (tmp_path / "three" / "red" / "broken.png").write_bytes(b"not an image")
    proc = run_gpl("compare", str(tmp_path / "three"), "--save", str(saved), "-q", "--workers", "0")
    assert proc.returncode == 2 and b"compare needs at least 3 images, got 2" in proc.stderr, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["three", "two"]  # no t.h5, nor a partial one


def test_labels_csv_rows_that_match_no_image_are_reported(tmp_path):
    """Bug: rows of --labels that named no image were ignored without a word. Now a warning counts them and
    names the first five; a CSV none of whose rows is an image is refused (exit 2)."""
    saved = class_folder_file(tmp_path / "emb.h5")  # cats/0..2.jpg, dogs/0..2.jpg
    names = [f"{c}/{i}.jpg" for c in ("cats", "dogs") for i in range(3)]
    extra = [f"birds/{i}.jpg" for i in range(7)]
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{n},{n.split('/')[0]}\n" for n in names + extra))
    notes: list[str] = []
    assert cmp.read_labels_csv(str(labels), names, None, notes.append) == ["cats"] * 3 + ["dogs"] * 3
    assert notes == [f"warning: 7 of the 13 paths in {labels} match no image and are ignored "
                     "(first 5: birds/0.jpg, birds/1.jpg, birds/2.jpg, birds/3.jpg, birds/4.jpg)"]
    proc = run_gpl("compare", saved, "--labels", str(labels), "-q")  # shown even with -q
    assert proc.returncode == 0 and proc.stderr.decode() == f"gpl: {notes[0]}\n"
    exact = tmp_path / "exact.csv"
    exact.write_text("".join(f"{n},{n.split('/')[0]}\n" for n in names))
    assert run_gpl("compare", saved, "--labels", str(exact), "-q").stderr == b""
    unrelated = tmp_path / "unrelated.csv"
    unrelated.write_text("".join(f"{n},bird\n" for n in extra))
    proc = run_gpl("compare", saved, "--labels", str(unrelated), "-q")
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode().startswith(f"gpl: error: none of the 7 paths in {unrelated} is one of the 6 images")


@pytest.mark.parametrize("ci, words", [((0.01, 0.05), "for a classifier on top, the linear probe prefers max (+3.0 points "
                                        "of test accuracy, 95 % CI +1.0 to +5.0)"),
                                       ((-0.0004, 0.05), "the linear probe ranks max first, not significantly (+3.0 "
                                        "points of test accuracy, 95 % CI +0.0 to +5.0)")])
def test_recommendation_says_what_the_probe_prefers(ci, words):
    from gpl_cli.analysis.probe import ProbePair, ProbeReport, ProbeScore

    report = cmp.Report("x", 100, [pooling("avg", 0.725, None), pooling("max", 0.70, None)],
                        [cmp.PairResult("avg", "max", 0.5, 0.9, 0.025, (0.015, 0.035))], 10, False, chance_map=0.2)
    scores = [ProbeScore(k, 8, 90, acc, (0, 1), 1.0, [], [], []) for k, acc in (("avg", 0.90), ("max", 0.93))]
    report.probe = ProbeReport(10, 5, 3, (1.0,), scores, [ProbePair("avg", "max", -0.03, (-ci[1], -ci[0]))])
    assert report.recommendation().endswith("by a difference that matters; " + words)
