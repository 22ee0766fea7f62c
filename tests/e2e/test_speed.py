"""Fast paths give the plain path's vectors; the tuned plan is cached, honoured and overridable.

Tolerances: the same input through the same layout is bit-identical; another memory layout
(channels-last) sums in another order and agrees to 1e-5 of each vector's largest component;
bfloat16 compute agrees to cosine >= 0.995; draft JPEG decoding is opt-in because it moves
vectors further than cosine 0.999.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE_IMAGES, assert_vectors_close, make_photo_like, run_gpl
from PIL import Image

from gpl_cli.embedding import tuning
from gpl_cli.embedding.config import EmbedConfig
from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.images import DRAFT_MARGIN, ImageDataset, collate, open_rgb, preprocess_image
from gpl_cli.embedding.settings import RunSettings, cpu_has_native_bf16, resolve_settings
from gpl_cli.errors import GplError
from gpl_cli.pooling.spec import parse_pool_list

PHOTOS = ["cat_chelsea.png", "coffee.png", "rocket.jpg", "igloo.webp", "astronaut.png", "sheep.jpg"]
SPECS = parse_pool_list(["avg,max"])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def photo_batch(lite0):
    """Real photos as the loader delivers them (collate: channels-last uint8) and as a plain NCHW stack."""
    samples = ImageDataset([str(SAMPLE_IMAGES / n) for n in PHOTOS], lite0.preprocess)
    batch = collate([samples[i] for i in range(len(PHOTOS))])
    plain = torch.stack([preprocess_image(open_rgb(str(SAMPLE_IMAGES / n)), lite0.preprocess) for n in PHOTOS])
    (positions, pixels, scale), = batch.groups  # centre-cropped at one scale: one shape, one group
    assert positions == list(range(len(PHOTOS))) and scale == 0
    return pixels, plain


def test_collate_copies_pixels_exactly_into_a_channels_last_batch(photo_batch):
    batched, plain = photo_batch
    assert batched.is_contiguous(memory_format=torch.channels_last) and batched.dtype == torch.uint8
    assert torch.equal(batched, plain)


def test_model_input_is_torchvision_totensor_normalize_bit_for_bit(lite0, photo_batch):
    from torchvision.transforms import functional as F

    batched, plain = photo_batch
    pre = lite0.preprocess
    expected = torch.stack([F.normalize(F.to_tensor(p.permute(1, 2, 0).numpy()), pre.mean, pre.std) for p in plain])
    for channels_last in (False, True):
        embedder = Embedder(lite0, SPECS, channels_last=channels_last)
        seen = {}
        handle = embedder.trunk.register_forward_pre_hook(lambda m, args, seen=seen: seen.setdefault("x", args[0].clone()))
        embedder.feature_maps(batched)
        handle.remove()
        assert torch.equal(seen["x"], expected)
        assert seen["x"].is_contiguous(memory_format=embedder.memory_format)


def test_plain_layout_gives_the_same_vectors_from_either_batch_layout(lite0, photo_batch):
    batched, plain = photo_batch
    embedder = Embedder(lite0, SPECS)
    a, b = embedder.embed_pixels(batched), embedder.embed_pixels(plain)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])  # same input values, same layout, same math


def test_channels_last_and_batching_match_the_plain_path(lite0, photo_batch):
    batched, plain = photo_batch
    reference = {k: np.concatenate([Embedder(lite0, SPECS).embed_pixels(plain[i:i + 1])[k] for i in range(len(plain))])
                 for k in ("avg", "max")}
    fast = Embedder(lite0, SPECS, channels_last=True).embed_pixels(batched)
    for key in reference:
        assert_vectors_close(fast[key], reference[key])


def test_the_backbone_is_never_modified(lite0, photo_batch):
    first = next(lite0.trunk.parameters())
    Embedder(lite0, SPECS, channels_last=True).embed_pixels(photo_batch[0])
    assert first.is_contiguous() and first.dtype == torch.float32


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16; gpl refuses bf16 here")
def test_bf16_vectors_are_close_and_float32(lite0, photo_batch):
    batched, _ = photo_batch
    fp32 = Embedder(lite0, SPECS, channels_last=True).embed_pixels(batched)
    bf16 = Embedder(lite0, SPECS, precision="bf16", channels_last=True).embed_pixels(batched)
    for key in fp32:
        assert bf16[key].dtype == np.float32
        assert cosine(fp32[key], bf16[key]).min() >= 0.995
        assert not np.array_equal(fp32[key], bf16[key])  # it really ran in bfloat16


def test_precisions_a_device_cannot_run_fast_are_refused(lite0, monkeypatch):
    with pytest.raises(GplError, match="fp16 needs a GPU"):
        Embedder(lite0, SPECS, device="cpu", precision="fp16")
    monkeypatch.setattr("gpl_cli.embedding.settings.cpu_has_native_bf16", lambda: False)
    with pytest.raises(GplError, match="native bfloat16"):
        Embedder(lite0, SPECS, device="cpu", precision="bf16")


# --- JPEG draft decoding ------------------------------------------------------------------------


def big_jpeg(path, size=(1400, 1100), orientation=None) -> None:
    im = Image.fromarray(make_photo_like(size, seed=7))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im.save(path, quality=92, exif=exif)


def test_draft_decodes_large_jpegs_smaller_but_never_below_the_size_needed(tmp_path):
    path = tmp_path / "big.jpg"
    big_jpeg(path)
    assert open_rgb(str(path)).size == (1400, 1100)
    drafted = open_rgb(str(path), min_side=256)
    assert drafted.size == (350, 275)  # 1/4 scale: the largest reduction keeping the short side >= 256
    assert open_rgb(str(path), min_side=600).size == (1400, 1100)  # 1100 < 2 x 600: not worth it
    png = tmp_path / "big.png"
    Image.open(path).save(png)
    assert open_rgb(str(png), min_side=256).size == (1400, 1100)  # only JPEGs have draft mode


def test_draft_still_applies_exif_orientation(tmp_path):
    path = tmp_path / "turned.jpg"
    big_jpeg(path, orientation=6)  # stored landscape, shown portrait
    assert open_rgb(str(path)).size == (1100, 1400)
    assert open_rgb(str(path), min_side=256).size == (275, 350)


def test_draft_decoding_is_close_and_off_unless_it_is_as_good_as_a_full_decode(lite0):
    """On the largest sample photo, at the margin gpl uses; opt-in while cosine < 0.999."""
    path = str(SAMPLE_IMAGES / "retina.jpg")  # 1411 x 1411
    pre = lite0.preprocess
    full = preprocess_image(open_rgb(path), pre)[None]
    drafted = preprocess_image(open_rgb(path, DRAFT_MARGIN * pre.resize), pre)[None]
    assert not torch.equal(full, drafted)  # the draft path really ran
    embedder = Embedder(lite0, SPECS)
    a, b = embedder.embed_pixels(full), embedder.embed_pixels(drafted)
    worst = min(float(cosine(a[k], b[k])[0]) for k in a)
    assert worst > 0.995
    assert worst >= 0.999 or EmbedConfig().jpeg_draft is False


# --- the tuned plan --------------------------------------------------------------------------------

TABLE = [
    {"layout": "nchw", "batch": 4, "rate": 40.0},
    {"layout": "nchw", "batch": 32, "rate": 35.0},
    {"layout": "channels_last", "batch": 4, "rate": 90.0},
    {"layout": "channels_last", "batch": 32, "rate": 30.0},
]


def cpu(threads: int = 1, precision: str = "fp32") -> RunSettings:
    """CPU settings with the model on `threads` threads (what a plan is keyed by), on torch (tests/e2e/test_runtime.py
    has the runtime's choice)."""
    return replace(resolve_settings("cpu", "fp32", workers=1, runtime="torch"), precision=precision, threads=threads)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cached_plan_is_used_and_batch_size_overrides_it(lite0, cache_home):
    tuning.save_table(tuning.plan_key(lite0, cpu()), TABLE)
    assert (cache_home / "gpl" / "plans.json").is_file()
    assert tuning.plan_run(lite0, cpu(), None, images=10) == tuning.Plan(4, True, "cache")
    # A given batch size wins; the layout is the faster one measured nearest to it.
    assert tuning.plan_run(lite0, cpu(), 30, images=10) == tuning.Plan(30, False, "--batch-size")
    # Another precision or thread count is another entry: nothing cached, a short run takes the default.
    assert tuning.plan_run(lite0, cpu(1, "bf16"), None, images=10) == tuning.Plan(4, True, "default")
    assert tuning.plan_run(lite0, cpu(2, "fp32"), None, images=10) == tuning.Plan(4, True, "default")


def test_short_runs_do_not_measure_long_runs_measure_once_and_cache(lite0, cache_home, monkeypatch):
    monkeypatch.setattr(tuning, "CPU_BATCHES", (1, 2))
    monkeypatch.setattr(tuning, "MEASURE_SECONDS", 0.01)
    calls = []
    real_measure = tuning.measure
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: calls.append(1) or real_measure(*a, **k))
    smallest = tuning.measure_min_images(cpu().device)
    assert tuning.plan_run(lite0, cpu(), None, images=smallest - 1).source == "default"
    assert not calls and not (cache_home / "gpl" / "plans.json").exists()
    plan = tuning.plan_run(lite0, cpu(), None, images=smallest)
    table = tuning.load_table(tuning.plan_key(lite0, cpu()))
    assert plan.source == "measured" and len(calls) == 1
    assert {(r["layout"], r["batch"]) for r in table} == {(lay, b) for lay in tuning.LAYOUTS for b in (1, 2)}
    best = max(table, key=lambda r: r["rate"])
    assert (plan.batch_size, plan.channels_last) == (best["batch"], tuning.LAYOUTS[best["layout"]])
    assert tuning.plan_run(lite0, cpu(), None, images=10**6).source == "cache"
    assert len(calls) == 1


