#!/usr/bin/env python3
"""gpl embed against its ceiling and the usual ways of embedding images, side by side, in one run.

Five methods on the same images, backbone and precision, each in a fresh process (so each
one's peak memory is its own), interleaved over rounds (so load from other processes falls
on all of them alike):

  1. ceiling   the backbone's forward pass (+ average pooling) on preloaded, normalised tensors,
               with the trunk prepared as gpl runs it (inference.py: batch norms folded),
               at the fastest memory layout and batch size found by a sweep done here, in one
               process on all cores or (on a CPU) one single-threaded copy per core side by side,
               with the faster of the process defaults and gpl's process settings (runtime.py:
               OpenMP spin, malloc thresholds); baselines run with the defaults, as users run them
  2. timm      the model-only ceiling: the same on plain timm (tf_efficientnet_liteN with the
               packaged weights, batch norms as loaded), one process on all threads, best layout
               and batch size (the default backbone's family only)
  3. gpl       gpl embed end to end: files in, the HDF5 file written (Job.write with the model
               loaded, as the other methods have it; see --process-start for the command itself)
  4. naive     a loop as users write it: PIL open, torchvision transforms, batch of 1, NCHW
  5. standard  torchvision ImageFolder + DataLoader (4 workers, at most one per core), batch 32,
               NCHW, full decode

It prints images/s, gpl's ratio to each of the others, peak memory, the machine, and how much CPU
other processes took meanwhile; also the decode bound: the rate of a pipeline that loses nothing
but the decoding (timed on one core), since on a CPU decoding and the model share the cores.
Sets: a folder of photos (default: labeled_photos in ../shared/data beside the repository, or
without it the 60 of them bundled in tests/data, with a note) and "large": the sample JPEGs of
>= 1000 px repeated to --large files.

  python bench/bench_embed.py                      # both sets, 3 rounds
  python bench/bench_embed.py --precision bf16     # same in bfloat16 (baselines autocast too)
  python bench/bench_embed.py --tiny               # a few images, 1 round: the CI check
  python bench/bench_embed.py --json out.json      # also keep every figure
  python bench/bench_embed.py --repeat 6 --large 0 --process-start   # 1,164 photos, start-up counted
  python bench/bench_embed.py --runtimes --repeat 6                   # torch and OpenVINO, fp32, bf16, int8

--repeat N links the photo set N times (labeled_photos x 6 = 1,164 images). --process-start counts
each method's process start in its time, as a user running it from a shell waits for it: the
baselines add their interpreter start, imports and model load to their timed loop (the ceiling
still excludes its decoding and its sweep), and gpl is the command `gpl embed DIR -o OUT.h5` itself,
timed from spawn to exit, with an empty gpl cache of its own each round (no plan measured ahead).

--runtimes compares runtimes and precisions instead of methods: `gpl embed DIR -o OUT.h5 -p avg --runtime R
--precision P` end to end (spawn to exit) for torch fp32, OpenVINO f32, OpenVINO bf16 (only on a CPU with
native bfloat16; elsewhere printed as skipped) and OpenVINO int8, interleaved over rounds. One gpl cache
serves them all: a first run of each fills it (OpenVINO's conversion, int8's quantization; its time is shown
as "first run"), so the timed rounds are what every later run on the machine costs. Then each embeds the
labelled photos once with avg and max, and `gpl compare` gives its mAP and the difference to torch fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from photos import find_photos

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from gpl_cli.defaults import DEFAULT_BACKBONE, PRECISIONS  # noqa: E402 - light: no torch
from gpl_cli.embedding.runtime import MALLOC_ENV, OPENMP_ENV, tune_process  # noqa: E402 - light: no torch

SAMPLE_IMAGES = os.path.join(REPO, "sample_images")
METHODS = ("ceiling", "timm", "gpl", "naive", "standard")
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32, 64)
STANDARD_BATCH = 32
LARGE_MIN_PX = 1000


def methods_for(backbone: str) -> tuple[str, ...]:
    """The methods that apply: the timm ceiling exists for the EfficientNet-Lite family only."""
    return METHODS if backbone.startswith("efficientnet_lite") else tuple(m for m in METHODS if m != "timm")


# --- the machine and the load on it --------------------------------------------------------


def machine() -> dict:
    import torch

    from gpl_cli.embedding.tuning import cpu_model

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def cpu_jiffies() -> int:
    """Busy CPU time of the whole machine, in clock ticks (0 where /proc/stat is missing)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            v = [int(x) for x in f.readline().split()[1:8]]
    except OSError:
        return 0
    return sum(v) - v[3] - v[4]  # minus idle and iowait


# --- image sets ----------------------------------------------------------------------------


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_large_set(root: str, count: int) -> str:
    """`count` files: the sample JPEGs of >= 1000 px, repeated, in one class folder (ImageFolder needs one)."""
    from PIL import Image

    big = []
    for name in sorted(os.listdir(SAMPLE_IMAGES)):
        if name.lower().endswith((".jpg", ".jpeg")):
            with Image.open(os.path.join(SAMPLE_IMAGES, name)) as im:
                if max(im.size) >= LARGE_MIN_PX:
                    big.append(name)
    folder = os.path.join(root, "large", "photos")
    os.makedirs(folder)
    for i in range(count):
        name = big[i % len(big)]
        link_or_copy(os.path.join(SAMPLE_IMAGES, name), os.path.join(folder, f"{i:05d}_{name}"))
    return os.path.dirname(folder)


