"""The duplicates, clusters and likely-mislabels pages, parsed without a browser: the histogram's bars fall on the
right side of the threshold line, the near misses, the pairs inside each group and the keep/remove marks are the
ones of the result given, and exact groups are labelled."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Page, make_photo_like
from PIL import Image

from gpl_cli.analysis.duplicates.clusters import Clusters
from gpl_cli.analysis.duplicates.mislabels import Mislabel, Mislabels
from gpl_cli.analysis.duplicates.model import Duplicates, Group, Member, Threshold
from gpl_cli.analysis.neighbors import Neighbor
from gpl_cli.report import html as hr

NAMES = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "gone.jpg", "f.jpg", "g.jpg"]
THRESHOLD = Threshold(0.95, "calibration e.h5.duplicates.json (target precision 0.99)")


@pytest.fixture()
def folder(tmp_path):
    for i, name in enumerate(NAMES):
        if name != "gone.jpg":
            Image.fromarray(make_photo_like((60 + 10 * i, 40), seed=i)).save(tmp_path / name)
    return tmp_path


def result(keep_rule: str | None = "largest", **changes) -> Duplicates:
    exact = Group([Member("a.jpg", 0, 1.0, keep=True, exact=True), Member("b.jpg", 1, 1.0, exact=True)],
                  [(0, 1, 1.0)], exact=True)
    near = Group([Member("c.jpg", 2, 0.97), Member("d.jpg", 3, 0.97, keep=True), Member("gone.jpg", 4, 0.955)],
                 [(0, 1, 0.97), (1, 2, 0.955), (0, 2, 0.951)])
    if keep_rule is None:
        for g in (exact, near):
            for m in g.members:
                m.keep = False
    # float32 like the real search, which compares in float32: 0.95 in float32 reaches the threshold 0.95
    best = np.array([1.0, 1.0, 0.97, 0.97, 0.955, 0.95, 0.93, 0.62, 0.6, np.nan], np.float32)
    near_misses = [("f.jpg", "g.jpg", 0.93), ("c.jpg", "f.jpg", 0.912)]
    return Duplicates(**{"file": "e.h5", "key": "avg", "threshold": THRESHOLD, "groups": [exact, near], "best": best,
                         "near_misses": near_misses, "keep_rule": keep_rule, **changes})


def chunks(page: str, marker: str) -> list[Page]:
    """Each element whose opening tag starts with `marker`, up to the next one, parsed on its own."""
    return [Page(marker + part) for part in page.split(marker)[1:]]


def test_histogram_bars_fall_on_their_side_of_the_threshold_line(folder):
    found = result()
    page = Page(hr.duplicates_page(found, hr.Thumbnails(str(folder)), "e.h5", "avg"))
    [line] = page.all("line", "threshold")
    assert float(line["data-value"]) == THRESHOLD.value
    x = float(line["x1"])
    bars = page.all("rect", "bar")
    best = found.best[np.isfinite(found.best)]
    above = [b for b in bars if "above" in b["class"].split()]
    below = [b for b in bars if "below" in b["class"].split()]
    assert len(above) + len(below) == len(bars)
    assert sum(int(b["data-count"]) for b in above) == int((best >= THRESHOLD.value).sum()) == 6
    assert sum(int(b["data-count"]) for b in below) == int((best < THRESHOLD.value).sum()) == 3
    assert all(float(b["x"]) >= x for b in above) and all(float(b["x"]) + float(b["width"]) <= x for b in below)
    for b in bars:  # each bar counts the scores in its range, compared in float32 like the search
        inside = (best >= float(b["data-from"])) & (best < float(b["data-to"]))
        assert int(b["data-count"]) == int(inside.sum()), b
    text = "".join(page.text)
    assert THRESHOLD.source in text and "6 of 9 images have a match at or above 0.950" in text


def test_near_misses_with_both_images_and_their_scores(folder):
    found = result()
    html = hr.duplicates_page(found, hr.Thumbnails(str(folder)), "e.h5", "avg")
    shown = []
    for part in chunks(html.split('id="groups"')[0], '<div class="pair near-miss"'):
        paths = [a["alt"] for a in part.all("img")]
        shown.append((*paths, float(part.tags[0][1]["data-score"])))
        assert f"{float(part.tags[0][1]['data-score']):.3f}" in "".join(part.text)
    assert shown == found.near_misses


def test_each_group_lists_its_pairs_its_marks_and_whether_it_is_exact(folder):
    found = result()
    html = hr.duplicates_page(found, hr.Thumbnails(str(folder)), "e.h5", "avg")
    cards = chunks(html, '<div class="card group"')
    assert len(cards) == len(found.groups)
    for card, group in zip(cards, found.groups):
        rows = [(int(r["data-a"]), int(r["data-b"]), float(r["data-score"])) for r in card.all("tr", "matched")]
        assert rows == sorted(group.pairs, key=lambda p: -p[2])  # most similar first
        figures = card.all("figure", "cell")
        assert [("keep" if "keep" in f["class"].split() else "remove") for f in figures] == \
            ["keep" if m.keep else "remove" for m in group.members]
        text = "".join(card.text)
        assert ("exact copies: identical bytes" in text) == group.exact
        assert text.count("exact copy") == sum(m.exact for m in group.members)
        for a, b, _ in group.pairs:  # each pair names its two images
            assert f"{group.members[a].path} \u2194 {group.members[b].path}" in text
    assert cards[1].placeholders() == ["gone.jpg"]
    assert "--keep largest" in "".join(Page(html).text)


def test_without_a_keep_rule_there_are_no_marks_but_the_largest_is_tagged(folder):
    html = hr.duplicates_page(result(keep_rule=None), hr.Thumbnails(str(folder)), "e.h5", "avg")
    page = Page(html)
    assert not page.all("figure", "keep") and not page.all("figure", "remove")
    # the largest readable image of each group: b.jpg (70 x 40) over a.jpg, d.jpg (90 x 40) over c.jpg
    tagged = [c for c in chunks(html.split('id="groups"')[1], '<figure class="cell') if "largest" in "".join(c.text)]
    assert [c.all("img")[0]["alt"] for c in tagged] == ["b.jpg", "d.jpg"]


def test_no_groups_and_no_scores_say_so(folder):
    empty = result(groups=[], near_misses=[], best=np.full(1, np.nan, np.float32))
    text = "".join(Page(hr.duplicates_page(empty, hr.Thumbnails(str(folder)), "e.h5", "avg")).text)
    assert "No duplicates at this threshold" in text and "no pair of images" in text


def test_calibration_section_shows_recall_per_edit_and_the_curve(folder):
    from gpl_cli.analysis.duplicates.calibrate import Calibration, Pooling

    curve = [(0.99, 1.0, 0.4), (0.95, 1.0, 0.8), (0.9, 0.99, 0.95), (0.85, 0.9, 0.99)]
    cal = Calibration("e.h5", "avg", 0.9, 0.99, True, 0.99, 0.95, 0.01,
                      {"jpeg": {"copies": 40, "found": 40, "recall": 1.0, "median": 0.981},
                       "crop": {"copies": 40, "found": 33, "recall": 0.825, "median": 0.921}},
                      curve, 40, 194, 0.9999, [Pooling("avg", 0.9, True, 0.99, 0.95, 0.01),
                                               Pooling("max", 0.93, True, 0.99, 0.9, 0.02)], "avg separates best")
    html = hr.duplicates_page(result(calibration=cal), hr.Thumbnails(str(folder)), "e.h5", "avg")
    section = Page(html.split('id="calibration"')[1].split("<section")[0])
    text = "".join(section.text)
    assert "crop" in text and "0.825" in text and "0.921" in text and "avg separates best" in text
    assert len(section.all("polyline")) == 2 and section.all("line", "threshold")


def test_clusters_page_shows_each_cluster_largest_first(folder):
    groups = [Group([Member(n, i, 0.9) for i, n in enumerate(NAMES[:3])], []),
              Group([Member(n, 5 + i, 0.88) for i, n in enumerate(NAMES[5:])], [])]
    html = hr.clusters_page(Clusters("e.h5", "avg", Threshold(0.85, "--cluster-threshold"), groups),
                            hr.Thumbnails(str(folder)), "e.h5", "avg")
    cards = chunks(html, '<div class="card cluster"')
    assert [[a["alt"] for a in c.all("img")] for c in cards] == [NAMES[:3], NAMES[5:]]
    assert "0.850 (from --cluster-threshold)" in "".join(Page(html).text)


def test_mislabels_page_marks_each_neighbour_by_its_label(folder):
    labels = ["cat", "dog", "dog", "dog", "cat", "cat", "dog"]
    item = Mislabel(1, 2 / 3, "a.jpg", 0, "cat", "dog",
                    [Neighbor(1, 0.9, "b.jpg", 1), Neighbor(2, 0.8, "f.jpg", 5), Neighbor(3, 0.7, "c.jpg", 2)])
    html = hr.mislabels_page(Mislabels("e.h5", "avg", 3, labels, "the class folders", [item]),
                             hr.Thumbnails(str(folder)), "e.h5", "avg")
    [row] = chunks(html, '<div class="row mislabel"')
    figures = row.all("figure", "cell")
    assert [f["class"].split()[-1] for f in figures] == ["query-image", "other", "same", "other"]
    text = "".join(row.text)
    assert "labelled cat" in text and "dog?" in text and "2 of 3 nearest" in text
