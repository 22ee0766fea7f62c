"""The pipe-friendly writers, in process: exact float round trips, awkward names, the npy spool."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest

from gpl_cli.atomic import PARTIAL
from gpl_cli.errors import GplError
from gpl_cli.store.formats.streams import DelimitedWriter, JsonlWriter, NpyStreamWriter
from gpl_cli.store.output import Output, format_for
from gpl_cli.store.sink import line_name

AWKWARD = ["plain.jpg", "with space.jpg", 'com,ma "quoted".png', "new\nline.png", "tab\there.png",
           "ünïcödé 写真.jpg", os.fsdecode(b"bad\xff\xfe.png"), "cr\rinside.png"]


def hard_floats(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """float32 values that stress a text round trip: tiny, huge, negative, zero, subnormal."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, dim)) * 10.0 ** rng.integers(-30, 30, (rows, dim))).astype(np.float32)
    specials = [0.0, -0.0, 1e-45, np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1 / 3, 0.1]
    x.reshape(-1)[: len(specials)] = specials
    return x


def write_all(writer, names, vectors, failures=()):
    for name, reason in failures:
        writer.fail(name, reason)
    half = len(names) // 2  # two batches, as the engine hands them over
    writer.write(names[:half], {k: v[:half] for k, v in vectors.items()})
    writer.write(names[half:], {k: v[half:] for k, v in vectors.items()})
    return writer.close({"backbone": "x"})


def test_jsonl_round_trips_floats_and_names_exactly(tmp_path):
    vectors = {"avg": hard_floats(len(AWKWARD), 7), "gem:p=3": hard_floats(len(AWKWARD), 3, seed=1)}
    out = tmp_path / "e.jsonl"
    files = write_all(JsonlWriter(str(out), {"avg": 7, "gem:p=3": 3}), AWKWARD, vectors, [("broken.jpg", "truncated")])
    assert files == [str(out)] and not os.path.exists(str(out) + PARTIAL)
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(AWKWARD) + 2  # one line per object, newline-terminated
    objects = [json.loads(line) for line in lines[:-1]]
    assert objects[0] == {"path": "broken.jpg", "error": "truncated"}
    rows = objects[1:]
    assert [r["path"] for r in rows] == AWKWARD
    assert os.fsencode(rows[6]["path"]) == b"bad\xff\xfe.png"
    for key in vectors:
        back = np.array([r["embeddings"][key] for r in rows], dtype=np.float64).astype(np.float32)
        # the same float32 values (JSON reads "-0" as the integer 0, so -0.0 == 0.0 is all that can hold)
        assert np.array_equal(back, vectors[key])
    # valid UTF-8 names stay readable, not \u-escaped
    assert "ünïcödé 写真.jpg".encode() in out.read_bytes()


def test_jsonl_writes_non_finite_values_as_python_json_reads_them(tmp_path):
    v = np.array([[np.nan, np.inf, -np.inf, 1.5]], dtype=np.float32)
    out = tmp_path / "nan.jsonl"
    write_all(JsonlWriter(str(out), {"max": 4}), ["a.jpg"], {"max": v})
    back = np.array(json.loads(out.read_text())["embeddings"]["max"], dtype=np.float32)
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf and back[3] == 1.5


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_delimited_round_trips_through_the_csv_module(tmp_path, delimiter):
    vectors = {"avg": hard_floats(len(AWKWARD), 5), "max": hard_floats(len(AWKWARD), 2, seed=3)}
    out = tmp_path / "e.txt"
    write_all(DelimitedWriter(str(out), {"avg": 5, "max": 2}, delimiter=delimiter), AWKWARD, vectors, [("x.jpg", "bad")])
    with open(out, encoding="utf-8", errors="surrogateescape", newline="") as f:
        table = list(csv.reader(f, delimiter=delimiter))
    assert table[0] == ["path", "avg_0", "avg_1", "avg_2", "avg_3", "avg_4", "max_0", "max_1"]
    body = table[1:]
    # failures take no row; control characters escaped (line_name), so each row is one line of the file
    assert [r[0] for r in body] == [line_name(n) for n in AWKWARD]
    assert out.read_bytes().count(b"\n") == 1 + len(AWKWARD)
    numbers = np.array([r[1:] for r in body], dtype=np.float64).astype(np.float32)
    expected = np.concatenate([vectors["avg"], vectors["max"]], axis=1)
    assert np.array_equal(numbers.view(np.uint32), expected.view(np.uint32))
    # plain names stay unquoted; the invalid byte is written as itself
    raw = out.read_bytes()
    assert b"\nplain.jpg" + delimiter.encode() in raw and b"bad\xff\xfe.png" in raw


def test_npy_stream_spools_and_emits_one_valid_array(tmp_path):
    v = hard_floats(9, 6)
    out = tmp_path / "s.npy"
    writer = NpyStreamWriter(str(out), {"avg": 6})
    writer.fail("gone.jpg", "missing")
    writer.write([f"{i}.jpg" for i in range(4)], {"avg": v[:4]})
    assert not out.exists() and out.with_name("s.npy" + PARTIAL).stat().st_size == 0  # nothing before the count is known
    writer.write([f"{i}.jpg" for i in range(4, 9)], {"avg": v[4:]})
    writer.close({})
    back = np.load(out)
    assert back.dtype == np.float32 and back.shape == (9, 6)
    assert np.array_equal(back.view(np.uint32), v.view(np.uint32))
    assert back.shape == np.load(io.BytesIO(out.read_bytes())).shape


def test_npy_stream_refuses_several_poolings(tmp_path):
    with pytest.raises(GplError, match="one array"):
        NpyStreamWriter(str(tmp_path / "x.npy"), {"avg": 3, "max": 3})


def test_formats_and_stdout_rules(tmp_path):
    assert format_for("-", None) == "jsonl"
    assert format_for("-", "npy") == "npy"
    assert format_for("a.CSV", None) == "csv" and format_for("a.ndjson", None) == "jsonl"
    with pytest.raises(GplError, match="stdout"):
        format_for("-", "h5")
    with pytest.raises(GplError, match="cannot tell the output format"):
        format_for("a.txt", None)
    existing = tmp_path / "e.tsv"
    existing.write_text("keep")
    with pytest.raises(GplError, match="output exists"):
        Output.resolve(str(existing)).open_writer({"avg": 2})
    assert existing.read_text() == "keep"
