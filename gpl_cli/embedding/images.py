"""Opening images safely and turning them into model-ready uint8 tensors.

A file that cannot be embedded is not an exception that escapes: it becomes a
`Failure` value that travels with its index, so rows never shift.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import threading
import warnings
from contextlib import contextmanager
from typing import IO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError
from torch.utils.data import Dataset

from gpl_cli.embedding.sources import SourceError, stat_identity
from gpl_cli.models.preprocess import Preprocess

# Alpha is composited onto white: a transparent background reads as paper, not as
# whatever colour happens to sit under alpha = 0 (often black).
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# Beyond this aspect ratio the far ends are cut before resizing: they would be cropped anyway,
# and resizing a 10000 x 4 strip's short side to 256 would otherwise build a 640000-pixel-wide image.
MAX_ASPECT = 8
# Draft decoding keeps this many times the resize target: drafting down to the target itself moves
# the embeddings away from a full decode's, twice the target keeps them close (see bench/RESULTS.md,
# 'Speed techniques, one at a time': JPEG draft decoding).
DRAFT_MARGIN = 2
# Preprocess.interpolation (torchvision's names for them) -> Pillow's resampling filter.
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC}


class Rejected(ValueError):
    """A file gpl declines to decode; the message is the reason as shown to the user."""


class Failure(NamedTuple):
    path: str
    reason: str


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit is scaled (not clipped), alpha is composited."""
    if im.mode in _SIXTEEN_BIT_MODES:
        # Mode "I" carries 16-bit PNG/TIFF samples; map 0..65535 onto 0..255.
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        im = Image.fromarray(np.clip(np.rint(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8), mode="L")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def describe_error(exc: BaseException) -> str:
    """A short reason a user can act on, for the failure record."""
    if isinstance(exc, (Rejected, SourceError)):
        return str(exc)
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused: image too large to decode safely ({exc})"
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (unknown or unsupported format)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file not found (or a broken symlink)"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(exc, DecodeTimeout):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower():
        return f"truncated or corrupt image data ({text})"
    return f"cannot decode image: {text}"


def open_rgb(path: str | IO[bytes], min_side: int | None = None) -> Image.Image:
    """Decode one image (a file, or the bytes of one read from a container): first frame, EXIF orientation
    applied, as RGB.

    With `min_side`, a JPEG at least twice that size on its shorter side is decoded at a
    reduced scale (1/2, 1/4 or 1/8, chosen by libjpeg's draft mode) that keeps the shorter
    side >= `min_side`: far less work, though not the same pixels as a full decode.
    Raises OSError/ValueError-family exceptions for unusable files; callers turn them into Failures.
    """
    if isinstance(path, str) and os.path.isfile(path) and os.path.getsize(path) == 0:
        raise Rejected("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit; gpl refuses both.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.seek(0)
            if min_side and isinstance(im, JpegImagePlugin.JpegImageFile) and min(im.size) >= 2 * min_side:
                scale = min_side / min(im.size)
                im.draft(None, (math.ceil(im.size[0] * scale), math.ceil(im.size[1] * scale)))
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)


def keep_aspect_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(height, width) with the longer side max_size and the aspect ratio kept (each side at least 1)."""
    scale = max_size / max(width, height)
    return max(1, round(height * scale)), max(1, round(width * scale))


def shorter_side_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) with the shorter side `side`; the longer one is truncated, not rounded, as
    torchvision's Resize(int) computes it, so that gpl's pixels equal the reference pipelines'."""
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


def centre_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """The crop x crop box centred as torchvision's CenterCrop places it (an image smaller than the
    crop is padded with black, half on each side, the odd pixel after)."""

    def start(size: int) -> int:
        return -((crop - size) // 2) if crop > size else int(round((size - crop) / 2.0))

    left, top = start(width), start(height)
    return left, top, left + crop, top + crop


def to_tensor(im: Image.Image) -> torch.Tensor:
    """An RGB image as a 3 x H x W uint8 tensor: a CHW view of a copy of its HWC pixels."""
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)


def preprocess_image(im: Image.Image, pre: Preprocess) -> torch.Tensor:
    """The image as a 3 x H x W uint8 tensor: resized and centre-cropped, or resized keeping its aspect.

    Pillow does the resizing (with its antialiasing filters), with the sizes and crop box of
    torchvision's Resize + CenterCrop on PIL images: the same pixels, without importing torchvision.
    """
    resample = RESAMPLING[pre.interpolation]
    if pre.mode == "keep-aspect":
        height, width = keep_aspect_size(*im.size, pre.max_size)
        if (width, height) != im.size:
            im = im.resize((width, height), resample)
        return to_tensor(im)
    w, h = im.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        long_side = MAX_ASPECT * min(w, h)
        left, top = (w - min(w, long_side)) // 2, (h - min(h, long_side)) // 2
        im = im.crop((left, top, left + min(w, long_side), top + min(h, long_side)))
    size = shorter_side_size(*im.size, pre.resize)
    if size != im.size:
        im = im.resize(size, resample)
    return to_tensor(im.crop(centre_box(*im.size, pre.crop)))


def model_inputs(im: Image.Image, pre: Preprocess) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The decoded image as the model's input: one tensor, or with several scales a tuple of one per scale,
    each resized from the one decoded image (`Preprocess.at`)."""
    if len(pre.scales) == 1:
        return preprocess_image(im, pre.at(pre.scales[0]))
    return tuple(preprocess_image(im, pre.at(scale)) for scale in pre.scales)


def scale_views(pixels: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A sample's inputs, one per scale (a one-scale sample holds a plain tensor)."""
    return pixels if isinstance(pixels, tuple) else (pixels,)


def pixels_to_bytes(pixels: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[bytes, list[int]]:
    """A sample's inputs as raw bytes and their shapes, 3 numbers per scale (how the Ray engine ships them)."""
    views = scale_views(pixels)
    return b"".join(v.numpy().tobytes() for v in views), [n for v in views for n in v.shape]


def pixels_from_bytes(data: bytes, shapes) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The inverse of pixels_to_bytes."""
    views, start = [], 0
    for shape in np.asarray(shapes, np.int64).reshape(-1, 3):
        size = int(np.prod(shape))
        views.append(torch.from_numpy(np.frombuffer(data, np.uint8, size, start).reshape(shape).copy()))
        start += size
    return views[0] if len(views) == 1 else tuple(views)


class DecodeTimeout(Exception):
    """Decoding one image took longer than the per-image limit."""


@contextmanager
def time_limit(seconds: float | None):
    """Raise DecodeTimeout if the block runs longer than `seconds` (main thread of a process only)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise DecodeTimeout(f"decoding took longer than {seconds:g} s (timed out)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Sample(NamedTuple):
    index: int
    pixels: torch.Tensor | tuple[torch.Tensor, ...] | None  # a tuple of one per scale with several (model_inputs)
    failure: Failure | None
    stat: tuple[int, int] = (-1, -1)  # (size, mtime_ns) of the bytes that were decoded


# A file replaced while it was being read is read again this many times before it fails.
CHANGED_RETRIES = 1


def file_identity(path: str) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime_ns) of `path`, or None when it cannot be stat'ed."""
    try:
        return stat_identity(os.stat(path))
    except OSError:
        return None


def draft_min_side(pre: Preprocess, jpeg_draft: bool) -> int | None:
    """The shorter side a draft-decoded JPEG must keep (None: always decode fully), for the largest scale."""
    return DRAFT_MARGIN * round(pre.resize * max(pre.scales)) if jpeg_draft else None


class ImageDataset(Dataset):
    """Indexes a list of paths; each item is a Sample carrying either pixels or a Failure.

    With `jpeg_draft`, large JPEGs are decoded at a reduced scale that keeps the shorter side
    >= DRAFT_MARGIN x the resize target (see open_rgb).
    """

    def __init__(self, paths: list[str], pre: Preprocess, timeout: float | None = None, jpeg_draft: bool = False,
                 sources: list | None = None):
        self.paths = paths
        self.sources = sources  # per path, where its bytes lie inside a container (None: a file); None: all files
        self.pre = pre
        self.timeout = timeout  # seconds per image; a decoder that hangs becomes a failure
        self.min_side = draft_min_side(pre, jpeg_draft)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        return load_sample(index, self.paths[index], self.pre, self.timeout, self.min_side,
                           self.sources[index] if self.sources else None)


def load_sample(index: int, path: str, pre: Preprocess, timeout: float | None = None,
                min_side: int | None = None, source=None) -> Sample:
    """One input decoded and preprocessed, or the Failure that explains why not (never raises for a bad file).

    The file is stat'ed before and after it is read, and the stat travels with the pixels: the
    (size, mtime) that --update later compares is the one of the bytes that were decoded. A file
    that changes while it is read is read again, then fails. With a `source` (gpl_cli.embedding.sources:
    an image inside a tar shard or parquet file) the bytes are read through it, the container is the file
    checked, and the stat is the one the source records; `path` names the image in messages.
    """
    checked = path if source is None else source.container
    for _ in range(1 + CHANGED_RETRIES):
        before = file_identity(checked)
        try:
            with time_limit(timeout):
                pixels = model_inputs(open_rgb(path if source is None else source.open(), min_side), pre)
        except Exception as exc:  # noqa: BLE001 - every decode error becomes a recorded failure
            return Sample(index, None, Failure(path, describe_error(exc)))
        if before is not None and file_identity(checked) == before:
            return Sample(index, pixels, None, before[2:] if source is None else source.stat)
    return Sample(index, None, Failure(path, "the file changed while it was being read (written to or replaced)"))


class Batch(NamedTuple):
    indices: list[int]  # of the decoded images, in input order
    stats: list[tuple[int, int]]  # (size, mtime_ns) of each decoded image's file, as `indices`
    # The images grouped by scale and shape: (positions in `indices`, their N x 3 x H x W uint8 pixels, the
    # index of their scale in Preprocess.scales). With a centre crop there is one group per scale; with
    # keep-aspect one per scale and distinct shape.
    groups: list[tuple[list[int], torch.Tensor, int]]
    failures: list[tuple[int, Failure]]


def collate(samples: list[Sample], leaves_worker: bool = True) -> Batch:
    """Decoded samples into same-shape stacks, each copied once into an NHWC (channels-last) uint8 buffer.

    Nothing is padded: a convolution near the image border would see the padding instead of
    its own zero padding, so a padded image's vector would differ from the same image
    embedded alone. Stacking only equal shapes keeps every vector exact.

    Each sample's pixels are a CHW view of PIL's HWC memory, so filling an NHWC buffer is a
    plain copy, and an NHWC batch converts to the model's float input in one pass whichever
    layout the model runs in. Inside a DataLoader worker, a batch that `leaves_worker` is
    allocated in shared memory, so handing it to the main process copies nothing more.
    """
    good = [s for s in samples if s.failure is None]
    views = [scale_views(s.pixels) for s in good]
    by_shape: dict[tuple[int, ...], list[int]] = {}  # (scale, *shape) -> positions
    for position, inputs in enumerate(views):
        for scale, pixels in enumerate(inputs):
            by_shape.setdefault((scale, *pixels.shape), []).append(position)
    shared = leaves_worker and torch.utils.data.get_worker_info() is not None
    groups = []
    for (scale, *shape), positions in by_shape.items():
        pixels = torch.empty((len(positions), *shape), dtype=torch.uint8, memory_format=torch.channels_last)
        if shared:
            pixels.share_memory_()
        for row, p in zip(pixels, positions):
            row.copy_(views[p][scale])
        groups.append((positions, pixels, scale))
    return Batch([s.index for s in good], [s.stat for s in good], groups, [(s.index, s.failure) for s in samples if s.failure])
