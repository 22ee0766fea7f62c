"""HDF5, gpl's own single-file format: embeddings/<pooling> (N x D float32), paths, stats,
failures/{paths,reasons}, fields/<name> (strings kept from the inputs, --keep-fields), metadata in attrs.
Its writer and its reader."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import numpy as np

from gpl_cli.atomic import AtomicPath, reporting, write_failed
from gpl_cli.store.embeddings import Embeddings, decode, require, wanted
from gpl_cli.store.sink import encode_name


def _chunk_rows(dim: int) -> int:
    """Rows per HDF5 chunk: about 1 MiB, at most 1024 rows."""
    return max(1, min(1024, (1 << 20) // (4 * dim)))


class _Refusals:
    """The file HDF5 writes through (h5py's file-object driver) in place of its own.

    HDF5 cannot recover from a write the system refuses: on a full disk its close failed half-way and
    the process then died at exit (SIGBUS or SIGSEGV). Here a refused write is recorded instead of
    reaching HDF5, which carries on into a file that H5Writer then discards, reporting the error."""

    def __init__(self, path: str):
        self.file = open(path, "w+b", buffering=0)
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.error is None and done < len(view):
            try:
                done += self.file.write(view[done:])
            except OSError as exc:
                self.error = exc
        return len(view)

    def read(self, size: int = -1) -> bytes:
        return self.file.read(size)

    def readinto(self, buffer) -> int:
        return self.file.readinto(buffer)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def truncate(self, size: int | None = None) -> int:
        try:
            return self.file.truncate(size)
        except OSError as exc:
            self.error = self.error or exc
            return size or 0

    def flush(self) -> None:
        """Unbuffered: every write has reached the system already."""


class H5Writer:
    """HDF5: embeddings/<pooling> (N x D float32), paths, failures/{paths,reasons}, metadata in attrs."""

    keeps_failures = True

    def __init__(self, path: str, dims: dict[str, int], overwrite: bool = False):
        import h5py

        self.target = AtomicPath(path, overwrite)
        with reporting(path):
            self.io = _Refusals(self.target.partial)
        text = h5py.string_dtype("utf-8")
        with self._reported():
            self.file = h5py.File(self.io, "w")
            group = self.file.create_group("embeddings")
            self.vectors = {
                key: group.create_dataset(key, (0, dim), maxshape=(None, dim), dtype="f4", chunks=(_chunk_rows(dim), dim))
                for key, dim in dims.items()
            }
            self.names = self.file.create_dataset("paths", (0,), maxshape=(None,), dtype=text, chunks=(4096,))
            self.stats = self.file.create_dataset("stats", (0, 2), maxshape=(None, 2), dtype="i8", chunks=(4096, 2))
            self.stats.attrs["columns"] = "size_bytes,mtime_ns"
            fails = self.file.create_group("failures")
            self.fail_names = fails.create_dataset("paths", (0,), maxshape=(None,), dtype=text, chunks=(256,))
            self.fail_reasons = fails.create_dataset("reasons", (0,), maxshape=(None,), dtype=text, chunks=(256,))
        self.text = text
        self.fields: dict = {}  # name -> its dataset, made with the first rows that carry it

    @contextmanager
    def _reported(self) -> Iterator[None]:
        """A write the system refused ends the output here: discarded, reported as write_failed."""
        try:
            yield
        except BaseException:
            self.abort()
            if self.io.error is None:
                raise
        if self.io.error is not None:
            self.abort()
            raise write_failed(self.io.error, self.target.path) from None

    @staticmethod
    def _append(dataset, rows) -> None:
        n = dataset.shape[0]
        dataset.resize(n + len(rows), axis=0)
        dataset[n:] = rows

    def write(self, names: list[str], vectors: dict[str, np.ndarray], stats: list[tuple[int, int]] | None = None,
              fields: dict[str, list[str]] | None = None) -> None:
        with self._reported():
            for name, values in (fields or {}).items():
                if name not in self.fields:
                    group = self.file.require_group("fields")
                    self.fields[name] = group.create_dataset(name, (0,), maxshape=(None,), dtype=self.text, chunks=(4096,))
                self._append(self.fields[name], values)
            for key, rows in vectors.items():
                self._append(self.vectors[key], rows)
            self._append(self.names, [encode_name(n) for n in names])
            self._append(self.stats, np.array(stats or [(-1, -1)] * len(names), dtype=np.int64).reshape(-1, 2))

    def fail(self, name: str, reason: str) -> None:
        with self._reported():
            self._append(self.fail_names, [encode_name(name)])
            self._append(self.fail_reasons, [reason])

    def close(self, metadata: dict) -> list[str]:
        with self._reported():
            if self.fields:  # HDF5 lists a group's members by name; the fields keep the order they were asked in
                self.file["fields"].attrs["order"] = list(self.fields)
            self.file.attrs["gpl_metadata"] = json.dumps(metadata)
            for key, value in metadata.items():
                if isinstance(value, (str, int, float, bool)):
                    self.file.attrs[key] = value
            self.file.close()
            self.io.file.close()
        return [self.target.commit()]  # a failure there discards the file (gpl_cli.atomic)

    def abort(self) -> None:
        with suppress(Exception):
            self.file.close()  # its writes cannot fail (_Refusals)
        self.io.file.close()
        self.target.discard()


def read_h5(path: str, keys: list[str] | None = None) -> Embeddings:
    import h5py

    with h5py.File(path, "r") as f:
        meta = _h5_metadata(f)
        available = meta.get("pool_keys", list(f["embeddings"].keys()))
        stored = list(f["embeddings"].keys())
        require(isinstance(available, list) and all(k in stored for k in available),
                f"pool_keys name poolings that are not stored (stored: {', '.join(stored) or 'none'})")
        vectors = {key: f["embeddings"][key][...] for key in wanted(available, keys, path)}
        fail_paths, fail_reasons = decode(f["failures/paths"][...]), decode(f["failures/reasons"][...])
        require(len(fail_paths) == len(fail_reasons), "failures/paths and failures/reasons differ in length")
        # Row counts and widths are checked on every pooling, also those not loaded.
        shapes = {key: f["embeddings"][key].shape for key in available}
        paths = decode(f["paths"][...])
        kept = f.get("fields")
        order = decode(list(kept.attrs.get("order", list(kept)))) if kept is not None else []
        fields = {name: decode(kept[name][...]) for name in order}
        for key, shape in shapes.items():
            count = shape[0] if shape else 0
            require(count == len(paths), f"embeddings/{key} has {count} rows but paths has {len(paths)}")
            require(len(shape) != 2 or shape[1] > 0, f"embeddings/{key} holds vectors of 0 numbers")
        return Embeddings(paths, vectors, meta, list(zip(fail_paths, fail_reasons)), f["stats"][...], fields=fields)


def read_h5_metadata(path: str) -> dict:
    """Only the metadata, without reading a row."""
    import h5py

    with h5py.File(path, "r") as f:
        return _h5_metadata(f)


def _h5_metadata(f) -> dict:
    meta = json.loads(f.attrs["gpl_metadata"])
    require(isinstance(meta, dict), "its gpl_metadata is not a JSON object")
    return meta
