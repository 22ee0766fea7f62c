"""Issue 22, outputs and files: a failed write leaves the earlier output whole and no temporaries, an NPY
output's parts are committed and read as one, a replaced file keeps its mode, an embeddings file is
never replaced by another kind of output, names too long for the file system are refused up front,
and SIGTERM on export leaves nothing half-written.

Faults are injected with strace (`-e inject=SYSCALL:error=ENOSPC` on one file's name), which makes the
system refuse exactly one file's creation or writes, as a full disk would."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, SAMPLE_IMAGES, gpl_imports, run_gpl

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="fault injection needs strace")
TEMPORARIES = (".partial", ".tmp", ".creating", ".replaced", ".removing")


def failing(folder: Path, name: str, syscalls: str = "openat", error: str = "ENOSPC") -> list[str]:
    """strace arguments that make `syscalls` on `name` in `folder` fail with `error`: -P matches the name as
    gpl opens it (relative to `folder`, its working folder) and an open descriptor by its absolute name."""
    return ["strace", "-f", "-qq", "-o", "/dev/null", "-P", name, "-P", str(folder / name),
            "-e", f"trace={syscalls}", "-e", f"inject={syscalls}:error={error}"]


def gpl_with_fault(fault: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*fault, sys.executable, "-m", "gpl_cli", *args], cwd=cwd, capture_output=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(TEMPORARIES)]


def assert_refused_cleanly(proc: subprocess.CompletedProcess, status: int, message: str) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == status, err
    assert "Traceback" not in err and message in err, err
    return err


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Two folders of four images each (`old`, `new`) and `old.h5`, embedded from `old` with two poolings."""
    root = tmp_path_factory.mktemp("lost")
    names = sorted(n for n in os.listdir(SAMPLE_IMAGES) if n.endswith((".png", ".jpg")))
    for folder, chosen in (("old", names[:4]), ("new", names[4:8])):
        (root / folder).mkdir()
        for name in chosen:
            shutil.copy(SAMPLE_IMAGES / name, root / folder / name)
    run_gpl("embed", "old", "-o", "old.h5", "-p", "avg,max", "-q", cwd=root, check=True)
    return root


@pytest.fixture
def here(work, tmp_path) -> Path:
    """A fresh copy of `work` for one test."""
    target = tmp_path / "w"
    shutil.copytree(work, target)
    return target


# --- item 1: an NPY output is committed as one ---------------------------------------------


@needs_strace
@pytest.mark.parametrize("part", ["o.avg.npy", "o.max.npy", "o.paths.txt", "o.json"])
def test_a_failed_write_of_any_npy_part_leaves_the_earlier_output_whole(here, part):
    run_gpl("embed", "old", "-o", "o.npy", "-p", "avg,max", "-q", cwd=here, check=True)
    before = digests(here)
    proc = gpl_with_fault(failing(here, part + ".partial"), "embed", "new", "-o", "o.npy", "-p", "avg,max", "-q",
                          "--overwrite", cwd=here)
    err = assert_refused_cleanly(proc, 1, f"no space left on device while writing {part}")
    assert "--resume" in err  # the journal keeps the finished rows
    after = digests(here)
    assert {f: after.get(f) for f in before} == before and not temporaries(here)
    proc = run_gpl("embed", "new", "-o", "o.npy", "-p", "avg,max", "-q", "--resume", cwd=here)
    assert proc.returncode == 0, proc.stderr.decode()
    listed = run_gpl("neighbors", "o.npy", "--outliers", "-k", "2", "--top", "4", cwd=here, check=True).stdout.decode()
    assert sorted(line.split("\t")[2] for line in listed.splitlines()) == sorted(os.listdir(here / "new"))


def test_npy_parts_of_two_runs_are_refused_together(here):
    """A kill between two renames can leave one run's vectors beside another's names: readers refuse the set."""
    run_gpl("embed", "old", "-o", "a.npy", "-p", "avg,max", "-q", cwd=here, check=True)
    run_gpl("embed", "new", "-o", "b.npy", "-p", "avg,max", "-q", cwd=here, check=True)
    shutil.copy(here / "a.avg.npy", here / "b.avg.npy")  # same shape: only the checksum tells them apart
    proc = run_gpl("export", "b.npy", "-o", "b.h5", cwd=here)
    assert_refused_cleanly(proc, 2, "its parts do not belong together (b.avg.npy: its contents are not those")
    assert not (here / "b.h5").exists()
    shutil.copy(here / "a.paths.txt", here / "b.paths.txt")  # what other tools read the names from
    proc = run_gpl("info", "b.npy", cwd=here)  # reads no vectors: the sizes are checked still
    assert_refused_cleanly(proc, 2, "its parts do not belong together (b.paths.txt: ")


