#!/usr/bin/env python3
"""`gpl embed` reading the same photos as files, as WebDataset tar shards and as parquet files, side by side.

The photo set (labeled_photos, repeated --repeat times as bench_embed.py does: x6 = 1,164 images) is laid
out three ways: a folder of files (hard links), 12 tar shards in img2dataset's layout (KEY.webp, KEY.json,
KEY.txt) and 4 parquet files in img2dataset's columns (key, url, caption and the image bytes, one row
group per file). Each round runs `gpl embed` once on each, in a fresh process, in rotating order (so load
from other processes falls on all alike), and reports per layout the median over rounds of

- images/s from spawn to exit (listing the inputs, start-up and writing the output included), and
- images/s of the run itself (gpl's own summary line: decoding and the model), and
- CPU ms per image: the CPU time of the gpl process and its workers over the images, which other processes
  on the machine change far less than they change the rates (the machine's cores / this = images/s that
  the layout allows when gpl has every core).

Then, in this process, the cost of reading alone: every image's bytes through gpl's own path for each
layout (a file opened and read; a tar member by one read at its offset; a parquet row from its row group),
after the listing, nothing decoded; then the cost of listing a shard (headers only: one of 10,000 samples, an image, a JSON and a caption
each, in this process), and peak memory from 10 to 100 shards of the same size (--shard-size images each):
the gpl process and its whole process tree (decoding workers included), sampled every 0.2 s as
bench/memory.py does. "Other load" is the CPU other processes took during a run, in cores.
Every run starts from the same cached plan (measured here first), as every run after a machine's first does.

  python bench/bench_sources.py                   # 1,164 photos, 3 rounds; 10 and 100 shards of 20
  python bench/bench_sources.py --tiny            # a few images, 1 round: a quick check that it runs
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from memory import measure
from photos import find_photos

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
LAYOUTS = ("files", "shards", "parquet")


def photo_list(folder: str, repeat: int) -> list[tuple[str, str]]:
    """(key, path) of each image, the set `repeat` times over, in a stable order."""
    from gpl_cli.embedding.inputs import collect_inputs

    paths = [it.path for it in collect_inputs([folder]).items]
    return [(f"{k}{i:06d}", p) for k in range(repeat) for i, p in enumerate(paths)]


def split(items: list, parts: int) -> list[list]:
    size = -(-len(items) // parts)
    return [items[i:i + size] for i in range(0, len(items), size)]


def build_files(folder: str, photos: list[tuple[str, str]]) -> None:
    os.makedirs(folder)
    for key, path in photos:
        dst = os.path.join(folder, key + os.path.splitext(path)[1])
        try:
            os.link(path, dst)
        except OSError:
            with open(path, "rb") as src, open(dst, "wb") as out:
                out.write(src.read())


def build_shards(folder: str, photos: list[tuple[str, str]], count: int) -> None:
    """`count` shards in img2dataset's layout: KEY.EXT, KEY.json, KEY.txt per sample."""
    os.makedirs(folder)
    for s, part in enumerate(split(photos, count)):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for key, path in part:
                with open(path, "rb") as f:
                    image = f.read()
                meta = json.dumps({"url": f"https://example.com/{key}", "key": key}).encode()
                for name, data in ((key + os.path.splitext(path)[1].lower(), image), (key + ".json", meta),
                                   (key + ".txt", f"photo {os.path.basename(path)}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))


def build_parquet(folder: str, photos: list[tuple[str, str]], count: int) -> None:
    """`count` parquet files in img2dataset's columns, the images in a binary column (one row group each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder)
    for s, part in enumerate(split(photos, count)):
        images = []
        for _, path in part:
            with open(path, "rb") as f:
                images.append(f.read())
        table = pa.table({"key": [k for k, _ in part], "url": [f"https://example.com/{k}" for k, _ in part],
                          "caption": [os.path.basename(p) for _, p in part], "webp": pa.array(images, pa.binary())})
        pq.write_table(table, os.path.join(folder, f"{s:05d}.parquet"))


SUMMARY = re.compile(r"embedded (\d+).*?, ([\d.]+) images/s")


def busy_seconds() -> float:
    """CPU time the whole machine spent busy so far (0 where /proc/stat is missing)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            v = [int(x) for x in f.readline().split()[1:8]]
    except OSError:
        return 0.0
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(args: list[str], out: str) -> tuple[float, float, int, float, float]:
    """(images/s spawn to exit, images/s of the run, images, other load in cores, CPU seconds of gpl's
    processes) of one `gpl embed`."""
    start, busy, own = time.perf_counter(), busy_seconds(), children_seconds()
    proc = subprocess.run([sys.executable, "-m", "gpl_cli", "embed", *args, "-o", out, "--overwrite"],
                          cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu = children_seconds() - own
    other = max(0.0, (busy_seconds() - busy) - cpu) / wall
    if proc.returncode != 0:
        raise SystemExit(f"gpl embed {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    found = SUMMARY.search(proc.stderr)
    images = int(found.group(1))
    return images / wall, float(found.group(2)), images, other, cpu


def reading_us(paths: list[str], rounds: int = 3) -> float:
    """Median microseconds per image to list `paths` and read every image's bytes the way the workers do."""
    from gpl_cli.embedding.inputs import collect_inputs

    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        items = collect_inputs(paths).items
        for it in items:
            if it.source is None:
                with open(it.path, "rb") as f:
                    f.read()
            else:
                it.source.open().read()
        times.append((time.perf_counter() - start) / len(items))
    return 1e6 * statistics.median(times)


def listing_seconds(folder: str, samples: int, rounds: int = 3) -> float:
    """Median seconds to list one shard of `samples` samples (a 20 KB image, a JSON and a caption each)."""
    from gpl_cli.embedding.inputs import collect_inputs

    path = os.path.join(folder, "listing.tar")
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            for ext, size in (("jpg", 20_000), ("json", 300), ("txt", 40)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = size
                tar.addfile(info, io.BytesIO(bytes(size)))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        assert len(collect_inputs([path]).items) == samples
        times.append(time.perf_counter() - start)
    os.remove(path)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", help="folder of photos (default: labeled_photos in ../shared/data)")
    parser.add_argument("--repeat", type=int, default=6, help="times the photo set is repeated (default 6: 1,164)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=20, help="images per shard in the memory runs")
    parser.add_argument("--tiny", action="store_true", help="a few images, one round, 2 and 4 shards")
    args = parser.parse_args()
    folder = find_photos(args.photos, "bench_sources")
    if args.tiny:
        args.repeat, args.rounds, args.shard_size = 1, 1, 4
    photos = photo_list(folder, args.repeat)[: 16 if args.tiny else None]
    from gpl_cli.embedding.tuning import cpu_model

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {len(photos)} images from {folder}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpl-sources-") as tmp:
        os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, "cache")
        subprocess.run([sys.executable, "-m", "gpl_cli", "tune", "--json"], cwd=REPO, check=True, capture_output=True)
        build_files(os.path.join(tmp, "files"), photos)
        build_shards(os.path.join(tmp, "shards"), photos, 12)
        build_parquet(os.path.join(tmp, "parquet"), photos, 4)
        inputs = {"files": [os.path.join(tmp, "files")], "shards": [os.path.join(tmp, "shards", "*.tar")],
                  "parquet": [os.path.join(tmp, "parquet", "*.parquet")]}
        rates: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in LAYOUTS}
        for r in range(args.rounds):
            for name in LAYOUTS[r % 3:] + LAYOUTS[:r % 3]:
                wall, run, images, other, cpu = run_once(inputs[name], os.path.join(tmp, f"{name}.h5"))
                assert images == len(photos), (name, images)
                rates[name].append((wall, run, 1000 * cpu / images, other))
                print(f"round {r + 1} {name:8s} {wall:6.1f} images/s spawn to exit, {run:6.1f} images/s run, "
                      f"{1000 * cpu / images:5.1f} CPU ms/image; other load {other:.2f} cores", flush=True)
        print(f"\n{len(photos)} images, median of {args.rounds} round(s):")
        print("| layout | images/s, spawn to exit | images/s, the run | CPU ms per image | other load, cores |")
        print("|---|---|---|---|---|")
        for name in LAYOUTS:
            wall, run, cpu, other = (statistics.median(x[i] for x in rates[name]) for i in range(4))
            print(f"| {name} | {wall:.1f} | {run:.1f} | {cpu:.1f} | {other:.2f} |")
        print("\nreading the images' bytes (listing included, no decoding), us per image:",
              ", ".join(f"{name} {reading_us(inputs[name]):.0f}" for name in LAYOUTS))
        samples = 1000 if args.tiny else 10_000
        seconds = listing_seconds(tmp, samples)
        print(f"\nlisting a shard of {samples} samples (3 members each): {seconds:.2f} s, "
              f"{seconds / (3 * samples) * 1e6:.1f} us a member")
        print("\npeak memory by shard count:")
        print("| shards | images | s | gpl process MiB | process tree MiB | largest process MiB |")
        print("|---|---|---|---|---|---|")
        counts = (2, 4) if args.tiny else (10, 100)
        peaks = {}
        for count in counts:
            many = photo_list(folder, -(-count * args.shard_size // len(photo_list(folder, 1))))[: count * args.shard_size]
            where = os.path.join(tmp, f"shards{count}")
            build_shards(where, many, count)
            peaks[count] = m = measure(os.path.join(where, "*.tar"), os.path.join(tmp, f"m{count}.h5"), [])
            print(f"| {count} | {len(many)} | {m['seconds']:.1f} | {m['main_mib']:.0f} | {m['tree_mib']:.0f} | "
                  f"{m['largest_process_mib']:.0f} |", flush=True)
        low, high = counts
        print(f"\n{high} vs {low} shards: gpl process {peaks[high]['main_mib'] / peaks[low]['main_mib']:.2f}x, "
              f"process tree {peaks[high]['tree_mib'] / peaks[low]['tree_mib']:.2f}x")


if __name__ == "__main__":
    main()
