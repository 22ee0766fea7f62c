"""--engine ray: the rows, order, vectors and failures the local engine writes, scheduled on Ray Data.

One local Ray instance (2 CPUs, temp files under pytest's tmp dir: conftest's `ray_address`) serves the
whole test session, as Ray cannot be started twice in one process; the runs in this process join it, and
the CLI run joins it through --ray-address. Each model actor runs torch with the one CPU Ray reserves for
it, so the local references here run with one thread too: float32 sums over a different thread count
differ in the last bits (about 3e-6 relative; measured with max pooling on sample_images), which is a
property of the machine, not of the engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_IMAGES, embed_to, photo_corpus, processes_mentioning, run_gpl

from gpl_cli.embedding import job as pipeline, ray as ray_engine
from gpl_cli.embedding.config import EmbedConfig, RayOptions, RunMode, RunOptions
from gpl_cli.embedding.images import open_rgb, preprocess_image
from gpl_cli.embedding.inputs import collect_inputs
from gpl_cli.embedding.job import Interrupted
from gpl_cli.embedding.ray import InOrder, actor_pool_size
from gpl_cli.embedding.tuning import torch_threads
from gpl_cli.errors import GplError
from gpl_cli.store.formats import read_embeddings
from gpl_cli.store.journal import JOURNAL_SUFFIX, Journal
from gpl_cli.store.output import Output
from gpl_cli.store.sink import encode_name

N_SMALL = 240  # the corpus for shards and resume: tiny images, embedded at most 64 pixels wide
SMALL = EmbedConfig(pools=("avg,max",), resize="keep-aspect", max_size=64)
CORRUPT = "d1/broken.jpg"


def ray_options(batch_size: int) -> RunOptions:
    return RunOptions(batch_size=batch_size, device="cpu", engine="ray")


def local_options(batch_size: int) -> RunOptions:
    return RunOptions(batch_size=batch_size, workers=0, device="cpu")


def embed_local(config, inputs, target, batch_size, backbone):
    with torch_threads(1):
        return embed_to(config, inputs, target, local_options(batch_size), backbone=backbone)


# --- sample_images: the Ray engine against the local engine and against numpy --------------------


@pytest.fixture(scope="module")
def sample_runs(ray_address, tmp_path_factory, lite0):
    """sample_images through both engines (avg, max); the Ray dataset is kept for a look at its stages."""
    out = tmp_path_factory.mktemp("sample")
    inputs = collect_inputs([str(SAMPLE_IMAGES)])
    config = EmbedConfig(pools=("avg,max",))
    embed_local(config, inputs, Output.resolve(str(out / "local.h5")), 4, lite0)
    datasets = []
    build = ray_engine.build_dataset

    def keep(*args):
        datasets.append(build(*args))
        return datasets[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray_engine, "build_dataset", keep)
        summary = embed_to(config, inputs, Output.resolve(str(out / "ray.h5")), ray_options(4), backbone=lite0)
    return read_embeddings(str(out / "local.h5")), read_embeddings(str(out / "ray.h5")), summary, datasets, out


def test_ray_engine_writes_what_the_local_engine_writes(sample_runs):
    local, remote, summary, _, _ = sample_runs
    assert summary.embedded == len(local) == 15 and summary.failed == 0
    assert remote.paths == local.paths == sorted(p.name for p in SAMPLE_IMAGES.iterdir() if p.suffix != ".md")
    for key in ("avg", "max"):
        np.testing.assert_allclose(remote.vectors[key], local.vectors[key], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(remote.stats, local.stats)
    changed = {k for k in local.metadata.keys() | remote.metadata.keys() if local.metadata.get(k) != remote.metadata.get(k)}
    assert changed <= {"engine", "seconds", "created"} and "engine" in changed
    assert (local.metadata["engine"], remote.metadata["engine"]) == ("local", "ray")


def test_ray_vectors_are_the_pooled_feature_maps(sample_runs, lite0):
    """avg and max computed here with numpy from the trunk's maps, not by gpl's pooling or engine."""
    _, remote, _, _, _ = sample_runs
    pre = lite0.preprocess
    pixels = torch.stack([preprocess_image(open_rgb(str(SAMPLE_IMAGES / p)), pre) for p in remote.paths])
    x = (pixels.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch_threads(1), torch.inference_mode():
        fmap = lite0.trunk.cpu().eval()(x).numpy()
    # gpl folds the batch norms into the convolutions (inference.py): rounding differs by up to ~4e-5.
    np.testing.assert_allclose(remote.vectors["avg"], fmap.mean(axis=(2, 3)), atol=1e-4, rtol=0)
    np.testing.assert_allclose(remote.vectors["max"], fmap.max(axis=(2, 3)), atol=1e-4, rtol=0)


def test_several_scales_on_ray_are_the_local_rows(ray_address, tmp_path, lite0):
    """Each image's inputs at every scale travel packed from the decode tasks to the model actors, a failure
    among them; the rows are the local engine's, and the model time comes back per scale."""
    root = photo_corpus(tmp_path / "photos", 10, 2)
    (root / "d0" / "broken.jpg").write_bytes(b"garbage")
    config, inputs = replace(SMALL, scales=(1.0, 2.0)), collect_inputs([str(root)])
    embed_local(config, inputs, Output.resolve(str(tmp_path / "local.h5")), 4, lite0)
    summary = embed_to(config, inputs, Output.resolve(str(tmp_path / "ray.h5")), ray_options(4), backbone=lite0)
    local, remote = read_embeddings(str(tmp_path / "local.h5")), read_embeddings(str(tmp_path / "ray.h5"))
    assert remote.paths == local.paths and len(local) == 10 and remote.failures == local.failures != []
    for key in ("avg", "max"):
        np.testing.assert_allclose(remote.vectors[key], local.vectors[key], atol=1e-6, rtol=0)  # rows of length ~1
    assert remote.metadata["scales"] == [1.0, 2.0]
    assert list(summary.scale_seconds) == ["1", "2"] and all(s > 0 for s in summary.scale_seconds.values())


