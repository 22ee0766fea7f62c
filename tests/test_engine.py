"""The engine's hand-over to sinks: rows stay with their names; what is no embedding is a failure."""

from __future__ import annotations

import numpy as np

from gpl_cli.engine import Summary, deliver
from gpl_cli.inputs import InputItem


class _Sink:
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
    sink, summary = _Sink(), Summary()
    deliver(items, sink, summary, None, [], [0, 1, 2, 3], {"avg": avg, "max": mx}, [(1, 10), (2, 20), (3, 30), (4, 40)])
    assert [r[0] for r in sink.rows] == ["n0", "n2"]
    assert sink.rows[1] == ("n2", [0.0, 0.0], [0.0, 0.0], (3, 30))  # each row keeps its own stat
    assert [(n, r.split(" gave")[0]) for n, r in sink.failed] == [("n1", "pooling avg"), ("n3", "pooling max")]
    assert (summary.embedded, summary.failed, summary.zero_rows) == (2, 2, {"avg": 1, "max": 1})
