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
from conftest import embed_to, make_photo_like, run_gpl

from gpl_cli.errors import GplError
from gpl_cli.store.export import export_embeddings
from gpl_cli.store.formats import read_embeddings
from gpl_cli.store.output import Output


@pytest.fixture(scope="module")
def source(tmp_path_factory, lite0):
    """Five generated photos (one non-ASCII name, nested folders) and a broken file, with avg and max."""
    from PIL import Image

    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.output import Output

    root = tmp_path_factory.mktemp("export")
    imgs = root / "imgs"
    (imgs / "a").mkdir(parents=True)
    names = ["a/one.jpg", "a/two.png", "b, c.jpg", "\u00fcber.png", "z.jpg"]
    for i, name in enumerate(names):
        Image.fromarray(make_photo_like((60 + 10 * i, 50), seed=10 + i)).save(imgs / name)
    (imgs / "broken.png").write_bytes(b"\x89PNG but no more")
    out = root / "src.h5"
    embed_to(EmbedConfig(pools=("avg", "max")), collect_inputs([str(imgs)]), Output.resolve(str(out)),
              RunOptions(), backbone=lite0)
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
    from gpl_cli.store.formats.shards import ShardWriter

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

    from gpl_cli.store import export
    from gpl_cli.store.formats.h5 import H5Writer

    src = tmp_path / "src.h5"
    rng = np.random.default_rng(0)
    writer = H5Writer(str(src), {"avg": 4, "max": 4})
    writer.write([f"img{i}.jpg" for i in range(10)], {k: rng.random((10, 4), np.float32) for k in ("avg", "max")})
    writer.fail("bad.jpg", "cannot identify image file")
    writer.close({"pool_keys": ["avg", "max"]})

    opened = Output.open_writer

    def failing_writer(*args, **kwargs):
        real = opened(*args, **kwargs)
        inner, blocks = real.write, []

        def write(names, vectors, stats=None, fields=None):
            if blocks:
                raise OSError(errno.ENOSPC, "No space left on device")
            blocks.append(len(names))
            inner(names, vectors, stats)

        real.write = write
        return real

    monkeypatch.setattr(export, "BLOCK_ROWS", 4)
    monkeypatch.setattr(Output, "open_writer", failing_writer)
    with pytest.raises(OSError, match="No space left"):
        export_embeddings(str(src), str(tmp_path / name), fmt)
    assert sorted(os.listdir(tmp_path)) == ["src.h5"]
def test_a_failed_export_leaves_no_partial_file(source, tmp_path, monkeypatch):
    from gpl_cli.store.formats import streams

    _, out, _ = source

    def disk_full(self, names, vectors, stats=None, fields=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streams.JsonlWriter, "write", disk_full)
    target = tmp_path / "x.jsonl"
    with pytest.raises(OSError, match="No space left"):
        export_embeddings(str(out), str(target))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["x.h5", "x.npy", "x_shards"])
def test_an_aborted_gpl_format_write_leaves_nothing(source, tmp_path, monkeypatch, target):
    from gpl_cli.store.formats import h5, npy, shards

    _, out, _ = source
    monkeypatch.setattr(h5.H5Writer, "close", lambda self, meta: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(npy.NpyWriter, "write", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(shards.ShardWriter, "write", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_embeddings(str(out), str(tmp_path / target), "shards" if target.endswith("shards") else None)
    assert list(tmp_path.iterdir()) == []


def small_h5(path) -> str:
    """Six rows with avg and max (4 numbers each) through the project's own writer: no model needed."""
    from gpl_cli.store.formats.h5 import H5Writer

    rng = np.random.default_rng(1)
    writer = H5Writer(str(path), {"avg": 4, "max": 4})
    writer.write([f"img{i}.jpg" for i in range(6)], {k: rng.random((6, 4), np.float32) for k in ("avg", "max")})
    writer.close({"pool_keys": ["avg", "max"]})
    return str(path)


def listing(folder) -> dict[str, bytes | None]:
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("overwrite", [False, True])
def test_cli_export_to_npy_refuses_a_directory_where_a_pooling_file_goes(tmp_path, overwrite):
    """Bug: export checked its output location with no pooling keys, so for an NPY output the check never saw
    the .npy files themselves. With a directory named out.max.npy it said "output exists ... use --overwrite",
    and with --overwrite it wrote out.avg.npy, then died on the directory with a traceback, leaving out.avg.npy
    behind. It is refused up front, whatever --overwrite says, as gpl embed refuses it; nothing is written."""
    src = small_h5(tmp_path / "src.h5")
    out = tmp_path / "out"
    out.mkdir()
    (out / "out.max.npy").mkdir()
    proc = run_gpl("export", src, "-o", str(out / "out.npy"), *(["--overwrite"] if overwrite else []))
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert f"cannot write {out / 'out.max.npy'}: it is a directory" in err
    assert listing(out) == {"out.max.npy": None}


@pytest.mark.parametrize("target, fmt", [("x.npy", None), ("x.avg.npy", "jsonl")])
def test_cli_export_never_writes_over_its_own_source(tmp_path, target, fmt):
    """Bug: export checked its output location with no pooling keys and without its source as an input, so
    with --overwrite it wrote over the file it was reading. The source is x.avg.npy, one file of the
    multi-pooling NPY output x.npy. `-o x.npy` rewrote all four files of x (x.json then named itself as
    exported_from); `-o x.avg.npy --format jsonl` replaced x.avg.npy by JSON Lines and the output x could no
    longer be read. As in gpl embed, an output that is one of the inputs is refused whatever --overwrite
    says, before anything is written."""
    export_embeddings(small_h5(tmp_path / "src.h5"), str(tmp_path / "x.npy"))
    (tmp_path / "src.h5").unlink()
    before = listing(tmp_path)
    assert sorted(before) == ["x.avg.npy", "x.json", "x.max.npy", "x.paths.txt"]
    proc = run_gpl("export", str(tmp_path / "x.avg.npy"), "-o", str(tmp_path / target), *(["--format", fmt] if fmt else []),
                   "--overwrite")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "one of the inputs" in err
    assert listing(tmp_path) == before