@needs_strace
def test_export_to_npy_keeps_the_earlier_set_when_its_metadata_cannot_be_written(here):
    run_gpl("export", "old.h5", "-o", "x.npy", cwd=here, check=True)
    run_gpl("embed", "new", "-o", "new.h5", "-p", "avg,max", "-q", cwd=here, check=True)
    before = digests(here)
    proc = gpl_with_fault(failing(here, "x.json.partial", "write"), "export", "new.h5", "-o", "x.npy",
                          "--overwrite", cwd=here)
    assert_refused_cleanly(proc, 1, "no space left on device while writing x.json")
    assert digests(here) == before and not temporaries(here)


# --- item 12: full disks -----------------------------------------------------------------------


@needs_strace
def test_a_full_disk_while_writing_h5_is_one_line_and_the_run_resumes(here):
    """HDF5 itself crashed the process (SIGBUS/SIGSEGV) after a refused write; its writes now go through gpl."""
    run_gpl("embed", "old", "-o", "o.h5", "-q", cwd=here, check=True)
    before = digests(here)
    proc = gpl_with_fault(failing(here, "o.h5.partial", "write,pwrite64"), "embed", "new", "-o", "o.h5", "-q",
                          "--overwrite", cwd=here)
    assert_refused_cleanly(proc, 1, "no space left on device while writing o.h5; the finished rows are kept in "
                                    "o.h5.gpl-journal")
    after = digests(here)
    assert {f: after.get(f) for f in before} == before and not temporaries(here)
    run_gpl("embed", "new", "-o", "o.h5", "-q", "--resume", cwd=here, check=True)
    info = run_gpl("info", "o.h5", "--json", cwd=here, check=True).stdout.decode()
    assert '"count": 4' in info and not (here / "o.h5.gpl-journal").exists()


@needs_strace
def test_a_full_journal_is_one_line_and_leaves_no_empty_journal(here):
    before = digests(here)
    proc = gpl_with_fault(failing(here, "o.h5.gpl-journal/chunk-000001.npz.tmp"), "embed", "new", "-o", "o.h5",
                          "-q", cwd=here)
    assert_refused_cleanly(proc, 1, "no space left on device while writing o.h5.gpl-journal/chunk-000001.npz")
    assert digests(here) == before and not temporaries(here)  # no journal, no output


@needs_strace
@pytest.mark.parametrize("target", ["x.csv", "x.h5", "x.npy"])
def test_export_on_a_full_disk_leaves_no_partial_files(here, target):
    part = "x.max.npy.partial" if target.endswith(".npy") else target + ".partial"
    proc = gpl_with_fault(failing(here, part, "write,pwrite64"), "export", "old.h5", "-o", target, cwd=here)
    assert_refused_cleanly(proc, 1, "no space left on device while writing x.")
    assert sorted(os.listdir(here)) == ["new", "old", "old.h5"]


@needs_strace
@pytest.mark.parametrize("command, target", [
    (("whiten", "fit", "old.h5", "--pool", "avg", "-o", "w.npz"), "w.npz"),
    (("classify", "new", "-q", "-o", "c.csv"), "c.csv"),
    (("classify", "new", "-q", "-o", "c.jsonl"), "c.jsonl"),
])
def test_other_writers_on_a_full_disk_say_so_in_one_line(here, command, target):
    (here / target).write_bytes(b"earlier")
    proc = gpl_with_fault(failing(here, target + ".partial", "write"), *command, "--overwrite", cwd=here)
    assert_refused_cleanly(proc, 1, f"no space left on device while writing {target}")
    assert (here / target).read_bytes() == b"earlier" and not temporaries(here)


# --- item 5: explain --json is written whole or not at all -------------------------------------


@needs_strace
def test_explain_json_on_a_full_disk_keeps_the_earlier_file(here):
    (here / "w.json").write_text('{"earlier": true}\n')
    proc = gpl_with_fault(failing(here, "w.json.partial", "write"), "explain", "new/" + os.listdir(here / "new")[0],
                          "-o", "x.png", "--json", "w.json", "--overwrite", cwd=here)
    assert_refused_cleanly(proc, 1, "no space left on device while writing w.json")
    assert (here / "w.json").read_text() == '{"earlier": true}\n' and not temporaries(here)


