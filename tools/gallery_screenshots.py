"""The README's screenshots of the four HTML pages, made from the bundled photos.

Runs the gpl commands the README shows (in a temporary folder), opens each page in headless
Chromium (Debian's `chromium`, driven by Playwright) and saves a PNG of its top part, reduced to a
256-colour palette so each stays small. Run: python tools/gallery_screenshots.py [OUT_DIR=docs]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WIDTH = 1040  # browser viewport, CSS pixels
SHOTS = {  # page -> (what to capture: a CSS selector, height in CSS pixels)
    "report_compare": ("#queries", 1150),
    "report_neighbors": ("body", 900),
    "report_duplicates": ("body", 1350),  # the histogram, a near miss and the groups
    "report_outliers": ("body", 900),
}


def gpl(*args: str, cwd: Path) -> None:
    print("$ gpl " + " ".join(args), file=sys.stderr)
    subprocess.run([sys.executable, "-m", "gpl_cli", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def make_pages(work: Path) -> None:
    shutil.copytree(REPO / "tests" / "data" / "labeled_photos", work / "labeled_photos",
                    ignore=shutil.ignore_patterns("*.md"))
    photos = work / "photos"  # the sample photos plus three edited copies, for near-duplicates
    shutil.copytree(REPO / "sample_images", photos, ignore=shutil.ignore_patterns("*.md"))
    (photos / "copies").mkdir()
    panda = Image.open(photos / "panda.jpg")
    panda.resize((panda.width // 2, panda.height // 2)).save(photos / "copies" / "panda_small.jpg", quality=90)
    Image.open(photos / "sheep.jpg").save(photos / "copies" / "sheep_q30.jpg", quality=30)
    giraffe = Image.open(photos / "giraffe.jpg")
    w, h = giraffe.size
    giraffe.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(photos / "copies" / "giraffe_crop.jpg")
    gpl("compare", "labeled_photos", "--save", "labeled.h5", "--html", "report_compare.html", "-q", cwd=work)
    gpl("neighbors", "labeled.h5", "fish/fish1.webp", "animal/cat.webp", "tool/hammer2.webp", "-k", "6",
        "--html", "report_neighbors.html", cwd=work)
    gpl("embed", "photos", "-o", "photos.h5", "-q", cwd=work)
    gpl("neighbors", "photos.h5", "--duplicates", "--threshold", "0.9", "--html", "report_duplicates.html", cwd=work)
    gpl("neighbors", "labeled.h5", "--outliers", "--top", "5", "--html", "report_outliers.html", cwd=work)


def screenshot(page: Path, selector: str, height: int, out: Path, browser) -> None:
    tab = browser.new_page(viewport={"width": WIDTH, "height": 800}, device_scale_factor=1)
    tab.goto(page.as_uri())
    box = tab.locator(selector).first.bounding_box()
    raw = out.with_suffix(".raw.png")
    tab.screenshot(path=str(raw), full_page=True,
                   clip={"x": 0, "y": box["y"] if selector != "body" else 0, "width": WIDTH, "height": height})
    tab.close()
    Image.open(raw).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    raw.unlink()
    print(f"{out}: {os.path.getsize(out) // 1024} KB", file=sys.stderr)


def main(out_dir: str = "docs") -> None:
    from playwright.sync_api import sync_playwright

    out = Path(out_dir).resolve()
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpl-shots-") as tmp:
        work = Path(tmp)
        make_pages(work)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            for name, (selector, height) in SHOTS.items():
                screenshot(work / f"{name}.html", selector, height, out / f"{name}.png", browser)
            browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
