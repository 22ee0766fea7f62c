"""Why gpl batches keep-aspect images by shape instead of padding them.

Embeds the sample photos with --resize keep-aspect two ways and compares each vector with
the same image embedded alone: (1) one zero-padded batch pooled with per-image masks,
(2) gpl's own batching (one forward pass per distinct shape). Prints the largest
difference relative to the vector's largest value. Run: python tools/padding_leak.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from gpl_cli.embedding.config import EmbedConfig
from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.images import Sample, collate, open_rgb, preprocess_image
from gpl_cli.models.backbones import load_backbone
from gpl_cli.pooling.ops import pool
from gpl_cli.pooling.spec import parse_pool_list

POOLS = ["avg,max,gem,rmac"]


def main(folder: str = "sample_images", max_size: int = 224) -> None:
    backbone = load_backbone("efficientnet_lite0")
    pre = EmbedConfig(resize="keep-aspect", max_size=max_size).preprocess_for(backbone)
    embedder = Embedder(backbone, parse_pool_list(POOLS), device="cpu", preprocess=pre)
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".png", ".webp"))
    pixels = [preprocess_image(open_rgb(str(p)), pre) for p in paths]
    alone = [embedder.embed_pixels(p[None]) for p in pixels]
    print(f"{len(paths)} images from {folder}, longer side {max_size}, "
          f"{len({tuple(p.shape) for p in pixels})} distinct shapes")

    # (1) one padded batch: zero pixels bottom/right, mask = each image's own map extent.
    height, width = max(p.shape[1] for p in pixels), max(p.shape[2] for p in pixels)
    padded = torch.zeros(len(pixels), 3, height, width, dtype=torch.uint8)
    for i, p in enumerate(pixels):
        padded[i, :, : p.shape[1], : p.shape[2]] = p
    fmap = embedder.feature_maps(padded).float()
    mask = torch.zeros(len(pixels), 1, *fmap.shape[2:], dtype=torch.bool)
    for i, p in enumerate(pixels):
        h, w = embedder.feature_maps(p[None]).shape[2:]
        mask[i, :, :h, :w] = True
    # (2) gpl's batching.
    batched = embedder.embed_batch(collate([Sample(i, p, None) for i, p in enumerate(pixels)]))

    for spec in embedder.specs:
        def worst(rows, key=spec.key) -> float:
            return max(float(np.abs(rows[i] - a[key][0]).max() / np.abs(a[key][0]).max())
                       for i, a in enumerate(alone))
        print(f"{spec.key:5s} padded+mask vs alone: {worst(pool(spec, fmap, mask).numpy()):.3g}   "
              f"gpl same-shape batches vs alone: {worst(batched[spec.key]):.3g}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
