"""Nothing lost: interrupted runs resume exactly, --update re-embeds only what changed, one writer at a time."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import numpy as np
import pytest
from conftest import REPO, assert_vectors_close, embed_to, make_photo_like, photo_corpus, run_gpl
from PIL import Image

from gpl_cli.store.formats import read_embeddings
from gpl_cli.store.journal import JOURNAL_SUFFIX
from gpl_cli.store.lock import OutputLock

N_IMAGES = 120


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = photo_corpus(tmp_path_factory.mktemp("resume") / "photos", N_IMAGES, 4)
    (root / "d1" / "broken.jpg").write_bytes(b"garbage")
    return root


@pytest.fixture(scope="module")
def reference(corpus):
    out = corpus.parent / "reference.h5"
    proc = run_gpl("embed", str(corpus), "-o", str(out), "-p", "avg,max", "-q", "--workers", "1")
    assert proc.returncode == 3, proc.stderr.decode()
    return read_embeddings(str(out))


def assert_same(result, reference):
    assert result.paths == reference.paths
    assert result.failures == reference.failures
    for key in ("avg", "max"):
        assert_vectors_close(result.vectors[key], reference.vectors[key])


class Run:
    """A real `gpl embed` in the background; `done` follows its progress bar, drawn on a terminal (a pty),
    as gpl draws bars only there."""

    def __init__(self, corpus, out, checkpoint_rows: int):
        cmd = [sys.executable, "-m", "gpl_cli", "embed", str(corpus), "-o", str(out), "-p", "avg,max",
               "--workers", "1", "--batch-size", "4", "--checkpoint-rows", str(checkpoint_rows)]
        self._terminal, stderr = pty.openpty()
        fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal's size: bars need width
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr)
        os.close(stderr)
        self.err = b""
        self.done = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._terminal, 4096)
            except OSError:  # EIO: the process closed its end
                break
            if not chunk:
                break
            self.err += chunk
            counts = re.findall(rb"(\d+)/%d" % (N_IMAGES + 1), self.err[-200:])
            if counts:
                self.done = int(counts[-1])

    def finish(self) -> tuple[int, bytes]:
        self.proc.wait(timeout=120)
        self._reader.join(timeout=10)
        os.close(self._terminal)
        return self.proc.returncode, self.err


def journal_rows(out) -> int:
    total = 0
    for name in chunks(out):
        with np.load(os.path.join(str(out) + JOURNAL_SUFFIX, name)) as z:
            total += len(z["names"]) + len(z["fail_names"])
    return total


def wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def chunks(out) -> list[str]:
    journal = str(out) + JOURNAL_SUFFIX
    return [n for n in os.listdir(journal) if n.endswith(".npz")] if os.path.isdir(journal) else []


@pytest.mark.parametrize(
    "sig,code,checkpoint_rows",
    [
        (signal.SIGINT, 130, 10_000),  # no checkpoint before the signal: what is saved, the exit saved
        (signal.SIGTERM, 143, 10_000),
        (signal.SIGKILL, -9, 8),  # no chance to flush: only the whole checkpoint chunks survive
    ],
)
def test_interrupted_run_resumes_to_the_uninterrupted_result(corpus, reference, tmp_path, sig, code, checkpoint_rows):
    out = tmp_path / "emb.h5"
    run = Run(corpus, out, checkpoint_rows)
    if sig == signal.SIGKILL:
        wait_for(lambda: len(chunks(out)) >= 2)
    else:
        wait_for(lambda: run.done >= 8)
    seen_done = run.done
    run.proc.send_signal(sig)
    returncode, err = run.finish()
    assert returncode == code, err.decode()
    assert not out.exists()
    if sig != signal.SIGKILL:
        assert b"--resume" in err and b"Traceback" not in err
        # Every image the progress bar had counted before the signal was saved on the way out.
        assert journal_rows(out) >= seen_done >= 8
    if sig == signal.SIGKILL:
        refused = run_gpl("embed", str(corpus), "-o", str(out), "-p", "avg,max", "-q")
        assert refused.returncode == 2 and b"--resume" in refused.stderr
        mixed = run_gpl("embed", str(corpus), "-o", str(out), "-p", "avg", "--resume", "-q")
        assert mixed.returncode == 2 and b"other settings" in mixed.stderr and b"pools" in mixed.stderr
        # Leftovers of a kill during a chunk write or during assembly never count as finished work.
        (tmp_path / "emb.h5.partial").write_bytes(b"half-written output")
        (tmp_path / ("emb.h5" + JOURNAL_SUFFIX) / "chunk-999999.npz.tmp").write_bytes(b"PK half a chunk")
    resumed = run_gpl("embed", str(corpus), "-o", str(out), "-p", "avg,max", "--resume", "--workers", "1")
    assert resumed.returncode == 3, resumed.stderr.decode()
    assert_same(read_embeddings(str(out)), reference)
    assert not os.path.exists(str(out) + JOURNAL_SUFFIX)


def test_update_embeds_only_new_and_changed_files_and_drops_vanished(tmp_path):
    folder = tmp_path / "photos"
    for i in range(20):
        (folder / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_photo_like((48, 40), seed=i)).save(folder / f"d{i % 4}" / f"p{i:03d}.jpg")
    (folder / "d1" / "broken.jpg").write_bytes(b"garbage")
    out = tmp_path / "emb.npy"
    first = run_gpl("embed", str(folder), "-o", str(out), "-p", "avg,max", "-q")
    assert first.returncode == 3
    os.remove(folder / "d0" / "p000.jpg")
    Image.fromarray(make_photo_like((48, 40), seed=999)).save(folder / "d2" / "p002.jpg")  # changed content
    Image.fromarray(make_photo_like((50, 44), seed=1000)).save(folder / "d3" / "new.jpg")
    (folder / "d1" / "broken.jpg").unlink()
    updated = run_gpl("embed", str(folder), "-o", str(out), "-p", "avg,max", "--update")
    assert updated.returncode == 0, updated.stderr.decode()
    # 20 photos - 1 removed - 1 changed were kept; the changed and the new one were embedded.
    assert b"embedded 20 (18 reused)" in updated.stderr
    fresh = tmp_path / "fresh.npy"
    run_gpl("embed", str(folder), "-o", str(fresh), "-p", "avg,max", "-q", check=True)
    got, want = read_embeddings(str(out)), read_embeddings(str(fresh))
    assert got.paths == want.paths and "d0/p000.jpg" not in got.paths and "d3/new.jpg" in got.paths
    assert got.failures == []
    for key in ("avg", "max"):
        assert_vectors_close(got.vectors[key], want.vectors[key])
    wrong = run_gpl("embed", str(folder), "-o", str(out), "-p", "avg", "--update", "-q")
    assert wrong.returncode == 2 and b"other settings" in wrong.stderr


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(corpus, tmp_path):
    out = tmp_path / "emb.h5"
    with OutputLock(str(out)):
        proc = run_gpl("embed", str(corpus / "d0" / "p000.jpg"), "-o", str(out), "-q")
    assert proc.returncode == 2 and b"another gpl run" in proc.stderr
    assert not out.exists()


# --- assembly ----------------------------------------------------------------------------------------


class _Collect:
    """A writer that keeps only what identifies each row (name, first value), not the vectors."""

    def __init__(self):
        self.rows: list[tuple[str, float]] = []
        self.failed: list[str] = []

    def write(self, names, vectors, stats):
        self.rows.extend(zip(names, vectors["avg"][:, 0].tolist()))

    def fail(self, name, reason):
        self.failed.append(name)


def test_assembly_restores_input_order_with_memory_independent_of_the_run(tmp_path):
    """Chunks of 97 rows, written in blocks of 400 rows in shuffled order (as resumed runs fill a
    journal): input order comes back, and assembly's memory stays near one write's worth, not the
    60 MB of vectors in the journal."""
    import tracemalloc

    from gpl_cli.embedding.inputs import InputItem
    from gpl_cli.embedding.job import assemble
    from gpl_cli.store.journal import Journal

    n, dim = 12_000, 1280
    journal = Journal.create(str(tmp_path / "j"), {"run": 1}, ["avg"], flush_rows=97)
    blocks = np.random.default_rng(0).permutation(n // 400)
    order = np.concatenate([np.arange(b * 400, (b + 1) * 400) for b in blocks])
    for start in range(0, n, 4):
        idx = order[start:start + 4]
        vectors = np.zeros((len(idx), dim), np.float32)
        vectors[:, 0] = idx  # each row carries its input number
        journal.write([f"{i:05d}.jpg" for i in idx], {"avg": vectors}, [(1, 2)] * len(idx))
    journal.fail("broken.jpg", "cannot decode")
    journal.flush()
    items = [InputItem(f"{i:05d}.jpg", f"{i:05d}.jpg") for i in range(n)] + [InputItem("broken.jpg", "broken.jpg")]
    out = _Collect()
    tracemalloc.start()
    try:
        assert assemble(journal, items, out) == (n, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.rows == [(f"{i:05d}.jpg", float(i)) for i in range(n)]
    assert out.failed == ["broken.jpg"]
    assert peak < 25 << 20, f"assembly peaked at {peak / 2**20:.0f} MiB"


# --- issue 12: no file of the user's is replaced, no process of a killed run lives on ------------------


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_update_of_a_foreign_h5_leaves_no_journal_and_resume_never_replaces_it(corpus, tmp_path):
    import h5py

    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["mine"] = np.arange(10)
    before = _sha(foreign)
    one = str(corpus / "d0")
    update = run_gpl("embed", one, "-o", str(foreign), "--update", "-q", "--workers", "0")
    assert update.returncode == 2 and b"not a readable gpl embeddings file" in update.stderr
    assert not os.path.exists(str(foreign) + JOURNAL_SUFFIX)
    plain = run_gpl("embed", one, "-o", str(foreign), "-q", "--workers", "0")
    assert plain.returncode == 2 and b"output exists" in plain.stderr
    resume = run_gpl("embed", one, "-o", str(foreign), "--resume", "-q", "--workers", "0")
    assert resume.returncode == 2
    assert _sha(foreign) == before


def test_resume_refuses_to_replace_a_file_that_appeared_where_the_output_goes(corpus, tmp_path):
    out = tmp_path / "emb.h5"
    run = Run(corpus, out, 8)
    wait_for(lambda: len(chunks(out)) >= 1)
    run.proc.kill()
    run.finish()
    out.write_bytes(b"the user's own file, saved here meanwhile")
    resumed = run_gpl("embed", str(corpus), "-o", str(out), "-p", "avg,max", "--resume", "-q", "--workers", "1")
    assert resumed.returncode == 2 and b"is not the output of the unfinished run" in resumed.stderr
    assert out.read_bytes() == b"the user's own file, saved here meanwhile"


def test_resume_after_a_kill_between_the_rename_and_the_journals_removal(corpus, tmp_path, lite0, monkeypatch):
    from gpl_cli.embedding.config import EmbedConfig, RunMode, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.journal import Journal
    from gpl_cli.store.output import Output

    out = tmp_path / "emb.h5"
    args = (EmbedConfig(pools=("avg", "max")), collect_inputs([str(corpus / "d0")]), Output.resolve(str(out)),
            RunOptions(workers=0))
    with monkeypatch.context() as m:
        m.setattr(Journal, "remove", lambda self: None)  # the kill: output renamed, journal still there
        embed_to(*args, backbone=lite0)
    before = _sha(out)
    summary = embed_to(*args, mode=RunMode(resume=True), backbone=lite0)
    assert "already complete" in summary.execution and summary.embedded == len(read_embeddings(str(out)))
    assert _sha(out) == before and not os.path.exists(str(out) + JOURNAL_SUFFIX)


def test_resume_of_a_run_killed_after_it_had_finished_is_accepted(corpus, tmp_path, lite0):
    """The journal already removed, the process not yet gone: --resume finds the complete output."""
    from gpl_cli.embedding.config import EmbedConfig, RunMode, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.errors import GplError
    from gpl_cli.store.output import Output

    out = tmp_path / "emb.h5"
    config, options = EmbedConfig(pools=("avg", "max")), RunOptions(workers=0)
    embed_to(config, collect_inputs([str(corpus / "d1")]), Output.resolve(str(out)), options, backbone=lite0)
    before = _sha(out)
    again = embed_to(config, collect_inputs([str(corpus / "d1")]), Output.resolve(str(out)), options,
                      mode=RunMode(resume=True), backbone=lite0)
    assert "already complete" in again.execution and again.failed == 1 and _sha(out) == before
    with pytest.raises(GplError, match="output exists"):  # other inputs: that is --update's work
        embed_to(config, collect_inputs([str(corpus / "d0")]), Output.resolve(str(out)), options,
                  mode=RunMode(resume=True), backbone=lite0)


def test_a_run_that_fails_before_embedding_anything_leaves_no_journal(corpus, tmp_path):
    out = tmp_path / "emb.h5"
    strict = run_gpl("embed", str(corpus / "d1" / "broken.jpg"), str(corpus / "d0"), "-o", str(out), "--strict",
                     "-q", "--workers", "0", "--batch-size", "1")
    assert strict.returncode == 3
    assert not os.path.exists(str(out) + JOURNAL_SUFFIX) and not out.exists()


def test_the_stat_recorded_is_the_one_of_the_bytes_that_were_decoded(tmp_path, lite0, monkeypatch):
    """A photo replaced after it was decoded but before its row was saved: the row keeps the old
    file's (size, mtime), so --update sees the change and embeds the new content."""
    from gpl_cli.embedding.config import EmbedConfig, RunMode, RunOptions
    from gpl_cli.embedding.embedder import Embedder
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.output import Output

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(make_photo_like((64, 48), seed=i)).save(folder / f"p{i}.png")
    victim = folder / "p1.png"
    original = os.stat(victim)
    real = Embedder.embed_batch

    def replace_then_embed(self, batch):
        if victim.stat().st_ino == original.st_ino:
            Image.fromarray(make_photo_like((80, 60), seed=77)).save(str(victim) + ".new", format="PNG")
            os.replace(str(victim) + ".new", victim)  # the bytes on disk change after decoding
        return real(self, batch)

    out = tmp_path / "emb.h5"
    args = (EmbedConfig(), collect_inputs([str(folder)]), Output.resolve(str(out)), RunOptions(workers=0, batch_size=3))
    with monkeypatch.context() as m:
        m.setattr(Embedder, "embed_batch", replace_then_embed)
        embed_to(*args, backbone=lite0)
    stale = read_embeddings(str(out))
    row = stale.paths.index("p1.png")
    assert tuple(stale.stats[row]) == (original.st_size, original.st_mtime_ns)
    summary = embed_to(*args, mode=RunMode(update=True), backbone=lite0)
    assert summary.reused == 2  # p1.png was embedded again
    fresh = tmp_path / "fresh.h5"
    embed_to(args[0], args[1], Output.resolve(str(fresh)), args[3], backbone=lite0)
    want = read_embeddings(str(fresh)).vectors["avg"]
    assert np.abs(stale.vectors["avg"][row] - want[row]).max() > 0.05  # the first run's row was the old photo's
    assert_vectors_close(read_embeddings(str(out)).vectors["avg"], want)


