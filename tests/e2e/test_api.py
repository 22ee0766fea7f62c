"""The Python API (gpl_cli.embed, gpl_cli.read); the README's and docs/python.md's examples run in tests/docs."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import make_photo_like, run_gpl

import gpl_cli
from gpl_cli.errors import GplError


def test_import_gpl_cli_and_read_load_no_torch(tmp_path):
    code = ("import sys, gpl_cli; assert 'torch' not in sys.modules; "
            "assert callable(gpl_cli.embed) and callable(gpl_cli.read); "
            "assert 'torch' not in sys.modules, 'torch loaded before a model was needed'")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("api") / "imgs"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["b.jpg", "a.png", "sub/c.jpg"]):
        Image.fromarray(make_photo_like((64 + 8 * i, 48), seed=i)).save(root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def test_embed_returns_what_gpl_embed_writes(folder, tmp_path, lite0, monkeypatch):
    """Same rows, failures and vectors as the command's file (read with h5py), and no file written."""
    out = tmp_path / "cli.h5"
    proc = run_gpl("embed", str(folder), "-o", str(out), "-p", "avg,max", "--normalize", "l2", "-q")
    assert proc.returncode == 3, proc.stderr

    from gpl_cli.embedding import job as pipeline
    from gpl_cli.store.output import Output

    def no_files(*args, **kwargs):
        raise AssertionError("embed wrote a file")

    monkeypatch.setattr(Output, "open_writer", no_files)
    monkeypatch.setattr(pipeline.Journal, "create", no_files)
    seen = []
    emb = gpl_cli.embed(folder, pool="avg,max", normalize="l2", model=lite0, on_failure=seen.append)
    with h5py.File(out) as f:
        assert emb.paths == [p.decode() for p in f["paths"][...]] == ["a.png", "b.jpg", "sub/c.jpg"]
        for key in ("avg", "max"):
            np.testing.assert_allclose(emb.vectors[key], f["embeddings"][key][...], rtol=0, atol=1e-5)
        assert [p for p, _ in emb.failures] == [p.decode() for p in f["failures/paths"][...]] == ["broken.jpg"]
        assert emb.metadata["config"] == {**json_config(f), "pools": ["avg", "max"]}
    assert [f.path for f in seen] == ["broken.jpg"]
    assert np.allclose(np.linalg.norm(emb.vectors["avg"], axis=1), 1.0, atol=1e-5)
    st = os.stat(folder / "a.png")
    assert tuple(emb.stats[0]) == (st.st_size, st.st_mtime_ns)
    assert emb.summary.embedded == 3 and emb.summary.failed == 1


def json_config(f) -> dict:
    import json

    return json.loads(f.attrs["gpl_metadata"])["config"]


def test_embed_strict_and_bad_options_are_errors(folder, lite0):
    with pytest.raises(GplError, match="--strict"):
        gpl_cli.embed(folder, model=lite0, strict=True)
    with pytest.raises(GplError, match="unknown pooling|unknown pool"):
        gpl_cli.embed(folder, pool="nosuch", model=lite0)


def test_read_any_output_gives_the_same_embeddings(folder, tmp_path):
    out = tmp_path / "x.h5"
    run_gpl("embed", str(folder), "-o", str(out), "-q")
    run_gpl("export", str(out), "-o", str(tmp_path / "x_dir"), "--format", "shards", "-q", check=True)
    run_gpl("export", str(out), "-o", str(tmp_path / "x.npy"), "-q", check=True)
    with h5py.File(out) as f:
        rows = f["embeddings/avg"][...]
    for path in (out, tmp_path / "x_dir", tmp_path / "x.npy"):
        emb = gpl_cli.read(path)
        assert emb.paths == ["a.png", "b.jpg", "sub/c.jpg"] and np.array_equal(emb.vectors["avg"], rows), path
