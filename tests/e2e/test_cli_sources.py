"""`gpl embed` over WebDataset tar shards and parquet files, end to end: the vectors of the same images
embedded as files, rows named SHARD/KEY with their kept fields, failures as rows, --resume after kill -9
and --update per sample, the Ray engine's rows equal to the local engine's, and a round trip out through
`gpl export --format parquet` into embedding-reader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_IMAGES, assert_vectors_close, make_photo_like, run_gpl
from PIL import Image
from shard_data import hf_parquet, img2dataset_parquet, sample_members, truncate_inside, write_tar

import gpl_cli
from gpl_cli.store.formats import read_embeddings
from gpl_cli.store.journal import JOURNAL_SUFFIX

PHOTOS = sorted(p for p in SAMPLE_IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".png", ".webp"))
KEEP = "json.url,txt,caption,image.path"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three shards in img2dataset's layout (a failed download, a sample in a nested folder, a corrupt JPEG, the
    last shard cut in the middle of a sample) and two parquet files, one per column layout. Returns the folder
    and, in row order, (row name, the image file it holds or None for a failure row, its kept fields)."""
    root = tmp_path_factory.mktemp("sources")
    (root / "shards").mkdir()
    rows, photos = [], iter(PHOTOS)

    def sample(shard: str, key: str) -> list:
        image = next(photos)
        rows.append((f"{shard}/{key}", image, {"json.url": f"https://example.com/{key}", "txt": f"caption of {key}",
                                               "caption": "", "image.path": ""}))
        return sample_members(key, image, f"caption of {key}")

    write_tar(root / "shards" / "00000.tar", [*sample("00000.tar", "000000000"), *sample("00000.tar", "000000001"),
                                              *sample_members("000000002", None, "no image"),
                                              *sample("00000.tar", "nested/dir/000000003")])
    corrupt = next(photos).read_bytes()[:1500] + b"\0" * 500
    write_tar(root / "shards" / "00001.tar", [*sample("00001.tar", "000010000"),
                                              ("000010001.jpg", corrupt), ("000010001.txt", b"corrupt"),
                                              *sample("00001.tar", "000010002")])
    rows.insert(-1, ("00001.tar/000010001", None, {"json.url": "", "txt": "corrupt", "caption": "", "image.path": ""}))
    write_tar(root / "shards" / "00002.tar", [*sample("00002.tar", "000020000"), *sample("00002.tar", "000020001")])
    cut = truncate_inside(root / "shards" / "00002.tar", f"000020001{rows[-1][1].suffix.lower()}")
    rows[-1] = (rows[-1][0], None, None)
    rows.append(("00002.tar", None, None))
    table = [{"key": f"p{i}", "image": next(photos), "caption": f"parquet caption {i}"} for i in range(3)]
    img2dataset_parquet(root / "img2dataset.parquet", table, row_group_size=2)
    rows += [(f"img2dataset.parquet/p{i}", r["image"], {"json.url": "", "txt": "", "caption": r["caption"],
                                                        "image.path": ""}) for i, r in enumerate(table)]
    hf = [next(photos), next(photos)]
    hf_parquet(root / "hf.parquet", hf)
    rows += [(f"hf.parquet/{i}", p, {"json.url": "", "txt": "", "caption": "", "image.path": p.name}) for i, p in enumerate(hf)]
    return root, rows, cut


def embed_sources(root: Path, out: str, *extra: str):
    return run_gpl("embed", "shards/{00000..00002}.tar", "img2dataset.parquet", "hf.parquet", "-o", out, "-p", "avg,max",
                   "--keep-fields", KEEP, *extra, cwd=root)


@pytest.fixture(scope="module")
def local_run(corpus):
    root, _, _ = corpus
    proc = embed_sources(root, "local.h5", "--workers", "2")
    assert proc.returncode == 3, proc.stderr.decode()  # the corrupt JPEG and the truncated shard
    return proc, read_embeddings(str(root / "local.h5"))


@pytest.fixture(scope="module")
def as_files(corpus, lite0):
    """The same images embedded as files: the reference."""
    _, rows, _ = corpus
    files = [str(image) for _, image, _ in rows if image is not None]
    emb = gpl_cli.embed(files, pool=["avg", "max"], model=lite0)
    return {path: (emb.vectors["avg"][i], emb.vectors["max"][i]) for i, path in enumerate(emb.paths)}


