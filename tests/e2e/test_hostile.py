"""A hostile corpus in one folder: every good image embedded, every bad one reported with its reason."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from conftest import assert_vectors_close, make_photo_like, run_gpl
from PIL import Image

from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.images import ImageDataset, Preprocess, collate, open_rgb, preprocess_image
from gpl_cli.pooling.spec import parse_pool_list
from gpl_cli.store.formats import read_embeddings

BAD = {  # name -> words its reason must contain
    "zero.jpg": "empty file",
    "trunc.jpg": "truncated",
    "trunc.png": "truncated",
    "text.jpg": "not a readable image",
    "page.png": "not a readable image",
    "bomb.png": "too large",
    "dangling.jpg": "not found",
    "loop.jpg": "symlink loop",
}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def save(im: Image.Image, path, **kw) -> None:
    im.save(path, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "corpus"
    root.mkdir()
    photo = Image.fromarray(make_photo_like((80, 60), seed=7))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    (root / "zero.jpg").write_bytes(b"")
    (root / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    png = io.BytesIO()
    photo.save(png, "PNG")
    (root / "trunc.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "text.jpg").write_text("just some text, not a JPEG\n")
    (root / "page.png").write_text("<!doctype html><html><body>404</body></html>")
    (root / "bomb.png").write_bytes(png_header_only(20000, 20000))
    os.symlink(root / "nowhere.jpg", root / "dangling.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")
    sub = root / "nested"
    sub.mkdir()
    os.symlink("..", sub / "up")  # a directory loop: never followed
    save(photo.convert("CMYK"), root / "cmyk.jpg", quality=95)
    save(Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257), root / "deep16.png")
    save(photo.convert("1"), root / "bilevel.png")
    save(photo.convert("P"), root / "palette.png")
    save(photo.convert("LA"), root / "la.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    save(rgba, root / "rgba.png")
    first, second = Image.fromarray(make_photo_like((64, 48), seed=1)), Image.fromarray(make_photo_like((64, 48), seed=2))
    first.save(root / "anim.gif", save_all=True, append_images=[second], duration=100, loop=0)
    first.save(root / "multi.tiff", save_all=True, append_images=[second])
    save(photo, root / "photo.webp", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    photo.transpose(Image.Transpose.ROTATE_90).save(root / "exif_rotated.jpg", quality=100, subsampling=0, exif=exif)
    photo.save(sub / "upright.jpg", quality=100, subsampling=0)
    save(Image.new("RGB", (1, 1), (200, 30, 30)), root / "one_pixel.png")
    save(Image.fromarray(make_photo_like((10000, 4), seed=3)), root / "strip.png")
    for name in ("with space.jpg", "new\nline.jpg", "naïve 写真.jpg"):
        save(photo, root / name, quality=90)
    with open(os.path.join(os.fsencode(root), b"bad\xffbyte.jpg"), "wb") as f:
        f.write(buf.getvalue())
    return root


GOOD = {
    "bilevel.png", "cmyk.jpg", "deep16.png", "la.png", "palette.png", "rgba.png", "anim.gif", "multi.tiff",
    "photo.webp", "exif_rotated.jpg", "nested/upright.jpg", "one_pixel.png", "strip.png", "with space.jpg",
    "new\nline.jpg", "naïve 写真.jpg", os.fsdecode(b"bad\xffbyte.jpg"),
}


@pytest.fixture(scope="module")
def run(corpus):
    out = corpus.parent / "out.h5"
    proc = run_gpl("embed", str(corpus), "-o", str(out), "--workers", "1", "--batch-size", "4")
    return proc, read_embeddings(str(out))


def test_every_good_image_is_embedded_and_every_bad_one_reported(run):
    proc, emb = run
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 3, err
    assert "Traceback" not in err
    assert set(emb.paths) == GOOD
    failures = dict(emb.failures)
    assert set(failures) == set(BAD)
    for name, words in BAD.items():
        assert words in failures[name], (name, failures[name])
        assert sum(f"{name}: " in line for line in err.splitlines()) == 1, name


def test_rows_stay_aligned_and_special_images_decode_right(run, corpus, lite0):
    _, emb = run
    embedder = Embedder(lite0, parse_pool_list(["avg"]))

    def alone(image: Image.Image) -> np.ndarray:
        return embedder.embed_pixels(preprocess_image(image, lite0.preprocess)[None])["avg"][0]

    row = {name: emb.vectors["avg"][i] for i, name in enumerate(emb.paths)}
    # the run's single-threaded workers and this process round differently: the stated tolerance
    assert_vectors_close(row["photo.webp"], alone(open_rgb(str(corpus / "photo.webp"))))
    # Animated GIF and multi-page TIFF: the first frame / page.
    assert_vectors_close(row["anim.gif"], alone(Image.open(corpus / "anim.gif").convert("RGB")))
    assert_vectors_close(row["multi.tiff"], alone(Image.fromarray(make_photo_like((64, 48), seed=1))))
    # EXIF rotation applied: the stored-sideways photo decodes like the upright one.
    rotated = np.asarray(open_rgb(str(corpus / "exif_rotated.jpg")), dtype=float)
    upright = np.asarray(open_rgb(str(corpus / "nested/upright.jpg")), dtype=float)
    assert rotated.shape == upright.shape
    assert np.abs(rotated - upright).mean() < 2.0
    assert np.all(np.isfinite(emb.vectors["avg"]))


def test_awkward_names_through_a_nul_separated_list_with_duplicates(corpus, tmp_path):
    names = [b"with space.jpg", b"new\nline.jpg", "naïve 写真.jpg".encode(), b"bad\xffbyte.jpg", b"with space.jpg"]
    listing = b"".join(os.path.join(os.fsencode(corpus), n) + b"\0" for n in names)
    out = tmp_path / "names.npy"
    proc = run_gpl("embed", "-", "-0", "-o", str(out), input=listing)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    assert b"1 duplicate input(s) embedded once" in proc.stderr
    emb = read_embeddings(str(out))
    assert [os.fsencode(p) for p in emb.paths] == [os.path.join(os.fsencode(corpus), n) for n in names[:4]]
    lines = (tmp_path / "names.paths.txt").read_bytes().split(b"\n")
    assert lines[1].endswith(b"new\\nline.jpg")


def test_strict_stops_at_the_first_failure(corpus, tmp_path):
    proc = run_gpl("embed", str(corpus), "-o", str(tmp_path / "s.h5"), "--strict", "-q")
    assert proc.returncode == 3
    assert b"stopped at the first failure (--strict)" in proc.stderr
    assert not (tmp_path / "s.h5").exists()


def test_a_hanging_decoder_is_bounded_by_the_per_image_timeout(monkeypatch, tmp_path):
    import gpl_cli.embedding.images as images

    good = tmp_path / "good.png"
    Image.fromarray(make_photo_like((32, 32))).save(good)
    real_open = images.open_rgb

    def open_or_hang(path, *args):
        if path.endswith("hang.png"):
            time.sleep(300)
        return real_open(path, *args)

    monkeypatch.setattr(images, "open_rgb", open_or_hang)
    pre = Preprocess(36, 32, (0.5,) * 3, (0.5,) * 3)
    dataset = ImageDataset([str(good), str(tmp_path / "hang.png"), str(good)], pre, timeout=0.5)
    # In a DataLoader worker process, as gpl embed runs it.
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate)
    start = time.monotonic()
    batch = next(iter(loader))
    assert time.monotonic() - start < 30
    assert batch.indices == [0, 2]
    assert [(i, "timed out" in f.reason) for i, f in batch.failures] == [(1, True)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permission bits")
def test_unreadable_file_is_reported(tmp_path):
    path = tmp_path / "secret.png"
    Image.fromarray(make_photo_like((16, 16))).save(path)
    path.chmod(0)
    pre = Preprocess(36, 32, (0.5,) * 3, (0.5,) * 3)
    assert ImageDataset([str(path)], pre)[0].failure.reason == "permission denied"


def test_permission_denied_is_named_as_such(monkeypatch, tmp_path):
    """The same path as above, reachable as root: the OS refusing to open the file."""
    import gpl_cli.embedding.images as images

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(images.Image, "open", refuse)
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    pre = Preprocess(36, 32, (0.5,) * 3, (0.5,) * 3)
    assert ImageDataset([str(tmp_path / "x.png")], pre)[0].failure.reason == "permission denied"


def test_weights_pickle_carrying_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": Payload()}, evil)
    Image.fromarray(make_photo_like((16, 16))).save(tmp_path / "img.png")
    proc = run_gpl("embed", str(tmp_path), "-o", str(tmp_path / "o.h5"), "--weights", str(evil))
    assert proc.returncode == 2
    assert b"refusing to load" in proc.stderr and b"evil.pth" in proc.stderr
    assert not marker.exists()
