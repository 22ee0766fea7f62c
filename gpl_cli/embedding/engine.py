"""The `Engine` protocol both engines implement (`local.LocalEngine`, `ray.RayEngine`), and what they share:
the run's `Summary`, a batch's results (`Embedded`) and `deliver`, which hands them to the sink in input order.

An engine schedules decoding and the pure `embedder.Embedder` (pixels in, pooled vectors out) on some
hardware; the job (`job.Job`) chooses one and never needs to know which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from gpl_cli.embedding.images import Failure
from gpl_cli.embedding.inputs import InputItem
from gpl_cli.embedding.settings import RunSettings
from gpl_cli.store.sink import Sink


@dataclass
class Summary:
    embedded: int = 0
    failed: int = 0
    reused: int = 0  # rows not computed by this run: resumed from a journal or kept by --update
    seconds: float = 0.0
    dims: dict[str, int] = field(default_factory=dict)
    pool_seconds: dict[str, float] = field(default_factory=dict)  # per pooling: pool, normalise, copy to host
    scale_seconds: dict[str, float] = field(default_factory=dict)  # per scale label: forward pass and poolings
    plan: str = ""  # batch size and memory layout the run used, in words
    runtime: str = "torch"  # what ran the trunk: torch or openvino
    execution: str = ""  # processes and threads, in words
    zero_rows: dict[str, int] = field(default_factory=dict)  # per pooling: all-zero vectors written

    @property
    def rate(self) -> float:
        return (self.embedded - self.reused) / self.seconds if self.seconds > 0 else 0.0


class Engine(Protocol):
    """What runs the embed job's batches: `local.LocalEngine` on this machine, `ray.RayEngine` on Ray.

    `run` hands every item's failure or row to `sink` in input order and returns the run's Summary.
    """

    def run(self, items: list[InputItem], sink: Sink, settings: RunSettings,
            on_failure: Callable[[Failure], None] | None = None,
            on_progress: Callable[[int], None] | None = None) -> Summary: ...


class Embedded(NamedTuple):
    """A batch after the model: vectors of the images that decoded, failures of the others."""

    indices: list[int]
    stats: list[tuple[int, int]]  # (size, mtime_ns) of each embedded file when it was decoded
    vectors: dict[str, np.ndarray]  # empty when every image of the batch failed
    failures: list[tuple[int, Failure]]
    pool_seconds: dict[str, float]  # what each pooling cost on this batch
    scale_seconds: dict[str, float]  # what each scale cost on it (forward pass and poolings), by scale label



def deliver(
    items: list[InputItem],
    sink: Sink,
    summary: Summary,
    on_failure: Callable[[Failure], None] | None,
    failures: list[tuple[int, Failure]],
    indices: list[int],
    vectors: dict[str, np.ndarray],
    stats: list[tuple[int, int]],
) -> None:
    """Hand one group of results to the sink: its failures, then its rows (`indices` into `items`).

    A row with a non-finite value (NaN, inf: an operator pushed past float32, e.g. crow:a=1e-9)
    is no embedding: it becomes that image's failure. All-zero rows are kept and counted in
    `summary.zero_rows` (cosine similarity with them is 0 by definition).
    """
    if indices:
        finite = np.logical_and.reduce([np.isfinite(v).all(axis=1) for v in vectors.values()])
        for pos in np.flatnonzero(~finite):
            bad = [key for key, v in vectors.items() if not np.isfinite(v[pos]).all()]
            reason = f"pooling {bad[0]} gave a non-finite vector (NaN or inf); try other parameters"
            failures = [*failures, (indices[pos], Failure(items[indices[pos]].path, reason))]
        if not finite.all():
            keep = np.flatnonzero(finite)
            indices, stats = [indices[i] for i in keep], [stats[i] for i in keep]
            vectors = {key: v[keep] for key, v in vectors.items()}
        for key, v in vectors.items():
            zero = int((~v.any(axis=1)).sum())
            if zero:
                summary.zero_rows[key] = summary.zero_rows.get(key, 0) + zero
    for index, failure in failures:
        sink.fail(items[index].name, failure.reason)
        summary.failed += 1
        if on_failure:
            on_failure(failure)
    if indices:
        sink.write([items[i].name for i in indices], vectors, stats)
        summary.embedded += len(indices)
