"""gpl_cli.journal: finished rows kept in atomic chunks, read back exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gpl_cli.errors import GplError
from gpl_cli.journal import TMP, Journal

IDENTITY = {"backbone": "efficientnet_lite0", "pools": ["avg", "max"]}


def test_rows_and_failures_come_back_from_their_chunks(tmp_path):
    rng = np.random.default_rng(1)
    journal = Journal.create(str(tmp_path / "j"), IDENTITY, ["avg", "max"], flush_rows=3)
    avg, mx = rng.random((5, 4), np.float32), rng.random((5, 2), np.float32)
    journal.write(["a", "b", "c"], {"avg": avg[:3], "max": mx[:3]}, [(10, 1), (11, 2), (12, 3)])  # a chunk
    journal.fail("bad.jpg", "not a readable image")
    journal.write(["d", "\udcff.jpg"], {"avg": avg[3:], "max": mx[3:]})  # no stats given
    journal.flush()
    assert sorted(n for n in os.listdir(journal.directory) if n.startswith("chunk-")) == [
        "chunk-000001.npz", "chunk-000002.npz"]
    rows, failures = journal.index()
    assert failures == {b"bad.jpg": "not a readable image"}
    names = [b"a", b"b", b"c", b"d", "\udcff.jpg".encode("utf-8", "surrogateescape")]
    for i, name in enumerate(names):
        chunk, row = rows[name]
        data = journal.chunk(chunk)
        np.testing.assert_array_equal(data["avg"][row], avg[i])
        np.testing.assert_array_equal(data["max"][row], mx[i])
    assert journal.chunk(rows[b"c"][0])["stats"][rows[b"c"][1]].tolist() == [12, 3]
    assert journal.chunk(rows[b"d"][0])["stats"][rows[b"d"][1]].tolist() == [-1, -1]


def test_reopening_drops_a_half_written_chunk_and_refuses_other_settings(tmp_path):
    directory = str(tmp_path / "j")
    Journal.create(directory, IDENTITY, ["avg"])
    half = os.path.join(directory, "chunk-000001.npz" + TMP)
    with open(half, "wb") as f:
        f.write(b"PK half a chunk")
    reopened = Journal.reopen(directory, IDENTITY, ["avg"])
    assert not os.path.exists(half) and reopened.index() == ({}, {})
    with pytest.raises(GplError, match="pools: \\['avg', 'max'\\] there, \\['avg'\\] now"):
        Journal.reopen(directory, {**IDENTITY, "pools": ["avg"]}, ["avg"])
