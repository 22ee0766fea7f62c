"""`gpl embed --precision int8`: the OpenVINO model quantized with NNCF on a calibration sample, end to end.

The vectors are checked against torch float32 by cosine with the bounds of tests/unit/models/test_quantize.py
(measured there: smallest 0.95, medians 0.97 on these photos; bounds median >= 0.95, smallest >= 0.8).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from gpl_cli.models.quantize import cosines
from tests.conftest import REPO, SAMPLE_IMAGES, run_gpl

pytest.importorskip("openvino")
pytest.importorskip("nncf")

PHOTOS = REPO / "tests" / "data" / "labeled_photos"


def _read(path):
    import gpl_cli

    return gpl_cli.read(str(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The photos embedded in fp32 on torch, and twice in int8 (the second run finds the cached model)."""
    root = tmp_path_factory.mktemp("int8")
    fp32 = run_gpl("embed", str(PHOTOS), "-o", str(root / "fp32.h5"), "-p", "avg,max", "--runtime", "torch")
    first = run_gpl("embed", str(PHOTOS), "-o", str(root / "int8.h5"), "-p", "avg,max", "--precision", "int8")
    again = run_gpl("embed", str(PHOTOS), "-o", str(root / "again.h5"), "-p", "avg,max", "--precision", "int8")
    for proc in (fp32, first, again):
        assert proc.returncode == 0, proc.stderr.decode()
    return root, first.stderr.decode(), again.stderr.decode()


def test_int8_vectors_agree_with_torch_fp32(runs):
    root, _, _ = runs
    ref, got = _read(root / "fp32.h5"), _read(root / "int8.h5")
    assert got.paths == ref.paths
    for key in ("avg", "max"):
        cos = cosines(ref.vectors[key].astype(np.float64), got.vectors[key].astype(np.float64))
        assert np.median(cos) >= 0.95, key
        assert cos.min() >= 0.8, key
        assert cos.max() < 0.99999, key  # quantized indeed


def test_the_agreement_is_printed_and_recorded(runs):
    root, stderr, _ = runs
    int8 = _read(root / "int8.h5").metadata["int8"]
    assert int8["calibration"] == "60 of the run's images"
    assert int8["held_out_images"] == 12  # every fifth of the 60
    assert 0.8 <= int8["min_cosine"] <= int8["median_cosine"] < 1
    assert "quantizing efficientnet_lite0 to int8 on 60 of the run's images" in stderr
    assert (f"int8 agreement with f32 on 12 held-out images: smallest cosine {int8['min_cosine']:.4f}, "
            f"median {int8['median_cosine']:.4f}") in stderr
    meta = _read(root / "int8.h5").metadata
    assert (meta["runtime"], meta["config"]["precision"]) == ("openvino", "int8")
    assert "precision int8, runtime openvino" in stderr


def test_a_second_run_reuses_the_cached_model(runs):
    root, _, again = runs
    assert "quantizing" not in again
    assert "int8 agreement with f32 on 12 held-out images" in again
    first, second = _read(root / "int8.h5"), _read(root / "again.h5")
    assert first.metadata["int8"] == second.metadata["int8"]
    for key in ("avg", "max"):
        np.testing.assert_array_equal(first.vectors[key], second.vectors[key])


def test_calibration_folder_is_used(runs, tmp_path):
    root, _, _ = runs
    out = tmp_path / "cal.h5"
    proc = run_gpl("embed", str(PHOTOS), "-o", str(out), "-p", "avg,max", "--precision", "int8",
                   "--calibration", str(SAMPLE_IMAGES))
    assert proc.returncode == 0, proc.stderr.decode()
    int8 = _read(out).metadata["int8"]
    assert int8["calibration"] == f"15 images of {SAMPLE_IMAGES}"
    assert int8["held_out_images"] == 3
    default = _read(root / "int8.h5")
    assert int8["calibration_identity"] != default.metadata["int8"]["calibration_identity"]
    # another sample, other ranges: other int8 vectors. Calibrated on 12 photos unlike these, they move further
    # from float32 (measured: median cosine 0.946, smallest 0.80, against 0.97 and 0.95 from the photos' own)
    assert not np.array_equal(_read(out).vectors["avg"], default.vectors["avg"])
    cos = cosines(_read(root / "fp32.h5").vectors["avg"], _read(out).vectors["avg"])
    assert np.median(cos) >= 0.9