def test_decoding_and_the_model_are_separate_ray_stages(sample_runs):
    """Decoding runs as CPU tasks, the model in an actor pool: Ray Data must not fuse them into one."""
    *_, datasets, _ = sample_runs
    stats = datasets[0].stats()
    assert "MapBatches(decode_stage):" in stats and "MapBatches(ModelActor):" in stats
    assert "decode_stage)->" not in stats


def test_cli_joins_a_cluster_and_streams_rows_in_input_order(sample_runs, ray_address, tmp_path, lite0):
    """gpl embed --engine ray --ray-address: stdout carries JSON Lines only, rows in input order, the
    corrupt file recorded in place; vectors as the in-process Ray run and the local engine give them."""
    local, *_ = sample_runs
    folder = tmp_path / "photos"
    names = sorted(p.name for p in SAMPLE_IMAGES.iterdir() if p.suffix != ".md")[:6]
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes((SAMPLE_IMAGES / name).read_bytes())
    (folder / names[2].replace(".", "_bad.")).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    proc = run_gpl("embed", str(folder), "-o", "-", "-p", "avg,max", "--engine", "ray", "--ray-address", ray_address,
                   "--batch-size", "2", "--device", "cpu", "-q")
    assert proc.returncode == 3, proc.stderr.decode()
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    rows = [r for r in lines if "embeddings" in r]
    errors = [r for r in lines if "error" in r]
    assert [r["path"] for r in rows] == names
    assert [r["path"] for r in errors] == [names[2].replace(".", "_bad.")]
    assert "truncated or corrupt image data" in errors[0]["error"]
    for key in ("avg", "max"):
        got = np.array([r["embeddings"][key] for r in rows], np.float32)
        want = local.vectors[key][[local.paths.index(n) for n in names]]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_without_an_address_the_cli_starts_and_stops_its_own_ray(sample_runs, tmp_path_factory):
    local, *_ = sample_runs
    temp = tmp_path_factory.mktemp("own")  # short: Ray's socket paths must stay under 108 bytes
    folder = temp / "photos"
    folder.mkdir()
    names = local.paths[:3]
    for name in names:
        (folder / name).write_bytes((SAMPLE_IMAGES / name).read_bytes())
    out = temp / "own.h5"
    proc = run_gpl("embed", str(folder), "-o", str(out), "-p", "avg,max", "--engine", "ray", "--device", "cpu",
                   env={"RAY_TMPDIR": str(temp), "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"" and os.listdir(temp / "ray")  # the instance used the temp dir given
    # Only gpl's own lines: none of Ray's notices (token authentication, actor restarts, progress bars).
    lines = proc.stderr.decode().splitlines()
    assert [line for line in lines if not line.startswith("gpl: ")] == [] and "gpl: embedded 3," in lines[-1], lines
    end = time.monotonic() + 30
    while processes_mentioning(str(temp)) and time.monotonic() < end:
        time.sleep(0.2)
    assert not processes_mentioning(str(temp)), "gpl left its Ray instance running"
    result = read_embeddings(str(out))
    assert result.paths == names and result.metadata["engine"] == "ray"
    for key in ("avg", "max"):
        np.testing.assert_allclose(result.vectors[key], local.vectors[key][:3], atol=1e-5, rtol=0)


def test_python_runs_share_the_ray_instance_gpl_started_and_it_stops_at_exit(sample_runs, tmp_path_factory):
    """Two runs from Python in one process: the second uses the instance the first started (Ray does not
    support being started again in one process), and it stops when the process exits."""
    local, *_ = sample_runs
    temp = tmp_path_factory.mktemp("api")  # short: Ray's socket paths must stay under 108 bytes
    (temp / "photos").mkdir()
    for name in local.paths[:2]:
        (temp / "photos" / name).write_bytes((SAMPLE_IMAGES / name).read_bytes())
    script = (
        "import json, sys, numpy as np, ray, gpl_cli\n"
        "runs, addresses = [], []\n"
        "for _ in range(2):\n"
        "    runs.append(gpl_cli.embed(sys.argv[1], pool='avg', engine='ray', device='cpu'))\n"
        "    addresses.append(ray.get_runtime_context().gcs_address if ray.is_initialized() else None)\n"
        "print(json.dumps({'addresses': addresses, 'paths': [r.paths for r in runs],\n"
        "                  'avg': [r.vectors['avg'].tolist() for r in runs]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(temp / "photos")], capture_output=True, timeout=300,
                          env={**os.environ, "RAY_TMPDIR": str(temp), "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["addresses"][0] is not None, "gpl stopped the Ray instance it started when the run ended"
    assert doc["addresses"][1] == doc["addresses"][0]
    assert doc["paths"] == [local.paths[:2]] * 2
    for avg in doc["avg"]:
        np.testing.assert_allclose(np.array(avg, np.float32), local.vectors["avg"][:2], atol=1e-5, rtol=0)
    end = time.monotonic() + 30
    while processes_mentioning(str(temp)) and time.monotonic() < end:
        time.sleep(0.2)
    assert not processes_mentioning(str(temp)), "the Ray instance outlived the Python process that started it"


# --- a few hundred images: shards, a corrupt file, resume -----------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = photo_corpus(tmp_path_factory.mktemp("corpus") / "photos", N_SMALL, 3, lambda i: (40 + i % 3, 32))
    (root / CORRUPT).write_bytes(b"garbage, not an image")
    return root


@pytest.fixture(scope="module")
def reference(corpus, lite0):
    """The local engine's single-file output for the corpus."""
    out = corpus.parent / "local.h5"
    summary = embed_local(SMALL, collect_inputs([str(corpus)]), Output.resolve(str(out)), 8, lite0)
    assert (summary.embedded, summary.failed) == (N_SMALL, 1)
    return read_embeddings(str(out))


def assert_same_rows(result, reference):
    assert result.paths == reference.paths
    assert result.failures == reference.failures
    for key in ("avg", "max"):
        np.testing.assert_allclose(result.vectors[key], reference.vectors[key], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def shards(ray_address, corpus, lite0):
    out = corpus.parent / "shards"
    summary = embed_to(SMALL, collect_inputs([str(corpus)]), Output.resolve(str(out), "shards", shard_rows=64),
                        ray_options(8), backbone=lite0)
    assert (summary.embedded, summary.failed) == (N_SMALL, 1)
    return out


def test_shards_hold_the_rows_in_order_and_read_back_as_one_data_set(shards, reference, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    assert sorted(os.listdir(shards / "avg_emb")) == [f"emb_{i:05d}.npy" for i in range(4)]  # 240 rows, 64 a shard
    for i in range(4):
        rows = slice(64 * i, 64 * (i + 1))
        assert pq.read_table(shards / "metadata" / f"metadata_{i:05d}.parquet")["path"].to_pylist() == reference.paths[rows]
        np.testing.assert_allclose(np.load(shards / "max_emb" / f"emb_{i:05d}.npy"), reference.vectors["max"][rows], atol=1e-5)
    info = run_gpl("info", str(shards), "--json", check=True)
    doc = json.loads(info.stdout)
    assert (doc["count"], doc["failed"], doc["engine"]) == (N_SMALL, 1, "ray")
    merged = tmp_path / "merged.h5"
    run_gpl("export", str(shards), "-o", str(merged), "-q", check=True)
    assert_same_rows(read_embeddings(str(merged)), reference)
    # gpl compare reads the folder as one data set: the same report as for the merged file
    reports = [json.loads(run_gpl("compare", str(source), "--json", "-q", check=True).stdout)
               for source in (shards, merged)]
    assert reports[0]["images"] == N_SMALL and set(reports[0]["poolings"]) == {"avg", "max"}
    assert reports[0]["poolings"] == reports[1]["poolings"]


def test_a_corrupt_image_is_a_failure_and_nothing_else_changes(shards, reference):
    result = read_embeddings(str(shards))
    assert [p for p, _ in result.failures] == [CORRUPT]
    assert result.failures == reference.failures  # the same reason as locally
    assert CORRUPT not in result.paths and len(result.paths) == N_SMALL
    assert_same_rows(result, reference)


def test_resume_on_ray_embeds_only_what_the_interrupted_run_left(ray_address, corpus, reference, lite0, monkeypatch,
                                                                tmp_path):
    inputs = collect_inputs([str(corpus)])
    out = tmp_path / "resumed.h5"
    written = []
    original_write = pipeline._Sink.write

    def write_then_stop(self, names, vectors, stats):
        written.extend(names)
        self.stop.signum = signal.SIGINT  # what the Ctrl-C handler does: the run stops after these rows
        original_write(self, names, vectors, stats)

    monkeypatch.setattr(pipeline._Sink, "write", write_then_stop)
    with pytest.raises(Interrupted, match="--resume"):
        embed_to(SMALL, inputs, Output.resolve(str(out)), ray_options(8), backbone=lite0)
    monkeypatch.setattr(pipeline._Sink, "write", original_write)
    done, failed = Journal(str(out) + JOURNAL_SUFFIX, ["avg", "max"]).index()
    assert set(done) == {encode_name(n) for n in written} and 0 < len(done) < N_SMALL and not out.exists()

    seen = []
    original_run = ray_engine.RayEngine.run

    def spy(self, items, *args, **kwargs):
        seen.extend(it.name for it in items)
        return original_run(self, items, *args, **kwargs)

    monkeypatch.setattr(ray_engine.RayEngine, "run", spy)
    summary = embed_to(SMALL, inputs, Output.resolve(str(out)), ray_options(8),
                        mode=RunMode(resume=True), backbone=lite0)
    left = [it.name for it in inputs.items if encode_name(it.name) not in done and encode_name(it.name) not in failed]
    assert seen == left and summary.reused == len(done)
    assert_same_rows(read_embeddings(str(out)), reference)
    assert not Path(str(out) + JOURNAL_SUFFIX).exists()


# --- pieces that need no cluster ------------------------------------------------------------------


def test_in_order_releases_each_result_as_soon_as_all_before_it_arrived():
    rng = np.random.default_rng(0)
    arrival = rng.permutation(50)
    order, released = InOrder(), []
    for k, index in enumerate(arrival):
        order.add(int(index), f"row{index}")
        got = order.release()
        released += got
        # everything below the smallest index not yet arrived is out, and nothing else
        missing = sorted(set(range(50)) - set(arrival[: k + 1].tolist()))
        assert len(released) == (missing[0] if missing else 50)
    assert released == [(i, f"row{i}") for i in range(50)]
    assert not order.waiting


def test_actor_pool_size_follows_the_cluster():
    auto = RayOptions()
    assert actor_pool_size({"CPU": 16.0, "GPU": 4.0}, "auto", auto) == (4, 1.0)
    assert actor_pool_size({"CPU": 16.0, "GPU": 4.0}, "auto", RayOptions(num_gpus=0.5)) == (8, 0.5)
    assert actor_pool_size({"CPU": 16.0, "GPU": 4.0}, "cpu", auto) == (8, 0.0)
    assert actor_pool_size({"CPU": 2.0}, "auto", auto) == (1, 0.0)
    assert actor_pool_size({"CPU": 2.0}, "auto", RayOptions(concurrency=3)) == (3, 0.0)
    with pytest.raises(GplError, match="no GPUs"):
        actor_pool_size({"CPU": 8.0}, "cuda", auto)
    with pytest.raises(GplError, match="has 2 GPUs"):
        actor_pool_size({"CPU": 8.0, "GPU": 2.0}, "auto", RayOptions(num_gpus=3))


def test_without_ray_installed_the_error_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from gpl_cli.cli import main; "
            f"sys.argv = ['gpl', 'embed', {str(SAMPLE_IMAGES)!r}, '-o', {str(tmp_path / 'x.h5')!r}, '--engine', 'ray']; "
            "main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == 2
    assert "pip install 'ray[data]'  (in a clone of gpl: pip install -e '.[ray]')" in proc.stderr.decode()
    assert not (tmp_path / "x.h5").exists() and proc.stdout == b""


def test_ray_options_need_the_ray_engine(tmp_path):
    proc = run_gpl("embed", str(SAMPLE_IMAGES), "-o", str(tmp_path / "x.h5"), "--ray-address", "auto")
    assert proc.returncode == 2
    assert "--ray-address applies to --engine ray only" in proc.stderr.decode()


def test_shard_rows_belongs_to_the_shards_format():
    assert Output.resolve("out_dir", "shards", shard_rows=10).sharded
    assert not Output.resolve("out.h5").sharded
    with pytest.raises(GplError, match="--shard-rows applies to --format shards"):
        Output.resolve("out.h5", shard_rows=10)
