"""gpl_cli.embedding.engine, embedder, local and ray: the Engine and Sink protocols, an Embedder moved to another device, and the hand-over to
sinks (rows stay with their names; what is no embedding is a failure)."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.engine import Engine, Summary, deliver
from gpl_cli.embedding.inputs import InputItem
from gpl_cli.embedding.job import _Sink
from gpl_cli.embedding.local import LocalEngine
from gpl_cli.embedding.ray import RayEngine
from gpl_cli.pooling.spec import parse_pool_list
from gpl_cli.store.embeddings import MemorySink
from gpl_cli.store.formats.h5 import H5Writer
from gpl_cli.store.formats.npy import NpyWriter
from gpl_cli.store.formats.shards import ShardWriter
from gpl_cli.store.formats.streams import DelimitedWriter, JsonlWriter, NpyStreamWriter
from gpl_cli.store.journal import Journal
from gpl_cli.store.sink import Sink, Writer


def _parameters(function) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


def test_both_engines_implement_the_engine_protocol():
    wanted = _parameters(Engine.run)
    assert _parameters(LocalEngine.run) == wanted and _parameters(RayEngine.run) == wanted


def test_every_sink_has_the_one_sink_shape():
    """Sinks take rows as Sink.write does; writers (what becomes an output) also the kept fields, as Writer.write."""
    fail = _parameters(Sink.fail)
    for protocol, sinks in ((Writer, (H5Writer, NpyWriter, ShardWriter, JsonlWriter, DelimitedWriter, NpyStreamWriter)),
                            (Sink, (Journal, _Sink, MemorySink))):
        for sink in sinks:
            assert _parameters(sink.write) == _parameters(protocol.write), sink
            assert inspect.signature(sink.write).parameters["stats"].default is None, sink
            assert _parameters(sink.fail) == fail, sink


def test_an_embedder_on_another_device_computes_the_same_and_counts_its_own_time(lite0):
    embedder = Embedder(lite0, parse_pool_list(["avg,gem"]), "l2", "cpu")
    moved = embedder.on_device("cpu")
    assert moved is not embedder and moved.trunk is not embedder.trunk
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = embedder.embed_pixels(pixels)
    counted = dict(embedder.pool_seconds)
    theirs = moved.embed_pixels(pixels)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key])
        assert np.allclose(np.linalg.norm(theirs[key], axis=1), 1.0, atol=1e-5)
    assert embedder.pool_seconds == counted and all(t > 0 for t in moved.pool_seconds.values())


class _Rows:
    def __init__(self):
        self.rows, self.failed = [], []

    def write(self, names, vectors, stats):
        self.rows += list(zip(names, vectors["avg"].tolist(), vectors["max"].tolist(), stats))

    def fail(self, name, reason):
        self.failed.append((name, reason))


def test_non_finite_rows_become_failures_and_zero_rows_are_counted():
    items = [InputItem(f"/p/n{i}", f"n{i}") for i in range(4)]
    avg = np.array([[1.0, 2.0], [np.nan, 1.0], [0.0, 0.0], [3.0, 4.0]], np.float32)
    mx = np.array([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [np.inf, 4.0]], np.float32)
    sink, summary = _Rows(), Summary()
    deliver(items, sink, summary, None, [], [0, 1, 2, 3], {"avg": avg, "max": mx}, [(1, 10), (2, 20), (3, 30), (4, 40)])
    assert [r[0] for r in sink.rows] == ["n0", "n2"]
    assert sink.rows[1] == ("n2", [0.0, 0.0], [0.0, 0.0], (3, 30))  # each row keeps its own stat
    assert [(n, r.split(" gave")[0]) for n, r in sink.failed] == [("n1", "pooling avg"), ("n3", "pooling max")]
    assert (summary.embedded, summary.failed, summary.zero_rows) == (2, 2, {"avg": 1, "max": 1})