def make_repeated_set(root: str, data: str, times: int) -> str:
    """The photo set `times` over, class folders kept (ImageFolder reads them), as hard links."""
    out = os.path.join(root, f"x{times}")
    for path in _paths(data):
        rel = os.path.relpath(path, data)
        for k in range(times):
            dst = os.path.join(out, os.path.dirname(rel), f"{k}_{os.path.basename(rel)}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            link_or_copy(path, dst)
    return out


def make_tiny_set(root: str) -> str:
    """Four of the small sample photos in one class folder: enough for every code path."""
    folder = os.path.join(root, "tiny", "photos")
    os.makedirs(folder)
    for name in ("cat_chelsea.png", "coffee.png", "igloo.webp", "rocket.jpg"):
        link_or_copy(os.path.join(SAMPLE_IMAGES, name), os.path.join(folder, name))
    return os.path.dirname(folder)


# --- the methods (each runs in its own process: `--method NAME`) -----------------------------


def _paths(data: str) -> list[str]:
    from gpl_cli.embedding.inputs import collect_inputs

    return [it.path for it in collect_inputs([data]).items]


def _autocast(args):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    return torch.autocast(args.device, dtype=dtype, enabled=args.precision != "fp32")


def _sync(args) -> None:
    import torch

    if args.device == "cuda":
        torch.cuda.synchronize()


def _reference_transform(backbone):
    """What popular scripts build: Resize + CenterCrop + ToTensor + Normalize (the backbone's own values)."""
    from torchvision import transforms as T

    pre = backbone.preprocess
    return T.Compose([
        T.Resize(pre.resize, interpolation=T.InterpolationMode(pre.interpolation)),
        T.CenterCrop(pre.crop),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])


def _preloaded(backbone, data: str, args):
    """Every image decoded, preprocessed and normalised, as N x 3 x H x W floats on the device, and the
    decoding cost in ms per image on one core (the files already cached)."""
    import torch

    from gpl_cli.embedding.images import open_rgb, preprocess_image

    pre = backbone.preprocess
    start = time.perf_counter()
    pixels = torch.stack([preprocess_image(open_rgb(p), pre) for p in _paths(data)])
    decode_ms = 1000 * (time.perf_counter() - start) / len(pixels)
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    return ((pixels.float() / 255 - mean) / std).to(args.device), decode_ms


def _forward_rate(forward, x, batch: int, args, ready=lambda: None) -> float:
    """Images/s of `forward` (+ the mean over the map) over `x` in batches, after one warm-up batch."""
    import torch

    with torch.inference_mode(), _autocast(args):
        forward(x[:batch]).float().mean((2, 3))
        _sync(args)
        ready()
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            forward(x[i:i + batch]).float().mean((2, 3))
        _sync(args)
        return len(x) / (time.perf_counter() - start)


def _sweep_batches(args, n: int) -> tuple[list[int], int]:
    candidates = SWEEP_BATCHES if args.device == "cpu" else SWEEP_BATCHES + (128, 256)
    sweep_n = min(n, args.sweep_images if args.device == "cpu" else max(args.sweep_images, 512))
    return [b for b in candidates if b <= max(1, sweep_n)][: args.sweep_limit], sweep_n


def method_timm(backbone, data: str, args) -> dict:
    """The model-only ceiling: plain timm, batch norms as loaded, one process on all threads, at the best
    layout and batch size; timm's import and model build are its start-up (efficientnet_lite* only)."""
    import timm
    import torch

    from gpl_cli.models.backbones import lite_weights_file
    from gpl_cli.models.weights import load_by_position, load_state_dict_file

    model = timm.create_model("tf_" + args.backbone, pretrained=False).eval()
    path = lite_weights_file(args.backbone)
    load_by_position(model, load_state_dict_file(path), path)  # the package's names differ from timm's
    model.to(args.device)
    began = time.perf_counter()
    x, _ = _preloaded(backbone, data, args)
    inputs = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    batches, sweep_n = _sweep_batches(args, len(x))
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    sweep = []
    for layout, memory_format in formats.items():
        model.to(memory_format=memory_format)
        sweep += [{"layout": layout, "batch": b,
                   "rate": round(_forward_rate(model.forward_features, inputs[layout][:sweep_n], b, args), 2)} for b in batches]
    best = max(sweep, key=lambda r: r["rate"])
    model.to(memory_format=formats[best["layout"]])
    start = time.perf_counter()
    rate = _forward_rate(model.forward_features, inputs[best["layout"]], best["batch"], args)
    seconds = time.perf_counter() - start
    return {"rate": rate, "seconds": seconds, "images": len(x), "best": {"layout": best["layout"], "batch": best["batch"]},
            "sweep": sweep, "excluded_seconds": time.perf_counter() - began - seconds}


def method_ceiling(backbone, data: str, args) -> dict:
    """Forward (+ mean over the map) on preloaded float tensors, at the best layout and batch size."""
    import torch

    from gpl_cli.models.inference import prepare_trunk

    began = time.perf_counter()
    x_nchw, decode_ms = _preloaded(backbone, data, args)
    # The trunk as gpl runs it (batch norms folded): the ceiling is the fastest forward of the backbone.
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    trunks = {"nchw": prepare_trunk(backbone.trunk, device, torch.contiguous_format, dtype),
              "channels_last": prepare_trunk(backbone.trunk, device, torch.channels_last, dtype)}
    inputs = {"nchw": x_nchw, "channels_last": x_nchw.contiguous(memory_format=torch.channels_last)}

    def rate(layout: str, batch: int, x: torch.Tensor, ready=lambda: None) -> float:
        return _forward_rate(trunks[layout], x, batch, args, ready)

    batches, sweep_n = _sweep_batches(args, len(x_nchw))
    sweep = [{"layout": lay, "batch": b, "rate": round(rate(lay, b, inputs[lay][:sweep_n]), 2)}
             for lay in trunks for b in batches]
    best = max(sweep, key=lambda r: r["rate"])
    start = time.perf_counter()
    out = {"rate": rate(best["layout"], best["batch"], inputs[best["layout"]]), "seconds": time.perf_counter() - start,
           "images": len(x_nchw), "best": {"layout": best["layout"], "batch": best["batch"], "processes": 1},
           "sweep": sweep}
    out["decode_ms"] = decode_ms
    replicas = _cpu_replicas(args)
    if replicas > 1:
        # gpl runs one single-threaded copy of the model per core; the ceiling must include that way too.
        def replica_rate(layout: str, batch: int, x: torch.Tensor) -> float:
            return _in_parallel(replicas, lambda part, ready: rate(layout, batch, part, ready), x)

        sweep_r = [{"layout": lay, "batch": b, "processes": replicas,
                    "rate": round(replica_rate(lay, b, inputs[lay][:max(sweep_n, replicas * b)]), 2)}
                   for lay in trunks for b in batches[:4]]
        best_r = max(sweep_r, key=lambda r: r["rate"])
        start = time.perf_counter()
        rate_r = replica_rate(best_r["layout"], best_r["batch"], inputs[best_r["layout"]])
        out["sweep"] += sweep_r
        out["single_process_rate"] = out["rate"]
        if rate_r > out["rate"]:
            out.update(rate=rate_r, seconds=time.perf_counter() - start,
                       best={"layout": best_r["layout"], "batch": best_r["batch"], "processes": replicas})
    out["decode_bound"] = decode_bound(out["rate"], decode_ms, args.device)
    # Decoding and the sweeps are not the model's work: --process-start leaves them out.
    out["excluded_seconds"] = time.perf_counter() - began - out["seconds"]
    return out


def decode_bound(ceiling: float, decode_ms: float, device: str) -> float:
    """Images/s of a pipeline that loses nothing but the decoding itself.

    On a CPU, decoding and the model share the cores, so their CPU times add up; with a GPU the
    cores decode while the GPU computes, so the slower of the two sets the pace.
    """
    cores = os.cpu_count() or 1
    if device == "cpu":
        return 1 / (1 / ceiling + decode_ms / 1000 / cores)
    return min(ceiling, cores * 1000 / decode_ms)


def _cpu_replicas(args) -> int:
    """How many single-threaded model copies gpl runs side by side here (its loader workers)."""
    import torch

    from gpl_cli.embedding.settings import resolve_workers

    return resolve_workers(args.workers, torch.device(args.device)) if args.device == "cpu" else 1


def _in_parallel(processes: int, timed_rate, x) -> float:
    """Images/s of `processes` forked copies, one thread each, timing their shares of `x` at once
    (each starts its clock when all are warmed up)."""
    import multiprocessing

    import torch

    ctx = multiprocessing.get_context("fork")
    share = len(x) // processes
    results = ctx.Queue()
    barrier = ctx.Barrier(processes)

    def child(i: int) -> None:
        torch.set_num_threads(1)
        results.put(share / timed_rate(x[i * share:(i + 1) * share], barrier.wait))  # seconds of this copy

    procs = [ctx.Process(target=child, args=(i,)) for i in range(processes)]
    for p in procs:
        p.start()
    seconds = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return processes * share / max(seconds)


def method_gpl(backbone, data: str, args) -> dict:
    """The embed pipeline, files to written output; the journal's own cost is timed on the side."""
    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.embedding.job import Job
    from gpl_cli.store import journal as journal_module
    from gpl_cli.store.output import Output

    flush_seconds = [0.0]
    original_flush = journal_module.Journal.flush

    def timed_flush(self):
        start = time.perf_counter()
        original_flush(self)
        flush_seconds[0] += time.perf_counter() - start

    journal_module.Journal.flush = timed_flush
    inputs = collect_inputs([data])
    out = os.path.join(args.scratch, f"gpl-{os.getpid()}.h5")
    config = EmbedConfig(pools=("avg",), precision=args.precision)
    start = time.perf_counter()
    job = Job(config, RunOptions(workers=args.workers, device=args.device), len(inputs.items), backbone=backbone)
    summary = job.write(inputs, Output.resolve(out, overwrite=True))
    seconds = time.perf_counter() - start
    from gpl_cli.store.formats import read_embeddings

    emb = read_embeddings(out)
    np_save(args, "gpl", emb.paths, emb.vectors["avg"])
    os.remove(out)
    return {"rate": len(inputs.items) / seconds, "seconds": seconds, "images": len(inputs.items),
            "plan": summary.plan, "engine_seconds": summary.seconds, "journal_flush_seconds": flush_seconds[0],
            "after_engine_seconds": seconds - summary.seconds}


def method_naive(backbone, data: str, args) -> dict:
    """One image at a time, as in most tutorials."""
    import torch
    from PIL import Image

    transform = _reference_transform(backbone)
    model = backbone.trunk.eval().to(args.device)
    paths = _paths(data)
    rows = []
    start = time.perf_counter()
    with torch.no_grad(), _autocast(args):
        for path in paths:
            x = transform(Image.open(path).convert("RGB")).unsqueeze(0).to(args.device)
            rows.append(model(x).float().mean((2, 3))[0].cpu().numpy())
    seconds = time.perf_counter() - start
    np_save(args, "naive", [os.path.relpath(p, data) for p in paths], rows)
    return {"rate": len(paths) / seconds, "seconds": seconds, "images": len(paths)}


def method_standard(backbone, data: str, args) -> dict:
    """torchvision ImageFolder + DataLoader(batch 32, workers), as popular inference scripts do it."""
    import torch
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(data, transform=_reference_transform(backbone))
    cuda = args.device == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_size=STANDARD_BATCH, num_workers=args.standard_workers, shuffle=False,
                                         pin_memory=cuda)
    model = backbone.trunk.eval().to(args.device)
    rows = []
    start = time.perf_counter()
    with torch.no_grad(), _autocast(args):
        for x, _ in loader:
            rows.extend(model(x.to(args.device, non_blocking=cuda)).float().mean((2, 3)).cpu().numpy())
    seconds = time.perf_counter() - start
    np_save(args, "standard", [os.path.relpath(p, data) for p, _ in dataset.samples], rows)
    return {"rate": len(dataset) / seconds, "seconds": seconds, "images": len(dataset)}


