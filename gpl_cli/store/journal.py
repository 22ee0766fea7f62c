"""The run journal: finished rows saved beside the output in atomic chunks.

While `gpl embed` runs, results go to `<output>.gpl-journal/`: a `run.json` with the run's
identity and numbered `chunk-NNNNNN.npz` files, each written to a temporary name, synced and
renamed, so a kill at any moment leaves only whole chunks. `--resume` skips what the
journal holds; the output file is assembled from it, in input order, at the end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from gpl_cli.atomic import AtomicPath, atomic_file, remove_whole, reporting
from gpl_cli.errors import GplError
from gpl_cli.store.sink import encode_name

JOURNAL_SUFFIX = ".gpl-journal"
TRASH_SUFFIX = ".removing"  # a journal being deleted: never read, removed by the next run
BUILDING_SUFFIX = ".creating"  # a journal being created: never read, replaced by the next run
REPLACES_FILE = "replaces.json"
FLUSH_ROWS = 256
FLUSH_SECONDS = 5.0
TMP = ".tmp"  # a chunk being written (gpl_cli.atomic); never counted


def _bytes_array(values: list[bytes]) -> np.ndarray:
    return np.array(values, dtype=f"S{max([len(v) for v in values] + [1])}")


@dataclass
class _Pending:
    names: list[bytes] = field(default_factory=list)
    vectors: dict[str, list[np.ndarray]] = field(default_factory=dict)
    stats: list[tuple[int, int]] = field(default_factory=list)
    fail_names: list[bytes] = field(default_factory=list)
    fail_reasons: list[bytes] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names) + len(self.fail_names)


class Journal:
    """An append-only store of finished rows and failures, safe against kills."""

    def __init__(self, directory: str, keys: list[str], flush_rows: int = FLUSH_ROWS):
        self.directory = directory
        self.keys = keys
        self.flush_rows = flush_rows  # a kill loses at most this many finished rows (or FLUSH_SECONDS of work)
        self._pending = _Pending()
        self._last_flush = time.monotonic()
        self._next = len(self._chunk_files()) + 1
        self._indexed: list[str] = []

    # --- lifecycle ---------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str, identity: dict, keys: list[str], flush_rows: int = FLUSH_ROWS,
               replaces: list | None = None) -> Journal:
        """A new journal. `replaces`: the identity of the output file this run may replace when it
        finishes (one that existed and was handed over by --overwrite or --update), else None."""
        folder = AtomicPath(directory, suffix=BUILDING_SUFFIX)  # appears under its name whole, or not at all
        folder.discard()  # a kill while an earlier run was creating it
        with reporting(directory):
            os.makedirs(folder.partial)
        try:
            with atomic_file(os.path.join(folder.partial, REPLACES_FILE), overwrite=True, suffix=TMP) as f:
                f.write(json.dumps(replaces).encode())
            with atomic_file(os.path.join(folder.partial, "run.json"), overwrite=True, suffix=TMP) as f:
                f.write(json.dumps(identity, indent=1).encode())
            folder.commit()
        except BaseException:
            folder.discard()
            raise
        return cls(directory, keys, flush_rows)

    @classmethod
    def reopen(cls, directory: str, identity: dict, keys: list[str], flush_rows: int = FLUSH_ROWS) -> Journal:
        with open(os.path.join(directory, "run.json"), encoding="utf-8") as f:
            recorded = json.load(f)
        check_same_run(recorded, identity, directory)
        for name in os.listdir(directory):
            if name.endswith(TMP):  # a chunk that a kill interrupted: never counted
                os.remove(os.path.join(directory, name))
        return cls(directory, keys, flush_rows)

    def replaces(self) -> list | None:
        """The identity of the existing output this run was allowed to replace (see create)."""
        try:
            with open(os.path.join(self.directory, REPLACES_FILE), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def is_empty(self) -> bool:
        return not len(self._pending) and not self._chunk_files()

    def remove(self) -> None:
        """Gone at once for any later run (gpl_cli.atomic.remove_whole)."""
        remove_whole(self.directory, TRASH_SUFFIX)

    # --- the Sink interface (gpl_cli.store.sink.Sink) -------------------------------------

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats: list[tuple[int, int]] | None = None) -> None:
        p = self._pending
        p.names.extend(encode_name(n) for n in names)
        for key in self.keys:
            p.vectors.setdefault(key, []).append(vectors[key])
        p.stats.extend(stats or [(-1, -1)] * len(names))
        self._maybe_flush()

    def fail(self, name: str, reason: str) -> None:
        self._pending.fail_names.append(encode_name(name))
        self._pending.fail_reasons.append(reason.encode("utf-8"))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._pending) >= self.flush_rows or time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Make everything received so far durable as one chunk."""
        p = self._pending
        self._last_flush = time.monotonic()
        if not len(p):
            return
        arrays = {
            "names": _bytes_array(p.names),
            "stats": np.array(p.stats, dtype=np.int64).reshape(-1, 2),
            "fail_names": _bytes_array(p.fail_names),
            "fail_reasons": _bytes_array(p.fail_reasons),
        }
        for i, key in enumerate(self.keys):
            arrays[f"v{i}"] = np.concatenate(p.vectors[key]) if p.vectors.get(key) else np.zeros((0, 0), np.float32)
        path = os.path.join(self.directory, f"chunk-{self._next:06d}.npz")
        try:
            with atomic_file(path, overwrite=True, suffix=TMP) as f:
                np.savez(f, **arrays)
        except GplError as exc:  # the system refused the write (gpl_cli.atomic.write_failed)
            self._pending = _Pending()  # not retried by the cleanup after this error: a resume embeds these again
            if not self._chunk_files():
                raise
            raise GplError(f"{exc}; the rows finished before it are kept in {self.directory}: once the disk has room, "
                           "run the same command with --resume to finish the run", exc.exit_code) from None
        self._next += 1
        self._pending = _Pending()

    # --- reading back ------------------------------------------------------------------

    def _chunk_files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.directory) if n.startswith("chunk-") and n.endswith(".npz"))

    def index(self) -> tuple[dict[bytes, tuple[int, int]], dict[bytes, str]]:
        """Where each finished name's row lives (chunk number, row) and the recorded failures. A name
        recorded again (a file embedded anew after it changed) counts by its latest record only."""
        rows: dict[bytes, tuple[int, int]] = {}
        failures: dict[bytes, str] = {}
        self._indexed = self._chunk_files()  # the chunk numbers given out refer to this listing
        for c, name in enumerate(self._indexed):
            with np.load(os.path.join(self.directory, name)) as z:
                for r, n in enumerate(z["names"]):
                    rows[bytes(n)] = (c, r)
                    failures.pop(bytes(n), None)
                for n, reason in zip(z["fail_names"], z["fail_reasons"]):
                    failures[bytes(n)] = bytes(reason).decode("utf-8")
                    rows.pop(bytes(n), None)
        return rows, failures

    def stats(self) -> dict[bytes, tuple[int, int]]:
        """Each finished name's file (size, mtime_ns) as recorded with its latest row ((-1, -1): unknown)."""
        recorded: dict[bytes, tuple[int, int]] = {}
        for name in self._chunk_files():
            with np.load(os.path.join(self.directory, name)) as z:
                recorded.update(zip(map(bytes, z["names"]), map(tuple, z["stats"].tolist())))
        return recorded

    def chunk(self, number: int) -> dict[str, np.ndarray]:
        """The vectors and stats of chunk `number`, as numbered by the last index()."""
        with np.load(os.path.join(self.directory, self._indexed[number])) as z:
            out = {key: z[f"v{i}"] for i, key in enumerate(self.keys)}
            out["stats"] = z["stats"]
            return out


def check_same_run(recorded: dict, current: dict, where: str) -> None:
    """Refuse to mix results of different options or weights in one output."""
    differences = [
        f"{k}: {recorded.get(k)!r} there, {current.get(k)!r} now"
        for k in sorted(set(recorded) | set(current))
        if recorded.get(k) != current.get(k)
    ]
    if differences:
        raise GplError(f"{where} was made with other settings; refusing to mix them in one output:\n  " + "\n  ".join(differences))
