"""gpl_cli.store.formats: the registry, and damaged gpl outputs: every reader refuses them with exit 2 naming the file and what is wrong.

Rows must never shift against their paths, so a file whose parts disagree in row count is
an error, never read as far as the shorter part goes.
"""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from conftest import embed_to, make_photo_like, run_gpl

from gpl_cli.errors import GplError
from gpl_cli.store.formats import read_embeddings

N = 15


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, lite0):
    """The same 15 images as .h5, as a two-pooling NPY output and as a shards folder of 3 x 5 rows."""
    from PIL import Image

    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.output import Output

    root = tmp_path_factory.mktemp("damaged")
    imgs = root / "imgs"
    imgs.mkdir()
    for i in range(N):
        Image.fromarray(make_photo_like((48, 40), seed=i)).save(imgs / f"im{i:02d}.png")
    made = {}
    for name, target in (("h5", Output.resolve(str(root / "e.h5"))), ("npy", Output.resolve(str(root / "e.npy"))),
                         ("shards", Output.resolve(str(root / "e_shards"), "shards", shard_rows=5))):
        embed_to(EmbedConfig(pools=("avg", "max")), collect_inputs([str(imgs)]), target, RunOptions(workers=0), backbone=lite0)
        made[name] = target.path
    return root, made


def _copy(outputs, kind, tmp_path):
    root, made = outputs
    src = made[kind]
    if kind == "npy":
        for f in os.listdir(root):
            if f.startswith("e.") and not f.endswith("h5"):
                shutil.copy(root / f, tmp_path / f)
        return str(tmp_path / "e.npy")
    dst = tmp_path / os.path.basename(src)
    (shutil.copytree if kind == "shards" else shutil.copy)(src, dst)
    return str(dst)


def _h5_paths_short(path):
    with h5py.File(path, "r+") as f:
        paths = f["paths"][:10]
        del f["paths"]
        f.create_dataset("paths", data=paths, dtype=h5py.string_dtype("utf-8"))


def _h5_metadata(value):
    def damage(path):
        with h5py.File(path, "r+") as f:
            f.attrs["gpl_metadata"] = value
    return damage


def _h5_pool_keys_missing(path):
    with h5py.File(path, "r+") as f:
        meta = json.loads(f.attrs["gpl_metadata"])
        meta["pool_keys"] = ["avg", "gem:p=3"]
        f.attrs["gpl_metadata"] = json.dumps(meta)


def _h5_strings(path):
    with h5py.File(path, "r+") as f:
        del f["embeddings/avg"]
        f["embeddings"].create_dataset("avg", data=np.array([b"x"] * N))


def _npy_json(edit):
    def damage(path):
        with open(path[:-4] + ".json", encoding="utf-8") as f:
            doc = json.load(f)
        with open(path[:-4] + ".json", "w", encoding="utf-8") as f:
            json.dump(edit(doc), f)
    return damage


def _npy_array(shape_of):
    def damage(path):
        np.save(path[:-4] + ".avg.npy", shape_of(np.load(path[:-4] + ".avg.npy")))
    return damage


def _remove(relative):
    def damage(path):
        os.remove(os.path.join(path, relative))
    return damage


# (output kind, damage, words the error must contain)
DAMAGES = {
    "h5 paths 10 of 15": ("h5", _h5_paths_short, "embeddings/avg has 15 rows but paths has 10"),
    "h5 metadata a list": ("h5", _h5_metadata("[1, 2]"), "gpl_metadata is not a JSON object"),
    "h5 pool_keys missing": ("h5", _h5_pool_keys_missing, "pool_keys name poolings that are not stored"),
    "h5 strings": ("h5", _h5_strings, "pooling 'avg' is not stored as numbers"),
    "npy json 10 paths": ("npy", _npy_json(lambda d: {**d, "paths": d["paths"][:10]}), "lists 10 paths"),
    "npy json a list": ("npy", _npy_json(lambda d: [d]), "is not a JSON object"),
    "npy 1-D": ("npy", _npy_array(lambda a: a[:, 0]), "e.avg.npy is 1-D"),
    "npy 3-D": ("npy", _npy_array(lambda a: a[:, :, None]), "is 3-D (shape (15, 1280, 1))"),
    "npy 10 rows": ("npy", _npy_array(lambda a: a[:10]), "e.avg.npy holds 10 rows"),
    "shards paths part gone": ("shards", _remove("metadata/metadata_00002.parquet"), "holds 2 parts"),
    "shards vector shard gone": ("shards", _remove("avg_emb/emb_00001.npy"), "avg_emb/ holds 2 shards"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_outputs_are_refused_with_the_reason(outputs, tmp_path, case):
    kind, damage, words = DAMAGES[case]
    path = _copy(outputs, kind, tmp_path)
    read_embeddings(path)  # intact before the damage
    damage(path)
    with pytest.raises(GplError, match="not a readable gpl embeddings file") as caught:
        read_embeddings(path)
    assert words in str(caught.value)


@pytest.mark.parametrize("case", ["shards paths part gone", "h5 paths 10 of 15", "npy json 10 paths", "npy 3-D"])
@pytest.mark.parametrize("command", ["info", "export", "neighbors"])
def test_every_command_exits_2_on_a_damaged_file(outputs, tmp_path, case, command):
    kind, damage, words = DAMAGES[case]
    path = _copy(outputs, kind, tmp_path)
    damage(path)
    args = {"info": ["info", path], "export": ["export", path, "-o", str(tmp_path / "x.jsonl")],
            "neighbors": ["neighbors", path, "--duplicates"]}[command]
    proc = run_gpl(*args)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert words in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x.jsonl") and not os.path.exists(tmp_path / "x.jsonl.partial")


def test_a_damaged_file_is_not_updated_and_leaves_no_journal(outputs, tmp_path):
    """--update on an NPY output with 10 vector rows for 15 paths: exit 2 before any journal exists."""
    root, _ = outputs
    path = _copy(outputs, "npy", tmp_path)
    _npy_array(lambda a: a[:10])(path)
    proc = run_gpl("embed", str(root / "imgs"), "-o", path, "-p", "avg,max", "--update", "-q", "--workers", "0")
    assert proc.returncode == 2, proc.stderr.decode()
    assert "e.avg.npy holds 10 rows" in proc.stderr.decode()
    assert not os.path.exists(path + ".gpl-journal")


def test_every_format_name_the_command_line_offers_has_a_writer_and_gpls_own_a_reader():
    from gpl_cli.defaults import FORMAT_ALIASES, OUTPUT_FORMATS, STDOUT_FORMATS
    from gpl_cli.store.formats import FORMATS, READABLE_EXTENSIONS

    assert {FORMAT_ALIASES.get(name, name) for name in OUTPUT_FORMATS} == set(FORMATS)
    assert {name for name, f in FORMATS.items() if f.to_stdout} == set(STDOUT_FORMATS)
    assert {name for name, f in FORMATS.items() if f.reader} == {"h5", "npy", "parquet"}
    assert READABLE_EXTENSIONS == {".h5": "h5", ".hdf5": "h5", ".hdf": "h5", ".npy": "npy", ".json": "npy"}
