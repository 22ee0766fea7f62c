"""gpl compare --search and --rerank on the 194 labelled photos: the nested-CV gain of the searched pipeline over
the default (crop, scale 1, avg), measured end to end through the CLI."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_gpl

SHARED = REPO.parent / "shared" / "data" / "labeled_photos"
GOAL = 0.05  # five mAP points over crop avg


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    if not SHARED.is_dir():
        pytest.skip(reason=f"{SHARED} is missing (the 194 labelled photos of the shared data)")
    page = tmp_path_factory.mktemp("search") / "report.html"
    # A smaller space than the default (one pooling, crop only) keeps this to three forward passes.
    proc = run_gpl("compare", str(SHARED), "--search", "--pool", "avg", "--resize", "crop", "--scales", "1",
                   "--scales", "1,1.414,2", "--rerank", "dba,aqe", "--json", "--html", str(page), check=True)
    return json.loads(proc.stdout), page.read_text(), proc.stderr.decode()


def test_the_searched_pipeline_beats_crop_avg_by_five_points_on_held_out_queries(searched):
    doc, _, _ = searched
    result = doc["search"]
    low, high = result["gain_ci95"]
    print(f"nested-CV gain {100 * result['gain']:+.1f} mAP points (95 % CI {100 * low:+.1f} to {100 * high:+.1f}); "
          f"winner {result['winner']}; per fold {result['fold_choices']}")
    assert result["default"] == {"resize": "crop", "scales": [1.0], "pool": "avg", "whiten": False, "rerank": None}
    assert result["default_map"] == pytest.approx(doc["poolings"]["avg"]["map"])
    assert result["gain"] >= GOAL and low > GOAL / 2
    assert result["held_out_map"] == pytest.approx(result["default_map"] + result["gain"])
    assert result["winner"]["rerank"] == "dba,aqe" and len(result["fold_choices"]) == result["folds"] == 5
    assert result["verdict"].startswith("search: ") and " gains +" in result["verdict"]
    assert result["commands"][-1].startswith("gpl neighbors pipeline.h5 ") and "--rerank dba,aqe" in result["commands"][-1]
    assert len(result["candidates"]) == 2 * 2 * 2  # scale sets x whitening x re-ranking, avg only


def test_rerank_rows_and_the_page(searched):
    doc, page, stderr = searched
    gain = doc["reranked"]["avg + dba,aqe"]
    assert gain["map"] - doc["poolings"]["avg"]["map"] == pytest.approx(gain["map_diff"])
    assert gain["significant"] and gain["map_diff"] > GOAL
    assert "Best pipeline (compare --search)" in page and doc["search"]["commands"][0] in page
    assert '<a href="#search">' in page
    assert "--search: a forward pass per scale, crop at 1.414, 2" in stderr
