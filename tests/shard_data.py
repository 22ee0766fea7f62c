"""Tar shards and parquet files in the layouts gpl reads, built with Python's tarfile and pyarrow, for the tests of
gpl_cli.embedding.sources (unit and end to end).

img2dataset writes one sample as KEY.jpg, KEY.json ({"url", "key", ...}) and KEY.txt (the caption), and a sample
whose download failed as KEY.json alone; its parquet output has the columns key, url, caption and jpg (the image
bytes). Hugging Face datasets store images as an `image` column of {bytes, path} structs.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

MTIME = 1_700_000_000  # every member's time, so that shards built twice are byte for byte the same


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> Path:
    """A tar archive of `members` (name, bytes), in this order."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), MTIME
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, image: Path | None, caption: str, url: str | None = None) -> list[tuple[str, bytes]]:
    """One img2dataset sample: KEY.EXT (the image, left out for a failed download), KEY.json, KEY.txt."""
    members = []
    if image is not None:
        members.append((f"{key}{image.suffix.lower()}", image.read_bytes()))
    members.append((f"{key}.json", json.dumps({"url": url or f"https://example.com/{key}", "key": key}).encode()))
    members.append((f"{key}.txt", caption.encode()))
    return members


def truncate_inside(path: Path, member: str) -> int:
    """Cut the archive in the middle of `member`'s data; returns the new length (the byte offset of the break)."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    cut = info.offset_data + info.size // 2
    os.truncate(path, cut)
    return cut


def img2dataset_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    """img2dataset's parquet columns: key, url, caption, jpg (bytes; None for a failed download)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "url": pa.array([r.get("url", f"https://example.com/{r['key']}") for r in rows], pa.string()),
        "caption": pa.array([r.get("caption", "") for r in rows], pa.string()),
        "jpg": pa.array([r["image"].read_bytes() if r["image"] else None for r in rows], pa.binary()),
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def hf_parquet(path: Path, images: list[Path | None], row_group_size: int | None = None) -> Path:
    """A Hugging Face-style `image` column of {bytes, path} structs, and a `label` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    column = pa.array([{"bytes": p.read_bytes(), "path": p.name} if p else None for p in images], kind)
    pq.write_table(pa.table({"image": column, "label": list(range(len(images)))}), path, row_group_size=row_group_size)
    return path