def test_a_file_that_changes_while_it_is_read_is_read_again_or_fails(tmp_path, monkeypatch):
    from gpl_cli.embedding import images

    path = tmp_path / "p.png"
    Image.fromarray(make_photo_like((64, 48), seed=1)).save(path)
    pre = images.Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3)
    real_open = images.open_rgb
    writes = []

    def open_and_touch(p, min_side=None, every_time=False):
        im = real_open(p, min_side)
        if every_time or not writes:
            writes.append(1)
            Image.fromarray(make_photo_like((64, 48), seed=len(writes) + 1)).save(p)
        return im

    monkeypatch.setattr(images, "open_rgb", open_and_touch)
    once = images.load_sample(0, str(path), pre)
    assert once.failure is None and len(writes) == 1  # read again after the change
    assert once.stat == (os.stat(path).st_size, os.stat(path).st_mtime_ns)
    monkeypatch.setattr(images, "open_rgb", lambda p, m=None: open_and_touch(p, m, every_time=True))
    always = images.load_sample(0, str(path), pre)
    assert always.pixels is None and "changed while it was being read" in always.failure.reason


def _harness():
    """bench/kill_harness.py's /proc helpers (children_of, alive), shared rather than copied."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kill_harness", REPO / "bench" / "kill_harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kill_9_leaves_no_worker_alive_and_an_immediate_resume_is_accepted(corpus, reference, tmp_path):
    out = tmp_path / "emb.h5"
    cmd = [sys.executable, "-m", "gpl_cli", "embed", str(corpus), "-o", str(out), "-p", "avg,max", "-q",
           "--workers", "2", "--batch-size", "2", "--checkpoint-rows", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    harness = _harness()
    wait_for(lambda: len(chunks(out)) >= 1 and len(harness.children_of(proc.pid)) >= 2)
    workers = harness.children_of(proc.pid)
    proc.kill()
    proc.wait()
    time.sleep(1.0)
    assert [w for w in workers if harness.alive(w)] == []
    resumed = run_gpl("embed", str(corpus), "-o", str(out), "-p", "avg,max", "--resume", "-q", "--workers", "1")
    assert resumed.returncode == 3, resumed.stderr.decode()
    assert_same(read_embeddings(str(out)), reference)


def test_the_kill_harness_short_version():
    """bench/kill_harness.py --tiny: kill -9 at random moments, resume at once, same output, no orphan."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kill_harness.py"), "--tiny"], capture_output=True,
                          timeout=900)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert "resumes refused: 0" in out and "alive 1 s later: 0" in out and "equals the uninterrupted run: True" in out


