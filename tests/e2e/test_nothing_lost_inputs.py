"""Nothing lost, round three (issue 22): inputs, locks, the job and option bounds.

Unreadable folders are failures (and --update keeps their rows), the walk has no depth limit, an output
claims every file it writes, a signal during assembly still ends the command, --resume words its refusal
by what the file is, and sizes and counts are bounded by the machine before anything loads.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import sys

import numpy as np
import pytest
from conftest import SAMPLE_IMAGES, gpl_imports, run_gpl

import gpl_cli
from gpl_cli.embedding.config import EmbedConfig, RunOptions
from gpl_cli.embedding.inputs import collect_inputs
from gpl_cli.errors import GplError
from gpl_cli.store.formats import read_embeddings
from gpl_cli.store.output import Output

NO_CAPS = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--"]
needs_capsh = pytest.mark.skipif(shutil.which("capsh") is None, reason="capsh drops root's file capabilities")


@pytest.fixture
def photos(tmp_path):
    """a/ with two photos, b/ with one."""
    root = tmp_path / "photos"
    for rel in ("a/panda.jpg", "a/sheep.jpg", "b/giraffe.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE_IMAGES / os.path.basename(rel), root / rel)
    return root


def gpl_without_caps(*args: str, cwd):
    """The CLI as a user whom permissions bind (root without its file capabilities)."""
    import subprocess

    command = shlex.join([sys.executable, "-m", "gpl_cli", *args])
    return subprocess.run([*NO_CAPS, "-c", command], capture_output=True, cwd=cwd, timeout=600)


# --- item 2: unreadable folders ------------------------------------------------------------------


@needs_capsh
def test_an_unreadable_folder_is_a_failure_and_update_keeps_its_rows(photos, tmp_path):
    out = tmp_path / "p.h5"
    run_gpl("embed", str(photos), "-o", str(out), "-q", check=True)
    before = read_embeddings(str(out))
    os.chmod(photos / "b", 0)
    try:
        updated = gpl_without_caps("embed", str(photos), "-o", str(out), "--update", "-q", cwd=tmp_path)
        fresh = gpl_without_caps("embed", str(photos), "-o", str(tmp_path / "fresh.h5"), "-q", cwd=tmp_path)
    finally:
        os.chmod(photos / "b", 0o755)
    assert updated.returncode == 3, updated.stderr.decode()
    assert b"b: cannot read this folder: Permission denied" in updated.stderr
    after = read_embeddings(str(out))
    assert after.paths == before.paths == ["a/panda.jpg", "a/sheep.jpg", "b/giraffe.jpg"]  # b's row kept, in place
    assert after.vectors["avg"].tobytes() == before.vectors["avg"].tobytes()
    assert after.failures == [("b", "cannot read this folder: Permission denied")]
    assert fresh.returncode == 3, fresh.stderr.decode()
    got = read_embeddings(str(tmp_path / "fresh.h5"))
    assert (got.paths, got.failures) == (["a/panda.jpg", "a/sheep.jpg"], after.failures)
    # Readable again: the row is checked as usual and the failure goes.
    again = run_gpl("embed", str(photos), "-o", str(out), "--update", "-q")
    assert again.returncode == 0, again.stderr.decode()
    assert read_embeddings(str(out)).failures == []


def test_a_tree_deeper_than_the_recursion_limit_is_walked(tmp_path):
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "top.jpg").write_bytes(b"x")
    deepest = folder
    for _ in range(max(1500, sys.getrecursionlimit() + 100)):
        deepest = deepest / "d"
        deepest.mkdir()  # one by one: os.makedirs itself recurses
    (deepest / "bottom.jpg").write_bytes(b"x")
    try:
        items = collect_inputs([str(folder)]).items
        assert [it.name.count("/") for it in items] == [len(deepest.relative_to(folder).parts), 0]
        assert [os.path.basename(it.name) for it in items] == ["bottom.jpg", "top.jpg"]
        assert not any(it.error for it in items)
    finally:  # bottom up: pytest's own clean-up (shutil.rmtree) recurses, and this tree is too deep for it
        (deepest / "bottom.jpg").unlink()
        while deepest != folder:
            deepest.rmdir()
            deepest = deepest.parent


def test_folders_past_path_max_are_failures_not_skipped(tmp_path):
    """20 nested folders of 250 characters: the ones past PATH_MAX cannot be opened and are reported."""
    root = tmp_path / "long"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    try:
        for i in range(20):  # relative to a descriptor: no path here is longer than PATH_MAX
            name = chr(ord("a") + i) * 250
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
            with open(os.open("p.jpg", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
                f.write(b"x")
    finally:
        os.close(fd)
    items = collect_inputs([str(root)]).items
    failed = [it for it in items if it.error]
    assert len(failed) == 1 and failed[0].error == "cannot read this folder: File name too long"
    assert len(items) - 1 == failed[0].name.count("/")  # every folder above it gave its image
    assert all(len(os.path.join(str(root), it.name)) < os.pathconf("/", "PC_PATH_MAX") for it in items if not it.error)


# --- item 3: an output claims every file it writes -----------------------------------------------


def test_outputs_that_share_a_file_are_not_written_at_once(photos, tmp_path):
    col = Output.resolve(str(tmp_path / "col.npy"), keys=["avg", "max"])
    with col.lock():  # a run writing col.avg.npy, col.max.npy, col.paths.txt and col.json
        proc = run_gpl("embed", str(photos / "a"), "-o", str(tmp_path / "col.avg.npy"), "-q")
    assert proc.returncode == 2, proc.stderr.decode()
    assert f"another gpl run (pid {os.getpid()}) is writing {tmp_path / 'col.avg.npy'}".encode() in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["photos"]  # nothing written, no lock left


def test_a_refused_claim_releases_what_it_had_taken(tmp_path):
    from gpl_cli.store.lock import OutputLock

    col = Output.resolve(str(tmp_path / "col.npy"), keys=["avg", "max"])
    with OutputLock(str(tmp_path / "col.paths.txt")):  # sorted last of col.npy's files: the others are taken first
        with pytest.raises(GplError, match=r"is writing .*col\.paths\.txt"):
            col.lock().__enter__()
        assert sorted(os.listdir(tmp_path)) == ["col.paths.txt.lock"]
    with col.lock():  # and free again once the holder is gone
        assert len(os.listdir(tmp_path)) == 5  # col.npy (its journal) and its four files
    assert os.listdir(tmp_path) == []


# --- item 14: a signal during assembly, --resume on a foreign file --------------------------------


def test_a_sigint_during_assembly_still_ends_the_command(photos, tmp_path, lite0, monkeypatch):
    """The signal lets the output complete, then the command stops with 130."""
    from conftest import embed_to

    from gpl_cli.embedding import job

    real = job.assemble

    def interrupted_assembly(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(job, "assemble", interrupted_assembly)
    save = Output.resolve(str(tmp_path / "s.h5"), keys=["avg"]).check()
    with pytest.raises(job.Interrupted) as caught:
        embed_to(EmbedConfig(pools=("avg",)), collect_inputs([str(photos)]), save, RunOptions(workers=0), backbone=lite0)
    assert caught.value.exit_code == 130
    assert read_embeddings(save.path).paths == ["a/panda.jpg", "a/sheep.jpg", "b/giraffe.jpg"]  # whole
    assert sorted(os.listdir(tmp_path)) == ["photos", "s.h5"]  # no journal, no lock


def test_resume_on_a_file_it_did_not_write_does_not_call_it_complete(photos, tmp_path):
    out = tmp_path / "x.h5"
    out.write_bytes(b"not an output")
    proc = run_gpl("embed", str(photos), "-o", str(out), "--resume", "-q")
    assert proc.returncode == 2
    assert b"no unfinished run to resume: it is not a gpl output" in proc.stderr
    assert b"complete" not in proc.stderr
    assert out.read_bytes() == b"not an output"


# --- items 11, 13, 14: option bounds and the API's checks ------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(batch_size=-1), "--batch-size must be an integer of at least 1, got -1"),
        (dict(workers=-1), "--workers must be an integer of at least 0, got -1"),
        (dict(device="tpu"), "unknown device 'tpu'"),
        (dict(normalize="l3"), "unknown --normalize 'l3'; valid: none, l2"),
        (dict(power="0.5"), "--power must be > 0 and finite, got '0.5'"),
        (dict(power=math.inf), "--power must be > 0 and finite, got inf"),
        (dict(pool=3), "pool must be a name or a list of names, got 3"),
        (dict(timeout=math.nan), r"--timeout must be a finite number of seconds \(0: no limit\), got nan"),
        (dict(timeout=math.inf), "--timeout must be a finite number of seconds"),
        (dict(workers=10**6), "--workers 1000000 is more than 4 per CPU core"),
        (dict(batch_size=10**9), r"--batch-size 1000000000 .* needs about .* GiB of memory, more than half"),
        (dict(resize="keep-aspect", max_size=100_000), r"--max-size 100000 .* of memory, .*use at most \d+"),
    ],
)
def test_the_api_refuses_what_the_command_line_refuses(options, message):
    with pytest.raises(GplError, match=message):
        gpl_cli.embed(str(SAMPLE_IMAGES / "panda.jpg"), **options)


@pytest.mark.parametrize(
    "args",
    [
        ("--workers", "1000"),
        ("--resize", "keep-aspect", "--max-size", "100000"),
        ("--batch-size", "1000000000"),
        ("--timeout", "nan"),
        ("--timeout", "inf"),
        ("--power", "inf"),
    ],
)
def test_absurd_values_are_refused_before_torch_loads(photos, tmp_path, args):
    out = tmp_path / "o.h5"
    status, heavy, stderr = gpl_imports("embed", str(photos), "-o", str(out), *args)
    assert status == 2, stderr
    assert "torch" not in heavy
    assert stderr.startswith("gpl: error: ") and stderr.count("\n") == 1, stderr
    assert sorted(os.listdir(tmp_path)) == ["photos"]  # no output, journal or lock


def test_the_largest_max_size_is_one_the_machine_holds():
    side = EmbedConfig.largest_side()
    EmbedConfig(resize="keep-aspect", max_size=side).check()
    with pytest.raises(GplError, match=f"use at most {side}$"):
        EmbedConfig(resize="keep-aspect", max_size=side + 1).check()


def test_a_whitening_file_with_a_nan_is_refused(tmp_path):
    from gpl_cli.pooling.whiten import Whitening, load_whitening

    mean, projection = np.zeros(4), np.eye(3, 4)
    projection[1, 2] = np.nan
    path = tmp_path / "w.npz"
    with open(path, "wb") as f:
        Whitening(mean, projection, np.ones(3), {"pooling": "avg"}).write(f)
    with pytest.raises(GplError, match="w.npz: the whitening holds NaN, infinite or non-numeric values"):
        load_whitening(str(path))


def test_read_takes_one_pooling_by_name(photos, tmp_path):
    out = tmp_path / "p.h5"
    run_gpl("embed", str(photos / "a"), "-o", str(out), "-p", "avg,max", "-q", check=True)
    one = gpl_cli.read(out, pools="avg")
    assert list(one.vectors) == ["avg"]
    assert one.vectors["avg"].tobytes() == gpl_cli.read(out).vectors["avg"].tobytes()
