"""The duplicate threshold calibration: its arithmetic against plain loops, the edits against Pillow's own
operations, in-memory copies embedded like files, and the saved calibration's reuse."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from gpl_cli.analysis.duplicates import calibrate as cal
from gpl_cli.analysis.duplicates.edits import BRIGHTNESS, CONTRAST, CROP, EDITS, JPEG_QUALITY, RESIZE
from gpl_cli.errors import GplError
from tests.conftest import SAMPLE_IMAGES, embed_to, make_photo_like


def brute_precision(positives, negatives, t):
    r = sum(1 for p in positives if p >= t) / len(positives)
    q = sum(1 for n in negatives if n >= t) / len(negatives)
    return 1.0 if r + q == 0 else r / (r + q), r, q


def brute_threshold(positives, negatives, target):
    candidates = sorted({int(np.floor(p * 1000)) / 1000 for p in positives})
    scored = [(t, brute_precision(positives, negatives, t)[0]) for t in candidates]
    for t, p in scored:  # ascending: the first that meets the target is the lowest
        if p >= target:
            return t, True
    best = max(p for _, p in scored)
    return next(t for t, p in scored if p == best), False


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.9, 0.99])
def test_threshold_is_the_lowest_that_meets_the_target(seed, target):
    rng = np.random.default_rng(seed)
    positives = rng.beta(8, 2, 300)  # copies score high, with a tail
    negatives = rng.beta(4, 3, 150 + 50 * seed)
    t, met = cal.choose_threshold(positives, negatives, target)
    want_t, want_met = brute_threshold(positives.tolist(), negatives.tolist(), target)
    assert (t, met) == pytest.approx((want_t, want_met))
    precision, recall, false = cal.precision_recall(positives, negatives, np.array([t]))
    assert (precision[0], recall[0], false[0]) == pytest.approx(brute_precision(positives.tolist(), negatives.tolist(), t))


def test_an_unreachable_target_takes_the_most_precise_threshold():
    positives = np.array([0.5, 0.6, 0.7])
    negatives = np.array([0.95, 0.8, 0.1])  # every copy scores below some distinct pair
    t, met = cal.choose_threshold(positives, negatives, 0.99)
    assert not met
    assert (t, met) == brute_threshold(positives.tolist(), negatives.tolist(), 0.99)


def test_curve_rows_match_the_loops():
    rng = np.random.default_rng(7)
    positives, negatives = rng.uniform(0.6, 1, 80), rng.uniform(0.3, 0.9, 40)
    rows = cal.curve(positives, negatives, 0.777)
    assert [r[0] for r in rows] == sorted((r[0] for r in rows), reverse=True)
    assert 0.777 in [r[0] for r in rows] and rows[0][0] == 1.0 and rows[-1][0] <= positives.min()
    for t, p, r in rows:
        want_p, want_r, _ = brute_precision(positives.tolist(), negatives.tolist(), t)
        assert (p, r) == pytest.approx((want_p, want_r), abs=1e-4)


def test_nearest_distinct_counts_copies_and_passes_over_exact_copies():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 16)).astype(np.float32)
    x[5] = x[2]  # an exact copy: 2 and 5 must not be each other's negative
    x[9] = x[2] * 3  # the same direction, another length: an exact copy too once normalised
    chosen, kinds = np.array([1, 2, 7]), 4
    copies = (np.repeat(x[chosen], kinds, axis=0) + rng.normal(scale=0.8, size=(12, 16))).astype(np.float32)
    copies[5] = x[4] + 0.01  # a copy of image 2 that lies next to image 4: a false match for 2
    got, duplicated = cal.nearest_distinct(x, chosen, copies, np.full(len(chosen), cal.EXACT))  # exact copies only

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    for i, row in enumerate(chosen):
        group = [x[row], *copies[i * kinds:(i + 1) * kinds]]
        others = [x[j] for j in range(12) if cos(x[j], x[row]) < 1 - 1e-6]  # not the image, nor its exact copies
        others += [copies[c] for c in range(len(copies)) if c // kinds != i]
        assert got[i] == pytest.approx(max(cos(a, b) for a in group for b in others), abs=1e-5)
    assert got[1] == pytest.approx(cos(copies[5], x[4]), abs=1e-5)
    assert duplicated == 1  # image 2, which has two exact copies


# --- the edits -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(make_photo_like((160, 120), seed=4))


def test_each_edit_does_what_it_says(photo):
    for seed in range(25):
        rng = functools.partial(np.random.default_rng, seed)  # each edit draws from a fresh generator
        assert np.array_equal(np.asarray(EDITS["mirror"](photo, rng()).image), np.asarray(ImageOps.mirror(photo)))
        crop = EDITS["crop"](photo, rng()).image
        for side, whole in zip(crop.size, photo.size):
            assert (1 - CROP[1]) * whole - 1 <= side <= (1 - CROP[0]) * whole + 1
        small = EDITS["resize"](photo, rng()).image
        assert RESIZE[0] * photo.width - 1 <= small.width <= RESIZE[1] * photo.width + 1
        assert small.width / photo.width == pytest.approx(small.height / photo.height, abs=0.02)
        grey = EDITS["greyscale"](photo, rng()).image
        assert grey.mode == "L" and np.array_equal(np.asarray(grey), np.asarray(ImageOps.grayscale(photo)))
        copy = EDITS["jpeg"](photo, rng())
        with Image.open(io.BytesIO(copy.encoded())) as decoded:
            assert decoded.format == "JPEG" and decoded.size == photo.size
        quality = int(copy.what.split("=")[1])
        assert JPEG_QUALITY[0] <= quality <= JPEG_QUALITY[1]
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=quality)
        assert copy.encoded() == buffer.getvalue()  # the bytes of that quality, not a second generation
        bc = EDITS["brightness/contrast"](photo, rng())
        b, c = (float(v) for v in bc.what.split()[1::2])
        assert BRIGHTNESS[0] <= b <= BRIGHTNESS[1] and CONTRAST[0] <= c <= CONTRAST[1]
        b, c = draw_two(seed, BRIGHTNESS, CONTRAST)  # the unrounded factors, drawn as the edit draws them
        want = ImageEnhance.Contrast(ImageEnhance.Brightness(photo).enhance(b)).enhance(c)
        assert np.array_equal(np.asarray(bc.image), np.asarray(want))
        turned = EDITS["rotate"](photo, rng())
        angle = float(turned.what.split()[1])
        assert 2 <= abs(angle) <= 10 and turned.image.size == photo.size
        assert turned.image.getpixel((0, 0)) == (0, 0, 0)  # a corner the turn uncovered
        words = EDITS["caption"](photo, rng()).image
        changed = np.abs(np.asarray(words, np.int16) - np.asarray(photo, np.int16)).max(axis=2)
        assert words.size == photo.size and changed.max() > 60 and 0.005 < (changed > 0).mean() < 0.6


def draw_two(seed, first, second):
    rng = np.random.default_rng(seed)
    return float(rng.uniform(*first)), float(rng.uniform(*second))


def test_edits_are_reproducible_and_lossless_copies_decode_to_the_edit(photo):
    for kind, edit in EDITS.items():
        a, b = edit(photo, np.random.default_rng(11)), edit(photo, np.random.default_rng(11))
        assert a.what == b.what and a.encoded() == b.encoded(), kind
        if kind != "jpeg":
            with Image.open(io.BytesIO(a.encoded())) as decoded:
                assert np.array_equal(np.asarray(decoded), np.asarray(a.image)), kind


# --- embedding in memory, reachability, the saved file ------------------------------------------------


@pytest.fixture(scope="module")
def small_file(tmp_path_factory, lite0):
    """sample_images embedded (avg, max): 15 images, too few to calibrate on."""
    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.output import Output

    root = tmp_path_factory.mktemp("cal")
    photos = root / "photos"
    shutil.copytree(SAMPLE_IMAGES, photos, ignore=shutil.ignore_patterns("*.md"))
    out = root / "photos.h5"
    embed_to(EmbedConfig(pools=("avg", "max")), collect_inputs([str(photos)]), Output.resolve(str(out)),
             RunOptions(), backbone=lite0)
    return root, out


def test_an_image_made_in_memory_embeds_like_the_same_file(small_file, lite0, tmp_path):
    from gpl_cli.analysis.neighbors import embed_all_like
    from gpl_cli.embedding.sources import MadeImage
    from gpl_cli.store.formats import read_metadata

    root, out = small_file
    original = str(root / "photos" / "panda.jpg")
    data = cal._edited(original, "caption", (0, 1, 2))
    (tmp_path / "copy.png").write_bytes(data)
    made = embed_all_like([(original + " (caption)", MadeImage(lambda: data, original)), str(tmp_path / "copy.png")],
                          read_metadata(str(out)), backbone=lite0)
    assert set(made) == {"avg", "max"}
    for vectors in made.values():
        np.testing.assert_allclose(vectors[0], vectors[1], rtol=0, atol=1e-6 * np.abs(vectors[1]).max())


def test_too_few_reachable_images_is_refused_with_the_file_and_the_reason(small_file, tmp_path):
    root, out = small_file
    with pytest.raises(GplError, match=r"cannot calibrate on .*photos.h5: 15 of its 15 images .*at least 20"):
        cal.calibrate(str(out))
    moved = tmp_path / "elsewhere.h5"
    shutil.copy(out, moved)
    with pytest.raises(GplError, match=r"0 of its 15 images can be read below .*\(15 missing\)"):
        cal.calibrate(str(moved), images=str(tmp_path))
    shutil.copytree(root / "photos", tmp_path / "photos")  # times kept: the same files, as embedded
    os.utime(tmp_path / "photos" / "panda.jpg", ns=(1, 1))  # ...but for two that changed since
    (tmp_path / "photos" / "sheep.jpg").write_bytes(b"another picture")
    rows, folder, why = cal.reachable(cal.read_embeddings(str(out)), str(tmp_path / "photos"))
    assert len(rows) == 13 and folder == str(tmp_path / "photos") and why == {"changed since they were embedded": 2}


def made_by_hand(file: str, key: str, threshold: float = 0.9) -> cal.Calibration:
    from gpl_cli.store.formats import read_metadata

    metadata = read_metadata(file)
    return cal.Calibration(
        file=file, key=key, threshold=threshold, target_precision=0.99, met=True, precision=1.0, recall=0.9,
        false_matches=0.0, per_kind={"mirror": {"copies": 20, "found": 18, "recall": 0.9, "median": 0.95}},
        curve=[(1.0, 1.0, 0.0), (threshold, 1.0, 0.9)], images=20, negatives=15, reproduced=1.0,
        poolings=[cal._figures(key, np.array([0.95, threshold]), np.array([0.5]), 0.99)], advice="",
        identity={"file": cal.file_identity(file, metadata), **cal._pooling_identity(metadata, key)})


def test_a_saved_calibration_is_reused_only_for_its_file_and_pooling(small_file, tmp_path):
    root, out = small_file
    file = str(tmp_path / "photos.h5")
    shutil.copy(out, file)
    assert cal.calibration_status(file, "avg") == (None, None)  # never calibrated
    cal.save_calibration(made_by_hand(file, "avg", 0.91))
    cal.save_calibration(made_by_hand(file, "max", 0.87))  # a second pooling keeps the first
    loaded = cal.load_calibration(file, "avg")
    assert loaded is not None and loaded.threshold == 0.91 and loaded.curve[1] == (0.91, 1.0, 0.9)
    assert loaded.as_threshold().source == "calibration photos.h5.duplicates.json (target precision 0.99)"
    assert cal.load_calibration(file, "max").threshold == 0.87
    assert cal.load_calibration(file, None).key == "avg"  # the file's first pooling

    saved = json.loads(open(file + cal.SUFFIX).read())
    saved["calibrations"]["avg"]["identity"]["weights_sha256"] = "0" * 64  # made with other weights
    with open(file + cal.SUFFIX, "w") as f:
        json.dump(saved, f)
    calibration, why = cal.calibration_status(file, "avg")
    assert calibration is None and "other weights or settings" in why
    assert cal.load_calibration(file, "max") is not None

    os.utime(file, ns=(1, 1))  # the file changed since
    calibration, why = cal.calibration_status(file, "max")
    assert calibration is None and "another version of" in why
    cal.save_calibration(made_by_hand(file, "avg"))  # a new one drops those of the old version
    assert set(json.loads(open(file + cal.SUFFIX).read())["calibrations"]) == {"avg"}


def test_a_file_gpl_did_not_write_is_never_replaced(small_file, tmp_path):
    root, out = small_file
    file = str(tmp_path / "photos.h5")
    shutil.copy(out, file)
    with open(file + cal.SUFFIX, "w") as f:
        f.write('{"notes": "mine"}')
    with pytest.raises(GplError, match="was not written by gpl; gpl will not replace it"):
        cal.save_calibration(made_by_hand(file, "avg"))
    assert cal.calibration_status(file, "avg") == (None, f"{file}{cal.SUFFIX} was not written by gpl")
    assert open(file + cal.SUFFIX).read() == '{"notes": "mine"}'


def near(v: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at exactly `cosine` to `v`, in a random direction."""
    v = v / np.linalg.norm(v)
    u = rng.normal(size=v.shape)
    u -= (u @ v) * v
    return (cosine * v + np.sqrt(1 - cosine**2) * u / np.linalg.norm(u)).astype(np.float32)


