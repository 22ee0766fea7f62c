"""--runtime torch|openvino|auto: one run's vectors on either runtime, every feature on OpenVINO, and auto's choice
from the measured plan.

The conversion of the default backbone is cached in the session's cache folder (tests/conftest.py), so it is paid
once per test session; tests that seed plans point the plan cache elsewhere and keep that conversion.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLE_IMAGES, embed_to, gpl_imports, photo_corpus, run_gpl

pytest.importorskip("openvino")

import gpl_cli  # noqa: E402
from gpl_cli.cli import cli  # noqa: E402
from gpl_cli.embedding import settings as run_settings, tuning  # noqa: E402
from gpl_cli.embedding.config import EmbedConfig, RunOptions  # noqa: E402
from gpl_cli.embedding.inputs import collect_inputs  # noqa: E402
from gpl_cli.embedding.job import Job, numerics  # noqa: E402
from gpl_cli.embedding.settings import cpu_has_native_bf16, resolve_settings  # noqa: E402
from gpl_cli.errors import EXIT_USAGE, GplError  # noqa: E402
from gpl_cli.models import openvino as gov  # noqa: E402
from gpl_cli.models.backbones import Backbone  # noqa: E402
from gpl_cli.models.preprocess import Preprocess  # noqa: E402
from gpl_cli.store.formats import read_embeddings  # noqa: E402
from gpl_cli.store.output import Output  # noqa: E402


def assert_same_rows(got, want) -> None:
    """Two runs' outputs hold the same rows, each vector within gov.TOLERANCE of its row's largest component."""
    assert got.paths == want.paths and list(got.vectors) == list(want.vectors)
    for key in want.vectors:
        scale = np.abs(want.vectors[key]).max(axis=1, keepdims=True)
        assert (scale > 1e-3).all()
        worst = float((np.abs(got.vectors[key] - want.vectors[key]) / scale).max())
        assert worst <= gov.TOLERANCE, f"{key} differs by {worst:.1e}"


def test_cli_embed_on_openvino_writes_torchs_vectors_with_workers_and_records_the_runtime(tmp_path, small_folder):
    runs = {}
    for runtime in ("torch", "openvino"):
        out = tmp_path / f"{runtime}.h5"
        proc = run_gpl("embed", str(small_folder), "-o", str(out), "-p", "avg,max,gem,rmac", "--workers", "2",
                       "--device", "cpu", "--runtime", runtime)
        assert proc.returncode == 0, proc.stderr.decode()
        assert f"precision fp32, runtime {runtime}," in proc.stderr.decode()
        assert "2 worker(s) x 1 thread" in proc.stderr.decode()  # each forked worker compiled its own copy
        runs[runtime] = read_embeddings(str(out))
    assert_same_rows(runs["openvino"], runs["torch"])
    assert (runs["torch"].metadata["runtime"], runs["openvino"].metadata["runtime"]) == ("torch", "openvino")
    info = run_gpl("info", str(tmp_path / "openvino.h5"), check=True).stdout.decode()
    assert "\nruntime       openvino\n" in info


def test_keep_aspect_and_several_scales_through_the_python_api(tmp_path, lite0):
    root = photo_corpus(tmp_path / "photos", 6, 2, size=lambda i: (60 + 17 * i, 90 - 5 * i))  # six shapes
    kwargs = dict(pool="avg,max,crow", resize="keep-aspect", max_size=96, scales=(1, 1.41), device="cpu",
                  model=lite0, workers=0)
    on_openvino = gpl_cli.embed(root, runtime="openvino", **kwargs)
    assert_same_rows(on_openvino, gpl_cli.embed(root, runtime="torch", **kwargs))
    assert on_openvino.metadata["runtime"] == "openvino" and on_openvino.summary.runtime == "openvino"


def test_update_at_fp32_may_mix_runtimes_and_embeds_only_the_new_file(tmp_path, small_folder):
    out = tmp_path / "emb.h5"
    run_gpl("embed", str(small_folder), "-o", str(out), "--workers", "0", "--runtime", "torch", check=True)
    shutil.copy(SAMPLE_IMAGES / "coffee.png", small_folder / "new.png")
    proc = run_gpl("embed", str(small_folder), "-o", str(out), "--workers", "0", "--runtime", "openvino", "--update")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "embedded 5 (4 reused)" in proc.stderr.decode() and "runtime openvino" in proc.stderr.decode()
    reference = tmp_path / "torch.h5"
    run_gpl("embed", str(small_folder), "-o", str(reference), "--workers", "0", "--runtime", "torch", check=True)
    assert_same_rows(read_embeddings(str(out)), read_embeddings(str(reference)))


def test_below_fp32_the_runtime_is_part_of_an_outputs_identity():
    # float32 rows of both runtimes agree within the tolerance above; bfloat16 rounds differently on each
    assert numerics("fp32", "openvino") == numerics("fp32", "torch") == {}
    assert numerics("bf16", "openvino") != numerics("bf16", "torch")


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16; gpl refuses bf16 here")
def test_bf16_rows_of_the_other_runtime_are_refused_by_update(tmp_path, small_folder):
    out = tmp_path / "emb.h5"
    run_gpl("embed", str(small_folder), "-o", str(out), "--precision", "bf16", "--runtime", "torch", check=True)
    proc = run_gpl("embed", str(small_folder), "-o", str(out), "--precision", "bf16", "--runtime", "openvino",
                   "--update")
    assert proc.returncode == EXIT_USAGE and "runtime: 'torch' there, 'openvino' now" in proc.stderr.decode()


def test_classify_on_openvino_gives_torchs_classes(tmp_path):
    image = str(SAMPLE_IMAGES / "coffee.png")
    results = {}
    for runtime in ("torch", "openvino"):
        out = tmp_path / f"{runtime}.jsonl"
        result = CliRunner().invoke(cli, ["classify", image, "-k", "3", "--runtime", runtime, "-o", str(out)])
        assert result.exit_code == 0, result.output
        doc = json.loads(out.read_text())
        results[runtime] = [(c["index"], round(c["probability"], 4)) for c in doc["classes"]]
    assert results["openvino"] == results["torch"]


def test_the_ray_engine_runs_openvino_in_its_actors(ray_address, tmp_path, lite0):
    inputs, config = collect_inputs([str(SAMPLE_IMAGES)]), EmbedConfig(pools=("avg,max",))
    ray_run = Output.resolve(str(tmp_path / "ray.h5"))
    embed_to(config, inputs, ray_run, RunOptions(batch_size=4, device="cpu", engine="ray", runtime="openvino"),
             backbone=lite0)
    local = Output.resolve(str(tmp_path / "local.h5"))
    embed_to(config, inputs, local, RunOptions(batch_size=4, workers=0, device="cpu", runtime="torch"), backbone=lite0)
    on_ray = read_embeddings(ray_run.path)
    assert on_ray.metadata["engine"] == "ray" and on_ray.metadata["runtime"] == "openvino"
    assert_same_rows(on_ray, read_embeddings(local.path))


# --- when OpenVINO cannot run ----------------------------------------------------------------------------------


class _SizeFrozen(torch.nn.Module):
    """A trunk whose trace keeps its example's size (a Python int from the input's shape): OpenVINO would run it
    wrong at any other size, so it is refused."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))[:, :, : int(x.shape[-2]) // 2]