# --- item 6: a replaced file keeps its permissions -----------------------------------------------


def test_an_updated_output_keeps_its_mode(here):
    run_gpl("embed", "old", "-o", "o.h5", "-q", cwd=here, check=True)
    os.chmod(here / "o.h5", 0o600)
    shutil.copy(here / "new" / os.listdir(here / "new")[0], here / "old" / "added.png")
    run_gpl("embed", "old", "-o", "o.h5", "-q", "--update", cwd=here, check=True)
    assert (here / "o.h5").stat().st_mode & 0o7777 == 0o600
    assert '"count": 5' in run_gpl("info", "o.h5", "--json", cwd=here, check=True).stdout.decode()


# --- item 4: no command writes over its input, or over an embeddings file -------------------------


@pytest.mark.parametrize("args", [
    ("explain", "old/{first}", "-o", "old/{first}"),
    ("whiten", "fit", "old.h5", "--pool", "avg", "-o", "old.h5"),
    ("neighbors", "old.h5", "--outliers", "--html", "old.h5"),
    ("explain", "old/{first}", "old/{second}", "-o", "x.png", "--json", "old.h5"),
    ("classify", "old/{first}", "-o", "old.h5", "--format", "csv"),
], ids=["explain-figure", "whiten-fit", "outliers-page", "explain-json", "classify-csv"])
def test_no_output_replaces_an_input_or_an_embeddings_file(here, args):
    first, second = sorted(os.listdir(here / "old"))[:2]
    before = digests(here)
    proc = run_gpl(*(a.format(first=first, second=second) for a in args), "--overwrite", cwd=here)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "is one of the inputs" in err or "is a gpl embeddings file; this command does not replace it" in err, err
    assert digests(here) == before and not (here / "x.png").exists()


# --- item 13: a name the temporaries push past the file system's limit ---------------------------


def test_a_name_too_long_for_its_temporaries_is_refused_before_the_model_loads(tmp_path):
    name = str(tmp_path / ("a" * 248 + ".h5"))
    status, heavy, err = gpl_imports("embed", str(SAMPLE_IMAGES / "coffee.png"), "-o", name)
    assert status == 2 and "torch" not in heavy, err
    assert "its name is too long; gpl also writes" in err and "at most 255 bytes" in err
    assert os.listdir(tmp_path) == []


# --- item 14: SIGTERM on export ------------------------------------------------------------------


def test_sigterm_during_export_leaves_no_partial_files(tmp_path):
    from gpl_cli.store.formats.h5 import H5Writer

    rows = np.random.default_rng(0).standard_normal((6000, 1280)).astype(np.float32)
    writer = H5Writer(str(tmp_path / "big.h5"), {"avg": 1280})
    writer.write([f"img{i:05d}.png" for i in range(len(rows))], {"avg": rows})
    writer.close({"pool_keys": ["avg"], "pools": {"avg": {"op": "avg", "params": {}, "dim": 1280}}})
    proc = subprocess.Popen([sys.executable, "-m", "gpl_cli", "export", "big.h5", "-o", "big.csv"], cwd=tmp_path,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (tmp_path / "big.csv.partial").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the export ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 143 and "Traceback" not in err and "terminated" in err, err
    assert sorted(os.listdir(tmp_path)) == ["big.h5"]


# --- the fault harness ---------------------------------------------------------------------------


@needs_strace
def test_the_fault_harness_holds_for_export_to_npy():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "fault_harness.py"), "--case", "export-npy",
                           "--errors", "ENOSPC"], capture_output=True, timeout=600)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    held = [line for line in out.splitlines() if line.startswith("export-npy ") and " held: " in line]
    assert len(held) >= 8 and "FAILED" not in out, out  # four files, each failing at creation and at writing


# --- standard output on a full device -------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("command", [
    ("info", "old.h5"),  # text through click
    ("neighbors", "old.h5", "--duplicates", "--threshold", "-1", "--json"),
    ("embed", "new", "-o", "-", "--format", "npy", "--pool", "avg"),  # the spooled array, written at the end
    ("embed", "new", "-o", "-", "--format", "jsonl"),  # rows as each batch is done
])
def test_stdout_on_a_full_device_is_one_line_not_a_traceback(work, command):
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "gpl_cli", *command], cwd=work, stdout=full,
                              stderr=subprocess.PIPE, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_refused_cleanly(proc, 1, "no space left on device while writing standard output")
    assert proc.stderr.decode().count("no space left") == 1
