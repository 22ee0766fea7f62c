"""`Job`: the one way gpl runs the model, for every command (embed, compare, neighbors' query images,
the probe's map pass, classify, explain).

A Job resolves the run settings once (device, precision, workers, the batch size and layout planned for
this machine), loads the backbone, builds the pure Embedder and chooses the engine (local or Ray). Its
`run` feeds any Sink in input order with signals handled (Ctrl-C and SIGTERM stop after the batch in
hand), `--strict`, progress and failure callbacks. Two destinations are built in:

- `embeddings`: every row in memory (what `gpl_cli.embed` returns);
- `write`: an Output (gpl_cli.store.output; gpl_cli.embedding.run.embed_into is all of `gpl embed`). Rows go to a journal beside the output as they are made
  (gpl_cli.store.journal); the output is assembled from it in input order only when every input has
  been handled. This is what makes `--resume` (finish an interrupted run) and `--update` (embed only
  new or changed files) exact: both only change which inputs the engine still has to see.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import UTC, datetime
from importlib.metadata import version

import numpy as np

from gpl_cli.atomic import refuse_existing
from gpl_cli.embedding.calibration import Recorded, calibration_for
from gpl_cli.embedding.config import EmbedConfig, RayOptions, RunMode, RunOptions
from gpl_cli.embedding.embedder import Embedder, build_embedder
from gpl_cli.embedding.engine import Engine, Summary
from gpl_cli.embedding.images import Failure, file_identity
from gpl_cli.embedding.inputs import InputItem, InputList
from gpl_cli.embedding.settings import resolve_settings
from gpl_cli.embedding.sources import keep_fields
from gpl_cli.embedding.tuning import plan_run
from gpl_cli.errors import EXIT_SOME_FAILED, GplError
from gpl_cli.models.backbones import Backbone, load_backbone
from gpl_cli.models.openvino import Unconvertible, is_cached
from gpl_cli.models.quantize import int8_parts
from gpl_cli.pooling.scales import scale_key
from gpl_cli.store.embeddings import Embeddings, MemorySink
from gpl_cli.store.formats import read_embeddings
from gpl_cli.store.journal import Journal, check_same_run
from gpl_cli.store.output import Output
from gpl_cli.store.sink import Sink, Writer, encode_name
from gpl_cli.version import __version__

ASSEMBLE_ROWS = 1024
log = logging.getLogger(__name__)


class Interrupted(GplError):
    """Ctrl-C or SIGTERM: finished work is saved, the message says how to resume."""


def versions() -> dict[str, str]:
    """The libraries a file was made with, read from their installed metadata: importing torchvision
    and timm only to read their versions would cost a second of every run that needs neither."""
    import torch

    return {"gpl": __version__, "torch": torch.__version__, "torchvision": version("torchvision"), "timm": version("timm")}


def build_metadata(config: EmbedConfig, embedder: Embedder, inputs: InputList, summary: Summary,
                   engine: str = "local") -> dict:
    whitened = embedder.whitenings
    pools = {s.key: {"op": s.op, "params": s.all_params(),
                     **({"whiten": whitened[s.key].describe()} if s.key in whitened else {})} for s in embedder.specs}
    if embedder.per_scale:  # each pooling's raw vectors at each scale (Embedder)
        pools = {scale_key(key, scale): {**p, "scale": scale} for key, p in pools.items() for scale in embedder.scales}
    return {
        **embedder.backbone.metadata(),
        "preprocess": embedder.preprocess.as_dict(),
        "scales": list(embedder.scales),
        **({"per_scale": True} if embedder.per_scale else {}),
        "pool_keys": list(pools),
        "pools": {key: {**p, "dim": summary.dims[key]} for key, p in pools.items()},
        "normalize": config.normalize,
        "power": config.power,
        "config": config.as_dict(),
        "engine": engine,
        "runtime": embedder.runtime,
        **({"int8": embedder.int8} if embedder.int8 else {}),
        "root": inputs.root,
        "count": summary.embedded,
        "failed": summary.failed,
        "seconds": round(summary.seconds, 3),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
    }


def numerics(precision: str, runtime: str, int8: dict | None = None) -> dict:
    """The part of a run's identity the runtime makes. In float32 torch and OpenVINO give the same vectors within
    gpl_cli.models.openvino.TOLERANCE (tests/unit/models/test_openvino.py), so their rows may share a file; below
    float32 each runtime rounds its own way, and its rows stay with their own; int8 rows with those of a model
    quantized on the same calibration sample (`int8`: Embedder.int8, as metadata records it)."""
    if precision == "fp32":
        return {}
    return {"runtime": runtime, **({"calibration": (int8 or {}).get("calibration_identity")} if precision == "int8" else {})}


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the run stops cleanly after the batch in hand.

    Raising from the signal handler itself could land anywhere (in a finaliser, where it is
    swallowed); a flag checked between batches cannot be lost. A second Ctrl-C acts at once.
    """

    def __init__(self):
        self.signum: int | None = None
        self._depth = 0

    def __call__(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted("interrupted", 128 + self.signum)

    @contextmanager
    def installed(self):
        """The handlers, for the block (nested blocks keep the outer ones; signals reach the main thread only)."""
        if self._depth or threading.current_thread() is not threading.main_thread():
            with nullcontext():
                yield self
            return
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
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


class Job:
    """The model, ready to run: settings resolved once, backbone, Embedder and engine (module docstring).

    `images`: how many images the run will see (the plan and the worker count depend on it).
    `backbone`: an already loaded backbone to reuse; it must be the one the config names.
    `flattened`: the trunk's whole map instead of the poolings (the linear probe's second pass).
    `per_scale`: each pooling's raw vectors at each of the config's scales, uncombined and not post-processed,
    under the keys f"{pooling key}@{scale}" (the contract is Embedder's); for `embeddings` only, not `write`.
    `on_progress("embed", done, total)` and `on_failure(Failure)` follow the run; nothing is printed.
    """

    def __init__(self, config: EmbedConfig, options: RunOptions | None = None, images: int = 0, *,
                 backbone: Backbone | None = None, flattened: bool = False, per_scale: bool = False,
                 strict: bool = False,
                 on_progress: Callable[[str, int, int], None] | None = None,
                 on_failure: Callable[[Failure], None] | None = None):
        options = options or RunOptions()
        config.check()
        options.check(config)  # bounds by what the machine can hold: before anything loads
        on_ray = options.engine == "ray"
        if on_ray:
            from gpl_cli.embedding.ray import import_ray

            import_ray()  # not installed: say how to install it before the model loads
        # With Ray the model runs in actors on the cluster's devices; the driver's copy stays on the CPU.
        settings = resolve_settings("cpu" if on_ray else options.device, config.precision, options.workers,
                                    options.batch_size, options.timeout, images, options.runtime)
        backbone = backbone or load_backbone(config.backbone, config.weights, config.layer)
        self.settings = settings.planned(plan_run(backbone, settings, options.batch_size, images))
        build = functools.partial(build_embedder, config, settings.device, backbone, flattened=flattened,
                                  per_scale=per_scale)
        try:
            self.embedder = build(channels_last=self.settings.channels_last, runtime=self.settings.runtime)
        except Unconvertible as exc:
            if settings.runtime != "auto":
                raise GplError(f"--runtime openvino: {backbone.name}: {exc}") from None
            log.warning("%s runs on torch: %s", backbone.name, exc)
            settings = replace(settings, runtime="torch")
            self.settings = settings.planned(plan_run(backbone, settings, options.batch_size, images))
            self.embedder = build(channels_last=self.settings.channels_last, runtime="torch")
        self.engine = self._engine(options)
        self.config, self.options, self.strict = config, options, strict
        self.on_progress, self.on_failure = on_progress, on_failure
        self._stop = _StopRequest()

    def _engine(self, options: RunOptions) -> Engine:
        if options.engine == "ray":
            from gpl_cli.embedding.ray import RayEngine

            return RayEngine(self.embedder, options.ray or RayOptions(), options.device)
        from gpl_cli.embedding.local import LocalEngine

        return LocalEngine(self.embedder)

    @property
    def identity(self) -> dict:
        """What must be equal for rows of two runs to belong in one file: below fp32 the runtime too (numerics)."""
        return json.loads(json.dumps({**self.config.as_dict(), "weights_sha256": self.embedder.backbone.weights_sha256,
                                      **numerics(self.config.precision, self.embedder.runtime, self.embedder.int8)}))

    def metadata(self, inputs: InputList, summary: Summary) -> dict:
        """What an output records about the run, JSON-ready."""
        return json.loads(json.dumps(build_metadata(self.config, self.embedder, inputs, summary, self.options.engine)))

    # --- running ----------------------------------------------------------------------------

    def quantize(self, items: list[InputItem], previous: dict | None = None) -> None:
        """int8: the model quantized (or read from the cache) on --calibration DIR, else on up to a few hundred
        of `items`, the run's whole input list; once per Job, before anything runs (the sample's identity is
        part of the run's). `previous`: the int8 record of an output being updated, whose model is used
        where it is still cached (the sample drawn from the inputs changes as images are added)."""
        if self.config.precision != "int8" or self.embedder.int8 is not None:
            return
        if previous and is_cached(int8_parts(self.embedder.backbone, previous["calibration_identity"])):
            self.quantize_like(previous)
            return
        log.info(self.embedder.quantize(calibration_for(items, self.config.calibration)).describe())

    def quantize_like(self, record: dict | None) -> None:
        """int8: the cached model a file was made with (`record`: its "int8" metadata), so that new images are
        embedded like its rows; a GplError where it is not cached here."""
        if not record or not is_cached(int8_parts(self.embedder.backbone, record.get("calibration_identity"))):
            origin = f" (calibrated on {record['calibration']})" if record and "calibration" in record else ""
            raise GplError(f"the int8 model the file was made with{origin} is not in this machine's cache, so "
                           "images cannot be embedded like its rows; query with paths in the file")
        self.embedder.quantize(Recorded(record["calibration_identity"], record["calibration"]))

    def run(self, items: list[InputItem], sink: Sink, total: int | None = None) -> Summary:
        """Every item through the engine into `sink`, in input order. Progress counts over `total` inputs
        (the ones not in `items` are done already). In the main thread SIGINT and SIGTERM stop the run
        after the batch in hand (Interrupted)."""
        self.quantize(items)
        total = len(items) if total is None else total
        done = total - len(items)
        on_progress = self.on_progress

        def progress(images: int) -> None:
            nonlocal done
            done += images
            on_progress("embed", done, total)

        if on_progress:
            on_progress("embed", done, total)
        report = self.on_failure or (lambda failure: None)
        unreadable = [it for it in items if it.error]  # folders the walk could not read: failures, not images
        items = [it for it in items if not it.error]
        with self._stop.installed():
            try:
                feed = _Sink(sink, self.strict, report, self._stop)
                for item in unreadable:
                    feed.fail(item.name, item.error)
                if unreadable and on_progress:
                    progress(len(unreadable))
                with warnings.catch_warnings():
                    # torch's advice on more loader processes than cores: gpl bounds --workers itself (config.py)
                    warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
                    summary = self.engine.run(items, feed, self.settings, on_progress=progress if on_progress else None)
            except (KeyboardInterrupt, RuntimeError) as exc:
                if isinstance(exc, RuntimeError) and self._stop.signum is None:
                    raise  # not an interruption (a DataLoader worker killed by the same signal is one)
                raise Interrupted("interrupted", 128 + (self._stop.signum or signal.SIGINT)) from None
        return replace(summary, failed=summary.failed + len(unreadable), plan=self.settings.plan,
                       runtime=self.embedder.runtime)

    def embeddings(self, inputs: InputList) -> Embeddings:
        """Every input embedded into memory (no file, no journal): what `gpl_cli.embed` returns. The rows,
        failures, metadata and Summary are those `write` would write for the same options."""
        memory = MemorySink(list(self.embedder.dims))
        summary = self.run(inputs.items, memory)
        return memory.embeddings(self.embedder.dims, self.metadata(inputs, summary), summary)

    def write(self, inputs: InputList, output: Output, mode: RunMode | None = None) -> Summary:
        """Embed every input into `output`; failures are recorded in it and passed to `on_failure`. The
        output's location was checked (Output.check) before the Job loaded the model."""
        mode = mode or RunMode()
        # from every input, not only the ones a --resume or --update still embeds
        self.quantize(inputs.items, _int8_record(output.marker) if mode.update else None)
        if self.embedder.per_scale:
            raise ValueError("per-scale vectors are for analysis in memory (Job.embeddings), not for an output file")
        output = replace(output, keys=tuple(self.embedder.dims))  # the files of an NPY output follow the poolings
        if output.to_stdout:
            if mode.resume or mode.update:
                raise GplError("--resume and --update need an output file, not stdout")
            writer = keep_fields(output.open_writer(self.embedder.dims), inputs)
            try:
                summary = self.run(inputs.items, writer)
            except BaseException:
                writer.abort()
                raise
            writer.close(build_metadata(self.config, self.embedder, inputs, summary, self.options.engine))
            return summary
        # The stop handlers stay installed until the output is complete: a signal that arrives during
        # assembly lets it finish (seconds) instead of killing the process half-way.
        with output.lock(), self._stop.installed():
            summary = _JournalRun(self, inputs, output, mode).finish()
        if self._stop.signum is not None:  # it came during assembly: the output is whole, and the command still stops
            raise Interrupted(f"interrupted; {output.path} was completed first", 128 + self._stop.signum)
        return summary


def _int8_record(path: str) -> dict | None:
    """The int8 record (calibration, agreement) of the output at `path`, if it is a readable gpl output that has one."""
    if not os.path.exists(path):
        return None
    try:
        return read_embeddings(path, keys=[]).metadata.get("int8")
    except GplError:
        return None


class _JournalRun:
    """One `Job.write` into a file output: the journal opened (new, resumed or updated), the rest embedded,
    the output assembled in input order and the journal removed."""

    def __init__(self, job: Job, inputs: InputList, output: Output, mode: RunMode):
        self.job, self.inputs, self.output, self.mode = job, inputs, output, mode
        self.identity = job.identity
        self.keys = list(job.embedder.dims)

    def finish(self) -> Summary:
        output, mode = self.output, self.mode
        previous = self._read_previous() if mode.update else None
        if mode.resume and not output.unfinished():  # killed after it had finished?
            finished = self._complete({encode_name(it.name) for it in self.inputs.items})
            if finished is not None:
                return self._already_complete(finished)
        journal, new = self._open_journal()
        finished = None if new else self._finished_by(journal)
        if finished is not None:
            journal.remove()
            return self._already_complete(finished)
        try:
            summary = self._embed_into(journal, previous)
        except BaseException:
            journal.flush()
            if new and journal.is_empty():  # nothing finished: leave nothing behind
                journal.remove()
            raise
        summary = self._assemble(journal, summary)
        journal.remove()
        return summary

    def _recorded(self, out: Embeddings) -> dict:
        config = out.metadata.get("config", {})
        return {**config, "weights_sha256": out.metadata.get("weights_sha256"),
                **numerics(config.get("precision", "fp32"), out.metadata.get("runtime", "torch"), out.metadata.get("int8"))}

    def _open_journal(self) -> tuple[Journal, bool]:
        """The unfinished run's journal (--resume, --update) or a new one; True when it is new."""
        output, mode = self.output, self.mode
        if output.unfinished():
            if mode.resume or mode.update:
                return Journal.reopen(output.journal, self.identity, self.keys, mode.checkpoint_rows), False
            if not output.overwrite:
                raise GplError(f"an unfinished run left {output.journal}: add --resume to finish it, "
                               "or --overwrite to start over")
            Journal(output.journal, self.keys).remove()
        existing = output.exists()
        if not mode.update:
            refuse_existing(output.files, output.overwrite, self._nothing_to_resume() if mode.resume else "")
        replaces = file_identity(output.marker) if existing else None
        return Journal.create(output.journal, self.identity, self.keys, mode.checkpoint_rows, replaces=replaces), True

    def _read_previous(self) -> Embeddings | None:
        """--update: the existing output, checked to be a gpl output of the same settings (before any journal exists)."""
        if not os.path.exists(self.output.marker):
            return None
        old = read_embeddings(self.output.marker)
        if old.stats is None:
            raise GplError(f"{self.output.path} records no file sizes and times; --update needs an .h5 or .npy output")
        check_same_run(self._recorded(old), self.identity, self.output.path)
        return old

    def _on_disk(self) -> Embeddings | None:
        """The output on disk (no vectors loaded), or None when there is none or it is not a readable gpl output."""
        if not os.path.exists(self.output.marker):
            return None
        try:
            return read_embeddings(self.output.marker, keys=[])
        except GplError:
            return None

    def _complete(self, names: set[bytes]) -> Embeddings | None:
        """The output on disk, if it is a gpl output of these settings that accounts for exactly `names`."""
        out = self._on_disk()
        if out is None:
            return None
        held = {encode_name(p) for p in out.paths} | {encode_name(p) for p, _ in out.failures}
        return out if self._recorded(out) == self.identity and held == names else None

    def _nothing_to_resume(self) -> str:
        """Why --resume refuses an existing output that no unfinished run left, for its message."""
        out = self._on_disk()
        if out is None:
            return " (no unfinished run to resume: it is not a gpl output)"
        if self._recorded(out) != self.identity:
            return " (no unfinished run to resume: it was made with other settings)"
        return " (it is complete: use --update to add new or changed files)"

    def _finished_by(self, journal: Journal) -> Embeddings | None:
        """When the output on disk is not the file this run may replace: the output, if the journal's own
        run already completed it (a kill between its rename and the journal's removal), else a GplError."""
        current = file_identity(self.output.marker)
        if current is None or list(current) == journal.replaces():
            return None
        done, failed = journal.index()
        out = self._complete(set(done) | set(failed))
        if out is None:
            raise GplError(f"{self.output.path} exists and is not the output of the unfinished run in "
                           f"{journal.directory}; move it away, or use --overwrite to replace it and start over")
        return out

    def _already_complete(self, out: Embeddings) -> Summary:
        return Summary(embedded=len(out), failed=len(out.failures), reused=len(out), dims=self.job.embedder.dims,
                       plan=self.job.settings.plan, runtime=self.job.embedder.runtime,
                       execution="already complete: the interrupted run had written the output")

    def _embed_into(self, journal: Journal, previous: Embeddings | None) -> Summary:
        """Every input not yet in the journal (after --update's reused rows) through the engine."""
        items = self.inputs.items
        if previous is not None:
            _reuse_previous(journal, previous, items)
        done, failed = journal.index()
        changed = _changed_since(journal, items, done)
        if not self.mode.update:  # --update may drop rows and embed files anew; resuming may not
            _check_same_inputs(journal, items, done, changed)
        items = _keep_unreadable(items, done)
        self.inputs = replace(self.inputs, items=items)  # what is assembled: kept rows included
        todo = [it for it in items if it.name in changed
                or (encode_name(it.name) not in done and encode_name(it.name) not in failed)]
        try:
            summary = self.job.run(todo, journal, total=len(items))
        except Interrupted as exc:
            journal.flush()
            saved = ("nothing was finished yet" if journal.is_empty() else
                     f"finished work is saved in {journal.directory}. Run the same command with --resume to finish it")
            raise Interrupted(f"interrupted; {saved}.", exc.exit_code) from None
        journal.flush()
        return replace(summary, reused=sum(1 for it in items if encode_name(it.name) in done and it.name not in changed))

    def _assemble(self, journal: Journal, summary: Summary) -> Summary:
        """The journal assembled into the output; the returned Summary counts the whole output, not only
        this run's own rows."""
        job = self.job
        writer = keep_fields(self.output.open_writer(job.embedder.dims, replace=True), self.inputs)
        try:
            embedded, failed = assemble(journal, self.inputs.items, writer)
            summary = replace(summary, embedded=embedded, failed=failed)
            writer.close(build_metadata(job.config, job.embedder, self.inputs, summary, job.options.engine))
        except BaseException:
            writer.abort()
            raise
        return summary


def _changed_since(journal: Journal, items: list[InputItem], done: dict[bytes, tuple[int, int]]) -> set[str]:
    """The names of the listed files whose row in the journal was made from another size or time than the
    file has now (a file changed since, or another file of the same name)."""
    if not done:
        return set()
    recorded = journal.stats()
    unknown = (-1, -1)
    return {it.name for it in items if not it.error and recorded.get(encode_name(it.name), unknown) != unknown
            and recorded[encode_name(it.name)] != it.current_stat()}


def _check_same_inputs(journal: Journal, items: list[InputItem], done: dict[bytes, tuple[int, int]],
                       changed: set[str]) -> None:
    """--resume finishes the interrupted run over the same files: refused (before anything is embedded) when
    rows it finished are of files not among these inputs, or of files changed since, as finishing would drop
    or silently redo them."""
    listed = {encode_name(it.name) for it in items}
    hidden = _unreadable_folders(items)  # their rows are kept (_keep_unreadable)
    gone = sorted(name for name in (n.decode("utf-8", "surrogateescape") for n in done if n not in listed)
                  if not (hidden and name.startswith(hidden)))
    if not gone and not changed:
        return
    found = [f"{len(gone)} of the {len(done)} files it finished are not among them (e.g. {gone[0]})"] if gone else []
    if changed:
        found.append(f"{len(changed)} changed since it embedded them (e.g. {min(changed)})")
    raise GplError(f"these inputs differ from those of the unfinished run in {journal.directory}: {'; '.join(found)}. "
                   "To finish that run, give it the same inputs; or use --update to keep its rows of the unchanged "
                   "files given now and embed the rest, or --overwrite to start over")


def _unreadable_folders(items: list[InputItem]) -> tuple[str, ...]:
    """The name prefixes of the folders the walk could not read."""
    return tuple(os.path.join(it.name, "") for it in items if it.error)


def _reuse_previous(journal: Journal, old: Embeddings, items: list[InputItem]) -> None:
    """--update: copy the rows of unchanged files from the existing output into the journal, and those of
    every file under a folder this walk could not read (unknown whether it changed: never dropped)."""
    done, _ = journal.index()
    current = {it.name: it.current_stat() for it in items}
    hidden = _unreadable_folders(items)
    keep = [
        i for i, (name, stat) in enumerate(zip(old.paths, old.stats))
        if (current.get(name) == tuple(stat) or (hidden and name.startswith(hidden))) and encode_name(name) not in done
    ]
    for start in range(0, len(keep), ASSEMBLE_ROWS):
        rows = keep[start:start + ASSEMBLE_ROWS]
        journal.write([old.paths[i] for i in rows], {k: v[rows] for k, v in old.vectors.items()},
                      [tuple(old.stats[i]) for i in rows])
    journal.flush()


def _keep_unreadable(items: list[InputItem], rows: dict[bytes, tuple[int, int]]) -> list[InputItem]:
    """`items` with the journal's rows of files under a folder the walk could not read (kept by --update, or
    by the run being resumed), each placed right after its folder's failure, where the walk would have
    listed it."""
    if not _unreadable_folders(items):
        return items
    names = sorted((n.decode("utf-8", "surrogateescape") for n in rows), key=lambda name: name.split(os.sep))
    listed = {it.name for it in items}
    out: list[InputItem] = []
    for item in items:
        out.append(item)
        if item.error:
            prefix = os.path.join(item.name, "")
            out += [InputItem(item.path + name[len(item.name):], name) for name in names
                    if name.startswith(prefix) and name not in listed]
    return out


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
