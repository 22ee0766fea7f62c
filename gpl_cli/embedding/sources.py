"""Images inside containers: WebDataset tar shards and parquet files as inputs of `gpl embed`.

Listing (in the gpl process, before anything is embedded) turns one container into its samples, in
a stated order, each with a source: where its image's bytes lie.

- A tar shard is read header by header (each member's data is skipped with a seek, never read or
  extracted). Consecutive members that share a key form a sample, as WebDataset groups them: the key
  is the member's path up to the first dot of its file name, the extension what follows it
  (`dir/000017.seg.png`: key `dir/000017`, extension `seg.png`). A sample's image is the member
  named by --image-key, else the first of IMAGE_SUFFIXES it has; a sample without one is left out and
  counted. A shard cut short (or whose headers stop making sense) keeps the samples before the break;
  the sample a cut member belongs to, and the shard itself, become failure rows that name the byte.
- A parquet file is read by row group: the image column (binary, or a Hugging Face-style `{bytes,
  path}` struct) and the key column, never the whole file at once. A row whose image is null is left
  out and counted.

Decoding (in the workers) opens a source by its locator: `TarMember` reads its bytes with one pread
of the shard, `ParquetRow` from its row group, a batch of rows at a time. Each process keeps one
container open at a time: workers walk the inputs in order, so they move from one shard to the next.
A container that changed since it was listed is a failure, never another image's pixels.

--keep-fields values (sidecar members, JSON fields of them, parquet columns) are read when the rows
are written (`keep_fields`), a batch at a time, so they cost no memory for the rows in flight.

Torch-free; pyarrow is imported only when a parquet input is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from gpl_cli.errors import GplError, missing

# What counts as an image: file extensions in a folder walk, the member extensions of a tar sample,
# in the order a sample's image member is chosen (and messages list them).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"
# Parquet image columns tried in this order when --image-column is not given (img2dataset writes
# `jpg`, Hugging Face datasets `image`).
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")
KEY_COLUMN = "key"  # img2dataset's; without it (and without --key-column) rows are named by number
RESERVED_FIELDS = ("path", "embeddings", "error")  # names gpl's outputs give their own columns
BLOCK = 512
PARQUET_BATCH = 64  # rows a worker holds of a parquet image column at a time


class SourceError(ValueError):
    """An image gpl cannot read out of its container; the message is the reason as shown to the user."""


@dataclass(frozen=True)
class SourceOptions:
    """How tar shards and parquet files are read (gpl embed --image-key, --image-column, --key-column,
    --keep-fields)."""

    image_key: str | None = None  # tar: the member extension that holds the image
    image_column: str | None = None  # parquet: the column of image bytes
    key_column: str | None = None  # parquet: the column that names each row
    keep_fields: tuple[str, ...] = ()  # carried into the output as string columns

    def check(self) -> None:
        for spec in self.keep_fields:
            if not spec or "/" in spec or spec.startswith(".") or spec.endswith("."):
                raise GplError(f"--keep-fields {spec!r}: not a field name (json.url, txt, a column name)")
            if spec in RESERVED_FIELDS:
                raise GplError(f"--keep-fields {spec}: gpl's outputs already have a {spec!r} column")
        if len(set(self.keep_fields)) != len(self.keep_fields):
            raise GplError(f"--keep-fields names a field twice: {','.join(self.keep_fields)}")
        if self.image_key is not None and not self.image_key.strip(". "):
            raise GplError(f"--image-key {self.image_key!r}: not a member extension (jpg, png, seg.png)")


def container_kind(path: str) -> str | None:
    """"tar" or "parquet" for a path gpl reads as a container (by its extension), else None."""
    ext = os.path.splitext(path)[1].lower()
    return "tar" if ext == TAR_SUFFIX else "parquet" if ext == PARQUET_SUFFIX else None


def stat_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime_ns): a file's identity, as every check that a file changed compares it."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# --- sources: where one image's bytes lie ------------------------------------------------------------


@dataclass(frozen=True)
class Container:
    """A tar shard or parquet file as it was when listed."""

    path: str
    identity: tuple[int, int, int, int]


@dataclass(frozen=True)
class TarMember:
    """A sample's image member in a tar shard; `sidecars`: (extension, offset, size) of the members
    --keep-fields reads."""

    shard: Container
    member: str  # its name in the archive, for messages
    offset: int  # of its data
    size: int
    mtime_ns: int  # from its tar header
    sidecars: tuple[tuple[str, int, int], ...] = ()

    @property
    def container(self) -> str:
        return self.shard.path

    @property
    def stat(self) -> tuple[int, int]:
        """What --update and --resume compare: the member's size and time, as its header records them."""
        return (self.size, self.mtime_ns)

    def open(self) -> IO[bytes]:
        return _WORKER.tar_bytes(self)


