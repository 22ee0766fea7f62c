"""--scales from the command line: the summary, the metadata and gpl info, loader workers, --resume and
--update, neighbors' outside queries, compare, and the refusals (one line, exit 2)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from conftest import embed_to, photo_corpus, run_gpl

import gpl_cli
from gpl_cli.store.formats import read_embeddings

N_IMAGES = 12
SMALL = ("--resize", "keep-aspect", "--max-size", "64")  # tiny inputs: scales 1 and 2 are 64 and 128 px


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return photo_corpus(tmp_path_factory.mktemp("scales") / "photos", N_IMAGES, 2, size=lambda i: (48 + 8 * (i % 3), 40))


@pytest.fixture(scope="module")
def run(corpus):
    """gpl embed at scales 1 and 2 with two loader workers: (output, the process)."""
    out = corpus.parent / "two.h5"
    proc = run_gpl("embed", str(corpus), "-o", str(out), "-p", "avg,gem", *SMALL, "--scales", "1,2", "--workers", "2")
    assert proc.returncode == 0, proc.stderr.decode()
    return out, proc


def test_workers_write_what_one_process_computes(run, corpus, lite0):
    out, _ = run
    got = read_embeddings(str(out))
    here = gpl_cli.embed(str(corpus), pool=["avg", "gem"], resize="keep-aspect", max_size=64, scales=(1, 2),
                         model=lite0, device="cpu", workers=0)
    assert got.paths == here.paths and len(got.paths) == N_IMAGES
    for key in ("avg", "gem"):  # rows of length about 1 (combined unit vectors), one thread against two
        np.testing.assert_allclose(got.vectors[key], here.vectors[key], rtol=0, atol=1e-5)


def test_summary_metadata_and_info_show_the_scales(run):
    out, proc = run
    assert re.search(r"gpl: embedded 12, failed 0, dims avg=1280, gem=1280, precision fp32, runtime torch, "
                     r"scales 1: \d+\.\d s, 2: \d+\.\d s \(model time\), ", proc.stderr.decode()), proc.stderr.decode()
    meta = read_embeddings(str(out), keys=[]).metadata
    assert meta["scales"] == meta["config"]["scales"] == [1.0, 2.0] and meta["preprocess"]["max_size"] == 64
    info = run_gpl("info", str(out), check=True).stdout.decode().splitlines()
    assert "scales        1, 2  (longer side 64, 128 px), combined per pooling" in info


def test_resume_and_update_refuse_a_mix_of_scales(run, corpus, tmp_path, lite0, monkeypatch):
    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.journal import Journal
    from gpl_cli.store.output import Output

    out, _ = run
    copy = tmp_path / "two.h5"
    shutil.copy(out, copy)
    update = run_gpl("embed", str(corpus), "-o", str(copy), "-p", "avg,gem", *SMALL, "--update", "-q")
    assert update.returncode == 2 and "scales: [1.0, 2.0] there, [1.0] now" in update.stderr.decode()
    same = run_gpl("embed", str(corpus), "-o", str(copy), "-p", "avg,gem", *SMALL, "--scales", "1,2", "--update")
    assert same.returncode == 0 and f"embedded {N_IMAGES} ({N_IMAGES} reused)" in same.stderr.decode()

    unfinished = tmp_path / "unfinished.h5"
    config = EmbedConfig(pools=("avg", "gem"), resize="keep-aspect", max_size=64, scales=(1.0, 2.0))
    with monkeypatch.context() as m:
        m.setattr(Journal, "remove", lambda self: None)  # a kill after the rename: the journal is still there
        embed_to(config, collect_inputs([str(corpus)]), Output.resolve(str(unfinished)), RunOptions(workers=0),
                 backbone=lite0)
    resume = run_gpl("embed", str(corpus), "-o", str(unfinished), "-p", "avg,gem", *SMALL, "--scales", "1,1.5",
                     "--resume")
    assert resume.returncode == 2 and "scales: [1.0, 2.0] there, [1.0, 1.5] now" in resume.stderr.decode()


def test_an_outside_query_is_embedded_at_the_files_scales(run, corpus, tmp_path):
    out, _ = run
    outside = tmp_path / "copy.jpg"
    shutil.copy(corpus / "d1" / "p003.jpg", outside)
    proc = run_gpl("neighbors", str(out), str(outside), "-k", "1", check=True)
    assert proc.stdout.decode() == "1\t1.0000\td1/p003.jpg\n"  # at scale 1 only its cosine would be lower


def test_compare_embeds_at_the_scales_it_is_given(corpus, tmp_path, lite0):
    saved = tmp_path / "compared.h5"
    proc = run_gpl("compare", str(corpus), "-p", "gem", "--scales", "1,2", "--save", str(saved), "--json",
                   "--workers", "0")
    assert proc.returncode == 0, proc.stderr.decode()
    got = read_embeddings(str(saved))
    want = gpl_cli.embed(str(corpus), pool="gem", scales=(1, 2), model=lite0, device="cpu", workers=0)
    assert got.metadata["scales"] == [1.0, 2.0] and got.paths == want.paths
    np.testing.assert_allclose(got.vectors["gem"], want.vectors["gem"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (("embed", "{corpus}", "-o", "{tmp}/x.h5", "--scales", "1,x"), "gpl: error: --scales takes numbers separated by "
                                                                      "commas (e.g. 1,1.41,2); 'x' in '1,x' is not one"),
    (("embed", "{corpus}", "-o", "{tmp}/x.h5", "--scales", "0,1"), "gpl: error: --scales must be numbers > 0, got 0.0"),
    (("embed", "{corpus}", "-o", "{tmp}/x.h5", "--scales", "2,1,2"), "gpl: error: --scales lists 2 twice"),
    (("compare", "{out}", "--scales", "1,2"), "gpl: error: --scales applies to images; {out} already holds embeddings"),
    (("compare", "{corpus}", "--probe", "--scales", "1,2"), "gpl: error: --probe also probes the flattened feature "
                                                            "map, which has the backbone's one input size: give it no --scales"),
])
def test_bad_scales_are_one_line_and_exit_2(run, corpus, tmp_path, args, message):
    out, _ = run
    names = {"corpus": corpus, "tmp": tmp_path, "out": out}
    proc = run_gpl(*(a.format(**names) for a in args))
    assert proc.returncode == 2 and proc.stderr.decode() == message.format(**names) + "\n"
    assert not (tmp_path / "x.h5").exists()


def test_classify_takes_no_scales(corpus):
    proc = run_gpl("classify", str(corpus), "--scales", "1,2")
    assert proc.returncode == 2 and proc.stderr.decode() == (
        "gpl: error: classify takes no --scales: the head was trained on raw vectors of one input size, and an "
        "average of unit vectors from several sizes would distort its probabilities\n")


def test_a_whitening_learned_at_two_scales_is_refused_at_one(run, corpus, tmp_path):
    out, _ = run
    fitted = run_gpl("whiten", "fit", str(out), "-p", "gem", "-o", str(tmp_path / "w.npz"))
    assert fitted.returncode == 0, fitted.stderr.decode()
    proc = run_gpl("embed", str(corpus), "-o", str(tmp_path / "one.h5"), "-p", "gem", *SMALL, "--whiten", str(tmp_path / "w.npz"))
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "--scales 1,2, this run uses --scales 1" in err and not (tmp_path / "one.h5").exists()
    both = run_gpl("embed", str(corpus), "-o", str(tmp_path / "two.h5"), "-p", "gem", *SMALL, "--scales", "1,2",
                   "--whiten", str(tmp_path / "w.npz"))
    assert both.returncode == 0, both.stderr.decode()