def np_save(args, method: str, names: list[str], rows, set_name: str | None = None) -> None:
    """Keep one method's vectors (first round only) so the driver can check that all agree."""
    import numpy as np

    path = os.path.join(args.scratch, f"{set_name or args.set_name}-{method}.npz")
    if not os.path.exists(path):
        np.savez(path, names=np.array(names), vectors=np.asarray(rows, dtype=np.float32))


def run_method(args) -> None:
    """Child process: load the model (untimed), run the methods named, print one JSON line each."""
    import torch

    from gpl_cli.models.backbones import load_backbone

    torch.manual_seed(0)
    backbone = load_backbone(args.backbone)
    # Interpreter start, imports and the model load: what a user waits for before the first image.
    startup = time.time() - args.spawned_at if args.spawned_at else None
    for method in args.method.split(","):
        result = globals()[f"method_{method}"](backbone, args.data, args)
        result["startup_seconds"] = startup
        result["since_spawn"] = time.time() - args.spawned_at if args.spawned_at else None
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["worker_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        result["cpu_seconds"] = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                                    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        print(f"RESULT {method} " + json.dumps(result), flush=True)


# --- the driver ----------------------------------------------------------------------------


def spawn(args, methods: list[str], data: str, set_name: str, tuned: bool) -> dict[str, dict]:
    """Run `methods` in one child process; each result also says how busy the rest of the machine was."""
    cmd = [sys.executable, os.path.abspath(__file__), data, "--method", ",".join(methods), "--set-name", set_name,
           "--backbone", args.backbone, "--precision", args.precision, "--device", args.device,
           *(["--workers", str(args.workers)] if args.workers is not None else []), "--standard-workers", str(args.standard_workers),
           "--scratch", args.scratch, "--sweep-images", str(args.sweep_images), "--sweep-limit", str(args.sweep_limit)]
    if tuned:
        cmd.append("--tuned")  # the child applies gpl's process settings before torch loads
    env = {k: v for k, v in os.environ.items() if k not in (*OPENMP_ENV, *MALLOC_ENV)}
    ticks, wall = cpu_jiffies(), time.perf_counter()
    cmd += ["--spawned-at", repr(time.time())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall, ticks = time.perf_counter() - wall, cpu_jiffies() - ticks
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            _, method, payload = line.split(" ", 2)
            results[method] = json.loads(payload)
    if proc.returncode != 0 or set(results) != set(methods):
        raise SystemExit(f"{','.join(methods)} on {set_name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    # CPU used by everything else on the machine meanwhile, in cores (the child's own CPU time is cumulative).
    own = max(r["cpu_seconds"] for r in results.values())
    for r in results.values():
        r["other_load_cores"] = round(max(0.0, ticks / os.sysconf("SC_CLK_TCK") - own) / wall, 2) if ticks else None
        if args.process_start:  # the rate a user sees: from spawn to the last vector (the ceiling: less its decoding)
            r["rate_without_start"] = r["rate"]
            r["rate"] = r["images"] / (r["since_spawn"] - r.get("excluded_seconds", 0.0))
    return results


def spawn_gpl_command(args, data: str, set_name: str) -> dict:
    """`gpl embed DATA -o OUT.h5` as a user runs it, timed from spawn to exit, with an empty gpl cache."""
    out = os.path.join(args.scratch, "cli.h5")
    cmd = [sys.executable, "-m", "gpl_cli", "embed", data, "-o", out, "--overwrite", "-p", "avg",
           "--precision", args.precision, "--device", args.device,
           *(["--workers", str(args.workers)] if args.workers is not None else [])]
    env = {**os.environ, "XDG_CACHE_HOME": tempfile.mkdtemp(prefix="cache-", dir=args.scratch)}
    with open(os.path.join(args.scratch, "cli.err"), "w+b") as err:
        ticks, start = cpu_jiffies(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall, ticks = time.perf_counter() - start, cpu_jiffies() - ticks
        err.seek(0)
        log = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-3000:]}")
    from gpl_cli.store.formats import read_embeddings

    emb = read_embeddings(out)
    names = emb.paths
    np_save(args, "gpl", names, emb.vectors["avg"], set_name)
    done = [line for line in log.splitlines() if line.startswith("gpl: embedded")]
    plan = done[-1].split("images/s (", 1)[-1].rstrip(") ").split(") ->")[0] if done else "?"
    cpu = usage.ru_utime + usage.ru_stime
    return {"rate": len(names) / wall, "seconds": wall, "images": len(names), "plan": plan,
            "peak_rss_mib": usage.ru_maxrss / 1024, "worker_peak_rss_mib": 0.0, "cpu_seconds": cpu,
            "startup_seconds": 0.0, "other_load_cores": round(max(0.0, ticks / os.sysconf("SC_CLK_TCK") - cpu) / wall, 2)}


# --- runtimes and precisions (--runtimes) ---------------------------------------------------

RUNTIME_RUNS = (("torch", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8"))


def runtime_skips(info: dict) -> dict[tuple[str, str], str]:
    """The runs this machine cannot make, with the reason (gpl itself refuses them)."""
    if info["bf16_native"]:
        return {}
    return {("openvino", "bf16"): "skipped: no native bf16 on this CPU (it has neither AVX512-BF16 nor AMX)"}


def gpl_embed_timed(args, data: str, runtime: str, precision: str, out: str, pools: str = "avg") -> dict:
    """`gpl embed DATA -o OUT --runtime R --precision P` from spawn to exit, with the runtimes' shared cache."""
    cmd = [sys.executable, "-m", "gpl_cli", "embed", data, "-o", out, "--overwrite", "-p", pools,
           "--runtime", runtime, "--precision", precision, "--device", "cpu",
           *(["--workers", str(args.workers)] if args.workers is not None else [])]
    env = {k: v for k, v in os.environ.items() if k not in (*OPENMP_ENV, *MALLOC_ENV)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({os.waitstatus_to_exitcode(status)}):\n{err[-3000:]}")
    summary = [line for line in err.splitlines() if line.startswith("gpl: embedded")]
    return {"seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "summary": summary[-1] if summary else "",
            "notes": [line for line in err.splitlines() if not line.startswith("gpl: embedded")]}


def run_runtimes(args, data: str, set_name: str, labeled: str, info: dict) -> dict:
    runs = [r for r in RUNTIME_RUNS if r not in runtime_skips(info)]
    images = len(_paths(data))
    out = os.path.join(args.scratch, "runtime.h5")
    first = {}
    for runtime, precision in runs:  # fills the cache: conversion and quantization are paid here, once
        first[f"{runtime} {precision}"] = gpl_embed_timed(args, data, runtime, precision, out)
        print(f"  [first run] {runtime} {precision}: {first[f'{runtime} {precision}']['seconds']:.1f} s",
              file=sys.stderr, flush=True)
    rates: dict[str, list[float]] = {f"{r} {p}": [] for r, p in runs}
    rss: dict[str, float] = {}
    summaries: dict[str, str] = {}
    for k in range(args.rounds):
        for runtime, precision in runs[k % len(runs):] + runs[: k % len(runs)]:
            name = f"{runtime} {precision}"
            timed = gpl_embed_timed(args, data, runtime, precision, out)
            rates[name].append(images / timed["seconds"])
            rss[name] = max(rss.get(name, 0.0), timed["peak_rss_mib"])
            summaries[name] = timed["summary"]
            print(f"  [round {k + 1}] {name:<14} {rates[name][-1]:7.1f} images/s", file=sys.stderr, flush=True)
    quality = runtime_quality(args, labeled, runs)
    return {"set": set_name, "images": images, "data": data, "rates": rates,
            "median_rate": {n: statistics.median(v) for n, v in rates.items()},
            "first_run_seconds": {n: v["seconds"] for n, v in first.items()},
            "first_run_notes": {n: v["notes"] for n, v in first.items()},
            "peak_rss_mib": rss, "summaries": summaries, "quality": quality,
            "skipped": {f"{r} {p}": why for (r, p), why in runtime_skips(info).items()}}


def runtime_quality(args, labeled: str, runs) -> dict:
    """mAP of avg and max on the labelled photos for each run, and each one's difference to torch fp32 (gpl compare)."""
    files = {}
    for runtime, precision in runs:
        files[(runtime, precision)] = os.path.join(args.scratch, f"{runtime}-{precision}.h5")
        gpl_embed_timed(args, labeled, runtime, precision, files[(runtime, precision)], pools="avg,max")
    reference = files[("torch", "fp32")]
    out = {}
    for (runtime, precision), path in files.items():
        name = f"{runtime} {precision}"
        if path == reference:
            continue
        proc = subprocess.run([sys.executable, "-m", "gpl_cli", "compare", reference, path, "--json"],
                              capture_output=True, text=True, cwd=REPO, check=True)
        report = json.loads(proc.stdout)
        a, b = "torch-fp32", f"{runtime}-{precision}"
        out["torch fp32"] = {pool: report["poolings"][f"{a}/{pool}"]["map"] for pool in ("avg", "max")}
        out[name] = {pool: report["poolings"][f"{b}/{pool}"]["map"] for pool in ("avg", "max")}
        for pair in report["pairs"]:
            for pool in ("avg", "max"):
                if (pair["a"], pair["b"]) == (f"{a}/{pool}", f"{b}/{pool}"):
                    # this run minus torch fp32 (+ 0.0: no "-0.0" where they are equal)
                    out[name][f"{pool}_diff"] = 0.0 - pair["map_diff"]
                    out[name][f"{pool}_diff_ci95"] = [0.0 - pair["map_diff_ci95"][1], 0.0 - pair["map_diff_ci95"][0]]
    return out


def runtime_report(s: dict) -> str:
    base = s["rates"]["torch fp32"]
    lines = [f"== runtimes: {s['images']} images from {s['data']}; gpl embed -p avg, spawn to exit, cache filled by a first run",
             f"{'runtime, precision':<20}{'images/s (median)':>18}{'all rounds':>26}{'x torch fp32':>14}"
             f"{'per round':>20}{'first run s':>13}{'peak RSS MiB':>14}"]
    for name, rates in s["rates"].items():
        rounds = ", ".join(f"{v:.1f}" for v in rates)
        ratios = [r / b for r, b in zip(rates, base)]  # the same round: the load of its minutes on both
        lines.append(f"{name:<20}{s['median_rate'][name]:>18.1f}{rounds:>26}{statistics.median(ratios):>13.2f}x"
                     f"{', '.join(f'{r:.2f}' for r in ratios):>20}{s['first_run_seconds'][name]:>13.1f}"
                     f"{s['peak_rss_mib'][name]:>14.0f}")
    for name, why in s["skipped"].items():
        lines.append(f"{name:<20}{why}")
    q = s["quality"]
    lines.append("mAP % on the labelled photos (avg / max), and the difference to torch fp32 in points (95 % CI):")
    for name, m in q.items():
        diff = "" if name == "torch fp32" else "   " + ", ".join(
            f"{pool} {100 * m[f'{pool}_diff']:+.1f} ({100 * m[f'{pool}_diff_ci95'][0]:+.1f} to "
            f"{100 * m[f'{pool}_diff_ci95'][1]:+.1f})" for pool in ("avg", "max"))
        lines.append(f"  {name:<18}{100 * m['avg']:.1f} / {100 * m['max']:.1f}{diff}")
    for name, summary in s["summaries"].items():
        lines.append(f"  {name}: {summary}")
    for name, notes in s["first_run_notes"].items():
        lines.extend(f"  {name} first run: {note}" for note in notes if note.strip())
    return "\n".join(lines)


def run_set(args, data: str, set_name: str) -> dict:
    per_round: list[dict[str, dict]] = []
    methods = methods_for(args.backbone)
    for r in range(args.rounds):
        if args.tiny:  # one process for all (and gpl's command): checks every code path, measures nothing
            command = args.process_start
            per_round.append(spawn(args, [m for m in methods if not (command and m == "gpl")], data, set_name, tuned=True))
            if command:
                per_round[-1]["gpl"] = spawn_gpl_command(args, data, set_name)
            per_round[-1]["ceiling"]["process"] = "gpl's"
            continue
        order = methods[r % len(methods):] + methods[: r % len(methods)]  # rotate so no method always goes first
        results = {}
        for method in order:
            if method == "ceiling":
                # The faster of the process defaults and gpl's settings (the child applies them first).
                tries = []
                for tuned in (False, True):
                    tries.append(spawn(args, [method], data, set_name, tuned)[method])
                    tries[-1]["process"] = "gpl's" if tuned else "defaults"
                results[method] = max(tries, key=lambda t: t["rate"])
            elif method == "gpl" and args.process_start:
                results[method] = spawn_gpl_command(args, data, set_name)
            else:
                results[method] = spawn(args, [method], data, set_name, tuned=method == "gpl")[method]
            print(f"  [{set_name} round {r + 1}] {method:<8} {results[method]['rate']:7.1f} images/s "
                  f"(other load {results[method]['other_load_cores']} cores)", file=sys.stderr, flush=True)
        per_round.append(results)
    return summarise(per_round, agreement(args, set_name))


def agreement(args, set_name: str) -> dict:
    """Smallest cosine between gpl's vectors and each baseline's, per image: they must compute the same thing."""
    import numpy as np

    ref = np.load(os.path.join(args.scratch, f"{set_name}-gpl.npz"))
    index = {n: i for i, n in enumerate(ref["names"])}
    out = {}
    for method in ("naive", "standard"):
        other = np.load(os.path.join(args.scratch, f"{set_name}-{method}.npz"))
        a = ref["vectors"][[index[n] for n in other["names"]]]
        b = other["vectors"]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out[method] = float(cos.min())
    return out


def summarise(per_round: list[dict[str, dict]], agree: dict) -> dict:
    methods = [m for m in METHODS if m in per_round[0]]
    rates = {m: [r[m]["rate"] for r in per_round] for m in methods}
    ratio = {f"gpl/{m}": [r["gpl"]["rate"] / r[m]["rate"] for r in per_round] for m in methods if m != "gpl"}
    if "rate_without_start" not in per_round[0]["ceiling"]:  # a steady-state bound: not with start-up counted
        ratio["gpl/decode-bound"] = [r["gpl"]["rate"] / r["ceiling"]["decode_bound"] for r in per_round]
    return {
        "rates": rates,
        "median_rate": {m: statistics.median(v) for m, v in rates.items()},
        "ratios": ratio,
        "median_ratio": {k: statistics.median(v) for k, v in ratio.items()},
        "peak_rss_mib": {m: max(r[m]["peak_rss_mib"] for r in per_round) for m in methods},
        "worker_peak_rss_mib": {m: max(r[m]["worker_peak_rss_mib"] for r in per_round) for m in methods},
        "other_load_cores": {m: [r[m]["other_load_cores"] for r in per_round] for m in methods},
        "min_cosine_to_gpl": agree,
        "rounds": per_round,
    }


def report(name: str, data: str, s: dict, images: int) -> str:
    r = s["rounds"][0]
    ceiling = s["rounds"][-1]["ceiling"]
    lines = [f"== {name}: {images} images from {data}",
             f"{'method':<10}{'images/s (median)':>18}{'all rounds':>28}{'peak RSS MiB':>14}{'worker MiB':>12}{'other load':>14}"]
    for m in s["rates"]:
        rounds = ", ".join(f"{v:.1f}" for v in s["rates"][m])
        load = ", ".join("?" if v is None else f"{v:.1f}" for v in s["other_load_cores"][m])
        lines.append(f"{m:<10}{s['median_rate'][m]:>18.1f}{rounds:>28}{s['peak_rss_mib'][m]:>14.0f}"
                     f"{s['worker_peak_rss_mib'][m]:>12.0f}{load:>14}")
    for k, v in s["median_ratio"].items():
        lines.append(f"ratio {k:<16} {v:5.2f}x   (per round: {', '.join(f'{x:.2f}' for x in s['ratios'][k])})")
    lines.append(f"ceiling: {ceiling['best']['layout']} batch {ceiling['best']['batch']} x {ceiling['best']['processes']} "
                 f"process(es) (one process on all cores: {ceiling.get('single_process_rate', ceiling['rate']):.1f} images/s), "
                 f"process settings: {ceiling['process']}; "
                 f"gpl plan: {r['gpl']['plan']}")
    if "gpl/decode-bound" in s["ratios"]:
        lines.append(f"decoding + preprocessing: {ceiling['decode_ms']:.2f} ms/image on one core; on the same cores as "
                     f"the model, a pipeline that loses nothing else reaches {ceiling['decode_bound']:.1f} images/s "
                     f"({ceiling['decode_bound'] / ceiling['rate']:.2f}x the ceiling)")
    else:
        lines.append(f"without process start: ceiling {ceiling['rate_without_start']:.1f} images/s, "
                     f"decoding + preprocessing {ceiling['decode_ms']:.2f} ms/image on one core")
    g = r["gpl"]
    if "after_engine_seconds" in g:
        lines.append(f"gpl time outside the engine loop (plan, journal read-back, assembly, HDF5 write): "
                     f"{g['after_engine_seconds']:.2f} s of {g['seconds']:.2f} s; journal flushes inside it: "
                     f"{g['journal_flush_seconds']:.3f} s")
    else:
        starts = ", ".join(f"{m} {r[m]['startup_seconds']:.1f} s" for m in s["rates"] if m != "gpl")
        lines.append(f"process start included: gpl is `gpl embed` from spawn to exit ({g['seconds']:.1f} s); "
                     f"the others' start-up (imports, model load): {starts}")
    lines.append("vectors agree with gpl: min cosine " + ", ".join(f"{k} {v:.6f}" for k, v in s["min_cosine_to_gpl"].items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", help="folder of photos in class subfolders (default: labeled_photos in "
                        "../shared/data, else the photos bundled in tests/data)")
    parser.add_argument("--large", type=int, default=300, help="files in the large-photo set (0: skip it)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--precision", default="fp32", choices=[p for p in PRECISIONS if p != "int8"],
                        help="the methods' precision (int8, which only gpl on OpenVINO runs: --runtimes)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every method runs the model")
    parser.add_argument("--workers", type=int, default=None, help="gpl's --workers (default: gpl's own default)")
    parser.add_argument("--standard-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers of the standard pipeline (default: 4, as popular scripts use, at most the cores)")
    parser.add_argument("--tiny", action="store_true", help="4 images, 1 round, small sweep: checks that the script works")
    parser.add_argument("--repeat", type=int, default=1, help="use the photo set this many times over (hard links)")
    parser.add_argument("--process-start", action="store_true",
                        help="count each method's process start (gpl: the `gpl embed` command, spawn to exit)")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--runtimes", action="store_true",
                        help="gpl embed on each runtime and precision (torch fp32, OpenVINO f32, bf16, int8) instead")
    # internal: one method in a child process
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--set-name", default="set", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--sweep-images", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--sweep-limit", type=int, default=len(SWEEP_BATCHES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        if args.tuned:
            tune_process()
        run_method(args)
        return

    with tempfile.TemporaryDirectory(prefix="gpl-bench-") as scratch:
        args.scratch = scratch
        # The gpl method reads its plan from a cache of its own, filled here once (gpl tune does the same).
        os.environ["XDG_CACHE_HOME"] = os.path.join(scratch, "cache")
        if args.runtimes:
            run_runtimes_main(args)
            return
        if args.tiny:
            args.rounds, args.sweep_limit, args.sweep_images = 1, 2, 4
            sets = {"tiny": make_tiny_set(scratch)}
        else:
            args.data = find_photos(args.data, "bench_embed")
            sets = {"labeled_photos": args.data}
            if args.repeat > 1:
                sets = {f"labeled_photos x{args.repeat}": make_repeated_set(scratch, args.data, args.repeat)}
            if args.large:
                sets["large"] = make_large_set(scratch, args.large)
        info = machine()
        measure_seconds = 0.0 if args.process_start else warm_plan_cache(args)
        print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
              f"bf16 native: {info['bf16_native']}, GPU: {info['cuda']}; backbone {args.backbone} on {args.device}, "
              f"{args.precision}, gpl workers {args.workers or 'default'}, standard workers {args.standard_workers}; "
              f"plan probe {measure_seconds:.1f} s (once per machine)")
        results = {"machine": info, "backbone": args.backbone, "device": args.device, "precision": args.precision,
                   "workers": args.workers, "standard_workers": args.standard_workers,
                   "plan_probe_seconds": measure_seconds, "load_before": os.getloadavg(), "sets": {}}
        for name, data in sets.items():
            images = len(_paths(data))
            results["sets"][name] = s = run_set(args, data, name)
            s["images"], s["data"] = images, data
            print(report(name, data, s, images), flush=True)
        results["load_after"] = os.getloadavg()
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)


def run_runtimes_main(args) -> None:
    """--runtimes: the photo set (--repeat times over) through gpl embed on each runtime and precision."""
    if args.tiny:  # int8 calibrates on 10 images at least: the 60 bundled photos, 1 round
        args.rounds = 1
        data = labeled = os.path.join(REPO, "tests", "data", "labeled_photos")
        name = "bundled photos"
    else:
        args.data = find_photos(args.data, "bench_embed")
        data, name = args.data, "labeled_photos"
        labeled = args.data
        if args.repeat > 1:
            data, name = make_repeated_set(args.scratch, args.data, args.repeat), f"labeled_photos x{args.repeat}"
    info = machine()
    import openvino

    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, OpenVINO {openvino.__version__}, "
          f"bf16 native: {info['bf16_native']}; backbone {DEFAULT_BACKBONE}, gpl workers {args.workers or 'default'}",
          flush=True)
    results = {"machine": info, "openvino": openvino.__version__, "load_before": os.getloadavg(),
               "runtimes": run_runtimes(args, data, name, labeled, info)}
    results["load_after"] = os.getloadavg()
    print(runtime_report(results["runtimes"]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


def warm_plan_cache(args) -> float:
    """Measure gpl's plan once (`gpl tune`), so every gpl run below starts from the cached plan."""
    if args.tiny:  # measuring takes seconds and is tested elsewhere; tiny runs take the default plan
        return 0.0
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gpl_cli", "tune", "-b", args.backbone, "--precision", args.precision,
                    "--device", args.device, "--json"],
                   check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
