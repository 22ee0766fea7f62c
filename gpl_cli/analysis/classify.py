"""`gpl classify`: the top-k ImageNet classes from the backbone's own trained head on a pooled vector.

Images go through the embed job (`gpl_cli.embedding.job.Job`) with one pooling and no post-processing: the head needs the raw pooled vector. Each batch's vectors
are turned into predictions and written as they arrive (`_Predict` is the sink), so nothing
grows with the number of images.

Outputs, one pooling, k classes per image:
- text (default on stdout): `path<TAB>rank<TAB>probability<TAB>index<TAB>name`, one line per class;
  failed images are on stderr only. Paths are escaped as in every line output (store.sink.line_name:
  backslash, tab, newline, CR as \\\\ \\t \\n \\r, other control characters as \\xNN), so each is one field.
- jsonl: `{"path", "pooling", "classes": [{"rank", "index", "name", "probability"}]}` per image;
  a failed image is `{"path", "error"}`.
- csv: header `path,rank,index,name,probability,error`, one row per class; a failed image is a
  row with only its path and error. Paths and errors are escaped as in text: every row is one line.
Files are written as FILE.partial and renamed into place when complete.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gpl_cli.errors import GplError
from gpl_cli.store.sink import line_name

if TYPE_CHECKING:
    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.images import Failure
    from gpl_cli.embedding.inputs import InputList
    from gpl_cli.store.output import Output

def pool_warning(pool_key: str, trained_pool: str) -> str | None:
    """What to tell the user when the head is fed another pooling than the one it was trained on."""
    if pool_key == trained_pool:
        return None
    return (f"the classifier head was trained on {trained_pool}-pooled features; fed {pool_key}-pooled ones its "
            "probabilities show what that pooling does to it, not a calibrated prediction")


Prediction = list[tuple[int, str, float]]  # (index, name, probability), most probable first


def _text_lines(name: str, top: Prediction) -> str:
    name = line_name(name)
    return "".join(f"{name}\t{rank}\t{p:.6f}\t{i}\t{label}\n" for rank, (i, label, p) in enumerate(top, 1))


def _json_line(name: str, pool: str, top: Prediction) -> str:
    classes = [{"rank": r, "index": i, "name": label, "probability": p} for r, (i, label, p) in enumerate(top, 1)]
    return json.dumps({"path": name, "pooling": pool, "classes": classes}) + "\n"


def _csv_rows(rows: list[list]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


class PredictionWriter:
    """Predictions (text, jsonl or csv), to stdout or atomically to a file (formats.streams.Destination)."""

    def __init__(self, output: Output, pool: str):
        from gpl_cli.store.formats.streams import Destination

        self.fmt = output.format
        self.pool = pool
        self.out = Destination(output.path, overwrite=True)  # an existing file was refused by Output.check
        if self.fmt == "csv":
            self._emit(_csv_rows([["path", "rank", "index", "name", "probability", "error"]]))

    def _emit(self, text: str) -> None:
        self.out.file.write(text.encode("utf-8", "surrogateescape"))
        self.out.file.flush()

    def write(self, name: str, top: Prediction) -> None:
        if self.fmt == "text":
            self._emit(_text_lines(name, top))
        elif self.fmt == "jsonl":
            self._emit(_json_line(name, self.pool, top))
        else:
            self._emit(_csv_rows([[line_name(name), r, i, label, repr(p), ""] for r, (i, label, p) in enumerate(top, 1)]))

    def fail(self, name: str, reason: str) -> None:
        if self.fmt == "jsonl":
            self._emit(json.dumps({"path": name, "error": reason}) + "\n")
        elif self.fmt == "csv":
            self._emit(_csv_rows([[line_name(name), "", "", "", "", line_name(reason)]]))
        # text: stdout carries predictions only; the failure is on stderr

    def close(self) -> None:
        self.out.commit()

    def abort(self) -> None:
        self.out.abort()


@dataclass
class _Predict:
    """An Embedder sink: each batch's pooled vectors through the head, straight to the writer."""

    head: object  # heads.ClassifierHead
    key: str
    k: int
    writer: PredictionWriter
    failures: list[tuple[str, str]] = field(default_factory=list)

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats=None) -> None:
        for name, top in zip(names, self.head.top_k(vectors[self.key], self.k)):
            self.writer.write(name, top)

    def fail(self, name: str, reason: str) -> None:
        self.failures.append((name, reason))
        self.writer.fail(name, reason)


@dataclass
class ClassifySummary:
    classified: int
    failed: list[tuple[str, str]]
    pool: str
    warning: str | None


def classify(
    inputs: InputList,
    output: Output,
    config: EmbedConfig,
    k: int = 5,
    options: RunOptions | None = None,
    on_failure: Callable[[Failure], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_warning: Callable[[str], None] = lambda text: None,
    loaded=None,
) -> ClassifySummary:
    """Top-k classes of every input written to `output` (a PREDICTIONS Output; '-' is stdout).

    `config` names the backbone, its weights and the one pooling fed to the head. `loaded`: an already
    loaded backbone (tests). Failures go to `on_failure` and the output.
    """
    from gpl_cli.embedding.job import Job
    from gpl_cli.models.heads import classifier_head

    if k < 1:
        raise GplError(f"-k must be at least 1, got {k}")
    specs = config.pool_specs()
    if len(specs) != 1:
        raise GplError(f"classify applies the head to one pooled vector; --pool names {len(specs)}: "
                       f"{', '.join(s.key for s in specs)}")
    output.check([it.path for it in inputs.items])  # before the model loads
    job = Job(config, options, len(inputs.items), backbone=loaded, on_progress=on_progress, on_failure=on_failure)
    head = classifier_head(job.embedder.backbone)
    spec = specs[0]
    if job.embedder.dims[spec.key] != head.weight.shape[1]:
        raise GplError(f"--pool {spec.key} gives {job.embedder.dims[spec.key]} numbers per image; the head of "
                       f"{config.backbone} takes {head.weight.shape[1]}")
    warning = pool_warning(spec.key, head.trained_pool)
    if warning:
        on_warning(warning)
    writer = PredictionWriter(output, spec.key)
    sink = _Predict(head, spec.key, min(k, head.weight.shape[0]), writer)
    try:
        summary = job.run(inputs.items, sink)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return ClassifySummary(summary.embedded, sink.failures, spec.key, warning)
