"""`gpl neighbors --duplicates --keep RULE --move-to DIR` and `--undo DIR` on real files: a SIGKILL at every
durable step (each rename, unlink and fsync) of a move or of an undo, then a rerun, loses no file and leaves
each in exactly one place; the undo restores the tree byte for byte. Also across filesystems (the rename
refused with EXDEV, as the kernel does), a name clash in DIR, and a file changed after embedding."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile

import pytest
from conftest import SAMPLE_IMAGES, run_gpl
from PIL import Image

from gpl_cli.analysis.duplicates.groups import find_duplicates
from gpl_cli.store.moves import PARTIAL


def forked(args: list[str], cwd, kill_at: int = 0, cross: str | None = None) -> tuple[int, int, str]:
    """Run the CLI in a forked child (gpl_cli is already imported here, so a run costs only its work), with
    os.rename, os.unlink and os.fsync counted: the kill_at-th call SIGKILLs the child before it happens.
    With `cross` (a folder), a rename between it and anywhere else fails with EXDEV, as a rename across
    filesystems does. Returns (exit status, -9 for the kill; the calls counted; stderr)."""
    from gpl_cli.cli.main import main

    with tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            status = 99
            try:
                os.chdir(cwd)
                sys.stdout = open(os.devnull, "w")
                sys.stderr = open(err.fileno(), "w", closefd=False)
                counter = {"calls": 0}
                rename = os.rename

                def counted(real):
                    def call(*a, **kw):
                        counter["calls"] += 1
                        if counter["calls"] == kill_at:
                            os.kill(os.getpid(), signal.SIGKILL)
                        if cross and real is rename:
                            inside = [os.path.abspath(p).startswith(cross + os.sep) for p in a[:2]]
                            if inside[0] != inside[1]:
                                raise OSError(errno.EXDEV, "Invalid cross-device link")
                        return real(*a, **kw)
                    return call

                os.rename, os.unlink, os.fsync = counted(os.rename), counted(os.unlink), counted(os.fsync)
                sys.argv = ["gpl", *args]
                try:
                    main()
                except SystemExit as exc:
                    status = exc.code or 0
                sys.stderr.write(f"\nCALLS {counter['calls']}\n")
                sys.stderr.flush()
            finally:
                os._exit(status)
        _, wait = os.waitpid(pid, 0)
        err.seek(0)
        text = err.read().decode()
    steps = int(text.rsplit("CALLS ", 1)[1]) if "CALLS " in text else -1
    return os.waitstatus_to_exitcode(wait), steps, text


def tree(root) -> dict[str, str]:
    """Every file below root (relative path -> sha256 of its bytes)."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """photos/: six sample photos, an exact copy of the panda in a subfolder, half-size copies of the panda
    and of the sheep; embedded once. Kept as `pristine` to restore before each run (mtimes included)."""
    work = tmp_path_factory.mktemp("moves")
    pristine = work / "pristine"
    (pristine / "copies").mkdir(parents=True)
    for name in ("panda.jpg", "sheep.jpg", "giraffe.jpg", "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg"):
        shutil.copy(SAMPLE_IMAGES / name, pristine / name)
    shutil.copy(SAMPLE_IMAGES / "panda.jpg", pristine / "copies" / "panda again.jpg")
    for name in ("panda", "sheep"):
        im = Image.open(SAMPLE_IMAGES / f"{name}.jpg")
        im.resize((im.width // 2, im.height // 2)).save(pristine / "copies" / f"{name}_half.jpg", quality=90)
    photos = work / "photos"
    shutil.copytree(pristine, photos)
    run_gpl("embed", str(photos), "-o", str(work / "photos.h5"), "-q", check=True)
    # What every forked run needs, imported here once
    find_duplicates(str(work / "photos.h5"), keep="largest")
    for module in ("gpl_cli.analysis.rerank", "gpl_cli.store.output", "gpl_cli.store.sink"):
        importlib.import_module(module)
    return work, pristine, photos


# --keep largest: the panda and its exact copy tie on pixels and bytes, and the first path is kept
REMOVED = {"panda.jpg", "copies/panda_half.jpg", "copies/sheep_half.jpg"}


def fresh(work, pristine, photos):
    for folder in (photos, work / "removed"):
        shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(pristine, photos)  # copy2: the sizes and mtimes the file recorded
    return tree(pristine)


MOVE = ["neighbors", "photos.h5", "--duplicates", "--keep", "largest", "--move-to", "removed"]
UNDO = ["neighbors", "--undo", "removed"]


def assert_each_file_once(work, photos, original, settled=True):
    """Every original file is whole where it was, or below removed/ if it was to go, and nothing else is
    there. Settled: in exactly one place. Right after a kill, a step may hold a file in both places (a copy
    across filesystems, in place and verified, its original not yet unlinked) and gpl's own incomplete copy
    (PARTIAL) may lie beside it: never less than one whole copy."""
    def ours(path):
        return path.startswith(".gpl-moves") or (not settled and path.endswith(PARTIAL))

    now = {k: v for k, v in tree(photos).items() if not ours(k)}
    moved = {k: v for k, v in tree(work / "removed").items() if not ours(k)}
    assert set(moved) <= REMOVED
    assert all(original.get(k) == v for k, v in {**now, **moved}.items())  # nothing but whole originals
    assert all(now.get(k) == v or moved.get(k) == v for k, v in original.items())  # each of them somewhere
    if settled:
        assert not set(now) & set(moved), set(now) & set(moved)


@pytest.mark.parametrize("cross", [False, True], ids=["rename", "across-filesystems"])
def test_a_kill_at_any_step_of_a_move_or_undo_loses_nothing(collection, cross):
    work, pristine, photos = collection
    cross = str(photos) if cross else None
    original = fresh(work, pristine, photos)
    status, steps, err = forked(MOVE, work, cross=cross)  # an uninterrupted move counts its steps
    assert status == 0 and set(tree(work / "removed")) - {".gpl-moves.jsonl"} == REMOVED, err
    assert steps >= 3 * len(REMOVED)  # at least a journal sync before and after each move, and the move
    for kill_at in range(1, steps + 1):
        fresh(work, pristine, photos)
        status, _, err = forked(MOVE, work, kill_at, cross)
        assert status == -signal.SIGKILL, (kill_at, err)
        assert_each_file_once(work, photos, original, settled=False)
        status, _, err = forked(MOVE, work)  # the rerun, on one filesystem or the other alike
        assert status == 0, (kill_at, err)
        assert set(tree(photos)) == set(original) - REMOVED, kill_at
        assert_each_file_once(work, photos, original)
        if kill_at % 4 == 0:  # the undo of a job finished by a rerun (the loop below kills undos)
            status, _, err = forked(UNDO, work)
            assert status == 0 and tree(photos) == original, (kill_at, err)
    # kills during the undo of a finished move (kept as a snapshot: copy2 keeps what the journal relies on)
    fresh(work, pristine, photos)
    assert forked(MOVE, work, cross=cross)[0] == 0
    moved = work / "moved"
    shutil.rmtree(moved, ignore_errors=True)
    shutil.copytree(photos, moved / "photos")
    shutil.copytree(work / "removed", moved / "removed")
    status, steps, err = forked(UNDO, work, cross=cross)
    assert status == 0 and tree(photos) == original, err
    for kill_at in range(1, steps + 1):
        for folder in ("photos", "removed"):
            shutil.rmtree(work / folder)
            shutil.copytree(moved / folder, work / folder)
        status, _, err = forked(UNDO, work, kill_at, cross)
        assert status == -signal.SIGKILL, (kill_at, err)
        assert_each_file_once(work, photos, original, settled=False)
        status, _, err = forked(UNDO, work)
        assert status == 0, (kill_at, err)
        assert tree(photos) == original, kill_at  # byte for byte, every file in its place
        assert not [p for p in tree(work / "removed") if not p.startswith(".gpl-moves")], kill_at
    # and the command itself, in its own process: a rerun of a finished job moves nothing again
    assert run_gpl(*MOVE, cwd=work).returncode == 0
    again = run_gpl(*MOVE, cwd=work)
    assert again.returncode == 0 and b"already moved into removed by an earlier run" in again.stderr


def test_a_name_clash_in_the_folder_is_refused_not_overwritten(collection):
    work, pristine, photos = collection
    original = fresh(work, pristine, photos)
    (work / "removed" / "copies").mkdir(parents=True)
    (work / "removed" / "copies" / "sheep_half.jpg").write_bytes(b"the user's own file")
    proc = run_gpl(*MOVE, cwd=work)
    assert proc.returncode == 3, proc.stderr.decode()
    err = proc.stderr.decode()
    assert ("gpl: not moved: photos/copies/sheep_half.jpg: removed/copies/sheep_half.jpg exists, and gpl never "
            "replaces a file\n") in err
    assert (work / "removed" / "copies" / "sheep_half.jpg").read_bytes() == b"the user's own file"
    assert tree(photos) == {k: v for k, v in original.items() if k not in REMOVED - {"copies/sheep_half.jpg"}}
    undone = run_gpl(*UNDO, cwd=work)  # puts back what was moved, leaves the user's file alone
    assert undone.returncode == 0 and tree(photos) == original, undone.stderr.decode()
    assert (work / "removed" / "copies" / "sheep_half.jpg").read_bytes() == b"the user's own file"


def test_a_file_changed_after_embedding_stays_and_gpl_says_why(collection):
    work, pristine, photos = collection
    fresh(work, pristine, photos)
    changed = photos / "copies" / "panda_half.jpg"
    changed.write_bytes(changed.read_bytes() + b"\0")  # one byte more
    touched = photos / "panda.jpg"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # newer, same bytes
    proc = run_gpl(*MOVE, "--json", cwd=work)
    assert proc.returncode == 3
    err = proc.stderr.decode()
    assert "gpl: not moved: photos/copies/panda_half.jpg: changed since it was embedded (" in err, err
    assert "gpl: not moved: photos/panda.jpg: changed since it was embedded (modified since)\n" in err, err
    assert changed.exists() and touched.exists() and not (photos / "copies" / "sheep_half.jpg").exists()
    moves = json.loads(proc.stdout)["moves"]
    assert [m["from"] for m in moves["moved"]] == [str(photos / "copies" / "sheep_half.jpg")]
    assert sorted(m["path"] for m in moves["not_moved"]) == sorted([str(touched), str(changed)])


def test_undo_refuses_where_the_original_place_is_taken(collection):
    work, pristine, photos = collection
    fresh(work, pristine, photos)
    assert run_gpl(*MOVE, cwd=work).returncode == 0
    (photos / "copies" / "sheep_half.jpg").write_bytes(b"a new file in the old place")
    proc = run_gpl(*UNDO, cwd=work)
    assert proc.returncode == 3
    assert "not put back: " in proc.stderr.decode() and "is taken" in proc.stderr.decode()
    assert (photos / "copies" / "sheep_half.jpg").read_bytes() == b"a new file in the old place"
    assert (work / "removed" / "copies" / "sheep_half.jpg").exists()  # still there, whole
    assert (photos / "copies" / "panda_half.jpg").exists()  # the others are back
