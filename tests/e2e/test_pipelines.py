"""gpl in real shell pipelines: stdin lists, data on stdout, closed pipes, Ctrl-C.

Every pipeline runs as a real `bash` chain with the installed `gpl` entry point. The vectors
that come out of stdout are compared with an HDF5 file embedded in process from the same
list (same backbone, poolings and inputs).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import embed_to, make_photo_like

from gpl_cli.embedding.inputs import read_path_list
from gpl_cli.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_SOME_FAILED, EXIT_USAGE
from gpl_cli.store.sink import line_name

# File names a pipeline must carry unchanged (bytes, as on disk).
AWKWARD = [
    b"with space.png",
    "\u00fcn\u00efc\u00f6d\u00e9 \u5199\u771f.jpg".encode(),
    b"bad\xff\xfe.png",
    b"tab\there.jpg",
    b" lead.png",
    b"cr\rinside.png",
    b"-dash.jpg",
]
NEWLINE_NAME = b"new\nline.png"  # only a NUL-separated list can carry it
BROKEN = b"broken.jpg"  # not an image: a failure, exit status 3
POOLS = "avg,max"

ENV = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def bash(script: str, cwd, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=cwd, input=stdin, capture_output=True, env=ENV, timeout=timeout)


def assert_clean(stderr: bytes) -> None:
    text = stderr.decode(errors="replace")
    assert "Traceback" not in text and "Exception ignored" not in text, text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, lite0):
    """A folder of small images under awkward names, plus the reference embeddings of all of them."""
    from PIL import Image

    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.formats import read_embeddings
    from gpl_cli.store.output import Output

    root = tmp_path_factory.mktemp("pipes")
    pics = os.path.join(os.fsencode(root), b"pics")
    os.mkdir(pics)
    for i, name in enumerate([*AWKWARD, NEWLINE_NAME]):
        fmt = "PNG" if name.endswith(b".png") else "JPEG"
        with open(os.path.join(pics, name), "wb") as f:
            Image.fromarray(make_photo_like((64 + 8 * i, 48), seed=i)).save(f, format=fmt)
    with open(os.path.join(pics, BROKEN), "wb") as f:
        f.write(b"this is not a JPEG")
    listed = [b"pics/" + n for n in [*AWKWARD, NEWLINE_NAME, BROKEN]]
    inputs = collect_inputs(["-"], stdin=io.BytesIO(b"\0".join(listed)), nul_separated=True)
    ref_file = str(root / "reference.h5")
    cwd = os.getcwd()
    os.chdir(root)  # names as a list on stdin gives them: relative to the working directory
    try:
        embed_to(EmbedConfig(pools=(POOLS,)), inputs, Output.resolve(ref_file), RunOptions(), backbone=lite0)
    finally:
        os.chdir(cwd)
    ref = read_embeddings(ref_file)
    assert len(ref) == len(AWKWARD) + 1 and len(ref.failures) == 1
    vectors = {os.fsencode(p): {k: v[i] for k, v in ref.vectors.items()} for i, p in enumerate(ref.paths)}
    return root, listed, vectors


def assert_matches(reference: np.ndarray, got: np.ndarray) -> None:
    # Another process, same CPU kernels: equal up to float32 rounding of the text round trip (exact) and
    # any thread-order noise in the convolutions.
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)


def test_read_path_list_keeps_names_byte_for_byte():
    lines = b"a b.jpg\r\nc\rd.png\n\n  \nbad\xff.jpg\n\ttab.jpg"
    assert read_path_list(io.BytesIO(lines)) == ["a b.jpg", "c\rd.png", os.fsdecode(b"bad\xff.jpg"), "\ttab.jpg"]
    nul = b"new\nline.png\0 lead.png\0\0last.png\0"
    assert read_path_list(io.BytesIO(nul), nul_separated=True) == ["new\nline.png", " lead.png", "last.png"]


def test_newline_list_with_crlf_to_csv_on_stdout(corpus):
    root, listed, ref = corpus
    names = [n for n in listed if n not in (b"pics/" + NEWLINE_NAME, b"pics/" + BROKEN)]
    # CRLF on some lines, as lists made on Windows have them
    (root / "list.txt").write_bytes(b"".join(n + (b"\r\n" if i % 2 else b"\n") for i, n in enumerate(names)))
    proc = bash(f"cat list.txt | gpl embed - -o - --format csv --pool {POOLS} -q", root)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stderr == b""  # -q: nothing at all on stderr; the data alone on stdout
    text = proc.stdout.decode("utf-8", "surrogateescape")
    table = list(csv.reader(io.StringIO(text, newline="")))
    assert table[0][:2] == ["path", "avg_0"] and table[0][-1] == "max_1279" and len(table[0]) == 1 + 2 * 1280
    # list order; names written the one way line outputs write them (a tab as \t: sink.line_name)
    assert [os.fsencode(r[0]) for r in table[1:]] == [os.fsencode(line_name(os.fsdecode(n))) for n in names]
    by_line_name = {os.fsencode(line_name(os.fsdecode(n))): n for n in names}
    for row in table[1:]:
        numbers = np.array(row[1:], dtype=np.float32)
        expected = ref[by_line_name[os.fsencode(row[0])]]
        assert_matches(np.concatenate([expected["avg"], expected["max"]]), numbers)


def test_nul_list_from_find_to_jsonl_on_stdout(corpus):
    root, listed, ref = corpus
    proc = bash(f"find pics -type f -print0 | gpl embed - -0 -o - --pool {POOLS}", root)
    assert proc.returncode == EXIT_SOME_FAILED
    assert_clean(proc.stderr)
    assert b"skipped pics/broken.jpg" in proc.stderr and b"embedded 8, failed 1" in proc.stderr
    objects = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(objects) == len(listed)  # one object per listed image, the failure included
    errors = [o for o in objects if "error" in o]
    assert errors == [{"path": "pics/broken.jpg", "error": errors[0]["error"]}]
    assert "not a readable image" in errors[0]["error"]
    rows = {os.fsencode(o["path"]): o["embeddings"] for o in objects if "error" not in o}
    assert set(rows) == set(ref)  # the newline name, the invalid bytes: every name back byte for byte
    for name, pools in rows.items():
        assert list(pools) == ["avg", "max"]
        for key, values in pools.items():
            assert_matches(ref[name][key], np.array(values, dtype=np.float32))


def test_npy_on_stdout_is_one_valid_array_without_failed_rows(corpus):
    root, listed, ref = corpus
    (root / "list0").write_bytes(b"\0".join(listed))
    proc = bash("gpl embed - -0 -o - --format npy --pool max -q < list0 > max.npy", root)
    assert proc.returncode == EXIT_SOME_FAILED, proc.stderr.decode(errors="replace")
    assert proc.stderr.startswith(b"gpl: skipped pics/broken.jpg")
    array = np.load(root / "max.npy")
    assert array.dtype == np.float32 and array.shape == (len(listed) - 1, 1280)
    expected = np.stack([ref[n]["max"] for n in listed if n != b"pics/" + BROKEN])
    assert_matches(expected, array)


def test_closed_pipe_ends_quietly(corpus):
    """`| head -1` closes the pipe while gpl still has rows to write: no traceback, exit status 141."""
    root, _, _ = corpus
    proc = bash(
        f"gpl embed pics -o - --pool {POOLS} --batch-size 1 --workers 2 2>gpl.err | head -1 > first.jsonl;"
        " echo ${PIPESTATUS[0]} > status",
        root,
    )
    assert proc.returncode == 0
    err = (root / "gpl.err").read_bytes()
    assert_clean(err)
    assert (root / "status").read_text().strip() == str(EXIT_BROKEN_PIPE), err.decode(errors="replace")
    lines = (root / "first.jsonl").read_bytes().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["path"] == " lead.png"  # the first of the sorted folder


def test_ctrl_c_ends_quietly(corpus):
    root, listed, _ = corpus
    # 300 spellings of one file (duplicates would be embedded once): "x", "./x", "././x", ...
    (root / "many0").write_bytes(b"\0".join([b"./" * i + listed[0] for i in range(300)]))
    with open(root / "many0", "rb") as stdin:
        proc = subprocess.Popen(
            ["gpl", "embed", "-", "-0", "-o", "-", "--batch-size", "1", "--workers", "1"],
            cwd=root, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, start_new_session=True,
        )
    first = proc.stdout.readline()  # the run is under way: one row is out
    assert json.loads(first)["path"] == os.fsdecode(listed[0])
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED
    assert_clean(err)
    assert err.rstrip().endswith(b"gpl: interrupted")


def test_a_format_stdout_cannot_take_is_refused_before_any_work(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from gpl_cli import cli as cli_module
    from gpl_cli.errors import GplError

    def never(*args, **kwargs):
        raise AssertionError("inputs were collected before the output format was checked")

    monkeypatch.setattr("gpl_cli.embedding.run.collect_inputs", never)
    result = CliRunner().invoke(cli_module.cli, ["embed", str(tmp_path), "-o", "-", "--format", "h5"])
    assert isinstance(result.exception, GplError) and result.exception.exit_code == EXIT_USAGE
    assert "--format h5 cannot be written to stdout" in str(result.exception)