@dataclass(frozen=True)
class ParquetRow:
    """Row `row` of row group `row_group` of a parquet file; its image in `column` (a struct's `bytes` when
    `struct`)."""

    file: Container
    row_group: int
    row: int
    column: str
    struct: bool = False

    @property
    def container(self) -> str:
        return self.file.path

    @property
    def stat(self) -> tuple[int, int]:
        """What --update and --resume compare: the parquet file's size and time (a row has neither of its own)."""
        return (self.file.identity[2], self.file.identity[3])

    def open(self) -> IO[bytes]:
        return _WORKER.parquet_bytes(self)


@dataclass(frozen=True)
class MadeImage:
    """An image made in memory when it is decoded (an edited copy, for calibration): `make` returns the bytes
    of an image file. It has no stat of its own; the file it is made from is checked as a container is."""

    make: Callable[[], bytes]
    container: str  # the file it is made from
    stat: tuple[int, int] = (-1, -1)

    def open(self) -> IO[bytes]:
        import io

        return io.BytesIO(self.make())


# --- reading by locator ------------------------------------------------------------------------------


class _Reader:
    """One process's open container (at most one at a time) and what it holds of it."""

    def __init__(self):
        self.key: tuple | None = None
        self.fd: int | None = None
        self.parquet = None  # pyarrow.parquet.ParquetFile
        self.cursor: tuple[int, str] | None = None  # (row group, column) that `batches` walks
        self.batches: Iterator | None = None  # its image column, PARQUET_BATCH rows at a time
        self.batch_start = 0
        self.batch: list = []
        self.fields: tuple[tuple, dict[str, list[str]]] | None = None  # (row group, specs) -> values

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.key = self.fd = self.parquet = self.cursor = self.batches = self.fields = None
        self.batch = []

    def _open(self, container: Container, kind: str) -> None:
        """`container` opened (the one before closed), refused when it is not the file that was listed."""
        if self.key == (kind, container):
            return
        self.close()
        fd = os.open(container.path, os.O_RDONLY)
        try:
            if stat_identity(os.fstat(fd)) != container.identity:
                raise SourceError(f"{container.path} changed since gpl listed it (written to or replaced); "
                                  "run gpl again to list it anew")
            if kind == "parquet":
                _, pq = import_pyarrow()
                self.parquet = pq.ParquetFile(os.fdopen(os.dup(fd), "rb"), buffer_size=1 << 20, pre_buffer=False)
        except BaseException:
            os.close(fd)
            raise
        self.key, self.fd = (kind, container), fd

    def tar_bytes(self, member: TarMember) -> IO[bytes]:
        import io

        self._open(member.shard, "tar")
        return io.BytesIO(self._read(member.shard, member.member, member.offset, member.size))

    def _read(self, shard: Container, name: str, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) < size:
            raise SourceError(f"{shard.path} is truncated at byte {offset + len(data)} "
                              f"(member {name} needs bytes {offset}-{offset + size})")
        if not data:
            raise SourceError(f"empty member {name} (0 bytes)")
        return data

    def parquet_bytes(self, row: ParquetRow) -> IO[bytes]:
        import io

        self._open(row.file, "parquet")
        if (row.row_group, row.column) != self.cursor or row.row < self.batch_start:
            # Rows are asked for in order; the next row group (or an earlier row) starts the column again.
            self.cursor = (row.row_group, row.column)
            self.batches = self.parquet.iter_batches(batch_size=PARQUET_BATCH, row_groups=[row.row_group],
                                                     columns=[row.column], use_threads=False)
            self.batch_start, self.batch = 0, []
        while row.row >= self.batch_start + len(self.batch):
            self.batch_start += len(self.batch)
            batch = next(self.batches, None)
            if batch is None:
                raise SourceError(f"{row.file.path}: row group {row.row_group} has no row {row.row}")
            self.batch = batch.column(0).to_pylist()
        value = self.batch[row.row - self.batch_start]
        data = value.get("bytes") if row.struct and value is not None else value
        if not data:
            raise SourceError(f"no image bytes in column {row.column} (null or empty)")
        return io.BytesIO(data)

    # --- --keep-fields ---

    def fields_of(self, source, specs: tuple[str, ...]) -> list[str]:
        if isinstance(source, TarMember):
            self._open(source.shard, "tar")
            return _member_fields(source, specs, lambda name, off, size: self._read(source.shard, name, off, size))
        if isinstance(source, ParquetRow):
            self._open(source.file, "parquet")
            key = (source.row_group, specs)
            if self.fields is None or self.fields[0] != key:
                self.fields = (key, _parquet_fields(self.parquet, source.row_group, specs))
            return [values[source.row] for values in self.fields[1].values()]
        return [""] * len(specs)


