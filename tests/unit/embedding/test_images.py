"""Decoding: every mode becomes the RGB a viewer would show; failures are values."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_photo_like
from PIL import Image

from gpl_cli.embedding.images import MAX_ASPECT, ImageDataset, Preprocess, collate, open_rgb, preprocess_image

PRE = Preprocess(36, 32, (0.5,) * 3, (0.5,) * 3)


def test_exif_orientation_is_applied(tmp_path):
    pixels = make_photo_like((40, 24), seed=3)  # landscape
    upright = Image.fromarray(pixels)
    # Store the image turned on its side and tag it "rotate 90 CW to display" (orientation 6).
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif)
    got = np.asarray(open_rgb(str(path)))
    assert got.shape == pixels.shape
    np.testing.assert_array_equal(got, pixels)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 10, 257 * 128, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    got = np.asarray(open_rgb(str(path)))
    np.testing.assert_array_equal(got[0, :, 0], [0, 10, 128, 255])
    assert (got[..., 0] == got[..., 2]).all()


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent black
    rgba[0, 0] = (200, 0, 0, 255)  # one opaque red pixel
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    got = np.asarray(open_rgb(str(path))).astype(int)
    assert tuple(got[3, 3]) == (255, 255, 255)
    assert tuple(got[0, 0]) == (200, 0, 0)
    assert all(abs(c - 127) <= 1 for c in got[0, 1])  # 255 * (1 - 128/255)


def test_cmyk_palette_and_greyscale_become_rgb(tmp_path):
    base = Image.fromarray(make_photo_like((16, 16)))
    for mode, ext in (("CMYK", "jpg"), ("P", "png"), ("L", "png"), ("1", "png"), ("LA", "png")):
        path = tmp_path / f"{mode}.{ext}"
        base.convert(mode).save(path)
        im = open_rgb(str(path))
        assert im.mode == "RGB" and im.size == (16, 16), mode
    grey = np.asarray(open_rgb(str(tmp_path / "L.png")))
    np.testing.assert_array_equal(grey[..., 0], np.asarray(base.convert("L")))


def test_preprocess_resizes_shorter_side_then_centre_crops():
    im = Image.fromarray(make_photo_like((90, 45)))
    t = preprocess_image(im, PRE)
    assert t.shape == (3, 32, 32) and str(t.dtype) == "torch.uint8"


def test_bad_files_become_failures_without_shifting_indices(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(make_photo_like((20, 20))).save(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("<html>not an image</html>")
    full = tmp_path / "full.jpg"
    Image.fromarray(make_photo_like((64, 64))).save(full)
    (tmp_path / "cut.jpg").write_bytes(full.read_bytes()[:300])
    paths = [str(tmp_path / n) for n in ("empty.jpg", "good.png", "text.png", "cut.jpg", "missing.png")]
    batch = collate([ImageDataset(paths, PRE)[i] for i in range(len(paths))])
    assert batch.indices == [1] and [g[1].shape for g in batch.groups] == [(1, 3, 32, 32)]
    reasons = {i: f.reason for i, f in batch.failures}
    assert sorted(reasons) == [0, 2, 3, 4]
    assert "empty file" in reasons[0]
    assert "not a readable image" in reasons[2]
    assert "truncated" in reasons[3] or "cannot decode" in reasons[3]
    assert "not found" in reasons[4]


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
        open_rgb(str(path))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_preprocess_equals_torchvision_resize_and_centre_crop(interpolation):
    """gpl resizes with Pillow alone (torchvision costs ~1 s to import); its pixels must be exactly
    those of torchvision's Resize(int) + CenterCrop + PILToTensor on the same PIL image."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(5)
    sizes = [(90, 45), (45, 90), (37, 36), (36, 36), (301, 299), (20, 17), (64, 300)]
    sizes += [tuple(int(v) for v in rng.integers(8, 400, 2)) for _ in range(16)]
    sizes = [(w, h) for w, h in sizes if max(w, h) <= MAX_ASPECT * min(w, h)]  # beyond: gpl trims first
    for resize, crop in ((36, 32), (256, 224), (30, 35), (33, 40)):  # crop > resize: padded with black
        pre = Preprocess(resize, crop, (0.5,) * 3, (0.5,) * 3, interpolation)
        for w, h in sizes:
            im = Image.fromarray(make_photo_like((w, h), seed=w * h))
            ref = TF.resize(im, resize, interpolation=InterpolationMode(interpolation), antialias=True)
            ref = TF.pil_to_tensor(TF.center_crop(ref, [crop, crop]))
            got = preprocess_image(im, pre)
            assert got.dtype == ref.dtype and got.shape == ref.shape, (w, h, resize, crop)
            assert bool((got == ref).all()), (w, h, resize, crop, interpolation)


def test_keep_aspect_equals_torchvision_resize():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from gpl_cli.embedding.images import keep_aspect_size

    pre = Preprocess(36, 32, (0.5,) * 3, (0.5,) * 3, "bicubic", mode="keep-aspect", max_size=48)
    for w, h in ((90, 45), (45, 90), (48, 30), (200, 7), (48, 48)):
        im = Image.fromarray(make_photo_like((w, h), seed=w + h))
        size = list(keep_aspect_size(w, h, 48))
        ref = TF.pil_to_tensor(TF.resize(im, size, interpolation=InterpolationMode.BICUBIC, antialias=True))
        got = preprocess_image(im, pre)
        assert got.shape == ref.shape and bool((got == ref).all()), (w, h)