def test_compare_shows_precision_and_runtime(runs):
    root, _, _ = runs
    proc = run_gpl("compare", str(root / "fp32.h5"), str(root / "int8.h5"), "--pool", "avg", cwd=root)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "efficientnet_lite0 from " in out and "(fp32 on torch vs int8 on openvino)" in out.splitlines()[0]
    assert "fp32/avg - int8/avg" in out


def test_update_keeps_the_model_that_made_the_file(runs, tmp_path):
    """Adding images changes the sample drawn from the run's images; --update still uses the cached model the
    file was made with, so old and new rows come from one model."""
    folder = tmp_path / "photos"
    shutil.copytree(PHOTOS, folder)
    moved = sorted((folder / "tool").iterdir())[0]
    moved.rename(tmp_path / moved.name)
    out = tmp_path / "u.h5"
    assert run_gpl("embed", str(folder), "-o", str(out), "--precision", "int8", "-q").returncode == 0
    before = _read(out).metadata["int8"]
    (tmp_path / moved.name).rename(moved)
    proc = run_gpl("embed", str(folder), "-o", str(out), "--precision", "int8", "--update")
    assert proc.returncode == 0, proc.stderr.decode()
    after = _read(out)
    assert after.metadata["int8"] == before and len(after) == 60
    assert "embedded 60 (59 reused)" in proc.stderr.decode()
    assert "quantizing" not in proc.stderr.decode()
    refused = run_gpl("embed", str(folder), "-o", str(out), "--update")
    assert refused.returncode == 2
    assert "precision: 'int8' there, 'fp32' now" in refused.stderr.decode()


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8", "--runtime", "torch"], "--precision int8 runs on OpenVINO"),
    (["--calibration", str(SAMPLE_IMAGES)], "--calibration applies to --precision int8 only"),
    (["--precision", "int8", "--calibration", "EMPTY"], "--calibration EMPTY: no images found"),
])
def test_refusals_are_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    proc = run_gpl("embed", str(SAMPLE_IMAGES), "-o", "out.h5", *args, cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out.h5").exists()


def test_too_few_images_to_calibrate(tmp_path):
    proc = run_gpl("embed", str(SAMPLE_IMAGES / "rocket.jpg"), "-o", str(tmp_path / "one.h5"), "--precision", "int8")
    err = proc.stderr.decode()
    assert proc.returncode == 2
    assert err.strip() == ("gpl: error: --precision int8 calibrates on at least 10 images and this run has 1: "
                           "embed more images or give a folder of similar photos with --calibration DIR")


def test_neighbors_embeds_a_query_with_the_files_own_model(runs, tmp_path):
    root, _, _ = runs
    query = tmp_path / "query.webp"
    shutil.copy(PHOTOS / "fish" / "fish1.webp", query)
    proc = run_gpl("neighbors", str(root / "int8.h5"), str(query), "-k", "1")
    assert proc.returncode == 0, proc.stderr.decode()
    rank, score, name = proc.stdout.decode().split("\t")
    assert (score, name.strip()) == ("1.0000", "fish/fish1.webp")  # the very vector of its row: the same model
    # elsewhere (another cache) that model is missing: said in one line, not calibrated anew on one image
    proc = run_gpl("neighbors", str(root / "int8.h5"), str(query), env={"XDG_CACHE_HOME": str(tmp_path / "empty")})
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1
    assert "the int8 model the file was made with (calibrated on 60 of the run's images) is not in this" in err
