"""gpl classify: the backbone's own head on its pooled vector, checked against gpl embed + numpy."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
from conftest import SAMPLE_IMAGES, run_gpl

from gpl_cli.analysis.classify import classify
from gpl_cli.embedding.config import EmbedConfig, RunOptions
from gpl_cli.embedding.inputs import collect_inputs
from gpl_cli.errors import GplError
from gpl_cli.store.output import PREDICTIONS, Output, format_for


def predict(inputs, path, pool="avg", **kwargs):
    """classify() into the file `path`, its format from the extension."""
    return classify(inputs, Output.resolve(path, kind=PREDICTIONS), EmbedConfig(pools=(pool,)), **kwargs)

PHOTOS = [str(SAMPLE_IMAGES / "cat_chelsea.png"), str(SAMPLE_IMAGES / "coffee.png")]


def test_top1_is_the_head_on_the_vector_gpl_embed_writes(lite0, tmp_path):
    run_gpl("embed", *PHOTOS, "-o", str(tmp_path / "e.h5"), "-q", check=True)
    with h5py.File(tmp_path / "e.h5") as f:
        avg = f["embeddings/avg"][...].astype(np.float64)
        paths = f["paths"].asstr()[...].tolist()
    # The trained linear layer, applied with numpy (not through gpl_cli.models.heads).
    weight = lite0.classifier.weight.detach().double().numpy()
    bias = lite0.classifier.bias.detach().double().numpy()
    logits = avg @ weight.T + bias
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)

    proc = run_gpl("classify", *PHOTOS, "-k", "3", "--format", "jsonl", "-q", check=True)
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["path"] for r in rows] == paths
    for row, p in zip(rows, probs):
        top = row["classes"]
        assert top[0]["index"] == int(np.argmax(p))
        assert [c["index"] for c in top] == np.argsort(-p)[:3].tolist()
        np.testing.assert_allclose([c["probability"] for c in top], np.sort(p)[::-1][:3], atol=1e-5)
    cat, coffee = rows[0]["classes"][0], rows[1]["classes"][0]
    assert 281 <= cat["index"] <= 285 and "cat" in cat["name"]
    assert 967 <= coffee["index"] <= 968 and coffee["name"] == "espresso"
    assert proc.stderr == b""  # avg: no warning


def test_text_output_on_stdout(tmp_path):
    proc = run_gpl("classify", PHOTOS[1], "-k", "2")
    assert proc.returncode == 0
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 2
    path, rank, prob, index, name = lines[0].split("\t")
    assert (path, rank, index, name) == (PHOTOS[1], "1", "967", "espresso") and 0.5 < float(prob) <= 1
    assert "classified 1, failed 0" in proc.stderr.decode()


@pytest.fixture
def inputs_with_a_broken_file(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    return collect_inputs([*PHOTOS, str(broken)])


def test_files_record_failures(lite0, tmp_path, inputs_with_a_broken_file):
    failed = []
    out = tmp_path / "p.csv"
    summary = predict(inputs_with_a_broken_file, str(out), k=2, options=RunOptions(workers=0), loaded=lite0,
                      on_failure=lambda failure: failed.append(failure.path))
    broken = inputs_with_a_broken_file.items[2].name
    assert summary.classified == 2 and [n for n, _ in summary.failed] == failed == [broken]
    # A batch's failures come before its rows, as in gpl embed's streams.
    rows = list(csv.DictReader(out.open()))
    errors = [r for r in rows if r["error"]]
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.jpg") and errors[0]["rank"] == ""
    ranked = [r for r in rows if not r["error"]]
    assert [(r["path"], r["rank"]) for r in ranked] == [(p, rank) for p in PHOTOS for rank in ("1", "2")]
    assert ranked[2]["index"] == "967" and ranked[2]["name"] == "espresso"
    assert not (tmp_path / "p.csv.partial").exists()

    jsonl = tmp_path / "p.jsonl"
    predict(inputs_with_a_broken_file, str(jsonl), k=1, options=RunOptions(workers=0), loaded=lite0)
    docs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    by_path = {d["path"]: d for d in docs}
    assert by_path[PHOTOS[1]]["pooling"] == "avg" and len(by_path[PHOTOS[1]]["classes"]) == 1
    assert "error" in by_path[broken]


def test_cli_exit_statuses(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    out = tmp_path / "p.jsonl"
    proc = run_gpl("classify", PHOTOS[1], str(broken), "-o", str(out), "-q")
    assert proc.returncode == 3 and proc.stdout == b""
    assert "broken.jpg" in proc.stderr.decode()
    proc = run_gpl("classify", PHOTOS[1], "-o", str(out))
    assert proc.returncode == 2 and f"output exists: {out}" in proc.stderr.decode()
    proc = run_gpl("classify", str(tmp_path / "missing.png"))
    assert proc.returncode == 2 and "input not found" in proc.stderr.decode()


def test_another_pooling_is_warned_about(lite0, tmp_path):
    warnings = []
    summary = predict(collect_inputs([PHOTOS[0]]), str(tmp_path / "m.jsonl"), pool="max",
                      options=RunOptions(workers=0), loaded=lite0, on_warning=warnings.append)
    assert summary.pool == "max" and len(warnings) == 1
    assert "trained on avg-pooled features" in warnings[0]


@pytest.mark.parametrize("pool,message", [
    ("catavgmax", "--pool catavgmax gives 2560 numbers per image; the head of efficientnet_lite0 takes 1280"),
    ("avg,max", "one pooled vector; --pool names 2: avg, max"),
    ("gem:p=auto", "exists only in gpl compare"),
])
def test_pools_the_head_cannot_take(lite0, tmp_path, pool, message):
    with pytest.raises(GplError, match=message.replace("(", r"\(")):
        predict(collect_inputs([PHOTOS[0]]), str(tmp_path / "x.jsonl"), pool=pool, loaded=lite0)


def test_output_formats():
    assert format_for("-", None, PREDICTIONS) == "text"
    assert format_for("a.CSV", None, PREDICTIONS) == "csv" and format_for("a.jsonl", None, PREDICTIONS) == "jsonl"
    with pytest.raises(GplError, match="use one of .csv .jsonl"):
        format_for("a.h5", None, PREDICTIONS)


def test_cli_text_file_output_is_checked_before_the_model_loads(tmp_path):
    """Pins classify's output checks for --format text to a file: classify hands the format "text" to the
    embeddings-format check (check_output_location), which works only because the format registry knows no
    "text". Every refusal is exit 2 and comes before the model loads: the weights given are not a state dict,
    so a check made after loading would fail on them instead."""
    image = tmp_path / "coffee.png"
    image.write_bytes((SAMPLE_IMAGES / "coffee.png").read_bytes())
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a state dict")
    (tmp_path / "adir").mkdir()
    existing = tmp_path / "out.txt"
    existing.write_text("mine\n")
    for output, extra, message in [
        (tmp_path / "nope" / "out.txt", (), f"cannot write {tmp_path / 'nope' / 'out.txt'}: the folder {tmp_path / 'nope'} does not exist"),
        (tmp_path / "adir", ("--overwrite",), f"cannot write {tmp_path / 'adir'}: it is a directory"),
        (image, ("--overwrite",), f"the output {image} is one of the inputs"),
        (existing, (), f"output exists: {existing} (use --overwrite to replace it)"),
    ]:
        proc = run_gpl("classify", str(image), "-o", str(output), "--format", "text", "--weights", str(bogus), "-q", *extra)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and message in err, err
        assert "weights" not in err and "Traceback" not in err
    assert image.read_bytes() == (SAMPLE_IMAGES / "coffee.png").read_bytes()
    assert existing.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "bogus.pt", "coffee.png", "out.txt"]
