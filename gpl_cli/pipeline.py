"""The embed job, end to end: inputs -> engine -> journal -> output file, with metadata.

Rows go to a journal beside the output as they are made (see journal.py); the output file
is assembled from it in input order only when every input has been handled. This is what
makes `--resume` (finish an interrupted run) and `--update` (embed only new or changed
files) exact: both only change which inputs the engine still has to see.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import version

import numpy as np

from gpl_cli.backbones import Backbone, load_backbone
from gpl_cli.config import EmbedConfig
from gpl_cli.defaults import ENGINES
from gpl_cli.engine import Embedder, Engine, RunOptions, Summary, build_embedder
from gpl_cli.errors import EXIT_SOME_FAILED, GplError
from gpl_cli.formats import check_output_location, is_sharded, open_writer, output_files, read_embeddings
from gpl_cli.images import Failure, file_identity
from gpl_cli.inputs import InputItem, InputList
from gpl_cli.journal import FLUSH_ROWS, JOURNAL_SUFFIX, TRASH_SUFFIX, Journal, OutputLock, check_same_run
from gpl_cli.outputs import STDOUT, Sink, Writer, encode_name
from gpl_cli.readers import Embeddings
from gpl_cli.settings import RunSettings, resolve_settings
from gpl_cli.tuning import plan_run
from gpl_cli.version import __version__

ASSEMBLE_ROWS = 1024


@dataclass
class OutputTarget:
    path: str
    format: str | None = None  # None: from the extension
    overwrite: bool = False
    shard_rows: int | None = None  # rows per shard of a shards (parquet) folder


@dataclass
class RunMode:
    resume: bool = False  # finish an interrupted run from its journal
    update: bool = False  # re-embed only new or changed files of an existing output
    strict: bool = False  # stop at the first input that cannot be embedded
    checkpoint_rows: int = FLUSH_ROWS  # finished rows are made durable at least this often


class Interrupted(GplError):
    """Ctrl-C or SIGTERM: finished work is saved, the message says how to resume."""


def versions() -> dict[str, str]:
    """The libraries a file was made with, read from their installed metadata: importing torchvision
    and timm only to read their versions would cost a second of every run that needs neither."""
    import torch

    return {"gpl": __version__, "torch": torch.__version__, "torchvision": version("torchvision"), "timm": version("timm")}


def run_identity(config: EmbedConfig, backbone: Backbone) -> dict:
    """What must be equal for rows of two runs to belong in one file."""
    return json.loads(json.dumps({**config.as_dict(), "weights_sha256": backbone.weights_sha256}))


def build_metadata(config: EmbedConfig, embedder: Embedder, inputs: InputList, summary: Summary,
                   engine: str = "local") -> dict:
    specs = embedder.specs
    whitened = embedder.whitenings
    return {
        **embedder.backbone.metadata(),
        "preprocess": embedder.preprocess.as_dict(),
        "pool_keys": [s.key for s in specs],
        "pools": {
            s.key: {"op": s.op, "params": s.all_params(), "dim": summary.dims[s.key],
                    **({"whiten": whitened[s.key].describe()} if s.key in whitened else {})}
            for s in specs
        },
        "normalize": config.normalize,
        "power": config.power,
        "config": config.as_dict(),
        "engine": engine,
        "root": inputs.root,
        "count": summary.embedded,
        "failed": summary.failed,
        "seconds": round(summary.seconds, 3),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
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


class _Sink:
    """The Sink the engine writes to: passes rows (with each file's stat when it was decoded) on to a journal
    or a stream writer, reports failures, and stops the run after the rows in hand when asked to."""

    def __init__(self, dest: Sink, strict: bool, report, stop: _StopRequest):
        self.dest = dest
        self.strict = strict
        self.report = report
        self.stop = stop

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats=None) -> None:
        self.dest.write(names, vectors, stats)
        self.stop.check()

    def fail(self, name: str, reason: str) -> None:
        self.report(Failure(name, reason))
        if self.strict:
            raise GplError(f"stopped at the first failure (--strict): {name}: {reason}", EXIT_SOME_FAILED)
        self.dest.fail(name, reason)
        self.stop.check()


def _open_journal(target: OutputTarget, mode: RunMode, identity: dict, keys: list[str]) -> tuple[Journal, bool]:
    """The unfinished run's journal (--resume, --update) or a new one; True when it is new."""
    directory = target.path + JOURNAL_SUFFIX
    shutil.rmtree(directory + TRASH_SUFFIX, ignore_errors=True)
    if os.path.isdir(directory):
        if mode.resume or mode.update:
            return Journal.reopen(directory, identity, keys, mode.checkpoint_rows), False
        if not target.overwrite:
            raise GplError(
                f"an unfinished run left {directory}: add --resume to finish it, or --overwrite to start over"
            )
        Journal(directory, keys).remove()
    files = output_files(target.path, target.format, keys)
    existing = [f for f in files if os.path.exists(f)]
    if existing and not (target.overwrite or mode.update):
        hint = " (it is complete: use --update to add new or changed files)" if mode.resume else ""
        raise GplError(f"output exists: {existing[0]}{hint}; use --overwrite to replace it")
    replaces = file_identity(files[-1]) if existing else None
    return Journal.create(directory, identity, keys, mode.checkpoint_rows, replaces=replaces), True


def _read_previous(target: OutputTarget, identity: dict, keys: list[str]) -> Embeddings | None:
    """--update: the existing output, checked to be a gpl output of the same settings (before any journal exists)."""

    last = output_files(target.path, target.format, keys)[-1]  # the file renamed into place last
    if not os.path.exists(last):
        return None
    old = read_embeddings(last)
    if old.stats is None:
        raise GplError(f"{target.path} records no file sizes and times; --update needs an .h5 or .npy output")
    recorded = {**old.metadata.get("config", {}), "weights_sha256": old.metadata.get("weights_sha256")}
    check_same_run(recorded, identity, target.path)
    return old


def _complete_output(target: OutputTarget, keys: list[str], identity: dict, names: set[bytes]) -> Embeddings | None:
    """The output on disk, if it is a gpl output of these settings that accounts for exactly `names`."""

    last = output_files(target.path, target.format, keys)[-1]
    if not os.path.exists(last):
        return None
    try:
        out = read_embeddings(last, keys=[])
    except GplError:
        return None
    recorded = {**out.metadata.get("config", {}), "weights_sha256": out.metadata.get("weights_sha256")}
    held = {encode_name(p) for p in out.paths} | {encode_name(p) for p, _ in out.failures}
    return out if recorded == identity and held == names else None


def _finished_output(journal: Journal, target: OutputTarget, identity: dict) -> Embeddings | None:
    """When the output on disk is not the file this run may replace: the output, if the journal's own
    run already completed it (a kill between its rename and the journal's removal), else a GplError."""
    current = file_identity(output_files(target.path, target.format, journal.keys)[-1])
    if current is None or list(current) == journal.replaces():
        return None
    done, failed = journal.index()
    out = _complete_output(target, journal.keys, identity, set(done) | set(failed))
    if out is None:
        raise GplError(f"{target.path} exists and is not the output of the unfinished run in {journal.directory}; "
                       "move it away, or use --overwrite to replace it and start over")
    return out


def _reuse_previous(journal: Journal, old: Embeddings, items: list[InputItem]) -> None:
    """--update: copy the rows of unchanged files from the existing output into the journal."""
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
    """Write every item's row (or failure) from the journal in input order; returns (rows, failures).

    Rows are copied out of their chunk as they are met and written ASSEMBLE_ROWS at a time, and
    only the last few chunks stay loaded, so memory does not grow with the run, whatever the
    order of rows in the journal (resumed and updated runs fill it out of input order).
    """
    rows, failures = journal.index()
    load = functools.lru_cache(maxsize=4)(journal.chunk)
    names: list[str] = []
    vectors: dict[str, list[np.ndarray]] = {k: [] for k in journal.keys}
    stats: list[tuple[int, int]] = []

    def flush() -> None:
        if names:
            writer.write(names, {k: np.stack(v) for k, v in vectors.items()}, stats)
            names.clear()
            stats.clear()
            for v in vectors.values():
                v.clear()

    n_rows = n_failed = 0
    for item in items:
        key = encode_name(item.name)
        if key in rows:
            c, r = rows[key]
            chunk = load(c)
            names.append(item.name)
            for k, v in vectors.items():
                v.append(chunk[k][r].copy())  # a copy, so the chunk itself can be dropped
            stats.append(tuple(chunk["stats"][r]))
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


def _prepare(config: EmbedConfig, images: int, options: RunOptions, backbone: Backbone | None,
             quiet: bool) -> tuple[Embedder, RunSettings, Engine]:
    """The run's settings (resolved once, with the plan for this machine), its Embedder and its Engine."""
    if options.engine not in ENGINES:
        raise GplError(f"unknown engine {options.engine!r}; valid: {', '.join(ENGINES)}")
    if options.engine == "ray":
        from gpl_cli.ray_engine import import_ray

        import_ray()  # not installed: say how to install it before the model loads
    # With Ray the model runs in actors on the cluster's devices; the driver's copy stays on the CPU.
    settings = resolve_settings("cpu" if options.engine == "ray" else options.device, config.precision,
                                options.workers, options.batch_size, options.timeout, images)
    backbone = backbone or load_backbone(config.backbone, config.weights, config.layer)
    settings = settings.planned(plan_run(backbone, settings, options.batch_size, images, quiet))
    embedder = build_embedder(config, settings.device, backbone, channels_last=settings.channels_last)
    return embedder, settings, engine_for(embedder, options)


class MemorySink:
    """A Sink that keeps every row and failure in memory, to become an Embeddings."""

    def __init__(self, keys: list[str]):
        self.names: list[str] = []
        self.vectors: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        self.stats: list[tuple[int, int]] = []
        self.failures: list[tuple[str, str]] = []

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats=None) -> None:
        self.names.extend(names)
        for key, rows in vectors.items():
            self.vectors[key].append(rows)
        self.stats.extend(stats or [(-1, -1)] * len(names))

    def fail(self, name: str, reason: str) -> None:
        self.failures.append((name, reason))

    def embeddings(self, dims: dict[str, int], metadata: dict, summary: Summary) -> Embeddings:
        vectors = {k: np.concatenate(v) if v else np.zeros((0, dims[k]), np.float32) for k, v in self.vectors.items()}
        return Embeddings(self.names, vectors, metadata, self.failures,
                          np.array(self.stats, dtype=np.int64).reshape(-1, 2), summary)