def _frozen_backbone() -> Backbone:
    return Backbone("frozen", _SizeFrozen().eval(), Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3), "random (test)",
                    "f" * 64, "test", feature_map=(8, 16, 32))


@pytest.fixture
def plans(tmp_path, monkeypatch):
    """A plan cache of the test's own (the conversions stay in the session's cache)."""
    path = tmp_path / "plans.json"
    monkeypatch.setattr(tuning, "cache_file", lambda: str(path))
    return path


def seed(backbone, settings, torch_rate: float, openvino_rate: float | None) -> None:
    tuning.save_table(tuning.plan_key(backbone, settings, "torch"), [{"layout": "channels_last", "batch": 4, "rate": torch_rate}])
    if openvino_rate is not None:
        tuning.save_table(tuning.plan_key(backbone, settings, "openvino"),
                          [{"runtime": "openvino", "layout": "nchw", "batch": 4, "rate": openvino_rate}])


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_an_unconvertible_backbone_is_exit_2_when_asked_for_and_torch_under_auto(tmp_path, plans):
    backbone = _frozen_backbone()
    config = EmbedConfig(backbone="frozen")
    with pytest.raises(GplError) as refused:
        Job(config, RunOptions(device="cpu", workers=0, runtime="openvino"), 10, backbone=backbone)
    assert refused.value.exit_code == EXIT_USAGE
    assert str(refused.value).startswith("--runtime openvino: frozen: its converted form gives a 8x16x25 map")
    settings = resolve_settings("cpu", workers=0, runtime="auto")
    seed(backbone, settings, 10.0, 1000.0)  # measured much faster: auto would take it
    lines = _Lines()
    logging.getLogger("gpl_cli").addHandler(lines)
    try:
        job = Job(config, RunOptions(device="cpu", workers=0), 10**6, backbone=backbone)
    finally:
        logging.getLogger("gpl_cli").removeHandler(lines)
    assert job.embedder.runtime == job.settings.runtime == "torch"
    assert [line for line in lines.lines if "runs on torch" in line] == [
        "frozen runs on torch: its converted form gives a 8x16x25 map where torch gives 8x19x25 at a 39x25 input: "
        "the traced graph depends on the input size"]


