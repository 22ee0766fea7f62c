"""The embed job, end to end: inputs -> engine -> journal -> output file, with metadata.

Rows go to a journal beside the output as they are made (see journal.py); the output file
is assembled from it in input order only when every input has been handled. This is what
makes `--resume` (finish an interrupted run) and `--update` (embed only new or changed
files) exact: both only change which inputs the engine still has to see.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np

from gpl_cli import __version__
from gpl_cli.backbones import Backbone, load_backbone
from gpl_cli.engine import (EmbedConfig, Embedder, RunOptions, Summary, check_precision, model_threads, resolve_device,
                            resolve_workers)
from gpl_cli.errors import EXIT_SOME_FAILED, GplError
from gpl_cli.images import Failure
from gpl_cli.inputs import InputItem, InputList
from gpl_cli.journal import JOURNAL_SUFFIX, Journal, OutputLock, check_same_run
from gpl_cli.tuning import plan_run
from gpl_cli.writers import Writer, encode_name, open_writer, output_files

ASSEMBLE_ROWS = 1024


@dataclass
class OutputTarget:
    path: str
    format: str | None = None  # None: from the extension
    overwrite: bool = False


@dataclass
class RunMode:
    resume: bool = False  # finish an interrupted run from its journal
    update: bool = False  # re-embed only new or changed files of an existing output
    strict: bool = False  # stop at the first input that cannot be embedded


class Interrupted(GplError):
    """Ctrl-C or SIGTERM: finished work is saved, the message says how to resume."""


def versions() -> dict[str, str]:
    import timm
    import torch
    import torchvision

    return {"gpl": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}


def run_identity(config: EmbedConfig, backbone: Backbone) -> dict:
    """What must be equal for rows of two runs to belong in one file."""
    return json.loads(json.dumps({**config.as_dict(), "weights_sha256": backbone.weights_sha256}))


def build_metadata(config: EmbedConfig, embedder: Embedder, inputs: InputList, summary: Summary) -> dict:
    specs = embedder.specs
    return {
        **embedder.backbone.metadata(),
        "pool_keys": [s.key for s in specs],
        "pools": {s.key: {"op": s.op, "params": s.all_params(), "dim": summary.dims[s.key]} for s in specs},
        "normalize": config.normalize,
        "config": config.as_dict(),
        "root": inputs.root,
        "count": summary.embedded,
        "failed": summary.failed,
        "seconds": round(summary.seconds, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }


def file_stat(path: str) -> tuple[int, int]:
    """(size, mtime in ns): what --update compares to decide that a file changed."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the run stops cleanly after the batch in hand.

    Raising from the signal handler itself could land anywhere (in a finaliser, where it is
    swallowed); a flag checked between batches cannot be lost. A second Ctrl-C acts at once.
    """

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted("interrupted", 128 + self.signum)

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class _JournalSink:
    """Feeds engine results to the journal, adding each file's stat; reports failures."""

    def __init__(self, journal: Journal, items: list[InputItem], strict: bool, report, stop: _StopRequest):
        self.journal = journal
        self.path_of = {it.name: it.path for it in items}
        self.strict = strict
        self.report = report
        self.stop = stop

    def write(self, names: list[str], vectors: dict[str, np.ndarray]) -> None:
        self.journal.write(names, vectors, [file_stat(self.path_of[n]) for n in names])
        self.stop.check()

    def fail(self, name: str, reason: str) -> None:
        self.report(Failure(name, reason))
        if self.strict:
            raise GplError(f"stopped at the first failure (--strict): {name}: {reason}", EXIT_SOME_FAILED)
        self.journal.fail(name, reason)
        self.stop.check()


def _open_journal(target: OutputTarget, mode: RunMode, identity: dict, keys: list[str]) -> Journal:
    directory = target.path + JOURNAL_SUFFIX
    if os.path.isdir(directory):
        if mode.resume or mode.update:
            return Journal.reopen(directory, identity, keys)
        if not target.overwrite:
            raise GplError(
                f"an unfinished run left {directory}: add --resume to finish it, or --overwrite to start over"
            )
        Journal(directory, keys).remove()
    existing = [f for f in output_files(target.path, target.format, keys) if os.path.exists(f)]
    if existing and not (target.overwrite or mode.update):
        hint = " (it is complete: use --update to add new or changed files)" if mode.resume else ""
        raise GplError(f"output exists: {existing[0]}{hint}; use --overwrite to replace it")
    return Journal.create(directory, identity, keys)


