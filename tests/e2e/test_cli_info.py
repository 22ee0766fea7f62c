"""gpl info, --help examples, --version and shell completion."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from datetime import datetime

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import embed_to, gpl_imports, make_photo_like, run_gpl

from gpl_cli.cli import cli
from gpl_cli.errors import EXIT_BROKEN_PIPE, EXIT_USAGE
from gpl_cli.store.formats import describe


@pytest.fixture(scope="module")
def small_file(tmp_path_factory, lite0):
    from PIL import Image

    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.export import export_embeddings
    from gpl_cli.store.output import Output

    root = tmp_path_factory.mktemp("info")
    imgs = root / "imgs"
    imgs.mkdir()
    for i, name in enumerate(["a.jpg", "b.png", "\u00e7a.jpg"]):
        Image.fromarray(make_photo_like((50, 40 + 5 * i), seed=20 + i)).save(imgs / name)
    (imgs / "empty.jpg").write_bytes(b"")
    out = root / "e.h5"
    embed_to(EmbedConfig(pools=("avg", "max"), normalize="l2"), collect_inputs([str(imgs)]), Output.resolve(str(out)),
              RunOptions(), backbone=lite0)
    export_embeddings(str(out), str(root / "e.npy"))  # two poolings: e.avg.npy, e.max.npy, e.json
    return root, out


def test_info_json_reports_what_the_file_holds(small_file):
    import timm
    import torch

    from gpl_cli.models.backbones import lite_weights_file

    root, out = small_file
    proc = run_gpl("info", str(out), "--json")
    assert proc.returncode == 0 and proc.stderr == b""
    doc = json.loads(proc.stdout)
    with h5py.File(out) as f:
        shapes = {k: f["embeddings"][k].shape for k in f["embeddings"]}
        reasons = [r.decode() for r in f["failures/reasons"][...]]
    assert doc["count"] == 3 and doc["failed"] == 1 and doc["format"] == "h5"
    assert {k: p["dim"] for k, p in doc["poolings"].items()} == {k: s[1] for k, s in shapes.items()} == {"avg": 1280, "max": 1280}
    assert doc["poolings"]["avg"]["op"] == "avg"
    assert doc["failures"] == [{"path": "empty.jpg", "reason": reasons[0]}] and reasons[0]
    assert doc["backbone"] == "efficientnet_lite0" and doc["normalize"] == "l2"
    with open(lite_weights_file("efficientnet_lite0"), "rb") as f:
        assert doc["weights_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert doc["preprocess"] == {
        "resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
        "mode": "crop", "max_size": None,
    }
    assert doc["feature_map_shape"] == [1280, 7, 7]
    assert abs((datetime.now().astimezone() - datetime.fromisoformat(doc["created"])).total_seconds()) < 3600
    assert doc["versions"]["torch"] == torch.__version__ and doc["versions"]["timm"] == timm.__version__


def test_info_text(small_file):
    root, out = small_file
    proc = run_gpl("info", str(out))
    assert proc.returncode == 0
    lines = proc.stdout.decode().splitlines()
    assert lines[0].startswith(f"file          {out}  (h5, ")
    assert lines[1] == "images        3 embedded, 1 failed"
    assert "poolings      avg (1280), max (1280)" in lines
    assert "normalize     l2" in lines
    assert any(line.startswith("backbone      efficientnet_lite0  (feature map C x H x W = 1280 x 7 x 7)") for line in lines)
    assert any(line.startswith("preprocess    resize 256, centre crop 224, bicubic") for line in lines)
    assert lines[-1].startswith("  failed: empty.jpg: ")


def _shown_bytes(line: str) -> tuple[float, float]:
    """The size a `gpl info` file line shows, in bytes, and the rounding its unit allows."""
    number, unit = re.search(r"\(\w+, ([\d.]+) (B|KB|MB|GB)", line).groups()
    scale = 1024 ** ["B", "KB", "MB", "GB"].index(unit)
    return float(number) * scale, 0.05 * scale


def test_info_shows_the_size_of_all_of_an_outputs_files(small_file):
    root, out = small_file
    npy_files = [f for f in root.iterdir() if f.name.startswith("e.") and f.suffix != ".h5"]  # what export wrote
    assert len(npy_files) == 4  # e.avg.npy, e.max.npy, e.paths.txt, e.json
    for given, files in ((out, [out]), (root / "e.json", npy_files)):
        size = sum(f.stat().st_size for f in files)
        assert json.loads(run_gpl("info", str(given), "--json", check=True).stdout)["size_bytes"] == size
        line = run_gpl("info", str(given), check=True).stdout.decode().splitlines()[0]
        shown, rounding = _shown_bytes(line)
        assert abs(shown - size) <= rounding, (line, size)
        assert line.endswith(f" in {len(files)} files)" if len(files) > 1 else "B)"), line


def test_info_lists_the_stored_paths_in_row_order(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    for i, name in enumerate(["b/two.png", "a/one.jpg", "tab\there.png", "new\nline.png"]):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_photo_like((48, 40), seed=i)).save(folder / name)
    out = tmp_path / "e.h5"
    run_gpl("embed", str(folder), "-o", str(out), "-q", check=True)
    stored = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())  # gpl sorts a folder
    assert json.loads(run_gpl("info", str(out), "--json", check=True).stdout)["paths"] == stored
    proc = run_gpl("info", str(out), "--paths", check=True)
    assert proc.stderr == b""
    assert proc.stdout.decode().splitlines() == ["a/one.jpg", "b/two.png", "new\\nline.png", "tab\\there.png"]
    with h5py.File(out) as f:
        assert f["paths"].asstr()[...].tolist() == stored  # the rows' own order
    both = run_gpl("info", str(out), "--paths", "--json")
    assert both.returncode == EXIT_USAGE and both.stdout == b"" and b"--json or --paths" in both.stderr
    help_text = CliRunner().invoke(cli, ["info", "--help"]).output
    assert "--paths" in help_text and "gpl info emb.h5 --paths | head" in help_text


def test_info_paths_into_a_closed_pipe_exit_141(tmp_path):
    """`gpl info big.h5 --paths | head -1`: the reader leaves after one line of many."""
    from gpl_cli.store.formats.h5 import H5Writer

    out = tmp_path / "big.h5"
    writer = H5Writer(str(out), {"avg": 1})
    names = [f"folder/photo_{i:06d}.jpg" for i in range(100_000)]  # megabytes of lines: more than a pipe holds
    writer.write(names, {"avg": np.ones((len(names), 1), np.float32)})
    writer.close({"pools": {"avg": {"op": "avg", "params": {}, "dim": 1}}, "pool_keys": ["avg"]})
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m gpl_cli info {out} --paths 2>err | head -1; "
                                         "echo ${PIPESTATUS[0]} > status"],
                          cwd=tmp_path, capture_output=True, timeout=300)
    assert proc.stdout == b"folder/photo_000000.jpg\n"
    assert (tmp_path / "err").read_bytes() == b""
    assert (tmp_path / "status").read_text().strip() == str(EXIT_BROKEN_PIPE)


def test_info_reads_every_output_kind_alike(small_file):
    root, out = small_file
    h5 = describe(str(out))
    for other in ("e.npy", "e.json", "e.avg.npy"):  # the name given to -o, the metadata, one pooling's file
        doc = describe(str(root / other))
        assert doc["format"] == "npy"
        assert (doc["count"], doc["failed"], doc["poolings"], doc["failures"]) == (h5["count"], h5["failed"], h5["poolings"], h5["failures"])


def test_info_on_a_file_that_is_not_gpl_output_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.h5"
    bad.write_bytes(b"plain text")
    proc = run_gpl("info", str(bad))
    assert proc.returncode == EXIT_USAGE and proc.stdout == b""
    assert proc.stderr.decode().startswith(f"gpl: error: {bad}: not a readable gpl embeddings file")
    proc = run_gpl("info", str(tmp_path / "missing.h5"))
    assert proc.returncode == EXIT_USAGE and f"no such file: {tmp_path / 'missing.h5'}" in proc.stderr.decode()


def test_every_command_shows_examples_in_its_help():
    runner = CliRunner()
    for name in ["", *cli.commands]:
        result = runner.invoke(cli, [name, "--help"] if name else ["--help"])
        assert result.exit_code == 0, name
        examples = result.output.split("Examples:")[1].split("\n\n")[0].splitlines()[1:]
        assert len(examples) >= 2 and all(line.strip().split()[0] in ("gpl", "find") for line in examples), (name, examples)


def test_version():
    from gpl_cli import __version__

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output == f"gpl, version {__version__}\n"


def test_shell_completion_as_the_readme_documents():
    script = run_gpl(env={"_GPL_COMPLETE": "bash_source"})
    assert script.returncode == 0 and b"complete -o nosort -F _gpl_completion gpl" in script.stdout
    words = run_gpl(env={"_GPL_COMPLETE": "bash_complete", "COMP_WORDS": "gpl ne", "COMP_CWORD": "1"})
    assert words.stdout.decode().splitlines() == ["plain,neighbors"]
    formats = run_gpl(env={"_GPL_COMPLETE": "bash_complete", "COMP_WORDS": "gpl export x.h5 --format ", "COMP_CWORD": "4"})
    assert "plain,parquet" in formats.stdout.decode().splitlines()


# Commands that run no model never import torch (issue 14): they answer in a fraction of its import time.
@pytest.mark.parametrize("command", ["pools", "info", "export", "neighbors", "neighbors --duplicates", "compare"])
def test_commands_on_files_import_no_torch(small_file, tmp_path, command):
    _, out = small_file
    with h5py.File(out) as f:
        first = f["paths"].asstr()[0]
    args = {"pools": ["pools"], "info": ["info", str(out)],
            "export": ["export", str(out), "-o", str(tmp_path / "x.jsonl"), "-q"],
            "neighbors": ["neighbors", str(out), first, "-k", "2"],
            "neighbors --duplicates": ["neighbors", str(out), "--duplicates"],
            "compare": ["compare", str(out), "-q"]}[command]
    status, heavy, err = gpl_imports(*args)
    assert status == 0, err
    assert not heavy & {"torch", "torchvision", "timm"}, f"gpl {command} imported {heavy}"
