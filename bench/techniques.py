#!/usr/bin/env python3
"""Measurements behind gpl's speed choices, one technique at a time (figures in bench/RESULTS.md).

  python bench/techniques.py openmp     # OpenMP spin-wait: default vs GOMP_SPINCOUNT=1000 vs passive,
                                        # on an idle machine and beside another 2-thread torch job
  python bench/techniques.py malloc     # glibc's default malloc thresholds vs gpl's (runtime.py)
  python bench/techniques.py copies     # one 2-thread process vs one 1-thread copy per core
  python bench/techniques.py draft      # JPEG draft decoding: time per image and cosine to a full decode
  python bench/techniques.py resize     # resizing only the cropped region: time saved, pixels changed
  python bench/techniques.py fold       # batch norms folded into convolutions vs the trunk as loaded
  python bench/techniques.py pointwise  # 1x1 convolutions as torch dispatches them vs always on oneDNN
  python bench/techniques.py grad       # torch.inference_mode vs torch.no_grad

Each prints images/s (or ms) per variant and round; rounds alternate the variants so that load
from other processes falls on all of them. Forward passes run the trunk as gpl does (batch norms
folded, channels-last) with gpl's malloc thresholds (runtime.py), except where those are compared.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_IMAGES = os.path.join(REPO, "sample_images")
sys.path.insert(0, REPO)


def _lite0_channels_last(fold: bool = True):
    """Lite0 in channels-last, as gpl runs it (batch norms folded) unless `fold` is False."""
    import torch

    from gpl_cli.models.backbones import load_backbone
    from gpl_cli.models.inference import prepare_trunk

    backbone = load_backbone("efficientnet_lite0")
    if fold:
        return backbone, prepare_trunk(backbone.trunk, torch.device("cpu"), torch.channels_last)
    return backbone, copy.deepcopy(backbone.trunk).eval().to(memory_format=torch.channels_last)


def forward_rate(threads: int, batch: int, images: int, start_at: float | None = None) -> float:
    """Images/s of lite0 (channels-last) on random input with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    _, trunk = _lite0_channels_last()
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        trunk(x)
        trunk(x)
        while start_at and time.time() < start_at:
            time.sleep(0.001)
        start = time.perf_counter()
        for _ in range(images // batch):
            trunk(x)
        return images // batch * batch / (time.perf_counter() - start)


def child(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, text=True, cwd=REPO)


def cmd_forward(ns) -> None:  # internal: one measurement in a fresh process
    if ns.tuned:
        from gpl_cli.embedding.runtime import keep_freed_memory

        keep_freed_memory()
    print(json.dumps(forward_rate(ns.threads, ns.batch, ns.images, ns.start_at)))


def cmd_malloc(ns) -> None:
    env = {"GOMP_SPINCOUNT": "1000"}  # the same for both: only the malloc thresholds differ
    cores = os.cpu_count() or 1
    for r in range(ns.rounds):
        for threads, batch in ((cores, 4), (1, 2), (1, 4)):
            rates = {}
            for name, extra in (("glibc defaults", []), ("gpl's thresholds", ["--tuned"])):
                args = ["forward", "--threads", str(threads), "--batch", str(batch), "--images", "96", *extra]
                rates[name] = json.loads(child(args, env).communicate()[0])
            print(f"round {r + 1}  {threads} thread(s), batch {batch}: "
                  + "; ".join(f"{k} {v:6.1f} images/s" for k, v in rates.items()), flush=True)


HOG = "import torch\nx = torch.randn(2, 256, 56, 56); w = torch.randn(256, 256, 3, 3)\nwhile True: torch.nn.functional.conv2d(x, w, padding=1)\n"


def cmd_openmp(ns) -> None:
    policies = {"default": {}, "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}
    for r in range(ns.rounds):
        for condition in ("idle", "beside a 2-thread torch job"):
            hog = subprocess.Popen([sys.executable, "-c", HOG]) if condition != "idle" else None
            if hog:
                time.sleep(2)
            try:
                for name, env in policies.items():
                    rates = [json.loads(child(["forward", "--threads", "2", "--batch", str(b), "--images", "32", "--tuned"],
                                              env).communicate()[0])
                             for b in (1, 8)]
                    print(f"round {r + 1}  {condition:<28} {name:<24} batch 1: {rates[0]:6.1f}  batch 8: {rates[1]:6.1f} images/s",
                          flush=True)
            finally:
                if hog:
                    hog.kill()
                    hog.wait()


def cmd_copies(ns) -> None:
    cores = os.cpu_count() or 1
    for r in range(ns.rounds):
        for batch in (2, 4, 8):
            one = json.loads(child(["forward", "--threads", str(cores), "--batch", str(batch), "--images", "96", "--tuned"],
                                   {"GOMP_SPINCOUNT": "1000"}).communicate()[0])
            start_at = time.time() + 8  # every copy loads its model first, then all start together
            procs = [child(["forward", "--threads", "1", "--batch", str(batch), "--images", "96", "--start-at", str(start_at),
                            "--tuned"]) for _ in range(cores)]
            rates = [json.loads(p.communicate()[0]) for p in procs]
            print(f"round {r + 1}  batch {batch}: one process x {cores} threads {one:6.1f} images/s; "
                  f"{cores} processes x 1 thread {sum(rates):6.1f} images/s ({' + '.join(f'{v:.1f}' for v in rates)})", flush=True)


def big_jpegs(folder: str) -> list[str]:
    """The largest sample JPEG plus 2x2 mosaics of the >= 680 px ones (about 2000 px, real detail)."""
    from PIL import Image

    from gpl_cli.embedding.images import open_rgb

    paths = [os.path.join(SAMPLE_IMAGES, "retina.jpg")]
    src = [open_rgb(os.path.join(SAMPLE_IMAGES, n)) for n in sorted(os.listdir(SAMPLE_IMAGES)) if n.endswith(".jpg")]
    src = [im for im in src if min(im.size) >= 680]
    for i, a in enumerate(src):
        b = src[(i + 1) % len(src)]
        w, h = 2 * min(a.size[0], b.size[0]), 2 * min(a.size[1], b.size[1])
        mosaic = Image.new("RGB", (w, h))
        for j, im in enumerate((a, b, b, a)):
            mosaic.paste(im.crop((0, 0, w // 2, h // 2)), ((j % 2) * w // 2, (j // 2) * h // 2))
        paths.append(os.path.join(folder, f"mosaic{i}.jpg"))
        mosaic.save(paths[-1], quality=92)
    return paths


def cmd_draft(ns) -> None:
    import numpy as np
    import torch

    from gpl_cli.embedding.embedder import Embedder
    from gpl_cli.embedding.images import open_rgb, preprocess_image
    from gpl_cli.pooling.spec import parse_pool_list

    backbone, _ = _lite0_channels_last()
    pre = backbone.preprocess
    embedder = Embedder(backbone, parse_pool_list(["avg,max"]))
    with tempfile.TemporaryDirectory() as tmp:
        paths = big_jpegs(tmp)
        full = torch.stack([preprocess_image(open_rgb(p), pre) for p in paths])  # also warms the file cache
        ref = embedder.embed_pixels(full)
        for margin in (None, 1, 1.5, 2, 3, 4):
            min_side = None if margin is None else int(margin * pre.resize)
            start = time.perf_counter()
            for _ in range(3):
                pixels = torch.stack([preprocess_image(open_rgb(p, min_side), pre) for p in paths])
            ms = 1000 * (time.perf_counter() - start) / (3 * len(paths))
            got = embedder.embed_pixels(pixels)
            cos = {k: (ref[k] * got[k]).sum(1) / (np.linalg.norm(ref[k], axis=1) * np.linalg.norm(got[k], axis=1)) for k in ref}
            label = "full decode" if margin is None else f"draft, short side >= {margin} x resize ({min_side} px)"
            print(f"{label:<42} {ms:6.1f} ms/image (decode + resize); min cosine to full: "
                  + ", ".join(f"{k} {v.min():.5f}" for k, v in cos.items()), flush=True)
        print(f"({len(paths)} JPEGs: retina.jpg 1411 px and {len(paths) - 1} mosaics of about 2000 px)")


def cmd_resize(ns) -> None:
    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    sys.path.insert(0, os.path.join(REPO, "bench"))
    from bench_embed import _paths
    from photos import find_photos

    from gpl_cli.embedding.images import open_rgb, preprocess_image
    from gpl_cli.models.backbones import load_backbone

    pre = load_backbone("efficientnet_lite0").preprocess
    images = [open_rgb(p) for p in _paths(find_photos(None, "techniques"))]

    def region_only(im):
        """Resize only the columns the centre crop keeps (rows: all, then cropped)."""
        w, h = im.size
        nh, nw = TF._geometry._compute_resized_output_size((h, w), [pre.resize])
        top, left = int(round((nh - pre.crop) / 2.0)), int(round((nw - pre.crop) / 2.0))
        sx = w / nw
        out = im.resize((pre.crop, nh), Image.Resampling.BICUBIC, box=(left * sx, 0, (left + pre.crop) * sx, h))
        return np.asarray(out)[top:top + pre.crop]

    diff = max(int(np.abs(preprocess_image(im, pre).permute(1, 2, 0).numpy().astype(int) - region_only(im)).max()) for im in images)
    for r in range(ns.rounds):
        t = {}
        for name, fn in (("resize then crop (gpl)", lambda im: preprocess_image(im, pre)), ("resize the crop only", region_only)):
            start = time.perf_counter()
            for im in images:
                fn(im)
            t[name] = 1000 * (time.perf_counter() - start) / len(images)
        print(f"round {r + 1}: " + "; ".join(f"{k} {v:.2f} ms" for k, v in t.items()) + f"; largest pixel difference {diff}",
              flush=True)


def cmd_fold(ns) -> None:
    import torch

    from gpl_cli.embedding.runtime import keep_freed_memory

    keep_freed_memory()
    _, plain = _lite0_channels_last(fold=False)
    _, folded = _lite0_channels_last()
    trunks = {"as loaded": plain, "batch norms folded": folded}
    with torch.inference_mode():
        x = torch.randn(4, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        a, b = plain(x), folded(x)
        print(f"largest difference of the feature maps: {(a - b).abs().max():.2e} (largest value {a.abs().max():.2f})")
        for threads in (1, os.cpu_count() or 1):
            torch.set_num_threads(threads)
            for m in trunks.values():
                m(x)
            for r in range(ns.rounds):
                rates = {}
                for name, m in trunks.items():
                    start = time.perf_counter()
                    for _ in range(24):
                        m(x)
                    rates[name] = 96 / (time.perf_counter() - start)
                print(f"round {r + 1}  {threads} thread(s), batch 4: "
                      + "; ".join(f"{k} {v:6.1f} images/s" for k, v in rates.items()), flush=True)


def cmd_pointwise(ns) -> None:
    """torch's dispatch (its reference kernel for single-threaded small batches) vs oneDNN, 1 and all threads."""
    import torch
    from torch import nn

    from gpl_cli.embedding.runtime import keep_freed_memory
    from gpl_cli.models.inference import OneDnnConv2d, as_conv, replace_submodule

    keep_freed_memory()
    _, routed = _lite0_channels_last()  # as gpl runs it: 1x1 convolutions on oneDNN
    dispatched = copy.deepcopy(routed)
    for name, m in list(dispatched.named_modules()):
        if isinstance(m, OneDnnConv2d):
            replace_submodule(dispatched, name, as_conv(m, nn.Conv2d))
    trunks = {"torch's dispatch": dispatched, "oneDNN": routed}
    with torch.inference_mode():
        for threads in (1, os.cpu_count() or 1):
            torch.set_num_threads(threads)
            for batch in (1, 2, 4, 8):
                x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
                a, b = (m(x) for m in trunks.values())
                for r in range(ns.rounds):
                    rates = {}
                    for name, m in trunks.items():
                        start = time.perf_counter()
                        for _ in range(max(1, 96 // batch)):
                            m(x)
                        rates[name] = max(1, 96 // batch) * batch / (time.perf_counter() - start)
                    print(f"round {r + 1}  {threads} thread(s), batch {batch}: "
                          + "; ".join(f"{k} {v:6.1f} images/s" for k, v in rates.items())
                          + f"; largest difference {(a - b).abs().max():.1e}", flush=True)


def cmd_grad(ns) -> None:
    import torch

    _, trunk = _lite0_channels_last()
    x = torch.randn(4, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
    for mode in modes.values():  # warm-up
        with mode():
            trunk(x)
    for r in range(ns.rounds):
        out = {}
        for name, mode in modes.items():
            with mode():
                start = time.perf_counter()
                for _ in range(24):
                    trunk(x)
                out[name] = 96 / (time.perf_counter() - start)
        print(f"round {r + 1}: " + "; ".join(f"{k} {v:.1f} images/s" for k, v in out.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("openmp", "malloc", "copies", "draft", "resize", "fold", "pointwise", "grad"):
        sub.add_parser(name).add_argument("--rounds", type=int, default=3)
    fwd = sub.add_parser("forward")
    fwd.add_argument("--threads", type=int, required=True)
    fwd.add_argument("--batch", type=int, required=True)
    fwd.add_argument("--images", type=int, required=True)
    fwd.add_argument("--start-at", type=float)
    fwd.add_argument("--tuned", action="store_true")
    ns = parser.parse_args()
    globals()[f"cmd_{ns.cmd}"](ns)


if __name__ == "__main__":
    main()
