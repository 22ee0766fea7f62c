"""Tar shards and parquet files as inputs: what a listing finds (samples, names, order, failures) and what a
source reads back (the image's own bytes, the kept fields), checked against the files the containers were
built from (tests/shard_data.py)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from conftest import SAMPLE_IMAGES, make_photo_like
from PIL import Image
from shard_data import hf_parquet, img2dataset_parquet, sample_members, truncate_inside, write_tar

from gpl_cli.embedding.images import Preprocess, load_sample, open_rgb
from gpl_cli.embedding.inputs import collect_inputs, container_names, expand_braces
from gpl_cli.embedding.sources import PARQUET_BATCH, SourceOptions, _Reader, keep_fields
from gpl_cli.errors import GplError

PNG, WEBP, JPG = SAMPLE_IMAGES / "coffee.png", SAMPLE_IMAGES / "igloo.webp", SAMPLE_IMAGES / "rocket.jpg"


def read(item) -> bytes:
    return item.source.open().read()


@pytest.fixture
def shards(tmp_path):
    """Two shards in img2dataset's layout: a PNG, a WebP, a JPEG, a failed download (no image), a sample in a
    nested folder, a member with no extension, and a directory entry."""
    folder = tmp_path / "shards"
    folder.mkdir()
    first = [*sample_members("000000000", PNG, "a cup"), *sample_members("000000001", None, "never downloaded"),
             *sample_members("000000002", WEBP, "an igloo"), ("README", b"not a sample")]
    write_tar(folder / "00000.tar", first)
    with tarfile.open(folder / "00000.tar", "a") as tar:
        tar.addfile(tarfile.TarInfo("sub/"))  # a directory entry: no member of any sample
    write_tar(folder / "00001.tar", [*sample_members("sub/deeper/000010000", JPG, "a rocket")])
    return folder


def test_samples_are_named_shard_slash_key_in_stream_order_and_read_back_their_own_bytes(shards):
    listed = collect_inputs([str(shards / "00000.tar"), str(shards / "00001.tar")])
    assert [it.name for it in listed.items] == ["00000.tar/000000000", "00000.tar/000000002",
                                                "00001.tar/sub/deeper/000010000"]
    assert [read(it) for it in listed.items] == [PNG.read_bytes(), WEBP.read_bytes(), JPG.read_bytes()]
    assert listed.no_image == ["00000.tar/000000001"]  # left out and counted, not a failure
    assert listed.containers == [str(shards / "00000.tar"), str(shards / "00001.tar")]
    assert all(it.error is None for it in listed.items)


def test_the_image_member_is_chosen_by_extension_or_by_image_key(tmp_path):
    mask = io.BytesIO()
    Image.fromarray(make_photo_like((40, 30), seed=3)).save(mask, "PNG")
    shard = write_tar(tmp_path / "s.tar", [("k.seg.png", mask.getvalue()), ("k.png", PNG.read_bytes()),
                                           ("k.jpg", JPG.read_bytes())])
    assert read(collect_inputs([str(shard)]).items[0]) == JPG.read_bytes()  # jpg comes first in the order
    assert read(collect_inputs([str(shard)], sources=SourceOptions(image_key="png")).items[0]) == PNG.read_bytes()
    assert read(collect_inputs([str(shard)], sources=SourceOptions(image_key="seg.png")).items[0]) == mask.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_member_names_of_every_tar_format_are_read(tmp_path, fmt):
    folder = "f" * 90 + "/" + "g" * 60  # past the 100 bytes of the name field
    shard = write_tar(tmp_path / "s.tar", [(f"{folder}/k1.png", PNG.read_bytes()), ("k2.jpg", JPG.read_bytes())], fmt)
    items = collect_inputs([str(shard)]).items
    assert [it.name for it in items] == [f"s.tar/{folder}/k1", "s.tar/k2"]
    assert [read(it) for it in items] == [PNG.read_bytes(), JPG.read_bytes()]


def test_a_truncated_shard_keeps_the_samples_before_the_break_and_names_the_shard_and_byte(shards):
    shard = shards / "00000.tar"
    cut = truncate_inside(shard, "000000002.webp")
    items = collect_inputs([str(shard)]).items
    assert [(it.name, it.error is None) for it in items] == [
        ("00000.tar/000000000", True), ("00000.tar/000000002", False), ("00000.tar", False)]
    assert read(items[0]) == PNG.read_bytes()
    for failed in items[1:]:
        assert f"{shard} is truncated at byte {cut}" in failed.error
    assert "000000002.webp needs bytes" in items[1].error
    assert items[2].error.endswith("what follows cannot be read")


def test_a_shard_cut_between_members_or_not_a_tar_at_all_is_a_failure_row(tmp_path):
    whole = write_tar(tmp_path / "whole.tar", sample_members("k", PNG, "a cup"))
    with tarfile.open(whole) as tar:
        boundary = tar.getmember("k.json").offset
    os.truncate(whole, boundary)
    items = collect_inputs([str(whole)]).items
    assert [it.name for it in items] == ["whole.tar/k", "whole.tar"]
    assert items[1].error == (f"{whole} is truncated at byte {boundary} (it ends without the end-of-archive marker): "
                              "what follows cannot be read")
    (tmp_path / "bad.tar").write_bytes(b"x" * 2048)
    (bad,) = collect_inputs([str(tmp_path / "bad.tar")]).items
    assert bad.name == "bad.tar" and bad.error == f"{tmp_path / 'bad.tar'} is not a tar archive (its first header has a bad checksum)"


def test_brace_ranges_lists_and_globs_expand_in_order(tmp_path):
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("x{}y{z}") == ["x{}y{z}"]
    for n in (2, 0, 1, 10):
        write_tar(tmp_path / f"{n:02d}.tar", sample_members(f"k{n}", PNG, ""))
    names = [it.name for it in collect_inputs([str(tmp_path / "*.tar")]).items]
    assert names == ["00.tar/k0", "01.tar/k1", "02.tar/k2", "10.tar/k10"]
    names = [it.name for it in collect_inputs([str(tmp_path / "{01..02}.tar")]).items]
    assert names == ["01.tar/k1", "02.tar/k2"]
    with pytest.raises(GplError, match=r"input not found: .*03\.tar \(from .*\{01\.\.03\}\.tar\)"):
        collect_inputs([str(tmp_path / "{01..03}.tar")])
    with pytest.raises(GplError, match=r"input not found: .*nope\*\.tar \(no file matches\)"):
        collect_inputs([str(tmp_path / "nope*.tar")])


def test_containers_sharing_a_file_name_are_named_by_their_paths():
    assert container_names(["a/00000.tar", "b/00001.tar"]) == {"a/00000.tar": "00000.tar", "b/00001.tar": "00001.tar"}
    assert container_names(["a/00000.tar", "b/00000.tar"]) == {"a/00000.tar": "a/00000.tar", "b/00000.tar": "b/00000.tar"}
    assert container_names(["a/00000.tar", "./a/00000.tar"])["a/00000.tar"] == "00000.tar"  # the same file twice


def test_files_tars_parquet_and_folders_keep_the_order_given(tmp_path, shards):
    (tmp_path / "dir").mkdir()
    Image.fromarray(make_photo_like((30, 20))).save(tmp_path / "dir" / "z.png")
    table = img2dataset_parquet(tmp_path / "t.parquet", [{"key": "p0", "image": JPG}])
    args = [str(table), str(PNG), str(shards / "00001.tar"), str(tmp_path / "dir")]
    names = [it.name for it in collect_inputs(args).items]
    assert names == ["t.parquet/p0", str(PNG), "00001.tar/sub/deeper/000010000", str(tmp_path / "dir" / "z.png")]
    stdin = io.BytesIO(f"{shards / '00001.tar'}\n{PNG}\n".encode())
    assert [it.name for it in collect_inputs(["-"], stdin=stdin).items] == ["00001.tar/sub/deeper/000010000", str(PNG)]


def test_parquet_in_both_layouts_rows_in_order_nulls_left_out(tmp_path):
    images = [PNG, None, WEBP, JPG, PNG]
    rows = [{"key": f"k{i}", "image": p, "caption": f"caption {i}"} for i, p in enumerate(images)]
    both = [img2dataset_parquet(tmp_path / "img2dataset.parquet", rows, row_group_size=2),
            hf_parquet(tmp_path / "hf.parquet", images, row_group_size=2)]
    listed = collect_inputs([str(p) for p in both])
    assert [it.name for it in listed.items] == [*(f"img2dataset.parquet/k{i}" for i in (0, 2, 3, 4)),
                                                *(f"hf.parquet/{i}" for i in (0, 2, 3, 4))]
    assert listed.no_image == ["img2dataset.parquet/k1", "hf.parquet/1"]
    assert [read(it) for it in listed.items] == [p.read_bytes() for p in images if p] * 2
    keyed = collect_inputs([str(both[0])], sources=SourceOptions(key_column="caption", image_column="jpg"))
    assert [it.name for it in keyed.items][:2] == ["img2dataset.parquet/caption 0", "img2dataset.parquet/caption 2"]


def test_a_worker_holds_a_few_rows_of_a_parquet_row_group_not_the_whole_group(tmp_path):
    count = 3 * PARQUET_BATCH + 5
    small = io.BytesIO()
    Image.fromarray(make_photo_like((16, 16))).save(small, "PNG")
    (tmp_path / "s.png").write_bytes(small.getvalue())
    big = img2dataset_parquet(tmp_path / "big.parquet", [{"key": str(i), "image": tmp_path / "s.png"} for i in range(count)])
    items = collect_inputs([str(big)]).items
    reader = _Reader()
    for it in items:
        assert reader.parquet_bytes(it.source).read() == small.getvalue()
        assert len(reader.batch) <= PARQUET_BATCH
    reader.close()


def test_parquet_options_that_name_no_column_are_refused_with_the_file_and_its_columns(tmp_path):
    table = img2dataset_parquet(tmp_path / "t.parquet", [{"key": "a", "image": PNG}])
    with pytest.raises(GplError, match=r"t\.parquet has no column 'png' \(--image-column\); its columns: key, url, caption, jpg"):
        collect_inputs([str(table)], sources=SourceOptions(image_column="png"))
    with pytest.raises(GplError, match=r"column caption holds string, not image bytes"):
        collect_inputs([str(table)], sources=SourceOptions(image_column="caption"))
    with pytest.raises(GplError, match=r"no column 'id' \(--key-column\)"):
        collect_inputs([str(table)], sources=SourceOptions(key_column="id"))
    with pytest.raises(GplError, match="--image-key applies to tar shards, and no input is one"):
        collect_inputs([str(table)], sources=SourceOptions(image_key="jpg"))
    with pytest.raises(GplError, match="--keep-fields applies to tar shards and parquet files"):
        collect_inputs([str(PNG)], sources=SourceOptions(keep_fields=("txt",)))
    with pytest.raises(GplError, match="--keep-fields jsn.url: no input holds it"):
        collect_inputs([str(table)], sources=SourceOptions(keep_fields=("jsn.url",)))
    with pytest.raises(GplError, match="already have a 'path' column"):
        collect_inputs([str(table)], sources=SourceOptions(keep_fields=("path",)))


class Rows:
    """A Writer that keeps what it is given."""

    keeps_failures = True

    def __init__(self):
        self.names, self.fields = [], {}

    def write(self, names, vectors, stats=None, fields=None):
        self.names += names
        for key, values in (fields or {}).items():
            self.fields.setdefault(key, []).extend(values)


def test_kept_fields_are_the_sidecars_json_fields_and_parquet_columns_of_each_row(tmp_path, shards):
    table = img2dataset_parquet(tmp_path / "t.parquet", [{"key": "p0", "image": JPG, "caption": "from parquet"}])
    hf = hf_parquet(tmp_path / "hf.parquet", [WEBP])
    specs = ("json.url", "txt", "caption", "image.path", "json.missing")
    listed = collect_inputs([str(shards / "00000.tar"), str(table), str(hf), str(PNG)], sources=SourceOptions(keep_fields=specs))
    writer = Rows()
    keep_fields(writer, listed).write([it.name for it in listed.items], {})
    meta = [json.loads(m) for n, m in sample_members("000000000", PNG, "a cup") if n.endswith(".json")]
    assert writer.fields == {
        "json.url": [meta[0]["url"], "https://example.com/000000002", "", "", ""],
        "txt": ["a cup", "an igloo", "", "", ""],
        "caption": ["", "", "from parquet", "", ""],
        "image.path": ["", "", "", "igloo.webp", ""],
        "json.missing": ["", "", "", "", ""],
    }


def test_kept_fields_of_a_shard_replaced_before_the_rows_are_written_stop_the_output(shards):
    listed = collect_inputs([str(shards / "00001.tar")], sources=SourceOptions(keep_fields=("txt",)))
    write_tar(shards / "00001.tar", sample_members("sub/deeper/000010000", JPG, "another caption"))
    with pytest.raises(GplError, match=r"cannot read the kept fields of 00001.tar/sub/deeper/000010000: .*changed since"):
        keep_fields(Rows(), listed).write([listed.items[0].name], {})


PRE = Preprocess(resize=64, crop=56, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_an_image_read_from_a_shard_has_the_pixels_of_the_file_and_the_members_stat(shards):
    item = collect_inputs([str(shards / "00000.tar")]).items[1]
    sample = load_sample(0, item.path, PRE, source=item.source)
    from gpl_cli.embedding.images import preprocess_image

    assert np.array_equal(sample.pixels.numpy(), preprocess_image(open_rgb(str(WEBP)), PRE).numpy())
    assert sample.stat == (WEBP.stat().st_size, 1_700_000_000 * 10**9) == item.current_stat()


def test_a_shard_replaced_after_it_was_listed_is_a_failure_not_another_image(shards):
    shard = shards / "00000.tar"
    items = collect_inputs([str(shard)]).items
    write_tar(shard, [*sample_members("000000000", JPG, "another"), *sample_members("000000002", PNG, "")])
    sample = load_sample(0, items[0].path, PRE, source=items[0].source)
    assert sample.pixels is None
    assert sample.failure.reason == f"{shard} changed since gpl listed it (written to or replaced); run gpl again to list it anew"
    assert sample.failure.path == f"{shard}/000000000"


def test_a_corrupt_image_member_fails_as_the_same_bytes_in_a_file_do(tmp_path):
    corrupt = JPG.read_bytes()[:2000] + b"\0" * 300
    (tmp_path / "k.jpg").write_bytes(corrupt)
    shard = write_tar(tmp_path / "s.tar", [("k.jpg", corrupt)])
    (item,) = collect_inputs([str(shard)]).items
    sample = load_sample(0, item.path, PRE, source=item.source)
    as_file = load_sample(0, str(tmp_path / "k.jpg"), PRE)
    assert sample.failure.path == f"{shard}/k"
    assert sample.failure.reason == as_file.failure.reason and as_file.failure.reason
