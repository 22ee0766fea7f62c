"""Issue 22, names and pages: a file name cannot forge a line, a page reads images only below the file's
root, shows names as isolated text and never waits on a FIFO; hand-made files with vectors 0 wide or
integer paths are refused as damaged; explain draws names as text; --outliers refuses a NaN row; compare
opens an NPY output by the name it was written to."""

from __future__ import annotations

import codecs
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import SAMPLE_IMAGES, Page, run_gpl

from gpl_cli.store.formats.h5 import H5Writer
from gpl_cli.store.formats.npy import NpyWriter
from gpl_cli.store.sink import line_name

# The forged name: as a raw line of `neighbors --duplicates` it reads as a row for keep_me.jpg.
FORGED = "a2.jpg\n1\t1.0000\tkeep_me.jpg"
FORGED_LINE = "a2.jpg\\n1\\t1.0000\\tkeep_me.jpg"


def write_h5(path, names, vectors, root, failures=(), **metadata):
    writer = H5Writer(str(path), {"avg": vectors.shape[1]})
    writer.write(list(names), {"avg": vectors})
    for name, reason in failures:
        writer.fail(name, reason)
    writer.close({"pool_keys": ["avg"], "pools": {"avg": {"dim": vectors.shape[1]}}, "backbone": "test",
                  "root": str(root), **metadata})
    return path


# --- item 7: names in line outputs ----------------------------------------------------------


def test_line_name_keeps_every_name_one_field_and_can_be_undone():
    specials = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029)] + ["\\"]
    for c in specials:
        escaped = line_name(f"a{c}b.jpg")
        assert len(escaped.splitlines()) == 1 and "\t" not in escaped and not set(escaped) & set(specials[:-1])
        assert escaped.isascii() and escaped != f"a{c}b.jpg"
    ascii_names = ["plain.jpg", "back\\slash\\n.jpg", FORGED, "cr\r.jpg", "bell\x07.jpg", "del\x7f.jpg"]
    assert [codecs.decode(line_name(n), "unicode_escape") for n in ascii_names] == ascii_names
    assert line_name("ünï 写真 \udcff.jpg") == "ünï 写真 \udcff.jpg"  # printable text and raw bytes as they are


@pytest.fixture(scope="module")
def forged(tmp_path_factory):
    """The issue's folder: a.jpg and the forged name are one photo, keep_me.jpg another; one failure whose
    name and reason hold control characters."""
    root = tmp_path_factory.mktemp("forged")
    v = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]], np.float32)
    failures = [("bad\nname\tx.jpg\rz", "cannot\ndecode")]
    return write_h5(root / "dup.h5", ["a.jpg", FORGED, "keep_me.jpg"], v, root, failures)


@pytest.mark.parametrize("args, fields", [
    (["--duplicates"], ["a.jpg", FORGED_LINE]),
    (["a.jpg", "-k", "2"], ["a.jpg", FORGED_LINE]),
    (["--outliers", "-k", "1"], ["keep_me.jpg", "a.jpg", FORGED_LINE]),
])
def test_neighbors_text_output_cannot_be_forged_by_a_name(forged, args, fields):
    proc = run_gpl("neighbors", str(forged), *args)
    assert proc.returncode == 0, proc.stderr.decode()
    rows = [line.split("\t") for line in proc.stdout.decode().splitlines()]
    assert all(len(r) == (4 if "--duplicates" in args else 3) for r in rows), rows  # duplicates: kind last
    assert [r[2] for r in rows] == fields  # `| cut -f3 | xargs rm` would not reach keep_me.jpg by a forged row


def test_info_and_delimited_exports_escape_names(forged):
    info = run_gpl("info", str(forged))
    assert info.returncode == 0, info.stderr.decode()
    assert "  failed: bad\\nname\\tx.jpg\\rz: cannot\\ndecode" in info.stdout.decode().splitlines()
    for fmt, sep in (("tsv", "\t"), ("csv", ",")):
        proc = run_gpl("export", str(forged), "-o", "-", "--format", fmt, "-q")
        assert proc.returncode == 0, proc.stderr.decode()
        lines = proc.stdout.decode().split("\n")
        assert lines[-1] == "" and len(lines) == 5  # a header and three rows, each one line
        assert [line.split(sep)[0] for line in lines[1:4]] == ["a.jpg", FORGED_LINE, "keep_me.jpg"]


