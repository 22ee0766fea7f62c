"""`gpl embed` end to end: real subprocesses, real files, rows aligned with paths."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import SAMPLE_IMAGES, assert_vectors_close, gpl_imports, run_gpl

from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.images import open_rgb, preprocess_image
from gpl_cli.embedding.settings import cpu_has_native_bf16
from gpl_cli.pooling.spec import parse_pool_list

EXPECTED_NAMES = ["a/corrupt.jpg", "a/one.jpg", "a/two.png", "b/three.JPG", "four.webp"]
GOOD = [n for n in EXPECTED_NAMES if n != "a/corrupt.jpg"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from conftest import make_photo_like
    from PIL import Image

    root = tmp_path_factory.mktemp("embed") / "imgs"
    for i, name in enumerate(GOOD):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_photo_like((96 + 8 * i, 64 + 4 * i), seed=i)).save(root / name)
    (root / "a/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return root


@pytest.fixture(scope="module")
def h5_run(folder):
    out = folder.parent / "out.h5"
    proc = run_gpl("embed", str(folder), "-o", str(out), "--pool", "avg", "--pool", "max", "--workers", "1")
    return out, proc


def alone(backbone, path, pools="avg,max"):
    """The image embedded by itself, in this process."""
    pixels = preprocess_image(open_rgb(str(path)), backbone.preprocess)[None]
    return {k: v[0] for k, v in Embedder(backbone, parse_pool_list([pools])).embed_pixels(pixels).items()}


def test_corrupt_file_is_reported_recorded_and_rows_stay_aligned(h5_run, folder, lite0):
    out, proc = h5_run
    err = proc.stderr.decode()
    assert proc.returncode == 3, err
    assert "a/corrupt.jpg: truncated or corrupt image data" in err
    assert proc.stdout == b""
    with h5py.File(out) as f:
        paths = list(f["paths"].asstr()[...])
        assert paths == GOOD
        for i, name in enumerate(paths):
            ref = alone(lite0, folder / name)
            assert_vectors_close(f["embeddings/avg"][i], ref["avg"])
            assert_vectors_close(f["embeddings/max"][i], ref["max"])
        assert list(f["failures/paths"].asstr()[...]) == ["a/corrupt.jpg"]
        assert f["failures/reasons"].asstr()[0].startswith("truncated or corrupt image data")


def test_hdf5_metadata_describes_the_run(h5_run):
    out, _ = h5_run
    with h5py.File(out) as f:
        meta = json.loads(f.attrs["gpl_metadata"])
        assert f.attrs["backbone"] == "efficientnet_lite0"
        assert f["embeddings/avg"].dtype == np.float32 and f["embeddings/avg"].shape == (4, 1280)
    assert meta["feature_map_shape"] == [1280, 7, 7]
    assert meta["preprocess"] == {
        "resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
        "mode": "crop", "max_size": None,
    }
    assert meta["pools"]["avg"] == {"op": "avg", "params": {}, "dim": 1280}
    assert meta["normalize"] == "none"
    assert len(meta["weights_sha256"]) == 64 and "efficientnet-lite0" in meta["weights"]
    assert set(meta["versions"]) >= {"gpl", "torch", "torchvision"}
    assert meta["count"] == 4 and meta["failed"] == 1 and meta["created"]


def test_npy_output_has_sidecars_and_matches_hdf5(h5_run, folder, tmp_path):
    out_h5, _ = h5_run
    out = tmp_path / "emb.npy"
    proc = run_gpl("embed", str(folder), "-o", str(out), "-p", "avg,max", "--normalize", "l2", "-q")
    assert proc.returncode == 3
    assert not out.exists()  # several poolings: one file each
    avg, mx = np.load(tmp_path / "emb.avg.npy"), np.load(tmp_path / "emb.max.npy")
    assert (tmp_path / "emb.paths.txt").read_text().splitlines() == GOOD
    doc = json.loads((tmp_path / "emb.json").read_text())
    assert doc["paths"] == GOOD and doc["failures"][0]["path"] == "a/corrupt.jpg"
    assert doc["normalize"] == "l2" and doc["backbone"] == "efficientnet_lite0"
    with h5py.File(out_h5) as f:
        raw = f["embeddings/avg"][...]
    np.testing.assert_allclose(avg, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(mx, axis=1), 1.0, atol=1e-5)
    assert not list(tmp_path.glob("*.partial"))


def test_stdin_list_single_pool_npy_and_overwrite_guard(folder, tmp_path, lite0):
    out = tmp_path / "one.npy"
    listing = f"{folder / 'four.webp'}\n{folder / 'a/one.jpg'}\n".encode()
    proc = run_gpl("embed", "-", "-o", str(out), "-q", input=listing)
    assert proc.returncode == 0, proc.stderr.decode()
    vecs = np.load(out)
    assert vecs.shape == (2, 1280)
    assert_vectors_close(vecs[0], alone(lite0, folder / "four.webp", "avg")["avg"])
    again = run_gpl("embed", "-", "-o", str(out), "-q", input=listing)
    assert again.returncode == 2 and b"--overwrite" in again.stderr


def test_usage_errors_exit_2_with_a_message(tmp_path):
    missing = run_gpl("embed", str(tmp_path / "nope"), "-o", str(tmp_path / "x.h5"))
    assert missing.returncode == 2 and b"input not found" in missing.stderr and b"Traceback" not in missing.stderr
    bad_pool = run_gpl("embed", str(SAMPLE_IMAGES), "-o", str(tmp_path / "x.h5"), "--pool", "avgg")
    assert bad_pool.returncode == 2 and b"unknown pooling 'avgg'" in bad_pool.stderr and b"max" in bad_pool.stderr


def test_help_is_fast_because_torch_is_not_imported():
    code = "import sys; from gpl_cli.cli import cli; cli.main(['--help'], standalone_mode=False); " \
           "sys.exit(1 if 'torch' in sys.modules or 'h5py' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert b"embed" in proc.stdout


# --- issue 12: options and output locations refused before any model work ---------------------------


@pytest.mark.parametrize("pool,words", [
    ("", "is empty"), ("avg,,max", "empty item"), ("avg,", "empty item"), ("gem:p=3,p=4", "p given twice"),
    ("nope", "unknown pooling"),
])
def test_bad_pool_lists_exit_2_before_torch_is_imported(folder, tmp_path, pool, words):
    status, heavy, err = gpl_imports("embed", str(folder), "-o", str(tmp_path / "x.h5"), "-p", pool)
    assert status == 2 and words in err, err
    assert not heavy & {"torch", "torchvision", "timm"}
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_does_not_exist_is_refused_before_loading(folder, tmp_path):
    status, heavy, err = gpl_imports("embed", str(folder), "-o", str(tmp_path / "nonexist/dir/x.h5"))
    assert status == 2 and "does not exist" in err and "Traceback" not in err
    assert "torch" not in heavy
    proc = run_gpl("export", str(tmp_path / "none.h5"), "-o", str(tmp_path / "nope/x.jsonl"))
    assert proc.returncode == 2 and b"does not exist" in proc.stderr


def test_an_output_that_is_a_directory_is_refused_and_nothing_is_left(folder, tmp_path):
    target = tmp_path / "c1"
    target.mkdir()
    proc = run_gpl("embed", str(folder), "-o", str(target), "--format", "h5", "--overwrite", "-q")
    assert proc.returncode == 2 and b"is a directory" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1"]


def test_an_output_that_is_one_of_the_inputs_is_refused_even_with_overwrite(folder, tmp_path):
    import shutil

    photo, other = tmp_path / "panda.jpg", tmp_path / "sheep.jpg"
    shutil.copy(folder / "a/one.jpg", photo)
    shutil.copy(folder / "a/one.jpg", other)
    before = photo.read_bytes()
    status, heavy, err = gpl_imports("embed", str(photo), str(other), "-o", str(photo), "--format", "h5",
                                         "--overwrite")
    assert status == 2 and "is one of the inputs" in err
    assert photo.read_bytes() == before and "torch" not in heavy


# --- an accelerator asked for by name that the machine lacks -----------------------------------------

NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # on a machine with a GPU too, torch then sees none


def _device_args(command: str, root, h5) -> list[str]:
    """`command` with every output it can write placed in `root` (which holds its inputs)."""
    import shutil

    for label, names in {"cats": ["cat_chelsea.png", "coffee.png"], "other": ["giraffe.jpg", "camera.png"]}.items():
        (root / "classes" / label).mkdir(parents=True)
        for name in names:
            shutil.copy(SAMPLE_IMAGES / name, root / "classes" / label / name)
    image = root / "classes" / "cats" / "coffee.png"  # in no embeddings file: neighbors must embed it
    return {
        "embed": ["embed", str(root / "classes"), "-o", str(root / "out.h5")],
        "classify": ["classify", str(image), "-o", str(root / "top.csv")],
        "compare": ["compare", str(root / "classes"), "--save", str(root / "s.h5"), "--plot", str(root / "p.png"),
                    "--html", str(root / "r.html")],
        "explain": ["explain", str(image), "-o", str(root / "why.png"), "--json", str(root / "why.json")],
        "tune": ["tune"],
        "neighbors": ["neighbors", str(h5), str(image), "--json"],
    }[command]


@pytest.mark.parametrize("command,device", [(c, "cuda") for c in
                                            ("embed", "classify", "compare", "explain", "tune", "neighbors")]
                         + [("embed", "mps"), ("neighbors", "mps")])
def test_a_missing_accelerator_is_one_line_exit_2_and_leaves_no_output(command, device, h5_run, tmp_path):
    import torch

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    args = _device_args(command, tmp_path, h5_run[0])
    before = sorted(tmp_path.rglob("*"))
    proc = run_gpl(*args, "--device", device, env=NO_GPU)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b"", err
    name = {"cuda": "CUDA", "mps": "MPS"}[device]
    assert err == f"gpl: error: --device {device}: no {name} device is available on this machine; " \
                  "use --device cpu (or auto)\n"
    assert sorted(tmp_path.rglob("*")) == before  # no output, partial file or lock left


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not cpu_has_native_bf16(), reason="this CPU would emulate bfloat16, which gpl refuses"))])
def test_the_precision_shows_in_the_summary_and_in_info(folder, tmp_path, precision):
    out = tmp_path / "p.h5"
    proc = run_gpl("embed", str(folder / "a/one.jpg"), "-o", str(out), "--precision", precision, "--device", "cpu")
    summary = proc.stderr.decode().splitlines()[-1]
    assert proc.returncode == 0 and summary.startswith("gpl: embedded 1, "), proc.stderr
    assert f", precision {precision}, " in summary
    info = run_gpl("info", str(out), check=True).stdout.decode().splitlines()
    assert f"precision     {precision}" in info
