"""The calibration sample of an int8 run (gpl_cli.embedding.calibration): which images, their identity, decoding."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from gpl_cli.embedding import calibration as cal
from gpl_cli.embedding.images import load_sample
from gpl_cli.embedding.inputs import InputItem, collect_inputs
from gpl_cli.errors import GplError
from tests.conftest import REPO, SAMPLE_IMAGES

PHOTOS = REPO / "tests" / "data" / "labeled_photos"


def _items(n: int) -> list[InputItem]:
    return [InputItem(f"/x/{i:04d}.jpg", f"{i:04d}.jpg") for i in range(n)]


def test_evenly_spaced_spreads_over_the_inputs_and_skips_unreadable_folders():
    items = _items(1000)
    chosen = cal.evenly_spaced(items, 300)
    assert len(chosen) == 300 and len(set(chosen)) == 300
    assert chosen[0] is items[0] and chosen[-1].name == "0996.jpg"  # 299 * 1000 // 300
    gaps = np.diff([int(it.name[:4]) for it in chosen])
    assert set(gaps) == {3, 4}
    broken = [InputItem("/x/dir", "dir", error="permission denied"), *_items(5)]
    assert cal.evenly_spaced(broken, 300) == tuple(broken[1:])


def test_the_default_sample_is_the_runs_own_images():
    items = collect_inputs([str(PHOTOS)]).items
    sample = cal.calibration_for(items, None)
    assert sample.items == tuple(items) and sample.origin == "60 of the run's images"
    with pytest.raises(GplError, match="at least 10 images and this run has 4"):
        cal.from_run(items[:4])


def test_identity_follows_the_files_and_the_preprocessing(tmp_path, lite0):
    folder = tmp_path / "photos"
    shutil.copytree(SAMPLE_IMAGES, folder)
    pre = lite0.preprocess
    first = cal.from_folder(str(folder))
    assert first.origin == f"15 images of {folder}"
    before = first.identity(pre)
    assert cal.from_folder(str(folder)).identity(pre) == before
    assert first.identity(replace(pre, mode="keep-aspect", max_size=300)) != before
    photo = folder / "rocket.jpg"
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))
    assert cal.from_folder(str(folder)).identity(pre) != before


def test_pixels_are_decoded_as_the_run_decodes_them(lite0):
    pre = replace(lite0.preprocess, scales=(1.0, 1.5))
    sample = cal.from_folder(str(SAMPLE_IMAGES))
    pixels = sample.pixels(pre)
    assert len(pixels) == 2 * len(sample.items)  # one input per image and scale
    reference = load_sample(0, sample.items[0].path, pre).pixels
    torch.testing.assert_close(pixels[0][0], reference[0], rtol=0, atol=0)
    torch.testing.assert_close(pixels[1][0], reference[1], rtol=0, atol=0)
    inputs = sample.inputs(pre)
    mean, std = np.array(pre.mean).reshape(1, 3, 1, 1), np.array(pre.std).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(inputs[0], (pixels[0].numpy() / 255 - mean) / std, atol=1e-6)
    assert inputs[0].dtype == np.float32


def test_synthetic_pixels_are_the_same_every_time(lite0):
    pre = lite0.preprocess
    a, b = cal.Synthetic().inputs(pre), cal.Synthetic().inputs(pre)
    assert len(a) == 20 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (1, 3, pre.crop, pre.crop)


def test_a_calibration_folder_must_hold_images(tmp_path):
    with pytest.raises(GplError, match="--calibration .*: not a folder of images"):
        cal.from_folder(str(tmp_path / "missing"))
    with pytest.raises(GplError, match="--calibration .*: no images found"):
        cal.from_folder(str(tmp_path))