def _reuse_previous(journal: Journal, target: OutputTarget, identity: dict, items: list[InputItem]) -> None:
    """--update: copy the rows of unchanged files from the existing output into the journal."""
    from gpl_cli.readers import read_embeddings

    files = output_files(target.path, target.format, journal.keys)
    if not os.path.exists(files[-1]):  # the file that is renamed into place last
        return
    old = read_embeddings(files[-1])
    recorded = {**old.metadata["config"], "weights_sha256": old.metadata["weights_sha256"]}
    check_same_run(recorded, identity, target.path)
    done, _ = journal.index()
    current = {it.name: file_stat(it.path) for it in items}
    keep = [
        i for i, (name, stat) in enumerate(zip(old.paths, old.stats))
        if current.get(name) == tuple(stat) and encode_name(name) not in done
    ]
    for start in range(0, len(keep), ASSEMBLE_ROWS):
        rows = keep[start:start + ASSEMBLE_ROWS]
        journal.write([old.paths[i] for i in rows], {k: v[rows] for k, v in old.vectors.items()},
                      [tuple(old.stats[i]) for i in rows])
    journal.flush()


def assemble(journal: Journal, items: list[InputItem], writer: Writer) -> tuple[int, int]:
    """Write every item's row (or failure) from the journal in input order; returns (rows, failures)."""
    rows, failures = journal.index()
    cached: dict[int, dict[str, np.ndarray]] = {}
    names: list[str] = []
    picks: list[tuple[int, int]] = []

    def flush() -> None:
        if names:
            vectors = {k: np.stack([cached[c][k][r] for c, r in picks]) for k in journal.keys}
            stats = [tuple(cached[c]["stats"][r]) for c, r in picks]
            writer.write(names, vectors, stats)
            names.clear()
            picks.clear()

    n_rows = n_failed = 0
    for item in items:
        key = encode_name(item.name)
        if key in rows:
            c, r = rows[key]
            if c not in cached:
                if len(cached) >= 4 and not picks:
                    cached.clear()
                cached[c] = journal.chunk(c)
            names.append(item.name)
            picks.append((c, r))
            n_rows += 1
            if len(names) >= ASSEMBLE_ROWS:
                flush()
        elif key in failures:
            writer.fail(item.name, failures[key])
            n_failed += 1
        else:
            raise RuntimeError(f"internal error: {item.name} was neither embedded nor recorded as failed")
    flush()
    return n_rows, n_failed


def run_embed(
    config: EmbedConfig,
    inputs: InputList,
    target: OutputTarget,
    options: RunOptions,
    quiet: bool = False,
    mode: RunMode | None = None,
    backbone: Backbone | None = None,
) -> Summary:
    """Embed every input into `target`; failures are reported on stderr and recorded in the file."""
    from tqdm import tqdm

    mode = mode or RunMode()
    output_files(target.path, target.format, [])  # an unknown extension fails before the model loads
    device = resolve_device(options.device)
    check_precision(config.precision, device)
    backbone = backbone or load_backbone(config.backbone, config.weights)
    specs = config.pool_specs()
    identity = run_identity(config, backbone)

    def report(failure: Failure) -> None:
        tqdm.write(f"gpl: skipped {failure.path}: {failure.reason}", file=sys.stderr)

    with OutputLock(target.path):
        journal = _open_journal(target, mode, identity, [s.key for s in specs])
        if mode.update:
            _reuse_previous(journal, target, identity, inputs.items)
        done, failed = journal.index()
        todo = [it for it in inputs.items if encode_name(it.name) not in done and encode_name(it.name) not in failed]
        threads = model_threads(device, resolve_workers(options.workers, device))
        plan = plan_run(backbone, options.device, config.precision, threads, options.batch_size, len(todo), quiet)
        embedder = Embedder(backbone, specs, config.normalize, options.device, config.precision, plan.channels_last,
                            config.jpeg_draft)
        options = replace(options, batch_size=plan.batch_size)
        bar = tqdm(total=len(inputs.items), initial=len(inputs.items) - len(todo), unit="img",
                   file=sys.stderr, disable=quiet, dynamic_ncols=True)
        stop = _StopRequest()
        try:
            with stop.installed():
                summary = embedder.run(todo, _JournalSink(journal, todo, mode.strict, report, stop), options,
                                       on_progress=bar.update)
                summary.plan = plan.describe()
        except (KeyboardInterrupt, Interrupted, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and stop.signum is None:
                raise  # not an interruption (a DataLoader worker killed by the same signal is one)
            journal.flush()
            code = 128 + (stop.signum or signal.SIGINT)
            raise Interrupted(
                f"interrupted; finished work is saved in {journal.directory}. "
                "Run the same command with --resume to finish it.", code) from None
        except GplError:
            journal.flush()
            raise
        finally:
            bar.close()
        journal.flush()
        summary.reused = sum(1 for it in inputs.items if encode_name(it.name) in done)
        _write_output(journal, inputs, target, embedder, config, summary)
        journal.remove()
    return summary


def _write_output(journal, inputs, target, embedder, config, summary) -> None:
    """Assemble the journal into the output file; the totals replace this run's own counts."""
    writer = open_writer(target.path, target.format, embedder.dims, overwrite=True)
    try:
        summary.embedded, summary.failed = assemble(journal, inputs.items, writer)
    except BaseException:
        writer.abort()
        raise
    writer.close(build_metadata(config, embedder, inputs, summary))