def embed_in_memory(
    config: EmbedConfig,
    inputs: InputList,
    options: RunOptions,
    quiet: bool = False,
    backbone: Backbone | None = None,
    strict: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_failure: Callable[[Failure], None] | None = None,
) -> Embeddings:
    """Embed every input into memory (no file, no journal): what `gpl_cli.embed` returns.

    The rows, failures, metadata and Summary are those `run_embed` would write for the same options.
    In the main thread Ctrl-C and SIGTERM stop the run after the batch in hand (Interrupted).
    """
    embedder, settings, engine = _prepare(config, len(inputs.items), options, backbone, quiet)
    memory = MemorySink(list(embedder.dims))
    stop = _StopRequest()
    in_main = threading.current_thread() is threading.main_thread()
    with stop.installed() if in_main else nullcontext():
        summary = _run_engine(engine, inputs.items, memory, settings, RunMode(strict=strict), len(inputs.items), stop,
                              on_progress, on_failure)
    summary = replace(summary, plan=settings.plan)
    # through JSON, as a file records it (lists, not tuples), so memory and file metadata compare equal
    metadata = json.loads(json.dumps(build_metadata(config, embedder, inputs, summary, options.engine)))
    return memory.embeddings(embedder.dims, metadata, summary)


def run_embed(
    config: EmbedConfig,
    inputs: InputList,
    target: OutputTarget,
    options: RunOptions,
    quiet: bool = False,
    mode: RunMode | None = None,
    backbone: Backbone | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_failure: Callable[[Failure], None] | None = None,
) -> Summary:
    """Embed every input into `target`; failures are recorded in the file and passed to `on_failure`.

    `on_progress("embed", done, total)` follows the run (resumed rows count as done from the start);
    `quiet` only silences the note logged before a tuning probe.
    """
    feedback = (on_progress, on_failure)
    mode = mode or RunMode()
    check_output_location(target.path, target.format, [s.key for s in config.pool_specs()],
                          [it.path for it in inputs.items])  # before the model loads
    check_shard_rows(target)
    embedder, settings, engine = _prepare(config, len(inputs.items), options, backbone, quiet)
    identity = run_identity(config, embedder.backbone)

    if target.path == STDOUT:
        if mode.resume or mode.update:
            raise GplError("--resume and --update need an output file, not stdout")
        writer = open_writer(target.path, target.format, embedder.dims)
        try:
            with _StopRequest().installed() as stop:
                summary = _run_engine(engine, inputs.items, writer, settings, mode, len(inputs.items), stop, *feedback)
        except BaseException:
            writer.abort()
            raise
        summary = replace(summary, plan=settings.plan)
        writer.close(build_metadata(config, embedder, inputs, summary, options.engine))
        return summary

    # The stop handlers stay installed until the output is complete: a signal that arrives during
    # assembly lets it finish (seconds) instead of killing the process half-way.
    keys = list(embedder.dims)
    with OutputLock(target.path), _StopRequest().installed() as stop:
        previous = _read_previous(target, identity, keys) if mode.update else None
        if mode.resume and not os.path.isdir(target.path + JOURNAL_SUFFIX):  # killed after it had finished?
            finished = _complete_output(target, keys, identity, {encode_name(it.name) for it in inputs.items})
            if finished is not None:
                return _already_complete(finished, embedder, settings.plan)
        journal, new = _open_journal(target, mode, identity, keys)
        finished = None if new else _finished_output(journal, target, identity)
        if finished is not None:
            journal.remove()
            return _already_complete(finished, embedder, settings.plan)
        try:
            summary = _embed_into(journal, engine, inputs, settings, mode, stop, previous, feedback)
        except BaseException:
            journal.flush()
            if new and journal.is_empty():  # nothing finished: leave nothing behind
                journal.remove()
            raise
        summary = _write_output(journal, inputs, target, embedder, config, replace(summary, plan=settings.plan),
                                options.engine)
        journal.remove()
    return summary


