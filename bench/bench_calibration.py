#!/usr/bin/env python3
"""The duplicate threshold calibrated on labelled photos: recall per kind of edit at the calibrated threshold
(target precision 0.99) and at the uncalibrated default 0.95, from the same edited copies (bench/RESULTS.md,
'Duplicate threshold calibration'; the table in the README).

  python bench/bench_calibration.py [PHOTOS] [--sample N] [--target-precision P] [--pool avg,gem,max]
  python bench/bench_calibration.py --evaluate [PHOTOS] [--sample N] [--target-precision P]

Embeds PHOTOS (default: the shared labeled_photos, else the bundled ones) with the default backbone and the
poolings given (the first is calibrated; the others are measured from the same forward pass), calibrates
(gpl_cli.analysis.duplicates.calibrate) on a sample of N photos (default: all of them, one copy of each kind
of edit per photo) and prints a Markdown table, the pooling advice and the time taken, with the CPU named.

--evaluate checks the calibrated threshold against collections whose duplicates are known, avg and max
pooling, sample N (default: gpl's own, 64): PHOTOS as they are; PHOTOS with a Pillow copy of PLANTED of them
planted beside their originals (a collection that already holds duplicates when it is calibrated); and the
corpus of tests/e2e/test_duplicates_calibration.py (60 photos, then the same with 8 edited copies of 20 of
them), calibrated on its 60 photos and on itself. For each: the threshold, how many sampled images were
found to have a copy in the file already (counted for avg, the pooling calibrated), and the pairs `gpl
neighbors --duplicates` groups at that threshold (a group is acted on whole, so every pair in it counts):
their true precision (pairs of one photo's original and copies among them) and recall (of all such pairs in
the collection).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)
# The corpus builder of tests/e2e/test_duplicates_calibration.py, which imports the tests' conftest.
sys.path[:0] = [os.path.join(REPO, "tests"), os.path.join(REPO, "tests", "e2e")]

from photos import find_photos  # noqa: E402
from startup import cpu_name  # noqa: E402

DEFAULT = 0.95
PLANTED = 10  # photos given one copy each in the collection calibrated on (--evaluate)
# The copies planted, in turn: what a collection gathers by itself (a re-saved JPEG, a mirrored, cropped or
# shrunk copy); every other one is a JPEG at quality 30.
PLANTS = {
    "q30": (".jpg", lambda im: im, {"quality": 30}),
    "mirror": (".png", ImageOps.mirror, {}),
    "crop": (".png", lambda im: im.crop((im.width // 10, im.height // 10, im.width, im.height)), {}),
    "half": (".png", lambda im: im.resize((im.width // 2, im.height // 2)), {}),
}


def embed(folder: str, file: str, pool: str) -> None:
    subprocess.run([sys.executable, "-m", "gpl_cli", "embed", folder, "-o", file, "--pool", pool],
                   check=True, stderr=subprocess.DEVNULL)


def with_planted_copies(photos: str, folder: str) -> dict[str, str]:
    """Copy PHOTOS into `folder` with a Pillow copy of PLANTED of them beside its original (PLANTS);
    returns copy -> original (names relative to `folder`)."""
    shutil.copytree(photos, folder, ignore=shutil.ignore_patterns("*.md"))
    names = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
    odd = itertools.cycle(["mirror", "crop", "half"])
    source = {}
    for i, name in enumerate(names[:: max(1, len(names) // (2 * PLANTED))][:PLANTED]):
        kind = "q30" if i % 2 == 0 else next(odd)
        ext, edit, options = PLANTS[kind]
        copy = f"{os.path.splitext(name)[0]}_{kind}{ext}"
        with Image.open(os.path.join(folder, name)) as im:
            edit(im.convert("RGB")).save(os.path.join(folder, copy), **options)
        source[copy] = name
    return source


def grouped_pairs(file: str, key: str, threshold: float, source: dict[str, str]) -> tuple[int, int, int]:
    """(pairs sharing a group at `threshold`, how many of them are one photo's, how many such pairs the file
    holds); a name missing from `source` is a photo of its own."""
    from gpl_cli.analysis.duplicates.groups import find_duplicates
    from gpl_cli.analysis.duplicates.model import Threshold
    from gpl_cli.store.formats import read_embeddings

    def photo(name: str) -> str:
        return source.get(name, name)

    found = find_duplicates(file, Threshold(threshold, "evaluated"), key=key)
    pairs = [(a.path, b.path) for g in found.groups for a, b in itertools.combinations(g.members, 2)]
    names = read_embeddings(file, keys=[key]).paths
    counts = np.unique([photo(n) for n in names], return_counts=True)[1]
    return len(pairs), sum(photo(a) == photo(b) for a, b in pairs), int((counts * (counts - 1) // 2).sum())


def evaluate(photos: str, sample: int | None, target: float) -> None:
    from test_duplicates_calibration import make_corpus

    from gpl_cli.analysis.duplicates.calibrate import SAMPLE, calibrate

    print(f"CPU: {cpu_name()}, {os.cpu_count()} CPUs; efficientnet_lite0, avg and max from one file; "
          f"target precision {target:g}, sample {sample or SAMPLE}\n")
    print("| collection | calibrated on | pooling | threshold | sampled images with a copy in the file | pairs grouped "
          "| true precision | recall of true pairs |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        planted = with_planted_copies(photos, os.path.join(tmp, "planted"))
        e2e = make_corpus(Path(photos), Path(tmp))
        runs = [("photos", "photos", "photos", {}), ("photos + planted copies", "planted", "planted", planted),
                ("e2e corpus", "distinct", "corpus", e2e), ("e2e corpus", "corpus", "corpus", e2e)]
        for name in ("photos", "planted", "distinct", "corpus"):
            embed(photos if name == "photos" else os.path.join(tmp, name), os.path.join(tmp, f"{name}.h5"), "avg,max")
        for collection, on, searched, source in runs:
            cal = calibrate(os.path.join(tmp, f"{on}.h5"), target_precision=target, sample=sample or SAMPLE,
                            save=False)
            for p in sorted(cal.poolings, key=lambda p: p.key):
                pairs, right, true = grouped_pairs(os.path.join(tmp, f"{searched}.h5"), p.key, p.threshold, source)
                precision = f"{right / pairs:.3f} ({pairs - right} false)" if pairs else "-"
                recall = f"{right / true:.3f} ({right} of {true})" if true else "-"
                passed = f"{cal.duplicated} of {cal.images}" if p.key == cal.key else ""
                print(f"| {collection} | {on} | {p.key} | {p.threshold:.3f}{'' if p.met else ' (not met)'} | "
                      f"{passed} | {pairs} | {precision} | {recall} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="?")
    parser.add_argument("--sample", type=int, default=None, help="photos edited (default: all; --evaluate: 64)")
    parser.add_argument("--target-precision", type=float, default=0.99)
    parser.add_argument("--pool", default="avg,gem,max")
    parser.add_argument("--evaluate", action="store_true", help="collections with known duplicates (docstring)")
    args = parser.parse_args()
    photos = os.path.abspath(find_photos(args.photos, "bench_calibration"))

    from gpl_cli.analysis.duplicates.calibrate import calibrate, precision_recall
    from gpl_cli.embedding.runtime import tune_process

    tune_process()
    if args.evaluate:
        evaluate(photos, args.sample, args.target_precision)
        return
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "photos.h5")
        embed(photos, file, args.pool)
        count = int(subprocess.run([sys.executable, "-c", "import sys; from gpl_cli.store.formats import "
                                    "read_metadata; print(read_metadata(sys.argv[1])['count'])", file],
                                   check=True, capture_output=True, text=True).stdout)
        start = time.perf_counter()
        cal = calibrate(file, target_precision=args.target_precision, sample=args.sample or count, save=False)
        seconds = time.perf_counter() - start

    negatives = np.array(cal.negative_scores)
    every = np.concatenate([k["scores"] for k in cal.per_kind.values()])
    precision, recall, false = precision_recall(every, negatives, np.array([cal.threshold, DEFAULT]))
    print(f"{cal.images} photos of {photos}, {len(every)} edited copies, {cal.negatives} nearest-distinct scores; "
          f"{cal.key} of efficientnet_lite0; {cpu_name()}, {os.cpu_count()} CPUs; calibration {seconds:.0f} s\n")
    print(f"| kind of edit | recall at {cal.threshold:.3f} (calibrated, precision {args.target_precision:g}) "
          f"| recall at {DEFAULT} (default) |")
    print("|---|---|---|")
    for kind, k in cal.per_kind.items():
        scores = np.array(k["scores"])
        print(f"| {kind} | {(scores >= cal.threshold).mean():.2f} | {(scores >= DEFAULT).mean():.2f} |")
    print(f"| **all** | **{recall[0]:.2f}** | **{recall[1]:.2f}** |")
    print(f"| estimated precision | {precision[0]:.3f} | {precision[1]:.3f} |")
    print(f"| images whose nearest distinct image reaches it | {round(false[0] * len(negatives))} of {len(negatives)} "
          f"| {round(false[1] * len(negatives))} of {len(negatives)} |")
    print(f"\nlowest score of an unedited photo re-embedded against its own row: {cal.reproduced:.6f}")
    print(cal.advice)


if __name__ == "__main__":
    main()
