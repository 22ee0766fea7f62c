"""gpl export: every format read back against the source file, read independently of gpl's readers."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys

import h5py
import numpy as np
import pytest
from conftest import make_photo_like, run_gpl

from gpl_cli.errors import GplError
from gpl_cli.export import export_embeddings
from gpl_cli.formats import read_embeddings


@pytest.fixture(scope="module")
def source(tmp_path_factory, lite0):
    """Five generated photos (one non-ASCII name, nested folders) and a broken file, with avg and max."""
    from PIL import Image

    from gpl_cli.config import EmbedConfig
    from gpl_cli.engine import RunOptions
    from gpl_cli.inputs import collect_inputs
    from gpl_cli.pipeline import OutputTarget, run_embed

    root = tmp_path_factory.mktemp("export")
    imgs = root / "imgs"
    (imgs / "a").mkdir(parents=True)
    names = ["a/one.jpg", "a/two.png", "b, c.jpg", "\u00fcber.png", "z.jpg"]
    for i, name in enumerate(names):
        Image.fromarray(make_photo_like((60 + 10 * i, 50), seed=10 + i)).save(imgs / name)
    (imgs / "broken.png").write_bytes(b"\x89PNG but no more")
    out = root / "src.h5"
    run_embed(EmbedConfig(pools=("avg", "max")), collect_inputs([str(imgs)]), OutputTarget(str(out)),
              RunOptions(), quiet=True, backbone=lite0)
    with h5py.File(out) as f:
        truth = {
            "paths": [p.decode() for p in f["paths"][...]],
            "vectors": {k: f["embeddings"][k][...] for k in ("avg", "max")},
            "failures": [p.decode() for p in f["failures/paths"][...]],
        }
    assert truth["paths"] == sorted(names, key=lambda n: n.split("/")) and truth["failures"] == ["broken.png"]
    return root, out, truth


def assert_same_embeddings(emb, truth):
    assert emb.paths == truth["paths"]
    assert list(emb.vectors) == ["avg", "max"]
    for key, rows in truth["vectors"].items():
        assert emb.vectors[key].dtype == np.float32 and np.array_equal(emb.vectors[key], rows)
    assert [p for p, _ in emb.failures] == truth["failures"]


@pytest.mark.parametrize("name", ["copy.h5", "copy.npy"])
def test_gpl_formats_round_trip_everything(source, tmp_path, name):
    _, src, truth = source
    summary = export_embeddings(str(src), str(tmp_path / name))
    assert summary.rows == 5 and summary.failures == 1 and not summary.failures_dropped
    back = read_embeddings(str(tmp_path / name))
    assert_same_embeddings(back, truth)
    original = read_embeddings(str(src)).metadata
    assert back.metadata.pop("exported_from") == str(src)
    assert back.metadata == original


def test_jsonl_file_holds_rows_and_failure_objects(source, tmp_path):
    _, src, truth = source
    export_embeddings(str(src), str(tmp_path / "e.jsonl"))
    objects = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [o for o in objects if "error" not in o]
    assert [o["path"] for o in rows] == truth["paths"]
    for key, want in truth["vectors"].items():
        assert np.array_equal(np.array([o["embeddings"][key] for o in rows], dtype=np.float32), want)
    assert [o["path"] for o in objects if "error" in o] == truth["failures"]


@pytest.mark.parametrize("fmt, delimiter", [("csv", ","), ("tsv", "\t")])
def test_csv_and_tsv_files(source, tmp_path, fmt, delimiter):
    _, src, truth = source
    summary = export_embeddings(str(src), str(tmp_path / f"e.{fmt}"))
    assert summary.failures_dropped  # csv/tsv have no place for the failure record
    with open(tmp_path / f"e.{fmt}", encoding="utf-8", newline="") as f:
        table = list(csv.reader(f, delimiter=delimiter))
    assert [r[0] for r in table[1:]] == truth["paths"]
    numbers = np.array([r[1:] for r in table[1:]], dtype=np.float32)
    assert np.array_equal(numbers, np.concatenate([truth["vectors"]["avg"], truth["vectors"]["max"]], axis=1))


def test_parquet_layout_is_what_embedding_readers_expect(source, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet layout needs pyarrow (pip install pyarrow)")
    _, src, truth = source
    out = tmp_path / "pq"
    export_embeddings(str(src), str(out), "parquet", shard_rows=2)
    # As embedding-reader's parquet_npy format reads it: files of each folder sorted, shard i with shard i.
    metas = sorted(glob.glob(str(out / "metadata") + "**/*.parquet"))
    assert [os.path.basename(m) for m in metas] == ["metadata_00000.parquet", "metadata_00001.parquet", "metadata_00002.parquet"]
    paths = []
    for key in ("avg", "max"):
        shards = sorted(glob.glob(str(out / f"{key}_emb") + "**/*.npy"))
        assert len(shards) == len(metas)
        arrays = [np.load(s) for s in shards]
        tables = [pq.read_table(m) for m in metas]
        assert [len(a) for a in arrays] == [t.num_rows for t in tables] == [2, 2, 1]
        assert all(a.dtype == np.float32 and a.shape[1] == 1280 for a in arrays)
        assert np.array_equal(np.concatenate(arrays), truth["vectors"][key])
        paths = [p for t in tables for p in t.column("path").to_pylist()]
    assert paths == truth["paths"]
    doc = json.loads((out / "gpl.json").read_text())
    assert doc["folders"] == {"avg": "avg_emb", "max": "max_emb"} and [f["path"] for f in doc["failures"]] == ["broken.png"]
    # and gpl reads the folder back, to any format
    assert_same_embeddings(read_embeddings(str(out)), truth)
    export_embeddings(str(out), str(tmp_path / "back.h5"))
    assert_same_embeddings(read_embeddings(str(tmp_path / "back.h5")), truth)


def test_parquet_overwrite_replaces_only_an_earlier_output(source, tmp_path):
    pytest.importorskip("pyarrow", reason="the parquet layout needs pyarrow (pip install pyarrow)")
    _, src, _ = source
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(GplError, match="not a gpl parquet output"):
        export_embeddings(str(src), str(mine), "parquet", overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "pq"
    export_embeddings(str(src), str(out), "parquet")
    with pytest.raises(GplError, match="output exists"):
        export_embeddings(str(src), str(out), "parquet")
    export_embeddings(str(src), str(out), "parquet", overwrite=True, shard_rows=4)
    assert sorted(os.listdir(out / "avg_emb")) == ["emb_00000.npy", "emb_00001.npy"]


def test_parquet_names_that_are_not_utf8_are_escaped(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet layout needs pyarrow (pip install pyarrow)")
    from gpl_cli.formats.shards import ShardWriter

    writer = ShardWriter(str(tmp_path / "pq"), {"avg": 2})
    writer.write([os.fsdecode(b"bad\xff.jpg"), "ok.jpg"], {"avg": np.ones((2, 2), np.float32)})
    writer.close({})
    table = pq.read_table(tmp_path / "pq" / "metadata" / "metadata_00000.parquet")
    assert table.column("path").to_pylist() == ["bad\\xff.jpg", "ok.jpg"]


def test_without_pyarrow_the_error_says_how_to_install_it(source, tmp_path, monkeypatch):
    _, src, _ = source
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(GplError, match="pip install pyarrow"):
        export_embeddings(str(src), str(tmp_path / "pq"), "parquet")
    assert not (tmp_path / "pq").exists()


def test_cli_export_to_stdout(source):
    root, src, truth = source
    proc = run_gpl("export", str(src), "-o", "-", "--format", "tsv", cwd=root)
    assert proc.returncode == 0, proc.stderr.decode()
    table = list(csv.reader(io.StringIO(proc.stdout.decode(), newline=""), delimiter="\t"))
    assert [r[0] for r in table[1:]] == truth["paths"]
    assert np.array_equal(np.array([r[1:1281] for r in table[1:]], dtype=np.float32), truth["vectors"]["avg"])
    err = proc.stderr.decode()
    assert "1 failure records" in err and "left out" in err and "exported 5 rows -> stdout" in err


@pytest.mark.parametrize("name,fmt", [("copy.h5", None), ("copy.npy", None), ("copy.jsonl", None),
                                      ("copy.csv", None), ("copy_dir", "parquet")])
def test_an_export_that_fails_mid_write_leaves_nothing(tmp_path, monkeypatch, name, fmt):
    """The disk fills after the first block: no output, and no .partial file or folder either."""
    import errno

    from gpl_cli import export
    from gpl_cli.formats.h5 import H5Writer

    src = tmp_path / "src.h5"
    rng = np.random.default_rng(0)
    writer = H5Writer(str(src), {"avg": 4, "max": 4})
    writer.write([f"img{i}.jpg" for i in range(10)], {k: rng.random((10, 4), np.float32) for k in ("avg", "max")})
    writer.fail("bad.jpg", "cannot identify image file")
    writer.close({"pool_keys": ["avg", "max"]})

    opened = export.open_writer

    def failing_writer(*args, **kwargs):
        real = opened(*args, **kwargs)
        inner, blocks = real.write, []

        def write(names, vectors, stats=None):
            if blocks:
                raise OSError(errno.ENOSPC, "No space left on device")
            blocks.append(len(names))
            inner(names, vectors, stats)

        real.write = write
        return real

    monkeypatch.setattr(export, "BLOCK_ROWS", 4)
    monkeypatch.setattr(export, "open_writer", failing_writer)
    with pytest.raises(OSError, match="No space left"):
        export_embeddings(str(src), str(tmp_path / name), fmt)
    assert sorted(os.listdir(tmp_path)) == ["src.h5"]
def test_a_failed_export_leaves_no_partial_file(source, tmp_path, monkeypatch):
    from gpl_cli.formats import streams

    _, out, _ = source

    def disk_full(self, names, vectors, stats=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streams.JsonlWriter, "write", disk_full)
    target = tmp_path / "x.jsonl"
    with pytest.raises(OSError, match="No space left"):
        export_embeddings(str(out), str(target))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["x.h5", "x.npy", "x_shards"])
def test_an_aborted_gpl_format_write_leaves_nothing(source, tmp_path, monkeypatch, target):
    from gpl_cli.formats import h5, npy, shards

    _, out, _ = source
    monkeypatch.setattr(h5.H5Writer, "close", lambda self, meta: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(npy.NpyWriter, "write", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(shards.ShardWriter, "write", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_embeddings(str(out), str(tmp_path / target), "shards" if target.endswith("shards") else None)
    assert list(tmp_path.iterdir()) == []
