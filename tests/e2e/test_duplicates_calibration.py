"""A threshold calibrated on real photos finds real edited copies: `gpl neighbors --duplicates --calibrate`
on 60 distinct labelled photos, then `--duplicates` with that threshold on the same photos mixed with edited
copies of 20 of them, made here with Pillow (every kind of edit gpl calibrates on, with this file's own
parameters), and the default threshold on the same corpus. The photos are embedded with max pooling, which
separates copies best on the whole labelled set (bench/bench_calibration.py: recall 0.95 at precision 0.99,
avg 0.88; bench/RESULTS.md)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_gpl
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

SHARED = REPO.parent / "shared" / "data" / "labeled_photos"
BUNDLED = REPO / "tests" / "data" / "labeled_photos"
DISTINCT, COPIED = 60, 20


def _caption(im: Image.Image, i: int) -> Image.Image:
    im = im.copy()
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=max(8, im.height // (8 + i % 5)))
    draw.text((4, im.height // 2 if i % 2 else im.height - im.height // 6), f"holiday {2000 + i}", font=font,
              fill=(255, 255, 0), stroke_width=1, stroke_fill=(0, 0, 0))
    return im


def _crop(im: Image.Image, i: int) -> Image.Image:
    cut = 0.02 + 0.18 * (i % 10) / 9  # 2 % to 20 % of each side
    w, h = im.size
    dx, dy = round(w * cut), round(h * cut)
    left, top = (dx, 0) if i % 2 else (0, dy)
    return im.crop((left, top, left + w - dx, top + h - dy))


# kind -> (extension, edit of image number i); the parameters sweep the ranges gpl calibrates on.
EDITS = {
    "jpeg": (".jpg", None),  # saved below at quality 10 to 90
    "crop": (".png", _crop),
    "resize": (".png", lambda im, i: im.resize((max(1, round(im.width * (0.25 + 0.75 * (i % 7) / 6))),
                                                max(1, round(im.height * (0.25 + 0.75 * (i % 7) / 6)))))),
    "mirror": (".png", lambda im, i: ImageOps.mirror(im)),
    "greyscale": (".png", lambda im, i: ImageOps.grayscale(im)),
    "brightness": (".png", lambda im, i: ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(0.6 + 0.8 * (i % 5) / 4))
                   .enhance(1.4 - 0.8 * (i % 3) / 2)),
    "rotate": (".png", lambda im, i: im.rotate((2 + 8 * (i % 5) / 4) * (-1) ** i, Image.Resampling.BICUBIC)),
    "caption": (".png", _caption),
}


def make_corpus(photos: Path, root: Path) -> dict[str, str]:
    """Write root/distinct (DISTINCT photos of `photos`) and root/corpus (the same photos and the edited copies of
    COPIED of them); returns corpus path -> the photo it derives from."""
    every = sorted(p.relative_to(photos) for p in photos.rglob("*.webp"))
    chosen = every[:: max(1, len(every) // DISTINCT)][:DISTINCT]
    assert len(chosen) == DISTINCT
    for name in chosen:  # the distinct photos, once alone and once among the copies
        for folder in ("distinct", "corpus"):
            (root / folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(photos / name, root / folder / name)
    source = {str(name): str(name) for name in chosen}  # corpus path -> the photo it derives from
    for i, name in enumerate(chosen[::DISTINCT // COPIED][:COPIED]):
        with Image.open(photos / name) as im:
            im = im.convert("RGB")
        for kind, (ext, edit) in EDITS.items():
            copy = root / "corpus" / "copies" / f"{name.with_suffix('')}.{kind}{ext}"
            copy.parent.mkdir(parents=True, exist_ok=True)
            if edit is None:
                im.save(copy, quality=10 + 80 * (i % 9) // 8)
            else:
                edit(im, i).save(copy)
            source[str(copy.relative_to(root / "corpus"))] = str(name)
    return source


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dup")
    source = make_corpus(SHARED if SHARED.is_dir() else BUNDLED, root)
    for folder in ("distinct", "corpus"):
        run_gpl("embed", folder, "-o", f"{folder}.h5", "-p", "max", cwd=root, check=True)
    return root, source


def found_and_precision(groups: list[dict], source: dict[str, str]) -> tuple[float, float, int]:
    """(share of copies grouped with their original, share of same-photo pairs among all the pairs that share a
    group, the number of those pairs): a group is acted on whole, so every pair in it counts."""
    group_of = {m["path"]: g for g, group in enumerate(groups) for m in group["members"]}
    copies = [p for p in source if p.startswith("copies/")]
    found = sum(1 for c in copies if c in group_of and group_of.get(source[c]) == group_of[c])
    pairs = [(a["path"], b["path"]) for group in groups for a, b in itertools.combinations(group["members"], 2)]
    right = sum(source[a] == source[b] for a, b in pairs)
    return found / len(copies), (right / len(pairs) if pairs else 1.0), len(pairs)


def test_the_calibrated_threshold_finds_the_copies_the_default_misses(corpus):
    root, source = corpus
    proc = run_gpl("neighbors", "distinct.h5", "--duplicates", "--calibrate", "--json", cwd=root, check=True)
    err = proc.stderr.decode()
    calibration = json.loads(proc.stdout)["calibration"]
    threshold = calibration["threshold"]
    assert calibration["met"] and calibration["images"] == DISTINCT and calibration["negatives"] == DISTINCT
    assert set(calibration["per_kind"]) == {"jpeg", "crop", "resize", "mirror", "greyscale", "brightness/contrast",
                                            "rotate", "caption"}
    assert f"threshold {threshold:.3f}: precision" in err and "recall per kind of edit: jpeg" in err
    assert f"gpl: threshold {threshold:g}: calibration distinct.h5.duplicates.json (target precision 0.99)" in err
    assert (root / "distinct.h5.duplicates.json").is_file()

    runs = {}
    for name, value in (("calibrated", threshold), ("default", 0.95)):
        proc = run_gpl("neighbors", "corpus.h5", "--duplicates", "--threshold", str(value), "--json",
                       cwd=root, check=True)
        runs[name] = found_and_precision(json.loads(proc.stdout)["groups"], source)
    print(f"threshold {threshold}: {runs['calibrated']}; 0.95: {runs['default']} (found, precision, pairs)")
    found, precision, _ = runs["calibrated"]
    assert found >= 0.95 and precision >= 0.99
    default_found, default_precision, _ = runs["default"]
    assert default_found < 0.95 and default_found < found  # the default misses copies the calibration finds

    # A later run reuses the saved calibration and says so; one that cannot read the images refuses.
    proc = run_gpl("neighbors", "distinct.h5", "--duplicates", cwd=root, check=True)
    assert f"gpl: threshold {threshold:g}: calibration distinct.h5.duplicates.json" in proc.stderr.decode()
    (root / "empty").mkdir()
    proc = run_gpl("neighbors", "distinct.h5", "--duplicates", "--calibrate", "--images", "empty", cwd=root)
    assert proc.returncode == 2
    assert f"cannot calibrate on distinct.h5: 0 of its {DISTINCT} images can be read below" in proc.stderr.decode()
