"""PCA whitening: learned as an independent NumPy PCA says, saved with provenance, refused where it does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLE_IMAGES, gpl_imports, run_gpl

from gpl_cli.cli import cli
from gpl_cli.errors import GplError
from gpl_cli.pooling.whiten import Whitening, fit_whitening, load_whitening, match_whitenings
from gpl_cli.store.formats import read_embeddings
from gpl_cli.store.formats.h5 import H5Writer


def numpy_pca(x):
    """Reference PCA by SVD of the centred, L2-normalised data (not the covariance eigensolver gpl uses)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, s**2 / len(x), vt


def aligned(rows, reference_rows):
    """rows with each one's sign flipped to agree with the reference (eigenvectors have no intrinsic sign)."""
    signs = np.sign((rows * reference_rows).sum(axis=1, keepdims=True))
    return rows * signs


def test_fit_matches_numpy_pca():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (300, 12)) @ rng.normal(0, 1, (12, 12)) + 3.0  # correlated, off-centre
    mean, projection, values = fit_whitening(x)
    ref_mean, ref_values, ref_vt = numpy_pca(x)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-12)
    np.testing.assert_allclose(values, ref_values[:12], rtol=1e-9)
    ref_projection = ref_vt / np.sqrt(ref_values)[:, None]
    np.testing.assert_allclose(aligned(projection, ref_projection), ref_projection, rtol=1e-7, atol=1e-9)