_WORKER = _Reader()  # the decoding process's
# A forked worker starts with nothing open: a parquet file object inherited from the parent would share its
# file offset with the parent and the other workers.
os.register_at_fork(after_in_child=_WORKER.close)


def import_pyarrow():
    """pyarrow and pyarrow.parquet, or the GplError that says how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise GplError(missing("parquet inputs need pyarrow", "pyarrow", "parquet")) from None
    return pyarrow, pyarrow.parquet


# --- --keep-fields ------------------------------------------------------------------------------------


def field_member(spec: str) -> tuple[str, tuple[str, ...]]:
    """A --keep-fields name for tar samples: (member extension, path into its JSON). `json.url` is the
    field `url` of the sample's .json member; any other name (`txt`, `cls`, `json`) a member's whole text."""
    head, _, rest = spec.partition(".")
    if rest and head.lower().endswith("json"):
        return head.lower(), tuple(rest.split("."))
    return spec.lower(), ()


def _text(value) -> str:
    """A kept value as the string stored: text as is, nothing as "", anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return json.dumps(value, ensure_ascii=False, default=str)


def _member_fields(source: TarMember, specs: tuple[str, ...], read) -> list[str]:
    members = {ext: (off, size) for ext, off, size in source.sidecars}
    parsed: dict[str, object] = {}
    out = []
    for spec in specs:
        ext, path = field_member(spec)
        if ext not in members:
            out.append("")
            continue
        if ext not in parsed:
            raw = read(f"{ext} of {source.member}", *members[ext]) if members[ext][1] else b""
            parsed[ext] = raw
        value = parsed[ext]
        if path:
            try:
                value = json.loads(value) if isinstance(value, bytes) else value
            except ValueError:
                value = None
            parsed[ext] = value
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
        out.append(_text(value))
    return out


def _parquet_fields(parquet, row_group: int, specs: tuple[str, ...]) -> dict[str, list[str]]:
    """Each kept column of one row group as strings (a struct's field by its dotted name; a column the file
    lacks as "")."""
    names = set(parquet.schema_arrow.names)
    wanted = sorted({spec if spec in names else spec.split(".")[0] for spec in specs} & names)
    table = parquet.read_row_group(row_group, columns=wanted, use_threads=False).flatten() if wanted else None
    rows = parquet.metadata.row_group(row_group).num_rows
    have = set(table.column_names) if table is not None else set()
    return {spec: [_text(v) for v in table.column(spec).to_pylist()] if spec in have else [""] * rows
            for spec in specs}


