"""gpl_cli.store.formats.h5 and .npy: gpl's own HDF5 and NPY layouts, read back with h5py and numpy directly."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from gpl_cli.errors import GplError
from gpl_cli.store.formats.h5 import H5Writer
from gpl_cli.store.formats.npy import NpyWriter
from gpl_cli.store.output import Output

NAMES = ["a.jpg", "sub/b.png", "new\nline.jpg"]


@pytest.fixture
def rows():
    rng = np.random.default_rng(2)
    return {"avg": rng.random((3, 5), np.float32), "gem:p=4": rng.random((3, 2), np.float32)}


def test_h5_layout(tmp_path, rows):
    path = str(tmp_path / "e.h5")
    writer = H5Writer(path, {k: v.shape[1] for k, v in rows.items()})
    writer.write(NAMES[:2], {k: v[:2] for k, v in rows.items()}, [(1, 2), (3, 4)])
    writer.fail("x.jpg", "truncated")
    writer.write(NAMES[2:], {k: v[2:] for k, v in rows.items()})
    assert writer.close({"pool_keys": list(rows), "backbone": "lite"}) == [path]
    with h5py.File(path) as f:
        for key, v in rows.items():
            np.testing.assert_array_equal(f["embeddings"][key][...], v)
        assert [p.decode() for p in f["paths"][...]] == NAMES
        assert f["stats"][...].tolist() == [[1, 2], [3, 4], [-1, -1]]
        assert [p.decode() for p in f["failures/paths"][...]] == ["x.jpg"]
        assert json.loads(f.attrs["gpl_metadata"])["backbone"] == f.attrs["backbone"] == "lite"
    assert os.listdir(tmp_path) == ["e.h5"]


def test_npy_layout_one_file_per_pooling_and_sidecars(tmp_path, rows):
    path = str(tmp_path / "e.npy")
    output = Output.resolve(path, keys=list(rows))
    files = output.files
    writer = output.open_writer({k: v.shape[1] for k, v in rows.items()})
    assert isinstance(writer.writer, NpyWriter)  # within the hint on write failures (Output.open_writer)
    writer.write(NAMES, rows)
    writer.fail("x.jpg", "truncated")
    assert writer.close({"pool_keys": list(rows)}) == files
    assert [os.path.basename(f) for f in files] == ["e.avg.npy", "e.gem_p4.npy", "e.paths.txt", "e.json"]
    np.testing.assert_array_equal(np.load(files[0]), rows["avg"])
    np.testing.assert_array_equal(np.load(files[1]), rows["gem:p=4"])
    assert open(files[2], "rb").read() == b"a.jpg\nsub/b.png\nnew\\nline.jpg\n"
    doc = json.load(open(files[3], encoding="utf-8"))
    assert doc["paths"] == NAMES and doc["failures"] == [{"path": "x.jpg", "reason": "truncated"}]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(f) for f in files)


def test_an_aborted_writer_leaves_nothing_and_an_existing_output_is_refused(tmp_path, rows):
    dims = {k: v.shape[1] for k, v in rows.items()}
    for name in ("e.h5", "e.npy"):
        writer = Output.resolve(str(tmp_path / name), keys=dims).open_writer(dims)
        writer.write(NAMES, rows)
        writer.abort()
    assert os.listdir(tmp_path) == []
    (tmp_path / "e.h5").write_bytes(b"keep")
    with pytest.raises(GplError, match="output exists"):
        H5Writer(str(tmp_path / "e.h5"), dims)
    assert (tmp_path / "e.h5").read_bytes() == b"keep"