def test_whitened_training_data_has_identity_covariance():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (500, 8)) * np.array([5, 3, 2, 1, 1, 0.5, 0.2, 0.1])
    mean, projection, _ = fit_whitening(x, dims=5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = (xn - mean) @ projection.T
    np.testing.assert_allclose(y.T @ y / len(y), np.eye(5), atol=1e-9)


def test_fewer_vectors_than_dimensions_keeps_only_directions_with_variance():
    x = np.random.default_rng(2).normal(0, 1, (6, 40))
    mean, projection, values = fit_whitening(x)
    assert projection.shape == (5, 40)  # 6 centred vectors span 5 directions
    assert (values > 0).all()
    with pytest.raises(GplError, match="between 1 and 5"):
        fit_whitening(x, dims=6)
    with pytest.raises(GplError, match="at least 2 vectors"):
        fit_whitening(x[:1])


def test_sign_convention_is_deterministic():
    x = np.random.default_rng(3).normal(0, 1, (50, 6))
    _, projection, _ = fit_whitening(x)
    biggest = projection[np.arange(len(projection)), np.abs(projection).argmax(axis=1)]
    assert (biggest > 0).all()


def _whitening(**provenance) -> Whitening:
    base = {"pooling": "gem", "backbone": "efficientnet_lite0", "weights_sha256": "abc", "layer": None, "power": None}
    base.update(provenance)
    return Whitening(np.zeros(4), np.eye(3, 4), np.ones(3), base, path="w.npz")


BACKBONE = {"backbone": "efficientnet_lite0", "weights_sha256": "abc", "layer": None}


def test_match_checks_backbone_weights_layer_pooling_dim_and_power():
    assert match_whitenings([_whitening()], BACKBONE, {"avg": 4, "gem": 4}, None)["gem"].out_dim == 3
    cases = [
        (_whitening(backbone="resnet50"), {"gem": 4}, None, "backbone resnet50, this run uses efficientnet_lite0"),
        (_whitening(weights_sha256="other"), {"gem": 4}, None, "other weights"),
        (_whitening(layer="blocks.5"), {"gem": 4}, None, "layer blocks.5, this run uses final map"),
        (_whitening(), {"gem": 8}, None, "4-d vectors, this run's gem vectors are 8-d"),
        (_whitening(), {"gem": 4}, 0.5, "--power none, this run uses --power 0.5"),
        (_whitening(), {"avg": 4}, None, "learned for pooling gem, which this run does not compute"),
    ]
    for w, dims, power, message in cases:
        with pytest.raises(GplError) as err:
            match_whitenings([w], BACKBONE, dims, power)
        assert message in str(err.value) and "w.npz" in str(err.value)
    with pytest.raises(GplError, match="two whitening files for pooling gem"):
        match_whitenings([_whitening(), _whitening()], BACKBONE, {"gem": 4}, None)


def test_a_whitening_learned_at_other_scales_does_not_fit():
    multi = _whitening(scales=[1.0, 1.414, 2.0])
    assert match_whitenings([multi], BACKBONE, {"gem": 4}, None, (1.0, 1.414, 2.0))["gem"] is multi
    with pytest.raises(GplError, match=r"--scales 1,1.414,2, this run uses --scales 1 .*w.npz|w.npz.*--scales 1,1.414,2, this run uses --scales 1$"):
        match_whitenings([multi], BACKBONE, {"gem": 4}, None)
    # one learned before scales were recorded was made at one size
    with pytest.raises(GplError, match="--scales 1, this run uses --scales 1,2"):
        match_whitenings([_whitening()], BACKBONE, {"gem": 4}, None, (1.0, 2.0))


def test_bad_whitening_files_are_clear_errors(tmp_path):
    with pytest.raises(GplError, match="not found"):
        load_whitening(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(GplError, match="not a gpl whitening file"):
        load_whitening(str(tmp_path / "other.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(GplError, match="cannot read whitening file"):
        load_whitening(str(tmp_path / "junk.npz"))


def _save(w, path) -> None:
    with open(path, "wb") as f:
        w.write(f)


def test_save_load_round_trip(tmp_path):
    w = _whitening()
    path = str(tmp_path / "w.npz")
    _save(w, path)
    back = load_whitening(path)
    np.testing.assert_array_equal(back.projection, w.projection)
    assert back.provenance == w.provenance and back.path == path
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(back.project(v).numpy(), [[1.0, 2.0, 3.0]])


def test_cli_round_trip_fit_then_embed_with_whitening(small_folder, tmp_path):
    runner = CliRunner()
    first, wfile, second = tmp_path / "a.h5", tmp_path / "w.npz", tmp_path / "b.h5"
    common = [str(small_folder), "--workers", "0", "-q", "--power", "0.5"]
    result = runner.invoke(cli, ["embed", *common, "-o", str(first), "--pool", "avg,gem"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["whiten", "fit", str(first), "-o", str(wfile)])
    assert isinstance(result.exception, GplError) and "choose one with --pool" in str(result.exception)
    result = runner.invoke(cli, ["whiten", "fit", str(first), "-o", str(wfile), "--pool", "gem", "--dims", "2"])
    assert result.exit_code == 0, result.output
    assert "learned on 4 gem vectors of efficientnet_lite0: 1280 -> 2 dims" in result.stderr

    result = runner.invoke(cli, ["embed", *common, "-o", str(second), "--pool", "avg,gem", "--whiten", str(wfile)])
    assert result.exit_code == 0, result.output

    source, out = read_embeddings(str(first)), read_embeddings(str(second))
    # The whitening, recomputed here with NumPy's SVD from the first file, applied as L2 -> project -> L2.
    mean, values, vt = numpy_pca(source.vectors["gem"].astype(np.float64))
    x = source.vectors["gem"].astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = (x - mean) @ (vt[:2] / np.sqrt(values[:2])[:, None]).T
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    got = out.vectors["gem"]
    assert got.shape == (4, 2)
    np.testing.assert_allclose(np.abs(got), np.abs(y), atol=1e-4)  # each component up to its sign
    np.testing.assert_array_equal(out.vectors["avg"], source.vectors["avg"])  # no whitening for avg

    meta = out.metadata
    assert "whiten" not in meta["pools"]["avg"]
    recorded = meta["pools"]["gem"]["whiten"]
    assert recorded["out_dim"] == 2 and recorded["file"] == str(wfile)
    prov = recorded["provenance"]
    assert prov["source"] == str(first) and prov["count"] == 4 and prov["backbone"] == "efficientnet_lite0"
    assert prov["pooling"] == "gem" and prov["power"] == 0.5 and prov["in_dim"] == 1280
    assert meta["pools"]["gem"]["dim"] == 2 and meta["config"]["whiten"] == [str(wfile)]
    with np.load(wfile, allow_pickle=False) as f:
        assert json.loads(str(f["provenance"]))["source_sha256"] == prov["source_sha256"]


def test_whitening_for_another_pooling_exits_2(tmp_path):
    w = _whitening(pooling="rmac", weights_sha256="x")
    w.projection, w.mean, w.eigenvalues = np.eye(2, 1280), np.zeros(1280), np.ones(2)
    path = tmp_path / "w.npz"
    _save(w, str(path))
    proc = run_gpl("embed", str(SAMPLE_IMAGES / "coffee.png"), "-o", str(tmp_path / "o.h5"), "--pool", "gem",
                   "--whiten", str(path), "-q")
    assert proc.returncode == 2
    assert b"learned for pooling rmac, which this run does not compute (--pool gem)" in proc.stderr


def test_fit_refuses_an_existing_output_before_reading_anything(tmp_path):
    target = tmp_path / "w.npz"
    target.write_bytes(b"the user's file")
    code = ("import sys\nfrom gpl_cli.cli import main\nsys.argv = ['gpl', 'whiten', 'fit', sys.argv[1], '-o', sys.argv[2]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'h5py' in sys.modules, file=sys.__stdout__)")
    import subprocess
    import sys

    source = tmp_path / "big.h5"
    source.write_bytes(b"never read")
    proc = subprocess.run([sys.executable, "-c", code, str(source), str(target)], capture_output=True, timeout=120)
    assert proc.stdout.split() == [b"2", b"False"] and b"output exists" in proc.stderr
    assert target.read_bytes() == b"the user's file"


def test_fit_on_1d_vectors_says_what_is_wrong(tmp_path, small_folder):
    out = tmp_path / "e.npy"
    run_gpl("embed", str(small_folder), "-o", str(out), "-q", "--workers", "0", check=True)
    np.save(out, np.load(out)[:, 0])
    proc = run_gpl("whiten", "fit", str(out), "-o", str(tmp_path / "w.npz"))
    assert proc.returncode == 2 and b"1-D" in proc.stderr and b"needs at least 2 vectors" not in proc.stderr


def test_fit_is_a_file_only_command_and_imports_no_torch(tmp_path):
    """Learning a whitening reads vectors and hashes files: it runs no model, so torch never loads."""
    source, out = tmp_path / "e.h5", tmp_path / "w.npz"
    x = np.random.default_rng(5).normal(0, 1, (20, 6)).astype(np.float32)
    writer = H5Writer(str(source), {"gem": 6})
    writer.write([f"img{i}.jpg" for i in range(len(x))], {"gem": x})
    writer.close({"pool_keys": ["gem"], "backbone": "test"})
    status, heavy, err = gpl_imports("whiten", "fit", str(source), "-o", str(out), "--dims", "3")
    assert status == 0, err
    assert "learned on 20 gem vectors of test: 6 -> 3 dims" in err
    assert not heavy & {"torch", "torchvision", "timm"}, f"gpl whiten fit imported {heavy}"
    assert load_whitening(str(out)).out_dim == 3