def _already_complete(out: Embeddings, embedder: Embedder, plan: str) -> Summary:
    return Summary(embedded=len(out), failed=len(out.failures), reused=len(out), dims=embedder.dims,
                   plan=plan, execution="already complete: the interrupted run had written the output")


def _embed_into(journal: Journal, engine: Engine, inputs: InputList, settings: RunSettings, mode: RunMode,
                stop: _StopRequest, previous: Embeddings | None, feedback) -> Summary:
    """Every input not yet in the journal (after --update's reused rows) through the engine."""
    if previous is not None:
        _reuse_previous(journal, previous, inputs.items)
    done, failed = journal.index()
    todo = [it for it in inputs.items if encode_name(it.name) not in done and encode_name(it.name) not in failed]
    try:
        summary = _run_engine(engine, todo, journal, settings, mode, len(inputs.items), stop, *feedback)
    except Interrupted as exc:
        journal.flush()
        saved = ("nothing was finished yet" if journal.is_empty() else
                 f"finished work is saved in {journal.directory}. Run the same command with --resume to finish it")
        raise Interrupted(f"interrupted; {saved}.", exc.exit_code) from None
    journal.flush()
    return replace(summary, reused=sum(1 for it in inputs.items if encode_name(it.name) in done))


def engine_for(embedder: Embedder, options: RunOptions) -> Engine:
    """What runs the batches: the Embedder itself, or the same Embedder scheduled on Ray (--engine ray)."""
    if options.engine == "ray":
        from gpl_cli.ray_engine import RayEmbedder, RayOptions

        return RayEmbedder(embedder, options.ray or RayOptions(), options.device)
    return embedder