def test_rows_are_the_samples_in_order_with_the_vectors_of_the_same_images_as_files(corpus, local_run, as_files):
    _, rows, cut = corpus
    proc, emb = local_run
    embedded = [(name, image, fields) for name, image, fields in rows if image is not None]
    assert emb.paths == [name for name, _, _ in embedded]
    for key, column in (("avg", 0), ("max", 1)):
        assert_vectors_close(emb.vectors[key], np.stack([as_files[str(image)][column] for _, image, _ in embedded]))
    assert emb.fields == {spec: [fields[spec] for _, _, fields in embedded] for spec in KEEP.split(",")}
    failures = dict(emb.failures)
    assert list(failures) == ["00001.tar/000010001", "00002.tar/000020001", "00002.tar"]
    assert failures["00001.tar/000010001"].startswith(("truncated or corrupt image data", "cannot decode image"))
    for name in ("00002.tar/000020001", "00002.tar"):
        assert f"shards/00002.tar is truncated at byte {cut}" in failures[name]
    err = proc.stderr.decode()
    assert "gpl: 1 sample(s) hold no image and are left out, not failures (first: 00000.tar/000000002)" in err
    assert "gpl: skipped 00001.tar/000010001: " in err and "Traceback" not in err


def test_the_ray_engine_reads_the_same_rows_with_gpls_own_reader(corpus, local_run):
    root, _, _ = corpus
    proc = embed_sources(root, "ray.h5", "--engine", "ray")
    assert proc.returncode == 3, proc.stderr.decode()
    on_ray, local = read_embeddings(str(root / "ray.h5")), local_run[1]
    assert on_ray.paths == local.paths and on_ray.failures == local.failures and on_ray.fields == local.fields
    assert np.array_equal(on_ray.stats, local.stats)
    for key in ("avg", "max"):
        assert_vectors_close(on_ray.vectors[key], local.vectors[key])


def test_shards_in_export_parquet_out_read_by_embedding_reader(corpus, local_run, tmp_path):
    from embedding_reader import EmbeddingReader

    root, _, _ = corpus
    emb = local_run[1]
    out = tmp_path / "exported"
    run_gpl("export", str(root / "local.h5"), "-o", str(out), "--format", "parquet", "-q", check=True)
    reader = EmbeddingReader(embeddings_folder=str(out / "avg_emb"), metadata_folder=str(out / "metadata"),
                             file_format="parquet_npy", meta_columns=["path", "json.url", "txt"])
    vectors, meta = [], []
    for batch, batch_meta in reader(batch_size=4, start=0, end=reader.count):
        vectors.append(batch)
        meta.append(batch_meta)
    got = __import__("pandas").concat(meta)
    assert got["path"].tolist() == emb.paths
    assert got["json.url"].tolist() == emb.fields["json.url"] and got["txt"].tolist() == emb.fields["txt"]
    assert np.array_equal(np.concatenate(vectors), emb.vectors["avg"])


def test_jsonl_on_stdout_carries_the_kept_fields(corpus, local_run):
    root, _, _ = corpus
    proc = run_gpl("embed", "shards/00000.tar", "-o", "-", "--keep-fields", "json.url,txt", "-q", cwd=root)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    emb = local_run[1]
    assert [(d["path"], d["json.url"], d["txt"]) for d in lines] == [
        (p, u, t) for p, u, t in zip(emb.paths, emb.fields["json.url"], emb.fields["txt"]) if p.startswith("00000.tar/")]


@pytest.mark.parametrize("args, words", [
    (["img2dataset.parquet", "--image-column", "png"], "img2dataset.parquet has no column 'png' (--image-column)"),
    (["shards/00000.tar", "--keep-fields", "jsn.url"], "--keep-fields jsn.url: no input holds it"),
    (["shards/{00000..00005}.tar"], "input not found: shards/00003.tar (from shards/{00000..00005}.tar)"),
    (["shards/00000.tar", "--key-column", "key"], "--key-column applies to parquet files, and no input is one"),
    (["shards/00000.tar", "--keep-fields", "txt", "-o", "-", "--format", "npy"], "a bare npy array on stdout"),
])
def test_bad_source_options_are_one_line_and_exit_2(corpus, args, words):
    root, _, _ = corpus
    proc = run_gpl("embed", *args, *(["-o", "x.h5"] if "-o" not in args else []), cwd=root)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and words in err and err.count("\n") == 1, err
    assert not (root / "x.h5").exists()


# --- kill -9, --resume, --update ---------------------------------------------------------------------------

N_SHARDS, PER_SHARD = 20, 6


