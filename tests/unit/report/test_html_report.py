"""HTML pages without a browser: escaping (parsed with html.parser), placeholders, thumbnail sizes, which
queries and confusions the compare report shows (against plain-Python recomputations), and the --html options."""

from __future__ import annotations

import base64
import io
import os
import shutil
from collections import Counter

import numpy as np
import pytest
from conftest import REPO, Page, make_photo_like, run_gpl
from PIL import Image

from gpl_cli.analysis import compare as cmp, neighbors as nb
from gpl_cli.analysis.duplicates.groups import find_duplicates
from gpl_cli.analysis.duplicates.model import Threshold
from gpl_cli.analysis.outliers import find_outliers
from gpl_cli.errors import GplError
from gpl_cli.report import gallery, html as hr
from gpl_cli.store.formats.h5 import H5Writer

PHOTOS = REPO / "tests" / "data" / "labeled_photos"
HOSTILE = '<img src=x onerror=alert(1)>"&.webp'
HOSTILE_CLASS = 'fish"<b>'


def assert_safe(page: str) -> Page:
    """No script, no event handler, no source but data: URIs, no link but to a section of the page itself;
    the hostile name survives only as text."""
    parsed = Page(page)
    assert not parsed.all("script")
    sections = {attrs.get("id") for tag, attrs in parsed.tags if tag == "section"}
    for tag, attrs in parsed.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        assert "src" not in attrs or attrs["src"].startswith("data:image/"), (tag, attrs)
        assert "href" not in attrs or attrs["href"][1:] in sections and attrs["href"][0] == "#", (tag, attrs)
    assert ("meta", {"http-equiv": "Content-Security-Policy", "content": hr.CSP}) in parsed.tags
    return parsed


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Real photos in three class folders (one named with markup, one file named as an attack), with
    synthetic class-clustered vectors in an embeddings file whose root is the folder."""
    root = tmp_path_factory.mktemp("html")
    photos = root / "photos"
    names = []
    for folder, cls in (("animal", "animal"), ("fish", HOSTILE_CLASS), ("tool", "tool")):
        (photos / cls).mkdir(parents=True)
        for src in sorted((PHOTOS / folder).iterdir())[:4]:
            shutil.copy(src, photos / cls / src.name)
            names.append(f"{cls}/{src.name}")
    os.rename(photos / names[0], photos / "animal" / HOSTILE)
    names[0] = f"animal/{HOSTILE}"
    labels = [n.split("/")[0] for n in names]
    rng = np.random.default_rng(0)
    centres = {c: rng.standard_normal(32) for c in set(labels)}
    vectors = {
        "avg": np.stack([centres[c] + 0.9 * rng.standard_normal(32) for c in labels]).astype(np.float32),
        "max": np.stack([centres[c] + 1.3 * rng.standard_normal(32) for c in labels]).astype(np.float32),
    }
    vectors["avg"][1] = vectors["avg"][0] + 0.01  # a near-duplicate pair, one of them the hostile name
    out = root / "emb.h5"
    writer = H5Writer(str(out), {k: 32 for k in vectors})
    writer.write(names, vectors)
    writer.close({"pool_keys": list(vectors), "backbone": "test", "root": str(photos)})
    return out, photos, names, labels, vectors


def test_every_page_escapes_names_and_labels(collection):
    out, photos, names, labels, _ = collection
    thumbs = hr.Thumbnails(str(photos))
    emb = cmp.load_embedding_files([str(out)])
    report = cmp.compare(emb, cmp.folder_labels(emb.paths))
    pages = {
        "compare": hr.compare_page(report, emb, labels, thumbs, 2),
        "neighbors": hr.neighbors_page(nb.nearest(str(out), [names[0], names[6]], 4), thumbs, str(out), "avg"),
        "duplicates": hr.duplicates_page(find_duplicates(str(out), Threshold(0.99, "--threshold")), thumbs, str(out), "avg"),
        "outliers": hr.outliers_page(find_outliers(str(out), 3, len(names)), thumbs, str(out), "avg", 3),
    }
    for kind, page in pages.items():
        parsed = assert_safe(page)
        text = "".join(parsed.text)
        assert f"animal/{HOSTILE}" in text, kind  # shown, as text
        images = parsed.all("img")
        assert images and all(a["src"].startswith("data:image/") for a in images), kind
        if kind != "compare":  # no plot: every image is a thumbnail of a file in the collection
            assert {a["alt"] for a in images} <= set(names), kind
    compare_text = "".join(Page(pages["compare"]).text)
    assert HOSTILE_CLASS in compare_text and f"{HOSTILE_CLASS}/" in compare_text


def decode(uri: str) -> Image.Image:
    head, data = uri.split(",", 1)
    assert head == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_thumbnails_are_small_jpegs_and_the_page_is_little_more(tmp_path):
    """Page size for N thumbnails: each a JPEG within THUMB_SIDE, and markup a small share of the page."""
    n, k = 40, 4
    files = []
    for i in range(n):
        files.append(tmp_path / f"p{i}.jpg")
        Image.fromarray(make_photo_like((1200, 800) if i % 2 else (600, 900), seed=i)).save(files[-1], quality=92)
    results = [nb.QueryResult(f.name, "file", [nb.Neighbor(j + 1, 0.5, files[(i + j + 1) % n].name, 0)
                                               for j in range(k)]) for i, f in enumerate(files)]
    page = hr.neighbors_page(results, hr.Thumbnails(str(tmp_path)), "x.h5", "avg")
    images = Page(page).all("img")
    assert len(images) == n * (k + 1)
    for a in images:
        im = decode(a["src"])
        assert im.format == "JPEG" and max(im.size) == hr.THUMB_SIDE
        assert (int(a["width"]), int(a["height"])) == im.size
    thumbnail_chars = sum(len(a["src"]) for a in images)
    assert len(page) - thumbnail_chars < 1500 * len(images)  # markup per image cell stays small


def test_exif_rotated_photo_is_shown_upright_with_its_upright_size(tmp_path):
    photo = Image.fromarray(make_photo_like((200, 100), seed=3))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated by 90 degrees: portrait
    photo.save(tmp_path / "r.jpg", exif=exif)
    picture = hr.make_picture(str(tmp_path / "r.jpg"))
    assert picture.size == (100, 200)
    assert decode(picture.uri).size == (80, 160)


def test_missing_and_unreadable_files_are_placeholders_naming_the_path(tmp_path):
    Image.fromarray(make_photo_like((64, 64))).save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    results = [nb.QueryResult("ok.png", "file", [nb.Neighbor(1, 0.9, "gone/away.jpg", 1),
                                                 nb.Neighbor(2, 0.8, "broken.jpg", 2)])]
    parsed = assert_safe(hr.neighbors_page(results, hr.Thumbnails(str(tmp_path)), "x.h5", "avg"))
    assert [a["alt"] for a in parsed.all("img")] == ["ok.png"]
    boxes = parsed.all("div", "missing")
    assert [b["title"] for b in boxes] == ["gone/away.jpg", "broken.jpg"]
    text = "".join(parsed.text)
    assert "file not found" in text and "not a readable image" in text


def test_non_utf8_names_are_shown_with_escapes():
    assert hr._text(os.fsdecode(b"caf\xe9 <1>.jpg")) == "caf\\xe9 &lt;1&gt;.jpg"


def independent_pick(ap: np.ndarray, neighbors: list[np.ndarray], codes: np.ndarray, n: int) -> list[tuple[int, str]]:
    """Per class: up to n queries whose 5 nearest differ between poolings, most first by (places where one
    pooling's neighbour is of the query's class and another's is not, images in one's 5 and not another's, AP
    spread, lower row); then the remaining query nearest the class median."""
    def differences(r):
        pattern = moved = 0
        for i in range(len(neighbors)):
            for j in range(i + 1, len(neighbors)):
                a, b = list(neighbors[i][r][:5]), list(neighbors[j][r][:5])
                moved += len(set(a) ^ set(b))
                pattern += sum((codes[x] == codes[r]) != (codes[y] == codes[r]) for x, y in zip(a, b))
        return pattern, moved

    spread = ap.max(axis=0) - ap.min(axis=0)
    centre = ap.mean(axis=0)
    picked = []
    for c in sorted(set(codes.tolist())):
        rows = [r for r in range(len(codes)) if codes[r] == c and not np.isnan(centre[r])]
        ranked = sorted((r for r in rows if differences(r)[1] > 0), key=lambda r: (*(-d for d in differences(r)),
                                                                                  -spread[r], r))
        picked += [(r, "disagree") for r in ranked[:n]]
        rest = [r for r in rows if r not in ranked[:n]]
        if rest:
            median = float(np.median([centre[r] for r in rows]))
            picked.append((min(rest, key=lambda r: (abs(centre[r] - median), r)), "typical"))
    return picked


def test_pick_queries_with_labels():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4, 90)
    codes[codes == 3] = 2
    codes[0] = 3  # a class of one: never a query
    ap = rng.uniform(0, 1, (3, 90)).round(2)  # rounded: ties in spread are likely
    ap[:, 0] = np.nan
    base = np.stack([rng.permutation(90)[:10] for _ in range(90)])
    neighbors = [base.copy() for _ in range(3)]
    for r in range(90):  # a third of the rows show the same 5 nearest under every pooling
        for k in (1, 2):
            if r % 3:  # the first few replaced by images not in the list (a list holds an image once)
                fresh = rng.choice(np.setdiff1d(np.arange(90), neighbors[k][r]), r % 4 + k - 1, replace=False)
                neighbors[k][r, : len(fresh)] = fresh
    got = gallery.pick_queries({k: ap[i] for i, k in enumerate("abc")}, dict(zip("abc", neighbors)), codes, 3)
    assert got == independent_pick(ap, neighbors, codes, 3)
    assert all(codes[r] != 3 for r, _ in got)
    same = {r for r in range(90) if all(set(nb[r][:5]) == set(base[r][:5]) for nb in neighbors)}
    assert same and not {r for r, why in got if why == "disagree"} & same


def test_a_query_with_the_same_neighbours_is_never_shown_as_disagreeing():
    """Its AP differs most (the poolings rank its class differently further down), but the 5 shown are the same."""
    codes = np.array([0] * 6 + [1] * 6)
    ap = np.array([[0.9, 0.5, 0.6, 0.6, 0.6, 0.6] * 2, [0.1, 0.5, 0.5, 0.5, 0.5, 0.5] * 2])
    near = np.tile(np.arange(1, 11), (12, 1)) % 12
    other = near.copy()
    other[1, 4] = 11  # query 1: its 5th neighbour differs
    picked = gallery.pick_queries({"a": ap[0], "b": ap[1]}, {"a": near, "b": other}, codes, 2)
    assert [r for r, why in picked if why == "disagree"] == [1]


def test_pick_queries_without_labels_by_the_neighbours_shown():
    rng = np.random.default_rng(2)
    a = np.stack([rng.permutation(50)[:10] for _ in range(50)])
    b = a.copy()
    for r in range(50):
        b[r, : r % 7] = 50 + np.arange(r % 7)  # row r shares 5 - min(r % 7, 5) of its 5 nearest
    moved = [len(set(a[r][:5]) ^ set(b[r][:5])) for r in range(50)]
    order = sorted((r for r in range(50) if moved[r]), key=lambda r: (-moved[r], r))
    got = gallery.pick_queries(None, {"a": a, "b": b}, None, 4)
    median = float(np.median(moved))
    typical = min((r for r in range(50) if r not in order[:4]), key=lambda r: (abs(moved[r] - median), r))
    assert got == [(r, "disagree") for r in order[:4]] + [(typical, "typical")]


def test_confusions_count_the_class_pairs_among_neighbors():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 4, 80)
    x = rng.standard_normal((80, 8)).astype(np.float32)
    neighbors = np.stack([rng.choice(np.delete(np.arange(80), r), 10, replace=False) for r in range(80)])
    names = ["w", "x", "y", "z"]
    counts = Counter((codes[q], codes[j]) for q in range(80) for j in neighbors[q] if codes[q] != codes[j])
    got = gallery.confusions(x, neighbors, codes, names, shown=4)
    want = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][0] * 4 + kv[0][1]))[:4]
    assert [(c.query_class, c.neighbor_class, c.count) for c in got] == [(names[a], names[b], v) for (a, b), v in want]
    for c in got:
        a = names.index(c.query_class)
        assert c.share == pytest.approx(c.count / (np.count_nonzero(codes == a) * 10))
        for q, j, s in c.examples:
            assert codes[q] == a and names[codes[j]] == c.neighbor_class and j in neighbors[q]
            assert s == pytest.approx(float(x[q] @ x[j] / np.linalg.norm(x[q]) / np.linalg.norm(x[j])), abs=1e-5)
        ranks = [list(neighbors[q]).index(j) for q, j, _ in c.examples]
        assert ranks == sorted(ranks)


def test_query_views_list_the_nearest_others_under_every_pooling():
    rng = np.random.default_rng(4)
    vectors = {k: rng.standard_normal((30, 6)).astype(np.float32) for k in ("a", "b")}
    views = gallery.query_views(vectors, [f"p{i}" for i in range(30)], [(3, "disagree"), (17, "typical")], k=4)
    for v in views:
        for key, found in v.neighbors.items():
            x = vectors[key] / np.linalg.norm(vectors[key], axis=1, keepdims=True)
            sims = x @ x[v.row]
            sims[v.row] = -np.inf
            assert [n.row for n in found] == list(np.argsort(-sims)[:4])
            np.testing.assert_allclose([n.score for n in found], np.sort(sims)[::-1][:4], atol=1e-5)


def test_page_output_is_checked_and_written_atomically(tmp_path):
    from gpl_cli.store.output import PAGE, Output

    with pytest.raises(GplError, match="folder .*nowhere does not exist"):
        Output.resolve(str(tmp_path / "nowhere" / "x.html"), kind=PAGE).check()
    mine = tmp_path / "mine.html"
    mine.write_text("user's file")
    with pytest.raises(GplError, match="output exists: .*mine.html \\(use --overwrite"):
        Output.resolve(str(mine), kind=PAGE).check()
    page = Output.resolve(str(mine), kind=PAGE, overwrite=True).check()
    hr.write_page(page, "<p>page</p>")
    assert mine.read_text() == "<p>page</p>" and sorted(os.listdir(tmp_path)) == ["mine.html"]


def test_cli_html_options(collection, tmp_path):
    out, photos, names, _, _ = collection
    page = tmp_path / "n.html"
    first = run_gpl("neighbors", str(out), names[6], "-k", "3", "--html", str(page), check=True)
    assert first.stdout.decode().count("\n") == 3  # the usual text output as well
    assert Page(page.read_text()).all("img") and not list(tmp_path.glob("*.partial"))
    user = tmp_path / "user.html"
    user.write_text("keep me")
    cases = [
        (("neighbors", str(out), "--outliers", "--html", str(user)), "output exists"),
        (("neighbors", str(out), "--duplicates", "--html", str(tmp_path / "no" / "d.html")), "does not exist"),
        # refused before any work: the folder of images is never embedded, --save never written
        (("compare", str(photos), "--html", str(user), "--save", str(tmp_path / "s.h5")), "output exists"),
    ]
    for args, message in cases:
        proc = run_gpl(*args)
        assert proc.returncode == 2 and message in proc.stderr.decode(), (args, proc.stderr)
    assert user.read_text() == "keep me" and not (tmp_path / "s.h5").exists()
    again = run_gpl("compare", str(out), "--html", str(user), "--overwrite", "--html-queries", "1", check=True)
    assert "mAP" in again.stdout.decode() and "gpl: wrote" in again.stderr.decode()
    parsed = assert_safe(user.read_text())
    assert len(parsed.all("div", "query")) == 3 * 2  # 3 classes x (1 where they disagree + 1 typical)


def test_pages_without_labels_or_with_one_pooling(collection):
    out, photos, _, _, _ = collection
    emb = cmp.load_embedding_files([str(out)])
    thumbs = hr.Thumbnails(str(photos))
    unlabelled = hr.compare_page(cmp.compare(emb), emb, None, thumbs, 2)
    parsed = assert_safe(unlabelled)
    assert len(parsed.all("div", "query")) == 3 and not parsed.all("figure", "same") + parsed.all("figure", "other")
    assert "Average precision per class" not in unlabelled
    one = cmp.load_embedding_files([str(out)], ["avg"])
    single = hr.compare_page(cmp.compare(one, cmp.folder_labels(one.paths)), one, cmp.folder_labels(one.paths),
                             thumbs, 1)
    assert len(Page(single).all("div", "pooling")) == 3 * 2 and "lowest AP" in single


def test_the_compare_page_shows_the_probe_and_gem_auto_results(collection):
    """--probe and gem:p=auto results appear on the page with the same cells as the text report."""
    from gpl_cli.analysis import gem_auto
    from gpl_cli.analysis.probe import probe_report

    out, photos, _, _, vectors = collection
    emb = cmp.load_embedding_files([str(out)])
    labels = cmp.folder_labels(emb.paths)
    report = cmp.compare(emb, labels)
    report.probe = probe_report(emb, labels, ["avg", "max"], 3, None)
    grid = {p: np.abs(vectors["avg"]) ** (1 / p) for p in gem_auto.GRID}  # stand-ins: any vectors per p
    report.gem_auto = gem_auto.choose_p(grid, labels, 3)
    page = hr.compare_page(report, emb, labels, hr.Thumbnails(str(photos)), 1)
    assert_safe(page)
    rows, _ = report.probe.table_rows()
    for label, cells in rows[1:]:
        assert label in page and all(cell in page for cell in cells)
    assert "GeM p fitted to the labels" in page and report.gem_auto.option() in page


def test_the_compare_page_has_contents_the_search_and_the_unreadable_images(collection):
    """A table of contents linking every section, the search's winner, gain, choices and commands, the
    re-ranking table, and the images that could not be read, listed with their reason."""
    from dataclasses import replace

    from gpl_cli.analysis import search
    from gpl_cli.analysis.rerank import parse_rerank_list

    out, photos, _, _, vectors = collection
    emb = cmp.load_embedding_files([str(out)])
    labels = cmp.folder_labels(emb.paths)
    emb = replace(emb, failures=[("tool/broken_file.webp", "not a readable image"), (HOSTILE, "truncated")])
    report = cmp.compare(emb, labels, rerank=[parse_rerank_list(["dba"])])
    space = search.search_space(["avg", "max"], ["crop"], [(1.0,)], ["dba"])
    report.search = search.nested_search(search.Views({("crop", 1.0, k): v for k, v in vectors.items()}), space,
                                         labels, folds=2)
    report.search.commands = report.search.winner.commands(["photos"], [], emb.paths[0])
    page = hr.compare_page(report, emb, labels, hr.Thumbnails(str(photos)), 1)
    parsed = assert_safe(page)
    sections = [attrs["id"] for tag, attrs in parsed.tags if tag == "section"]
    links = [attrs["href"] for tag, attrs in parsed.tags if tag == "a"]
    assert links == [f"#{s}" for s in sections]
    assert sections[:3] == ["verdict", "search", "metrics"] and sections[-1] == "unreadable" and "rerank" in sections
    assert hr._text(report.search.verdict()) in page
    assert all(hr._text(c) in page for c in report.search.commands)
    assert "2 more could not be read" in page
    unreadable = page[page.index('<section id="unreadable">'):]
    assert "tool/<wbr>broken_<wbr>file.webp" in unreadable and "not a readable image" in unreadable
    assert hr._text(HOSTILE) in unreadable and HOSTILE not in page  # escaped, as every name
    assert hr._text(report.recommendation()) in page