def test_classify_text_and_csv_escape_names(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    shutil.copy(SAMPLE_IMAGES / "panda.jpg", folder / FORGED)
    text = run_gpl("classify", str(folder), "-k", "1")
    assert text.returncode == 0, text.stderr.decode()
    assert text.stdout.decode().split("\t")[0] == FORGED_LINE and text.stdout.decode().count("\n") == 1
    csv = run_gpl("classify", str(folder), "-k", "1", "-o", "-", "--format", "csv")
    assert csv.returncode == 0, csv.stderr.decode()
    lines = csv.stdout.decode().splitlines()
    assert len(lines) == 2 and lines[1].startswith(FORGED_LINE + ",1,")


# --- items 8, 9, 10: what pages show and read -------------------------------------------------


def test_pages_read_images_only_below_the_files_root_unless_images_names_a_folder(tmp_path):
    photos, private = tmp_path / "photos", tmp_path / "private"
    photos.mkdir()
    private.mkdir()
    shutil.copy(SAMPLE_IMAGES / "panda.jpg", photos / "a.jpg")
    shutil.copy(SAMPLE_IMAGES / "sheep.jpg", private / "id.jpg")
    names = ["a.jpg", str(private / "id.jpg"), "../private/id.jpg"]
    f = write_h5(tmp_path / "shared.h5", names, np.eye(3, 4, dtype=np.float32), photos)
    proc = run_gpl("neighbors", str(f), "--outliers", "-k", "1", "--html", str(tmp_path / "p.html"))
    assert proc.returncode == 0, proc.stderr.decode()
    page = Page((tmp_path / "p.html").read_text())
    assert set(page.images()) == {"a.jpg"}  # no thumbnail of the private file, by either name
    assert set(page.placeholders()) == set(names[1:]) and "outside the folder of the file's images" in "".join(page.text)
    # --images names the folder to read from: every name that lands below it is shown, whatever its spelling.
    proc = run_gpl("neighbors", str(f), "--outliers", "-k", "1", "--html", str(tmp_path / "q.html"),
                   "--images", str(private))
    assert proc.returncode == 0, proc.stderr.decode()
    page = Page((tmp_path / "q.html").read_text())
    assert set(page.images()) == set(names[1:])
    assert set(page.placeholders()) == {"a.jpg"} and "file not found" in "".join(page.text)  # looked for in --images


def test_pages_show_names_isolated_with_control_and_bidi_characters_visible(tmp_path):
    from gpl_cli.analysis import neighbors as nb
    from gpl_cli.report import html as hr

    rlo, tab = "\u202eevil>gpj.jpg", "tab\there.jpg"
    for name in (rlo, tab):
        shutil.copy(SAMPLE_IMAGES / "panda.jpg", tmp_path / name)
    results = [nb.QueryResult(rlo, "file", [nb.Neighbor(1, 1.0, rlo, 0), nb.Neighbor(2, 0.5, tab, 1)])]
    page = hr.neighbors_page(results, hr.Thumbnails(str(tmp_path)), "x.h5", "avg")
    assert "\u202e" not in page and "\t" not in page
    text = "".join(Page(page).text)
    assert "\\u202eevil>gpj.jpg" in text and "tab\\there.jpg" in text
    assert page.count('<span class="path"><bdi>') == 3


@pytest.mark.parametrize("args", [["a.jpg", "-k", "2"], ["--duplicates", "--threshold", "0"]])
def test_a_fifo_at_a_stored_path_does_not_hang_a_page(tmp_path, args):
    shutil.copy(SAMPLE_IMAGES / "panda.jpg", tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "b.jpg")
    f = write_h5(tmp_path / "ff.h5", ["a.jpg", "b.jpg"], np.ones((2, 4), np.float32), tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gpl_cli", "neighbors", str(f), *args, "--html",
                           str(tmp_path / "ff.html")], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    page = Page((tmp_path / "ff.html").read_text())
    assert "a.jpg" in page.images() and "b.jpg" not in page.images()
    assert "not a regular file" in "".join(page.text)


def test_ctrl_c_stops_a_page_while_it_makes_thumbnails(tmp_path):
    """A decoder that never returns (patched in) is where the page waits when Ctrl-C comes: exit 130."""
    shutil.copy(SAMPLE_IMAGES / "panda.jpg", tmp_path / "a.jpg")
    f = write_h5(tmp_path / "s.h5", ["a.jpg"], np.ones((1, 4), np.float32), tmp_path)
    script = (
        "import sys, time\n"
        "import gpl_cli.embedding.images as images\n"
        "def stuck(*a, **k):\n"
        "    print('decoding', file=sys.stderr, flush=True)\n"
        "    time.sleep(300)\n"
        "images.open_rgb = stuck\n"
        "from gpl_cli.cli.main import main\n"
        f"sys.argv = ['gpl', 'neighbors', {str(f)!r}, 'a.jpg', '-k', '1', '--html', {str(tmp_path / 'p.html')!r}]\n"
        "main()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        assert proc.stderr.readline() == b"decoding\n"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
    finally:
        proc.kill()
        proc.wait()
    assert b"interrupted" in proc.stderr.read()
    assert not (tmp_path / "p.html").exists()


def test_a_thumbnail_is_bounded_by_the_decode_timeout(tmp_path, monkeypatch):
    import gpl_cli.embedding.images as images
    from gpl_cli.report import html as hr

    shutil.copy(SAMPLE_IMAGES / "panda.jpg", tmp_path / "a.jpg")
    monkeypatch.setattr(images, "open_rgb", lambda *a, **k: time.sleep(5))
    thumbs = hr.Thumbnails(str(tmp_path), timeout=0.5)
    start = time.monotonic()
    picture = thumbs[thumbs.file("a.jpg")]
    assert time.monotonic() - start < 3
    assert picture.uri is None and "timed out" in picture.problem


# --- item 13: hand-made files -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
    """An .h5 whose vectors are 0 wide, and one whose paths are integers."""
    root = tmp_path_factory.mktemp("hand_made")
    names = [f"c{i % 2}/{i}.jpg" for i in range(6)]
    made = {}
    for kind in ("zero", "ints"):
        made[kind] = write_h5(root / f"{kind}.h5", names, np.random.default_rng(0).random((6, 4), np.float32), root)
    with h5py.File(made["zero"], "r+") as f:
        del f["embeddings/avg"]
        f["embeddings"].create_dataset("avg", data=np.zeros((6, 0), np.float32))
    with h5py.File(made["ints"], "r+") as f:
        del f["paths"]
        f.create_dataset("paths", data=np.arange(6))
    return made


@pytest.mark.parametrize("kind", ["zero", "ints"])
@pytest.mark.parametrize("command", [["compare"], ["export", "-o", "{out}"], ["neighbors", "--outliers"], ["info"]])
def test_hand_made_files_are_refused_as_damaged(hand_made, tmp_path, kind, command):
    f = hand_made[kind]
    args = [command[0], str(f), *(a.format(out=tmp_path / "x.npy") for a in command[1:])]
    proc = run_gpl(*args)
    assert proc.returncode == 2, (proc.stdout.decode(), proc.stderr.decode())
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and err.startswith(f"gpl: error: {f}: not a readable gpl embeddings file")
    assert proc.stdout == b"" and not list(tmp_path.iterdir())


# --- item 14 ------------------------------------------------------------------------------


def test_outliers_refuse_a_file_with_a_nan_row_as_duplicates_do(tmp_path):
    v = np.random.default_rng(1).random((5, 4)).astype(np.float32)
    v[2, 1] = np.nan
    f = write_h5(tmp_path / "nan.h5", [f"{i}.jpg" for i in range(5)], v, tmp_path)
    for args in (["--outliers", "-k", "1"], ["--duplicates"]):
        proc = run_gpl("neighbors", str(f), *args)
        assert proc.returncode == 2, proc.stdout.decode()
        assert "not finite" in proc.stderr.decode() and "2.jpg" in proc.stderr.decode()


def test_explain_draws_a_name_with_dollars_as_text(tmp_path):
    name = tmp_path / "$\\frac{x$ and $y^2$.png"
    shutil.copy(SAMPLE_IMAGES / "coffee.png", name)
    proc = run_gpl("explain", str(name), "-o", str(tmp_path / "x.png"), "-p", "avg", "--classes", "0")
    assert proc.returncode == 0, proc.stderr.decode()
    assert (tmp_path / "x.png").stat().st_size > 1000


def test_title_of_an_explain_panel_is_the_name_as_text():
    from matplotlib.figure import Figure

    from gpl_cli.analysis.explain import ImageExplanation
    from gpl_cli.report.explain_figure import _image_panel

    ax = Figure().subplots()
    _image_panel(ax, ImageExplanation("x/$y^2$.png", np.zeros((8, 8, 3), np.uint8), (4, 2, 2), {}, {}, [], None))
    title = ax.title
    assert title.get_text().startswith("$y^2$.png") and not title._preprocess_math(title.get_text())[1]


def test_compare_opens_an_npy_output_by_the_name_info_accepts(tmp_path):
    names = [f"c{i % 2}/{i}.jpg" for i in range(6)]
    rows = np.random.default_rng(2).random((6, 4)).astype(np.float32)
    writer = NpyWriter(str(tmp_path / "x.npy"), {"avg": 4, "max": 4})
    writer.write(names, {"avg": rows, "max": rows[::-1].copy()})
    writer.close({"pool_keys": ["avg", "max"], "pools": {"avg": {"dim": 4}, "max": {"dim": 4}}, "root": str(tmp_path)})
    assert not (tmp_path / "x.npy").exists()
    assert run_gpl("info", str(tmp_path / "x.npy")).returncode == 0
    proc = run_gpl("compare", str(tmp_path / "x.npy"), "--csv", "-q")
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert "avg,,dim,4" in lines and "max,,dim,4" in lines