def small_shards(folder: Path, shards: range, seed: int = 0) -> None:
    """Shards of small photo-like JPEGs, PER_SHARD samples each (with their json and txt)."""
    folder.mkdir(exist_ok=True)
    for s in shards:
        members = []
        for i in range(PER_SHARD):
            image = folder / "tmp.jpg"
            Image.fromarray(make_photo_like((48, 40), seed=seed + s * PER_SHARD + i)).save(image, quality=90)
            members += sample_members(f"{s:05d}{i:04d}", image, f"sample {i} of shard {s}")
        write_tar(folder / f"{s:05d}.tar", members)
    (folder / "tmp.jpg").unlink(missing_ok=True)


def embed_shards(folder: Path, out: Path, *extra: str, **kwargs):
    return run_gpl("embed", str(folder / "*.tar"), "-o", str(out), "-p", "avg,max", "--workers", "1",
                   "--batch-size", "4", *extra, **kwargs)


def journal_chunks(out: Path) -> list[str]:
    journal = str(out) + JOURNAL_SUFFIX
    return [n for n in os.listdir(journal) if n.endswith(".npz")] if os.path.isdir(journal) else []


def test_kill_9_in_the_middle_of_20_shards_then_resume_gives_the_uninterrupted_rows(tmp_path):
    folder = tmp_path / "shards"
    small_shards(folder, range(N_SHARDS))
    reference = tmp_path / "reference.h5"
    assert embed_shards(folder, reference, "-q").returncode == 0
    out = tmp_path / "emb.h5"
    cmd = [sys.executable, "-m", "gpl_cli", "embed", str(folder / "*.tar"), "-o", str(out), "-p", "avg,max", "-q",
           "--workers", "1", "--batch-size", "4", "--checkpoint-rows", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(journal_chunks(out)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -9 and not out.exists()
    saved = sum(len(np.load(os.path.join(str(out) + JOURNAL_SUFFIX, c))["names"]) for c in journal_chunks(out))
    assert 0 < saved < N_SHARDS * PER_SHARD
    resumed = embed_shards(folder, out, "--resume")
    err = resumed.stderr.decode()
    assert resumed.returncode == 0, err
    assert f"embedded {N_SHARDS * PER_SHARD} ({saved} reused)" in err  # finished samples were not decoded again
    got, want = read_embeddings(str(out)), read_embeddings(str(reference))
    assert got.paths == want.paths and got.paths[:2] == ["00000.tar/000000000", "00000.tar/000000001"]
    assert got.failures == [] and np.array_equal(got.stats, want.stats)
    for key in ("avg", "max"):
        assert_vectors_close(got.vectors[key], want.vectors[key])


def test_update_re_embeds_only_the_samples_that_changed_and_drops_the_vanished(tmp_path):
    folder = tmp_path / "shards"
    small_shards(folder, range(3))
    out = tmp_path / "emb.h5"
    assert embed_shards(folder, out, "-q").returncode == 0
    before = read_embeddings(str(out))
    # Shard 1 rewritten: its sample 2 gets another image, its sample 5 is gone; shard 2 removed; shard 3 added.
    with_new = tmp_path / "new"
    small_shards(with_new, range(1, 2), seed=1000)
    import tarfile

    with tarfile.open(folder / "00001.tar") as old, tarfile.open(with_new / "00001.tar") as new:
        members = [(m.name, (new if m.name.startswith("000010002.") else old).extractfile(m.name).read())
                   for m in old.getmembers() if not m.name.startswith("000010005.")]
    write_tar(folder / "00001.tar", members)
    (folder / "00002.tar").unlink()
    small_shards(folder, range(3, 4))
    updated = embed_shards(folder, out, "--update")
    assert updated.returncode == 0, updated.stderr.decode()
    assert "embedded 17 (10 reused)" in updated.stderr.decode()  # shard 0: 6 kept; shard 1: 4 kept, 1 changed; 6 new
    fresh = tmp_path / "fresh.h5"
    assert embed_shards(folder, fresh, "-q").returncode == 0
    got, want = read_embeddings(str(out)), read_embeddings(str(fresh))
    assert got.paths == want.paths and "00001.tar/000010005" not in got.paths
    for key in ("avg", "max"):
        assert_vectors_close(got.vectors[key], want.vectors[key])
    kept = before.paths.index("00000.tar/000000003")
    assert np.array_equal(got.vectors["avg"][got.paths.index("00000.tar/000000003")], before.vectors["avg"][kept])
