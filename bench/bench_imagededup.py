#!/usr/bin/env python3
"""gpl's duplicate search against imagededup on real photos mixed with edited copies of some of them.

The corpus (built here with Pillow, in a temporary folder): every photo of PHOTOS (default: the shared
labeled_photos) once, plus eight edited copies of --copied of them: JPEG at quality 10-90, a crop of 2-20 %
of each side, a resize to 0.25-0.8x, a mirror image, greyscale, brightness and contrast changed, a rotation
of 2-10 degrees, and a caption drawn over the photo. The photos and copies of one photo are its duplicates:
every pair among them is a true pair, every other pair a false one.

Each tool reports pairs, scored by precision (true pairs among those reported) and recall (true pairs
reported among all true pairs):
- imagededup at its default settings: the CNN method (MobileNetV3 features, cosine >= 0.9) and the hashes
  PHash and DHash (Hamming distance <= 10). Its CNN fetches its weights from download.pytorch.org; where that
  fails, the table says so.
- gpl at the default threshold 0.95, at the threshold calibrated on the photos alone (`--calibrate` on a file
  of PHOTOS: what a user with a clean collection gets), and calibrated on the corpus itself. A group is
  acted on whole (--keep/--move-to), so every pair within a group counts as reported.

imagededup is not a gpl dependency: run this with a Python that has it and can import gpl_cli, e.g.
  python -m venv /tmp/idd && echo "$PWD/.venv/lib/python3.11/site-packages" \\
      > /tmp/idd/lib/python3.11/site-packages/gpl.pth && /tmp/idd/bin/pip install --no-deps imagededup PyWavelets
  /tmp/idd/bin/python bench/bench_imagededup.py [PHOTOS] [--copied 24]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from photos import find_photos  # noqa: E402
from startup import cpu_name  # noqa: E402

KINDS = ("jpeg", "crop", "resize", "mirror", "greyscale", "brightness", "rotate", "caption")


def edit(im: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    if kind == "crop":
        cut = rng.uniform(0.02, 0.2)
        dx, dy = int(w * cut), int(h * cut)
        left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        return im.crop((left, top, left + w - dx, top + h - dy))
    if kind == "resize":
        scale = rng.uniform(0.25, 0.8)
        return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    if kind == "mirror":
        return ImageOps.mirror(im)
    if kind == "greyscale":
        return im.convert("L").convert("RGB")
    if kind == "brightness":
        return ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(rng.choice([0.65, 1.35])))\
            .enhance(rng.uniform(0.7, 1.3))
    if kind == "rotate":
        return im.rotate(rng.uniform(2, 10) * rng.choice([-1, 1]), Image.Resampling.BILINEAR)
    if kind == "caption":
        out = im.copy()
        font = ImageFont.load_default(size=max(10, h // 9))
        ImageDraw.Draw(out).text((w // 20, int(h * rng.uniform(0.05, 0.8))), "(c) Summer trip 2019", font=font,
                                 fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        return out
    raise ValueError(kind)


def build_corpus(photos: str, folder: str, copied: int, seed: int) -> dict[str, str]:
    """Fill `folder` (flat: imagededup does not recurse by default); returns file name -> the photo it shows."""
    rng = np.random.default_rng(seed)
    names = sorted(os.path.relpath(os.path.join(d, f), photos) for d, _, files in os.walk(photos)
                   for f in files if f.lower().endswith((".webp", ".jpg", ".jpeg", ".png")))
    source = {}
    for name in names:
        flat = name.replace(os.sep, "__")
        shutil.copy(os.path.join(photos, name), os.path.join(folder, flat))
        source[flat] = flat
    for i in rng.choice(len(names), size=min(copied, len(names)), replace=False):
        flat = names[i].replace(os.sep, "__")
        with Image.open(os.path.join(photos, names[i])) as im:
            im = im.convert("RGB")
        stem = os.path.splitext(flat)[0]
        for kind in KINDS:
            if kind == "jpeg":
                copy = f"{stem}.copy-jpeg.jpg"
                im.save(os.path.join(folder, copy), quality=int(rng.integers(10, 91)))
            else:
                copy = f"{stem}.copy-{kind}.png"
                edit(im, kind, rng).save(os.path.join(folder, copy))
            source[copy] = flat
    return source


def score(reported: set[tuple[str, str]], source: dict[str, str]) -> dict:
    true = {tuple(sorted(p)) for p in itertools.combinations(source, 2) if source[p[0]] == source[p[1]]}
    right = len(reported & true)
    to_original = {c: tuple(sorted((c, o))) for c, o in source.items() if c != o}
    found = {c for c, pair in to_original.items() if pair in reported}
    per_kind = {k: sum(f".copy-{k}." in c for c in found) / sum(f".copy-{k}." in c for c in to_original) for k in KINDS}
    return {"reported": len(reported), "precision": right / len(reported) if reported else float("nan"),
            "recall": right / len(true), "copies found": len(found) / len(to_original), "per kind": per_kind}


def imagededup_pairs(method: str, folder: str) -> set[tuple[str, str]]:
    from imagededup import methods

    found = getattr(methods, method)().find_duplicates(image_dir=folder)
    return {tuple(sorted((a, b))) for a, dups in found.items() for b in dups}


def gpl(*args: str, cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "gpl_cli", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True)


def gpl_pairs(doc: dict) -> set[tuple[str, str]]:
    return {tuple(sorted((a["path"], b["path"]))) for g in doc["groups"] for a, b in itertools.combinations(g["members"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photos", nargs="?")
    ap.add_argument("--copied", type=int, default=24, help="photos that get the eight edited copies")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    photos = os.path.abspath(find_photos(args.photos, "bench_imagededup"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus")
        os.mkdir(corpus)
        source = build_corpus(photos, corpus, args.copied, args.seed)
        copies = sum(c != o for c, o in source.items())
        print(f"CPU: {cpu_name()}; corpus: {len(source) - copies} photos of {photos} + {copies} edited copies "
              f"of {args.copied} ({', '.join(KINDS)})", file=sys.stderr)

        for method, setting in (("CNN", "cosine >= 0.9"), ("PHash", "Hamming <= 10"), ("DHash", "Hamming <= 10")):
            t = time.perf_counter()
            try:
                pairs = imagededup_pairs(method, corpus)
            except Exception as e:  # its CNN downloads weights; offline that fails, and the table says why
                rows.append((f"imagededup {method} (default)", setting, None, f"could not run: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120]}"))
                continue
            rows.append((f"imagededup {method} (default)", setting, score(pairs, source), time.perf_counter() - t))

        t = time.perf_counter()
        gpl("embed", corpus, "-o", "corpus.h5", "-q", cwd=tmp)
        gpl("embed", photos, "-o", "photos.h5", "-q", cwd=tmp)
        embed_s = time.perf_counter() - t
        runs = [("gpl, default threshold", ["--threshold", "0.95"]),
                ("gpl, calibrated on the photos alone", None),
                ("gpl, calibrated on the corpus itself", ["--calibrate"])]
        for label, options in runs:
            if options is None:  # calibrate on the clean photos, then search the corpus at that threshold
                t = time.perf_counter()
                cal = json.loads(gpl("neighbors", "photos.h5", "--duplicates", "--calibrate", "--json", cwd=tmp).stdout)
                options = ["--threshold", str(cal["calibration"]["threshold"])]
                calibrate_s = time.perf_counter() - t
            else:
                calibrate_s = 0.0
            t = time.perf_counter()
            doc = json.loads(gpl("neighbors", "corpus.h5", "--duplicates", "--json", *options, cwd=tmp).stdout)
            rows.append((label, f"cosine >= {doc['threshold']['value']:.3f}", score(gpl_pairs(doc), source),
                         calibrate_s + time.perf_counter() - t))
    print(f"gpl embed of the corpus and of the photos: {embed_s:.0f} s (default backbone and pooling)", file=sys.stderr)
    print("| method | setting | pairs reported | precision | recall | copies found with their original | s |")
    print("|---|---|---|---|---|---|---|")
    for label, setting, s, secs in rows:
        if s is None:
            print(f"| {label} | {setting} | - | - | - | - | {secs} |")
        else:
            precision = f"{s['precision']:.3f}" if s["reported"] else "-"
            print(f"| {label} | {setting} | {s['reported']} | {precision} | {s['recall']:.3f} | "
                  f"{s['copies found']:.3f} | {secs:.1f} |")
    print("\ncopies found with their original, by kind of edit:\n")
    print(f"| method | {' | '.join(KINDS)} |")
    print("|---|" + "---|" * len(KINDS))
    for label, _, s, _ in rows:
        if s is not None:
            shares = [f"{s['per kind'][k]:.2f}" for k in KINDS]
            print(f"| {label} | {' | '.join(shares)} |")


if __name__ == "__main__":
    main()