class _KeptFields:
    """A Writer whose rows get the --keep-fields of their inputs, read from the sources as they are written."""

    def __init__(self, writer, items: Iterable, specs: tuple[str, ...]):
        self.writer, self.specs = writer, specs
        self.sources = {it.name: it.source for it in items}
        self.reader = _Reader()
        self.keeps_failures = writer.keeps_failures

    def write(self, names: list[str], vectors: dict, stats=None) -> None:
        values = []
        for name in names:
            try:
                values.append(self.reader.fields_of(self.sources.get(name), self.specs))
            except (OSError, SourceError) as exc:  # the rows stay in the journal: a later run can write them
                raise GplError(f"cannot read the kept fields of {name}: {getattr(exc, 'strerror', None) or exc}") from None
        fields = {spec: [row[i] for row in values] for i, spec in enumerate(self.specs)}
        self.writer.write(names, vectors, stats, fields=fields)

    def fail(self, name: str, reason: str) -> None:
        self.writer.fail(name, reason)

    def close(self, metadata: dict) -> list[str]:
        self.reader.close()
        return self.writer.close(dict(metadata, kept_fields=list(self.specs)))

    def abort(self) -> None:
        self.reader.close()
        self.writer.abort()


def keep_fields(writer, inputs):
    """`writer` storing the --keep-fields of `inputs` (an InputList) with each row; `writer` itself when none
    are kept."""
    return _KeptFields(writer, inputs.items, inputs.fields) if inputs.fields else writer


# --- listing ---------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One row-to-be of a container, in order: a sample's `source`, or the `error` that makes it a failure.
    `key` None stands for the container itself (it could not be read, or not to its end)."""

    key: str | None
    source: TarMember | ParquetRow | None = None
    error: str | None = None


@dataclass
class Listing:
    entries: list[Entry] = field(default_factory=list)
    no_image: list[str] = field(default_factory=list)  # keys of samples left out: no image member (or a null one)
    found: set[str] = field(default_factory=set)  # --keep-fields this container can provide


def list_container(path: str, kind: str, options: SourceOptions) -> Listing:
    """The samples of one tar shard or parquet file (module docstring). A container that cannot be opened
    is one failure entry; options that do not fit a parquet file (a missing column) are a GplError."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return Listing([Entry(None, error=f"cannot read {path}: {exc.strerror or exc}")])
    try:
        container = Container(path, stat_identity(os.fstat(fd)))
        if kind == "tar":
            return _list_tar(fd, container, options)
        return _list_parquet(fd, container, options)
    finally:
        os.close(fd)