def test_measuring_stops_when_larger_batches_keep_getting_slower(lite0, monkeypatch):
    rates = iter([10.0, 20.0, 14.0, 12.0, 30.0] * 2)  # per layout: up, then two steps below 0.75 x best
    monkeypatch.setattr(tuning, "_best_time", lambda embedder, pixels, seconds: len(pixels) / next(rates))
    monkeypatch.setattr(tuning, "CPU_BATCHES", (1, 2, 4, 8, 16))
    table = tuning.measure(lite0, cpu())
    assert [r["batch"] for r in table if r["layout"] == "nchw"] == [1, 2, 4, 8]


def test_a_corrupt_cache_is_ignored_and_replaced(lite0, cache_home):
    (cache_home / "gpl").mkdir(parents=True)
    (cache_home / "gpl" / "plans.json").write_text("{not json")
    assert tuning.plan_run(lite0, cpu(), None, images=10).source == "default"
    tuning.save_table(tuning.plan_key(lite0, cpu()), TABLE)
    assert tuning.plan_run(lite0, cpu(), None, images=10).source == "cache"


def test_cli_uses_the_cached_plan_and_its_vectors_match_the_plain_path(lite0, tmp_path, small_folder):
    cache = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(cache)}
    # Seed the cache the CLI process will look up: with loader workers on a CPU the model runs on one thread.
    key = tuning.plan_key(lite0, cpu())
    (cache / "gpl").mkdir(parents=True)
    (cache / "gpl" / "plans.json").write_text(json.dumps({key: [{"layout": "channels_last", "batch": 3, "rate": 1.0}]}))
    out = tmp_path / "fast.h5"
    proc = run_gpl("embed", str(small_folder), "-o", str(out), "-p", "avg,max", "--workers", "2", "--device", "cpu", env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "batch 3, channels-last (cache)" in proc.stderr.decode()
    from gpl_cli.store.formats import read_embeddings

    emb = read_embeddings(str(out))
    assert emb.metadata["config"]["precision"] == "fp32" and emb.metadata["config"]["jpeg_draft"] is False
    plain = Embedder(lite0, SPECS)
    for i, name in enumerate(emb.paths):
        pixels = preprocess_image(open_rgb(str(small_folder / name)), lite0.preprocess)[None]
        ref = plain.embed_pixels(pixels)
        for key in ("avg", "max"):
            assert_vectors_close(emb.vectors[key][i], ref[key][0])


def test_gpl_tune_prints_and_caches_the_table(lite0, cache_home, monkeypatch):
    from click.testing import CliRunner

    from gpl_cli.cli import cli

    monkeypatch.setattr(tuning, "CPU_BATCHES", (1, 2))
    monkeypatch.setattr(tuning, "MEASURE_SECONDS", 0.01)
    monkeypatch.setattr("gpl_cli.models.backbones.load_backbone", lambda name, weights=None: lite0)
    result = CliRunner().invoke(cli, ["tune", "--device", "cpu", "--runtime", "torch", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert list(doc["tables"]) == ["torch"] and doc["runtime"] == "torch"
    table = doc["tables"]["torch"]
    assert len(table) == 4 and all(r["rate"] > 0 for r in table)
    assert tuning.load_table(tuning.plan_key(lite0, cpu())) == table


# --- the benchmark script --------------------------------------------------------------------------


def test_benchmark_tiny_mode_runs_every_method(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_embed.py"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio gpl/ceiling" in proc.stdout and "ratio gpl/naive" in proc.stdout and "ratio gpl/standard" in proc.stdout
    doc = json.loads(out.read_text())
    tiny = doc["sets"]["tiny"]
    assert set(tiny["median_rate"]) == {"ceiling", "timm", "gpl", "naive", "standard"}
    assert all(v > 0 for v in tiny["median_rate"].values())
    assert tiny["images"] == 4 and doc["machine"]["cores"] >= 1
    # Every method embeds the same images the same way.
    assert min(tiny["min_cosine_to_gpl"].values()) > 0.9999
    # Decoding shares the cores with the model: the bound that counts it lies below the ceiling.
    ceiling = tiny["rounds"][0]["ceiling"]
    assert ceiling["decode_ms"] > 0 and 0 < ceiling["decode_bound"] < ceiling["rate"]
    assert "ratio gpl/decode-bound" in proc.stdout


def test_benchmark_with_process_start_times_the_gpl_command_itself(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_embed.py"), "--tiny", "--process-start",
                           "--json", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tiny = json.loads(out.read_text())["sets"]["tiny"]
    gpl, naive = tiny["rounds"][0]["gpl"], tiny["rounds"][0]["naive"]
    # gpl ran as the command (its own process, spawn to exit), and its rows are the same vectors
    assert gpl["images"] == 4 and gpl["peak_rss_mib"] > 0 and abs(gpl["rate"] * gpl["seconds"] - 4) < 1e-6
    assert min(tiny["min_cosine_to_gpl"].values()) > 0.9999
    # the baselines' rates count their process start: slower than their timed loops alone
    assert naive["since_spawn"] > naive["startup_seconds"] > 0 and naive["rate"] < naive["rate_without_start"]
    assert "process start included" in proc.stdout and "ratio gpl/decode-bound" not in proc.stdout


def test_benchmarks_find_their_photos_or_say_what_they_need(tmp_path, monkeypatch, capsys):
    """Bug: bench/bench_embed.py ended in a traceback on a checkout without ../shared/data/labeled_photos.
    Every benchmark takes its photos from bench/photos.py: without the shared set, the photos bundled for
    the tests, with a note; a folder given that does not exist is one line and exit status 2."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("photos", REPO / "bench" / "photos.py")
    photos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(photos)
    monkeypatch.setattr(photos, "SHARED", str(tmp_path / "shared" / "data" / "labeled_photos"))
    assert photos.find_photos(None, "bench_embed") == str(REPO / "tests" / "data" / "labeled_photos")
    note = capsys.readouterr().err
    assert note.startswith("bench_embed: note: no ") and note.count("\n") == 1 and "tests/data/labeled_photos" in note
    missing = str(tmp_path / "nowhere")
    for script, args in [("bench_embed", [missing]), ("compare_trees", [str(tmp_path), "--data", missing]),
                         ("memory", ["--photos", missing]), ("kill_harness", ["--photos", missing])]:
        proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), *args], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120)
        assert (proc.returncode, proc.stderr) == (2, f"{script}: {missing} is not a folder of images\n"), proc.stderr


# --- process settings ------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_freed_memory_stays_in_the_heap_after_keep_freed_memory():
    """A freed 16 MiB block leaves RSS under glibc's defaults and stays with gpl's thresholds."""
    code = """
import resource, sys, numpy as np
from gpl_cli.embedding.runtime import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
a = np.ones(16 << 20, dtype=np.uint8)
before = rss()
del a
print(before - rss())
"""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    dropped = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env,
                                        cwd=REPO, check=True).stdout) for mode in ("default", "tuned")}
    assert dropped["default"] > 15 << 20  # handed back to the OS: the next allocation page-faults again
    assert dropped["tuned"] < 1 << 20


def test_gpl_tune_shows_a_row_for_every_layout_its_help_promises(lite0, cache_home, monkeypatch):
    from click.testing import CliRunner

    from gpl_cli.cli import cli

    monkeypatch.setattr(tuning, "CPU_BATCHES", (1, 2))
    monkeypatch.setattr("gpl_cli.models.backbones.load_backbone", lambda name, weights=None: lite0)
    help_text = " ".join(CliRunner().invoke(cli, ["tune", "--help"]).output.split())
    promised = re.search(r"in each memory layout, (\S+) then (\S+), one row per measurement", help_text)
    assert promised, help_text
    result = CliRunner().invoke(cli, ["tune", "--device", "cpu", "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stderr.splitlines() if line.startswith("  ")]
    assert [(r[0], r[2]) for r in rows] == [(layout, batch) for layout in promised.groups() for batch in ("1", "2")]
    assert result.stdout.startswith("fastest: batch ") and result.stdout.split(", ")[1].split()[0] in promised.groups()
