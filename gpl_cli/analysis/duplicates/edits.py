"""Edited copies of an image, made in memory: the ordinary edits a duplicate finder must see through.

Each edit takes an RGB image and a seeded numpy Generator, draws its parameters from the ranges below and
returns a `Copy`: the edited image, a short description of what was done ("jpeg q=23", "crop 11%") and
the bytes of an image file holding it. A JPEG copy is its JPEG bytes (their artefacts are the edit); any
other copy is stored losslessly, so that the edit is the only change. `EDITS` maps each kind's name to its
function, in the order reports list them.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

JPEG_QUALITY = (10, 90)
CROP = (0.02, 0.20)  # the fraction of the width and of the height cut away
RESIZE = (0.25, 1.0)  # the copy's side over the original's
BRIGHTNESS = (0.6, 1.4)  # factors (1: unchanged)
CONTRAST = (0.6, 1.4)
ROTATION = (2.0, 10.0)  # degrees, either way
CAPTION_HEIGHT = (0.08, 0.16)  # the text's height over the image's
WORDS = ("holiday", "2019", "copyright", "sample", "draft", "family", "photo", "do not copy", "museum", "trip")



@dataclass
class Copy:
    image: Image.Image
    what: str
    data: bytes | None = None  # the encoded file when the edit made one (JPEG)

    def encoded(self) -> bytes:
        """The bytes of an image file that holds the copy."""
        if self.data is None:
            buffer = io.BytesIO()
            self.image.save(buffer, "PNG", compress_level=1)
            self.data = buffer.getvalue()
        return self.data


Edit = Callable[[Image.Image, np.random.Generator], Copy]


def jpeg(im: Image.Image, rng: np.random.Generator) -> Copy:
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=quality)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as copy:
        copy.load()
        return Copy(copy.convert("RGB"), f"jpeg q={quality}", data)


def crop(im: Image.Image, rng: np.random.Generator) -> Copy:
    cut = float(rng.uniform(*CROP))
    w, h = im.size
    cw, ch = max(1, round(w * (1 - cut))), max(1, round(h * (1 - cut)))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return Copy(im.crop((left, top, left + cw, top + ch)), f"crop {cut:.0%}")


def resize(im: Image.Image, rng: np.random.Generator) -> Copy:
    scale = float(rng.uniform(*RESIZE))
    w, h = im.size
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return Copy(im.resize(size, Image.Resampling.BICUBIC), f"resize {scale:.2f}x")


def mirror(im: Image.Image, rng: np.random.Generator) -> Copy:
    return Copy(ImageOps.mirror(im), "mirror")


def greyscale(im: Image.Image, rng: np.random.Generator) -> Copy:
    return Copy(ImageOps.grayscale(im), "greyscale")


def brightness_contrast(im: Image.Image, rng: np.random.Generator) -> Copy:
    b, c = float(rng.uniform(*BRIGHTNESS)), float(rng.uniform(*CONTRAST))
    return Copy(ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(b)).enhance(c), f"brightness {b:.2f} contrast {c:.2f}")


def rotate(im: Image.Image, rng: np.random.Generator) -> Copy:
    angle = float(rng.uniform(*ROTATION)) * (1 if rng.integers(2) else -1)
    # The corners the turn uncovers are black, as most editors leave them.
    return Copy(im.rotate(angle, Image.Resampling.BICUBIC), f"rotate {angle:+.1f} deg")


def caption(im: Image.Image, rng: np.random.Generator) -> Copy:
    """Words over the picture: a caption on a dark band at the bottom, or a half-transparent watermark
    across the middle."""
    words = " ".join(rng.choice(WORDS, size=2, replace=False))
    w, h = im.size
    font = ImageFont.load_default(max(6, round(h * float(rng.uniform(*CAPTION_HEIGHT)))))
    layer = Image.new("RGBA", im.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), words, font=font)
    x = max(0, (w - (right - left)) // 2)
    if rng.integers(2):
        band = round((bottom - top) * 1.4)
        draw.rectangle((0, h - band, w, h), fill=(0, 0, 0, 160))
        draw.text((x, h - band + (band - (bottom - top)) // 2 - top), words, font=font, fill=(255, 255, 255, 255))
        what = "caption"
    else:
        draw.text((x, (h - (bottom - top)) // 2 - top), words, font=font, fill=(255, 255, 255, 128))
        what = "watermark"
    return Copy(Image.alpha_composite(im.convert("RGBA"), layer).convert("RGB"), f"{what} {words!r}")


EDITS: dict[str, Edit] = {
    "jpeg": jpeg,
    "crop": crop,
    "resize": resize,
    "mirror": mirror,
    "greyscale": greyscale,
    "brightness/contrast": brightness_contrast,
    "rotate": rotate,
    "caption": caption,
}