def test_a_weak_copy_already_in_the_file_is_no_negative():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(43, 64)).astype(np.float32)  # 40 distinct images (random directions score < 0.6)...
    x[40] = near(x[0], 0.90, rng)  # ...a weak copy of image 0, weaker than most of 0's own edited copies
    x[41] = near(x[1], 0.90, rng)  # ...one of image 1, sampled too
    x[42] = near(x[3], 0.70, rng)  # ...and a distinct photo of image 3's subject
    chosen = np.array([*range(16), 41])
    scores = np.tile([0.97, 0.95, 0.93, 0.88], (len(chosen), 1))
    scores[3, 3] = 0.5  # image 3 has one very weak copy (a quarter-size or greyscale one, say)
    copies = np.array([near(x[row], s, rng) for row, row_scores in zip(chosen, scores) for s in row_scores])
    positives = np.array([[float(c @ x[row] / np.linalg.norm(c) / np.linalg.norm(x[row])) for c in copies[i * 4:(i + 1) * 4]]
                          for i, row in enumerate(chosen)])
    # A row counts as a copy from the image's weakest copy on, but never below the median image's weakest: 0.88.
    level = cal.copy_level(positives)
    np.testing.assert_allclose(level, 0.88, atol=1e-5)
    got, duplicated = cal.nearest_distinct(x, chosen, copies, level)

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    for i, row in enumerate(chosen):
        group = [x[row], *copies[i * 4:(i + 1) * 4]]
        copy_rows = {r for r in range(len(x)) if max(cos(g, x[r]) for g in group) >= 0.88 - 1e-5} | {row}
        others = [x[r] for r in range(len(x)) if r not in copy_rows]
        others += [copies[c] for c in range(len(copies)) if chosen[c // 4] not in copy_rows]
        assert got[i] == pytest.approx(max(cos(g, o) for g in group for o in others), abs=1e-5)
    weak = [0, 1, len(chosen) - 1]  # images 0 and 1, and the sampled weak copy of 1
    assert got[weak].max() < 0.6 and duplicated == 3
    assert got[3] >= cos(x[3], x[42]) - 1e-6  # still a negative: 0.70 is below 0.88, though above 3's weakest copy
    # So the threshold finds the copies at 0.90 and stays above the distinct pair at 0.70.
    threshold, met = cal.choose_threshold(positives.ravel(), got, 0.99)
    assert met and 0.70 < threshold <= 0.88