def _blocks(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header ("LEN key=value\\n" each)."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class _Break(Exception):
    """Where a tar shard stops being readable: `why` completes "PATH ...", `member` is the (name, data offset,
    size) of the member cut short, if one is."""

    def __init__(self, why: str, member: tuple[str, int, int] | None = None):
        super().__init__(why)
        self.why, self.member = why, member


def _number(field: bytes) -> int:
    """A tar header's numeric field: octal digits, or GNU's base-256 (first byte's high bit set) for big values."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big", signed=False) - (1 << (8 * len(field) - 2) if field[0] & 0x40 else 0)
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _name(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


REGULAR = (b"0", b"\0", b"7")  # tar type flags of a member holding a file's bytes
PAX, GLOBAL_PAX, LONG_NAME, LONG_LINK = b"x", b"g", b"L", b"K"


def _checksum_ok(header: bytes) -> bool:
    try:
        recorded = _number(header[148:156])
    except ValueError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if recorded == unsigned:
        return True
    return recorded == unsigned - 256 * sum(b > 127 for b in header[:148] + header[156:])  # old tars: signed bytes


def tar_members(fd: int, size: int) -> Iterator[tuple[str, int, int, int]]:
    """(name, data offset, size, mtime_ns) of each regular file of a tar archive (ustar, GNU or pax), in stream
    order, reading the headers only; raises _Break where the archive is cut short or a header is not one."""
    offset, extra = 0, {}
    while True:
        header = os.pread(fd, BLOCK, offset)
        if len(header) < BLOCK and not offset:
            raise _Break(f"is not a tar archive ({len(header)} bytes, less than one tar header)")
        if len(header) < BLOCK:
            raise _Break(f"is truncated at byte {offset + len(header)} (it ends "
                         f"{'inside a member header' if header else 'without the end-of-archive marker'})")
        if header.count(0) == BLOCK:
            return
        if not _checksum_ok(header):
            raise _Break(f"has no valid tar header at byte {offset} (bad checksum)" if offset else
                         "is not a tar archive (its first header has a bad checksum)")
        kind, data = header[156:157], offset + BLOCK
        length = int(extra.get("size") or _number(header[124:136]))
        name = _name(header[0:100])
        if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar: a long path's folder part
            name = f"{_name(header[345:500])}/{name}"
        name = extra.get("path", name)
        if data + length > size:
            raise _Break(f"is truncated at byte {size}", (name, data, length) if kind in REGULAR else None)
        if kind == PAX:
            extra = _pax(os.pread(fd, length, data))
        elif kind == LONG_NAME:
            extra = {"path": _name(os.pread(fd, length, data))}
        elif kind not in (GLOBAL_PAX, LONG_LINK):
            if kind in REGULAR and not name.endswith("/"):
                mtime = float(extra.get("mtime") or _number(header[136:148]))
                yield name, data, length, int(round(mtime * 1e9))
            extra = {}
        offset = data + _blocks(length)


def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name as WebDataset splits it, or None for a name without an extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext


def _list_tar(fd: int, shard: Container, options: SourceOptions) -> Listing:
    listing = Listing()
    wanted = {field_member(spec)[0] for spec in options.keep_fields}
    image_key = options.image_key.strip(".").lower() if options.image_key else None
    order = [s.lstrip(".") for s in IMAGE_SUFFIXES]
    key: str | None = None
    members: dict[str, tuple[str, int, int, int]] = {}
    extensions: set[str] = set()

    def sample_done() -> None:
        if key is None:
            return
        if image_key is not None:
            image = image_key if image_key in members else None
        else:
            image = next((ext for ext in order if ext in members), None)
        if image is None:
            listing.no_image.append(key)
            return
        name, offset, size, mtime = members[image]
        sidecars = tuple((ext, off, length) for ext, (_, off, length, _) in members.items() if ext in wanted)
        listing.entries.append(Entry(key, TarMember(shard, name, offset, size, mtime, sidecars)))

    try:
        for name, offset, size, mtime in tar_members(fd, shard.identity[2]):
            parts = split_member(name)
            if parts is None:
                continue
            this, ext = parts
            if this != key:
                sample_done()
                key, members = this, {}
            extensions.add(ext.lower())
            members.setdefault(ext.lower(), (name, offset, size, mtime))
    except _Break as brk:
        cut = split_member(brk.member[0]) if brk.member else None
        if cut is not None:
            if cut[0] != key:
                sample_done()
                key = cut[0]
            name, offset, size = brk.member
            listing.entries.append(Entry(key, error=f"{shard.path} {brk.why}: this sample's member {name} "
                                                    f"needs bytes {offset}-{offset + size}"))
        else:
            sample_done()
        tail = "" if brk.why.startswith("is not a tar") else ": what follows cannot be read"
        listing.entries.append(Entry(None, error=f"{shard.path} {brk.why}{tail}"))
    else:
        sample_done()
    listing.found = {spec for spec in options.keep_fields if field_member(spec)[0] in extensions}
    return listing


def _flat_names(fields, prefix: str = "") -> set[str]:
    """Column names, and a struct's fields by their dotted names (`image.path`)."""
    import pyarrow as pa

    out = set()
    for f in fields:
        out.add(prefix + f.name)
        if pa.types.is_struct(f.type):
            out |= _flat_names(f.type, f"{prefix}{f.name}.")
    return out


def _is_bytes(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _image_column(path: str, schema, given: str | None) -> tuple[str, bool]:
    """(column, whether it is a {bytes, path} struct) holding a parquet file's images; GplError when there
    is none (or the one given holds no image bytes)."""
    import pyarrow as pa

    def holds_images(name: str) -> bool | None:
        kind = schema.field(name).type
        if _is_bytes(kind):
            return False
        if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and _is_bytes(kind.field("bytes").type):
            return True
        return None

    columns = ", ".join(schema.names)
    if given is not None:
        if given not in schema.names:
            raise GplError(f"{path} has no column {given!r} (--image-column); its columns: {columns}")
        struct = holds_images(given)
        if struct is None:
            raise GplError(f"{path}: column {given} holds {schema.field(given).type}, not image bytes "
                           "(binary, or a struct with a binary 'bytes' field)")
        return given, struct
    for name in IMAGE_COLUMNS:
        if name in schema.names and holds_images(name) is not None:
            return name, bool(holds_images(name))
    raise GplError(f"{path}: no image column (tried {', '.join(IMAGE_COLUMNS)}); name it with --image-column. "
                   f"Its columns: {columns}")


def _list_parquet(fd: int, file: Container, options: SourceOptions) -> Listing:
    pa, pq = import_pyarrow()
    try:
        parquet = pq.ParquetFile(os.fdopen(os.dup(fd), "rb"))
    except (pa.ArrowException, OSError) as exc:
        return Listing([Entry(None, error=f"{file.path} is not a readable parquet file ({exc})")])
    schema = parquet.schema_arrow
    column, struct = _image_column(file.path, schema, options.image_column)
    key_column = options.key_column or (KEY_COLUMN if KEY_COLUMN in schema.names else None)
    if key_column not in (None, *schema.names):
        raise GplError(f"{file.path} has no column {key_column!r} (--key-column); its columns: {', '.join(schema.names)}")
    flat = _flat_names(schema)
    listing = Listing(found={spec for spec in options.keep_fields if spec in flat})
    meta = parquet.metadata
    leaf = f"{column}.bytes" if struct else column
    leaf_index = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == leaf)
    first = 0
    for group in range(parquet.num_row_groups):
        rows = meta.row_group(group).num_rows
        keys = (parquet.read_row_group(group, columns=[key_column], use_threads=False).column(0).to_pylist()
                if key_column else [None] * rows)
        without_image = _rows_without_image(parquet, group, leaf_index, column, struct)
        for r, key in enumerate(keys):
            name = _text(key) if key is not None else str(first + r)
            if r in without_image:
                listing.no_image.append(name)
            else:
                listing.entries.append(Entry(name, ParquetRow(file, group, r, column, struct)))
        first += rows
    return listing


def _rows_without_image(parquet, group: int, leaf_index: int, column: str, struct: bool) -> set[int]:
    """The rows of a row group whose image is null: none when the column's statistics count no null, else
    found by reading the column, PARQUET_BATCH rows at a time."""
    stats = parquet.metadata.row_group(group).column(leaf_index).statistics
    if stats is not None and stats.has_null_count and stats.null_count == 0:
        return set()
    missing, start = set(), 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group], columns=[column], use_threads=False):
        values = batch.column(0)
        nulls = values.is_null().to_pylist()
        if struct:  # the struct itself, or its bytes, may be the null
            nulls = [a or b for a, b in zip(nulls, values.field("bytes").is_null().to_pylist())]
        missing.update(start + i for i, null in enumerate(nulls) if null)
        start += len(batch)
    return missing