def test_without_openvino_installed_auto_is_torch_and_openvino_says_how_to_install(monkeypatch):
    monkeypatch.setattr(run_settings, "installed", lambda: False)
    assert resolve_settings("cpu", runtime="auto").runtime == "torch"
    with pytest.raises(GplError, match=r"pip install openvino .*pip install -e '\.\[openvino\]'"):
        resolve_settings("cpu", runtime="openvino")


def test_openvino_is_refused_off_the_cpu_and_below_its_precisions():
    assert "use --device cpu" in run_settings.openvino_refusal(torch.device("cuda"), "fp32")
    assert "not --precision fp16" in run_settings.openvino_refusal(torch.device("cpu"), "fp16")
    assert run_settings.openvino_refusal(torch.device("cpu"), "fp32") is None


# --- auto: the measured plan, and whether the run repays OpenVINO's start -------------------------------------


@pytest.mark.parametrize("openvino_rate,conversion_cached,images,expected", [
    (None, True, 10**6, "torch"),  # OpenVINO never measured here: torch
    (90.0, True, 10**6, "torch"),  # measured slower
    (125.0, True, 10**5, "openvino"),  # faster, cached: 10^5 images save 100 s against a 1 s start
    (125.0, True, 100, "torch"),  # 100 images (50 per worker) save 0.1 s: less than the start
    (125.0, False, 2000, "torch"),  # 1,000 per worker save 2 s: not the conversion's 30 s
    (125.0, False, 10**5, "openvino"),  # 50,000 per worker save 100 s: the conversion pays
])
def test_auto_takes_openvino_only_where_measured_faster_and_repaid(lite0, plans, monkeypatch, openvino_rate,
                                                                   conversion_cached, images, expected):
    monkeypatch.setattr(gov, "is_cached", lambda parts: conversion_cached)
    settings = replace(resolve_settings("cpu", workers=2, runtime="auto"), threads=1)
    seed(lite0, settings, 100.0, openvino_rate)
    plan = tuning.plan_run(lite0, settings, None, images)
    assert plan.runtime == expected and settings.planned(plan).runtime == expected
    assert plan.channels_last == (expected == "torch")  # OpenVINO takes NCHW
    torch_only = tuning.plan_run(lite0, replace(settings, runtime="torch"), None, 10**6)
    assert torch_only.runtime == "torch"  # an explicit runtime is never replaced


def test_explicit_openvino_without_a_measurement_takes_the_default_batch(lite0, plans):
    plan = tuning.plan_run(lite0, resolve_settings("cpu", workers=0, runtime="openvino"), None, 10)
    assert (plan.runtime, plan.batch_size, plan.source, plan.describe()) == ("openvino", 4, "default", "batch 4 (default)")


def test_gpl_tune_measures_both_runtimes_and_caches_each_table(lite0, plans, monkeypatch):
    monkeypatch.setattr(tuning, "CPU_BATCHES", (1, 2))
    monkeypatch.setattr(tuning, "MEASURE_SECONDS", 0.01)
    monkeypatch.setattr("gpl_cli.models.backbones.load_backbone", lambda name, weights=None: lite0)
    result = CliRunner().invoke(cli, ["tune", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert list(doc["tables"]) == ["torch", "openvino"]
    assert {(r["layout"], r["batch"]) for r in doc["tables"]["openvino"]} == {("nchw", 1), ("nchw", 2)}
    settings = resolve_settings("cpu", runtime="auto")
    for runtime, table in doc["tables"].items():
        assert tuning.load_table(tuning.plan_key(lite0, settings, runtime)) == table
    best = {runtime: max(r["rate"] for r in table) for runtime, table in doc["tables"].items()}
    assert doc["runtime"] == ("openvino" if best["openvino"] > best["torch"] else "torch")  # a long run's choice


def test_a_small_cli_run_under_auto_stays_on_torch_without_importing_openvino(tmp_path):
    status, heavy, err = gpl_imports("embed", str(SAMPLE_IMAGES / "coffee.png"), "-o", str(tmp_path / "one.h5"))
    assert status == 0, err
    assert "runtime torch" in err and "openvino" not in heavy and "torch" in heavy