def check_shard_rows(target: OutputTarget) -> None:
    if target.shard_rows is not None and not is_sharded(target.path, target.format):
        raise GplError("--shard-rows applies to --format shards (or parquet) only")


def _run_engine(engine: Engine, todo: list[InputItem], dest: Sink, settings: RunSettings,
                mode: RunMode, total: int, stop: _StopRequest, on_progress, on_failure) -> Summary:
    """The engine over `todo`, progress counted over all `total` inputs; SIGINT/SIGTERM (seen by `stop`)
    end it as Interrupted."""
    done = total - len(todo)

    def progress(images: int) -> None:
        nonlocal done
        done += images
        on_progress("embed", done, total)

    if on_progress:
        on_progress("embed", done, total)
    report = on_failure or (lambda failure: None)
    try:
        return engine.run(todo, _Sink(dest, mode.strict, report, stop), settings,
                          on_progress=progress if on_progress else None)
    except (KeyboardInterrupt, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and stop.signum is None:
            raise  # not an interruption (a DataLoader worker killed by the same signal is one)
        raise Interrupted("interrupted", 128 + (stop.signum or signal.SIGINT)) from None


def _write_output(journal, inputs, target, embedder, config, summary: Summary, engine: str) -> Summary:
    """Assemble the journal into the output file; the returned Summary counts the whole output, not
    only this run's own rows."""
    writer = open_writer(target.path, target.format, embedder.dims, overwrite=True, shard_rows=target.shard_rows)
    try:
        embedded, failed = assemble(journal, inputs.items, writer)
        summary = replace(summary, embedded=embedded, failed=failed)
        writer.close(build_metadata(config, embedder, inputs, summary, engine))
    except BaseException:
        writer.abort()
        raise
    return summary
