"""The calibration sample of an int8 run (`--precision int8`): which images, decoded as the run decodes them.

By default up to CALIBRATION_IMAGES of the run's own inputs, spread evenly over them; with `--calibration DIR`
the images found in DIR instead. The sample's identity (its names, sizes and modification times, and the
preprocessing) keys the cached quantized model, so a cached run decodes nothing: `Calibration.pixels` runs
only when the model must be quantized.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpl_cli.embedding.images import draft_min_side, load_sample, scale_views
from gpl_cli.embedding.inputs import InputItem, collect_inputs
from gpl_cli.errors import GplError
from gpl_cli.models.preprocess import Preprocess
from gpl_cli.models.quantize import check_sample_size

CALIBRATION_IMAGES = 300  # enough for stable activation ranges; NNCF's own default subset is the same size


@dataclass(frozen=True)
class Calibration:
    items: tuple[InputItem, ...]
    origin: str  # where the images come from, in words (messages, metadata)

    @property
    def stats(self) -> list[tuple[int, int]]:
        return [item.current_stat() for item in self.items]

    def identity(self, pre: Preprocess) -> str:
        """A digest of the sample and its preprocessing: a changed, added or removed image, or another input
        size or resize mode, gives another quantized model."""
        doc = {"images": [[item.name, *stat] for item, stat in zip(self.items, self.stats)], "preprocess": repr(pre)}
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]

    def pixels(self, pre: Preprocess, jpeg_draft: bool = False, timeout: float | None = 60.0) -> list[torch.Tensor]:
        """Each image decoded and preprocessed as the run does it, as 1 x 3 x H x W uint8 tensors, one per image
        and scale; images that fail to decode are left out (the run itself reports them)."""
        min_side = draft_min_side(pre, jpeg_draft)
        out = []
        for i, item in enumerate(self.items):
            sample = load_sample(i, item.path, pre, timeout, min_side, item.source)
            if sample.pixels is not None:
                out.extend(view.unsqueeze(0) for view in scale_views(sample.pixels))
        return out

    def inputs(self, pre: Preprocess, jpeg_draft: bool = False, timeout: float | None = 60.0) -> list[np.ndarray]:
        """`pixels` as the model's inputs: float32, normalised as the Embedder normalises a batch."""
        return normalised(self.pixels(pre, jpeg_draft, timeout), pre)


@dataclass(frozen=True)
class Synthetic:
    """Random pixels in place of photos, for timing an int8 model (gpl tune): its speed does not depend on the
    ranges it was calibrated for, and no photos are at hand there. Never used to embed."""

    count: int = 20
    origin: str = "random pixels, for timing only"

    def identity(self, pre: Preprocess) -> str:
        return f"random pixels, {self.count} images, seed 0, {pre.crop} px"

    def inputs(self, pre: Preprocess, jpeg_draft: bool = False, timeout: float | None = None) -> list[np.ndarray]:
        generator = torch.Generator().manual_seed(0)
        pixels = [torch.randint(0, 256, (1, 3, pre.crop, pre.crop), dtype=torch.uint8, generator=generator)
                  for _ in range(self.count)]
        return normalised(pixels, pre)


@dataclass(frozen=True)
class Recorded:
    """The sample an existing output's int8 model was calibrated on, known by its identity alone: --update
    takes that model from the cache, so that new rows come from the model that made the old ones."""

    sample: str
    origin: str

    def identity(self, pre: Preprocess) -> str:
        return self.sample

    def inputs(self, pre: Preprocess, jpeg_draft: bool = False, timeout: float | None = None) -> list[np.ndarray]:
        raise GplError("the int8 model of the output being updated left the cache while this run started; "
                       "run the command again")


def normalised(pixels: list[torch.Tensor], pre: Preprocess) -> list[np.ndarray]:
    """uint8 1 x 3 x H x W tensors as float32 arrays, (x / 255 - mean) / std: the Embedder's arithmetic."""
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return [p.float().div_(255.0).sub_(mean).div_(std).numpy() for p in pixels]


def evenly_spaced(items: Sequence[InputItem], limit: int = CALIBRATION_IMAGES) -> tuple[InputItem, ...]:
    """At most `limit` of `items`, spread evenly over them in input order (folders are listed sorted, so
    the choice does not depend on the order the files were written in)."""
    usable = [item for item in items if item.error is None]
    if len(usable) <= limit:
        return tuple(usable)
    return tuple(usable[i * len(usable) // limit] for i in range(limit))


def from_run(items: Sequence[InputItem], limit: int = CALIBRATION_IMAGES) -> Calibration:
    chosen = evenly_spaced(items, limit)
    check_sample_size(len(chosen), "this run")
    return Calibration(chosen, f"{len(chosen)} of the run's images")


def from_folder(directory: str, limit: int = CALIBRATION_IMAGES) -> Calibration:
    """--calibration DIR: the images under DIR (as `gpl embed DIR` would find them), at most `limit`."""
    if not os.path.isdir(directory):
        raise GplError(f"--calibration {directory}: not a folder of images")
    try:
        listed = collect_inputs([directory])
    except GplError as exc:
        raise GplError(f"--calibration {directory}: {exc}") from None
    chosen = evenly_spaced(listed.items, limit)
    check_sample_size(len(chosen), f"--calibration {directory}")
    return Calibration(chosen, f"{len(chosen)} images of {directory}")


def calibration_for(items: Sequence[InputItem], directory: str | None) -> Calibration:
    """The sample of a run over `items`: --calibration DIR when given, else the run's own images."""
    return from_folder(directory) if directory else from_run(items)
