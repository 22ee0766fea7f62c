"""NPY, gpl's own numpy-friendly format: one N x D .npy per pooling, a .paths.txt sidecar and a .json
with metadata, failures and the fields kept from the inputs (--keep-fields). Its file naming, its writer and its reader (a bare .npy on stdout is
written by gpl_cli.store.formats.streams)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from gpl_cli.atomic import AtomicPath, commit_all, refuse_existing, reporting
from gpl_cli.errors import GplError
from gpl_cli.store.embeddings import Embeddings, check_rows, require, wanted
from gpl_cli.store.formats.streams import NpyStreamWriter
from gpl_cli.store.sink import STDOUT, NpyStream, Writer, encode_name, line_name, safe_key


def output_files(path: str, keys: list[str]) -> list[str]:
    """Every file of an NPY output at `path`, the .json (renamed into place last) last."""
    stem = _npy_stem(path)
    return [*_npy_files(path, keys).values(), stem + ".paths.txt", stem + ".json"]


def _npy_stem(path: str) -> str:
    return path[:-4] if path.lower().endswith(".npy") else path


def _npy_files(path: str, keys: list[str]) -> dict[str, str]:
    return {key: path if len(keys) == 1 else f"{_npy_stem(path)}.{safe_key(key)}.npy" for key in keys}


def names_an_output(path: str) -> bool:
    """`-o out.npy` with several poolings wrote out.<pooling>.npy and out.json: the name given still opens it."""
    return path.lower().endswith(".npy") and os.path.isfile(path[:-4] + ".json")


def open_npy_writer(path: str, dims: dict[str, int], overwrite: bool = False) -> Writer:
    """An NPY output at `path`, or ("-") one bare array on stdout."""
    if path == STDOUT:
        return NpyStreamWriter(path, dims, overwrite)
    return NpyWriter(path, dims, overwrite)


class NpyWriter:
    """NPY: one N x D .npy per pooling, a .paths.txt sidecar and a .json with metadata and failures.

    One pooling writes exactly the named file; several write <stem>.<pooling>.npy each.
    Every file is written and synced before the first is renamed into place, the .json last
    (gpl_cli.atomic.commit_all): a failed write leaves the earlier output whole. The .json records
    each part's size and checksum ("parts"), so that readers refuse a set that a kill between two
    renames left mixed (read_npy).
    """

    keeps_failures = True

    def __init__(self, path: str, dims: dict[str, int], overwrite: bool = False):
        stem = _npy_stem(path)
        self.files = _npy_files(path, list(dims))
        self.paths_file, self.json_file = stem + ".paths.txt", stem + ".json"
        refuse_existing([*self.files.values(), self.paths_file, self.json_file], overwrite)
        self.targets = {key: AtomicPath(f, overwrite=True) for key, f in self.files.items()}
        self.sidecars = [AtomicPath(self.paths_file, overwrite=True), AtomicPath(self.json_file, overwrite=True)]
        self.streams: dict[str, NpyStream] = {}
        try:
            for key, t in self.targets.items():
                self.streams[key] = NpyStream(t.partial, dims[key], name=t.path)
        except BaseException:
            self.abort()
            raise
        self.names: list[str] = []
        self.stats: list[tuple[int, int]] = []
        self.failures: list[dict[str, str]] = []
        self.fields: dict[str, list[str]] = {}

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats: list[tuple[int, int]] | None = None,
              fields: dict[str, list[str]] | None = None) -> None:
        for name, values in (fields or {}).items():
            self.fields.setdefault(name, []).extend(values)
        for key, rows in vectors.items():
            self.streams[key].append(rows)
        self.names.extend(names)
        self.stats.extend([tuple(map(int, s)) for s in stats] if stats else [(-1, -1)] * len(names))

    def fail(self, name: str, reason: str) -> None:
        self.failures.append({"path": name, "reason": reason})

    def close(self, metadata: dict) -> list[str]:
        try:
            for stream in self.streams.values():
                stream.close()
            parts = {os.path.basename(f): {"bytes": os.path.getsize(self.targets[key].partial),
                                           "sha256": self.streams[key].sha256.hexdigest()}
                     for key, f in self.files.items()}
            # One name per line, written the one way line outputs write names (sink.line_name).
            lines = b"".join(encode_name(line_name(n)) + b"\n" for n in self.names)
            paths, meta = self.sidecars
            with reporting(paths.path), open(paths.partial, "wb") as f:
                f.write(lines)
            parts[os.path.basename(paths.path)] = {"bytes": len(lines), "sha256": hashlib.sha256(lines).hexdigest()}
            doc = dict(metadata, files={k: os.path.basename(v) for k, v in self.files.items()}, parts=parts,
                       paths=self.names, stats=self.stats, failures=self.failures,
                       **({"fields": self.fields} if self.fields else {}))
            with reporting(meta.path), open(meta.partial, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, ensure_ascii=True)
            commit_all([*self.targets.values(), *self.sidecars])
        except BaseException:
            self.abort()
            raise
        return [*self.files.values(), self.paths_file, self.json_file]

    def abort(self) -> None:
        for stream in self.streams.values():
            stream.abandon()
        for target in [*self.targets.values(), *self.sidecars]:
            target.discard()


def _existing_stem(path: str) -> str:
    """The stem of the NPY output that `path` (any of its .npy files, or its .json) belongs to."""
    stem = path[:-4] if path.lower().endswith(".npy") else path[:-5] if path.lower().endswith(".json") else path
    if not os.path.isfile(stem + ".json"):
        # A single-pooling output is named by the user; a multi-pooling one is <stem>.<key>.npy.
        stem = os.path.splitext(stem)[0]
    return stem


def files_of(path: str) -> list[str]:
    """Every file of the existing NPY output that `path` belongs to (what its .json lists), else `path` alone."""
    stem = _existing_stem(path)
    try:
        with open(stem + ".json", encoding="utf-8") as f:
            listed = json.load(f)["files"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [path]
    folder = os.path.dirname(stem)
    return [*(os.path.join(folder, str(name)) for name in listed), stem + ".paths.txt", stem + ".json"]


def read_npy(path: str, keys: list[str] | None = None) -> Embeddings:
    stem = _existing_stem(path)
    json_file = stem + ".json"
    if not os.path.isfile(json_file):
        raise GplError(f"{path}: no metadata file {json_file} beside it (not a gpl output, or an unfinished run)")
    with open(json_file, encoding="utf-8") as f:
        doc = json.load(f)
    require(isinstance(doc, dict), f"{json_file} is not a JSON object")
    folder = os.path.dirname(json_file)
    files, paths = doc.pop("files"), doc.pop("paths")
    require(isinstance(files, dict) and all(isinstance(v, str) and os.path.basename(v) == v for v in files.values()),
            f"{json_file}: 'files' is not a map of pooling to a file beside it")
    require(isinstance(paths, list) and all(isinstance(p, str) for p in paths), f"{json_file}: 'paths' is not a list of names")
    for name in files.values():  # every pooling's row count, also of those not loaded
        check_rows(np.load(os.path.join(folder, name), mmap_mode="r"), len(paths), name, f"{json_file} lists")
    parts = doc.pop("parts", None)  # absent in outputs of gpl before it recorded them
    paths_file = os.path.basename(stem) + ".paths.txt"
    if parts is not None:  # sizes always
        _check_parts(json_file, parts, dict.fromkeys([*files.values(), paths_file]))
    vectors = {key: np.load(os.path.join(folder, files[key])) for key in wanted(list(files), keys, path)}
    if parts is not None and vectors:  # the checksums of what was loaded, and of the paths beside them
        with open(os.path.join(folder, paths_file), "rb") as f:
            _check_parts(json_file, parts, {paths_file: f.read(), **{files[k]: v for k, v in vectors.items()}})
    failures = [(d["path"], d["reason"]) for d in doc.pop("failures")]
    stats = np.array(doc.pop("stats"), dtype=np.int64).reshape(-1, 2)
    fields = doc.pop("fields", {})
    return Embeddings(paths, vectors, doc, failures, stats, fields=fields)


def _check_parts(json_file: str, parts, contents: dict) -> None:
    """Refuse an NPY output whose files are not the ones its .json was written with: each file named in
    `contents` has the recorded size, and the recorded sha256 where its contents are given (an array's
    data bytes, or a file's bytes; None: the size alone)."""
    require(isinstance(parts, dict) and all(isinstance(parts.get(n), dict) for n in contents),
            f"{json_file}: 'parts' does not record every file of the output")
    folder = os.path.dirname(json_file)
    for name, loaded in contents.items():
        recorded = parts[name]
        try:
            size = os.path.getsize(os.path.join(folder, name))
        except OSError:
            size = None
        why = ("it is missing" if size is None else
               f"{size} bytes, the .json records {recorded.get('bytes')}" if size != recorded.get("bytes") else
               "its contents are not those the .json records"
               if loaded is not None and hashlib.sha256(loaded).hexdigest() != recorded.get("sha256") else None)
        require(why is None, f"its parts do not belong together ({name}: {why}); "
                             "run the gpl embed or gpl export that wrote it again")