def test_resume_with_other_inputs_is_refused_and_update_finishes_it_exactly(corpus, tmp_path):
    """Bug: --resume after an interrupted run over other inputs started over without a word, and dropped the
    rows the interrupted run had finished. It is refused, naming the difference and the ways on; the
    journal is kept; --update then finishes with the unchanged rows and re-embeds a file that changed."""
    photos = tmp_path / "photos"
    shutil.copytree(corpus, photos)
    out = tmp_path / "emb.h5"
    run = Run(photos, out, 8)
    wait_for(lambda: len(chunks(out)) >= 2)
    run.proc.kill()
    run.finish()
    kept = sorted(chunks(out))
    with np.load(os.path.join(str(out) + JOURNAL_SUFFIX, kept[0])) as z:
        finished = [bytes(n).decode() for n in z["names"]]
    subset = run_gpl("embed", str(photos / "d0"), "-o", str(out), "-p", "avg,max", "--resume", "-q")
    err = subset.stderr.decode()
    assert subset.returncode == 2 and err.count("\n") == 1, err
    assert f"differ from those of the unfinished run in {out}{JOURNAL_SUFFIX}" in err
    assert "are not among them (e.g. d0/p000.jpg)" in err and "--update" in err and "--overwrite" in err
    # The same names in another folder: other files (their sizes or times differ), not the run's own.
    elsewhere = tmp_path / "copy"
    shutil.copytree(photos, elsewhere, copy_function=shutil.copyfile)
    os.utime(elsewhere / finished[0], ns=(0, 0))  # differs even where file times are whole seconds
    moved = run_gpl("embed", str(elsewhere), "-o", str(out), "-p", "avg,max", "--resume", "-q")
    assert moved.returncode == 2 and b"changed since it embedded them" in moved.stderr, moved.stderr
    assert sorted(chunks(out)) == kept and not out.exists()
    finished_rows = 0
    for name in kept:
        with np.load(os.path.join(str(out) + JOURNAL_SUFFIX, name)) as z:
            finished_rows += len(z["names"])
    # A finished file replaced by another photo: --update embeds it anew, keeps the other finished rows.
    Image.fromarray(make_photo_like((48, 40), seed=500)).save(photos / finished[0])
    updated = run_gpl("embed", str(photos), "-o", str(out), "-p", "avg,max", "--update", "--workers", "1")
    assert updated.returncode == 3, updated.stderr.decode()
    assert f"({finished_rows - 1} reused)".encode() in updated.stderr, updated.stderr
    fresh = tmp_path / "fresh.h5"
    run_gpl("embed", str(photos), "-o", str(fresh), "-p", "avg,max", "-q", "--workers", "1")
    assert_same(read_embeddings(str(out)), read_embeddings(str(fresh)))
