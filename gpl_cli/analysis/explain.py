"""What each global pooling keeps from a feature map, and where a cosine similarity comes from.

Every pooling here is written as an exact sum over the map's cells: for one image's C x H x W
map, `decompose` returns parts (D x H x W) whose sum over the cells is the pooled vector, so

    cos(a, b) = sum_k a_k b_k / (|a| |b|) = sum over cells c of A of sum_k parts_A[k, c] b_k / (|a| |b|)

and symmetrically over the cells of B. The sums are exact for every pooling; what a pooling
defines is how a channel's value is assigned to cells (the `rule` of each decomposition):

- avg, spoc, crow are linear in the map once their weights are known: cell c carries its own
  (weighted) activation. CroW's weights depend on the whole map; they are taken as given.
- max carries each channel's maximum at the cell where it is reached (ties: the first cell in
  row-major order); rmac does the same region by region, each region's maximum scaled by the
  region's and the sum's normalisation.
- gem and lse are not linear: a channel's value is spread over the cells in proportion to the
  quantity the pooling averages (x^p for GeM, exp(r x) for LSE: their weights in the mean).

Numpy in, numpy out (float64); the pooled values themselves come from the registry's own
operators where the split needs them, so the vectors explained are the ones `gpl embed` writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpl_cli.embedding.images import load_sample
from gpl_cli.pooling.ops import centre_prior, crow_weights, pool, rmac_regions
from gpl_cli.pooling.spec import PoolSpec


@dataclass(frozen=True)
class Decomposition:
    """A pooled vector as a sum over cells: parts.sum(axis=(1, 2)) is the vector."""

    key: str
    parts: np.ndarray  # D x H x W float64
    rule: str  # how a channel's value is assigned to cells, in words

    @property
    def vector(self) -> np.ndarray:
        return self.parts.sum(axis=(1, 2))


@dataclass(frozen=True)
class Region:
    top: int
    left: int
    side: int
    weight: float  # the region's share of the R-MAC vector (the weights of all regions sum to 1)


@dataclass(frozen=True)
class CellMap:
    """What one pooling keeps from one image: a value per cell and what the value means."""

    key: str
    values: np.ndarray  # H x W float64
    meaning: str  # what the colours mean, for the colour bar
    regions: tuple[Region, ...] = ()  # R-MAC only


def _pooled(fmap: np.ndarray, spec: PoolSpec) -> np.ndarray:
    """The registry operator on this map: the very numbers `gpl embed` computes, as float64."""
    return pool(spec, torch.from_numpy(np.ascontiguousarray(fmap, np.float32))[None])[0].double().numpy()


def _argmax_cells(x: np.ndarray) -> np.ndarray:
    """Per channel, the flat index of the first cell (row-major) holding its maximum."""
    return x.reshape(x.shape[0], -1).argmax(axis=1)


def _at_argmax(x: np.ndarray) -> np.ndarray:
    """Each channel's maximum placed at its argmax cell, zeros elsewhere."""
    c, h, w = x.shape
    flat = np.zeros((c, h * w))
    cells = _argmax_cells(x)
    flat[np.arange(c), cells] = x.reshape(c, -1)[np.arange(c), cells]
    return flat.reshape(c, h, w)


def _channel_shares(weights: np.ndarray) -> np.ndarray:
    """Each channel's non-negative weights over the cells, scaled to sum to 1."""
    return weights / weights.sum(axis=(1, 2), keepdims=True)


def _gem_weights(x: np.ndarray, p: float, eps: float) -> np.ndarray:
    """clamp(x, eps)^p up to one positive factor per channel (x / channel max, so no overflow)."""
    x = np.maximum(x, eps)
    return (x / x.max(axis=(1, 2), keepdims=True)) ** p


def _lse_weights(x: np.ndarray, r: float) -> np.ndarray:
    """exp(r x) up to one positive factor per channel (shifted by the channel max, so no overflow)."""
    return np.exp(r * (x - x.max(axis=(1, 2), keepdims=True)))


def _rmac(x: np.ndarray, levels: int) -> tuple[np.ndarray, list[Region]]:
    """R-MAC's parts and its regions' weights.

    v = U / |U| with U = sum_r m_r / |m_r| (m_r: the region's channel maxima). Region r's
    channel k term m_rk / (|m_r| |U|) sits at the cell where the region's maximum is;
    its weight in v is <m_r / |m_r|, v> / |U| (the weights sum to <U, v> / |U| = 1).
    """
    _, h, w = x.shape
    parts = np.zeros_like(x)
    units = []
    regions = rmac_regions(h, w, int(levels))
    for top, left, side in regions:
        window = x[:, top:top + side, left:left + side]
        peak = _at_argmax(window)
        unit = peak / max(np.linalg.norm(peak.sum(axis=(1, 2))), 1e-12)  # l2_normalize's eps
        parts[:, top:top + side, left:left + side] += unit
        units.append(unit.sum(axis=(1, 2)))
    total = np.linalg.norm(parts.sum(axis=(1, 2)))
    scale = max(total, 1e-12)
    vector = parts.sum(axis=(1, 2)) / scale
    weights = [Region(t, left, s, float(u @ vector / scale)) for (t, left, s), u in zip(regions, units)]
    return parts / scale, weights


def decompose(fmap: np.ndarray, spec: PoolSpec) -> Decomposition:
    """The pooled vector of `fmap` (C x H x W, as the embedder computes it) as parts over its cells."""
    x = fmap.astype(np.float64)
    _, h, w = x.shape
    params = spec.all_params()
    op = spec.op
    if op in ("avg", "max", "avgmax", "catavgmax"):
        avg, peak = x / (h * w), _at_argmax(x)
        parts = {"avg": avg, "max": peak, "avgmax": 0.5 * (avg + peak),
                 "catavgmax": np.concatenate([avg, peak])}[op]
        rule = {"avg": "each cell carries its activations / HW",
                "max": "each channel's maximum sits at the cell where it is reached",
                "avgmax": "half avg's parts plus half max's",
                "catavgmax": "avg's parts, then max's"}[op]
    elif op == "spoc":
        parts = x * centre_prior(h, w, torch.device("cpu")).double().numpy() if params["center"] else x
        rule = "each cell carries its activations" + (" x the centre prior" if params["center"] else "")
    elif op == "crow":
        clamped, spatial, channel = (t[0].double().numpy() for t in
                                     crow_weights(torch.from_numpy(fmap)[None], None, params["a"], params["b"]))
        parts = clamped * spatial * channel[:, None, None]
        rule = "each cell carries its activations x its spatial weight x the channel weight"
    elif op == "gem":
        shares = _channel_shares(_gem_weights(x, params["p"], params["eps"]))
        parts = _pooled(fmap, spec)[:, None, None] * shares
        rule = "each channel's value spread over the cells in proportion to x^p"
    elif op == "lse":
        parts = _pooled(fmap, spec)[:, None, None] * _channel_shares(_lse_weights(x, params["r"]))
        rule = "each channel's value spread over the cells in proportion to exp(r x)"
    elif op == "rmac":
        parts, _ = _rmac(x, int(params["levels"]))
        rule = "each region's channel maximum, normalised, sits at the cell where it is reached"
    else:
        raise ValueError(f"no decomposition for pooling {op!r}")
    return Decomposition(spec.key, parts, rule)


def _share(values: np.ndarray) -> np.ndarray:
    total = values.sum()
    return values / total if total else np.zeros_like(values)


def cell_map(fmap: np.ndarray, spec: PoolSpec, parts: Decomposition) -> CellMap:
    """What `spec` keeps from this one image, cell by cell (see README: gpl explain)."""
    x = fmap.astype(np.float64)
    params = spec.all_params()
    if spec.op == "max":
        # A constant channel (all zero after a ReLU: most of them) has no place where it peaks.
        varies = np.ptp(x.reshape(x.shape[0], -1), axis=1) > 0
        cells = np.bincount(_argmax_cells(x)[varies], minlength=x.shape[1] * x.shape[2]).reshape(x.shape[1:])
        return CellMap(spec.key, cells.astype(np.float64),
                       f"channels peaking here ({int(varies.sum())} of {x.shape[0]} vary)")
    if spec.op == "gem":
        x = np.maximum(x, params["eps"])
        return CellMap(spec.key, _share(((x / x.max()) ** params["p"]).sum(axis=0)), "share of the sum of x^p")
    if spec.op == "lse":
        return CellMap(spec.key, _share(np.exp(params["r"] * (x - x.max())).sum(axis=0)), "share of the sum of exp(r x)")
    if spec.op == "crow":
        _, spatial, _ = crow_weights(torch.from_numpy(fmap)[None], None, params["a"], params["b"])
        return CellMap(spec.key, spatial[0, 0].double().numpy(), "CroW spatial weight")
    if spec.op == "rmac":
        _, regions = _rmac(x, int(params["levels"]))
        spread = np.zeros(x.shape[1:])
        for r in regions:
            spread[r.top:r.top + r.side, r.left:r.left + r.side] += r.weight / r.side**2
        return CellMap(spec.key, spread, "region weights, each spread over its cells", tuple(regions))
    return CellMap(spec.key, _share(parts.parts.sum(axis=0)), f"share of the {spec.key} vector's sum")


def cosine_maps(a: Decomposition, b: Decomposition) -> tuple[float, np.ndarray, np.ndarray]:
    """cos(a, b) and its exact split over the cells of A and over the cells of B (each map sums to it)."""
    va, vb = a.vector, b.vector
    norm = np.linalg.norm(va) * np.linalg.norm(vb)
    if norm == 0:
        return 0.0, np.zeros(a.parts.shape[1:]), np.zeros(b.parts.shape[1:])
    return (float(va @ vb / norm), np.einsum("khw,k->hw", a.parts, vb) / norm,
            np.einsum("khw,k->hw", b.parts, va) / norm)


def class_activation_maps(fmap: np.ndarray, weight: np.ndarray, classes: list[int]) -> np.ndarray:
    """Zhou et al.'s CAM without the bias: w_k . f(c) per cell (K x H x W).

    Its mean over the cells is the class logit minus the bias, since the head reads the avg vector.
    """
    return np.einsum("kc,chw->khw", weight[classes].astype(np.float64), fmap.astype(np.float64))


# --- images through the embedder --------------------------------------------------------


@dataclass
class ImageExplanation:
    """One image as the model saw it, its map decomposed for every pooling, and its CAMs."""

    path: str
    pixels: np.ndarray  # H x W x 3 uint8: resized and cropped as for the model
    fmap_shape: tuple[int, int, int]  # C x h x w
    parts: dict[str, Decomposition]
    maps: dict[str, CellMap]
    top: list[tuple[int, str, float]]  # the head's most probable classes on the avg vector ([] without a head)
    cams: np.ndarray | None  # K x h x w, one per class of `top`


def explain_pixels(embedder, path: str, pixels, head=None, classes: int = 3) -> ImageExplanation:
    """Decompose one preprocessed image (3 x H x W uint8) under every pooling of `embedder`.

    The map is the embedder's own (`Embedder.feature_maps`, batch norms folded), so the parts
    sum to the vectors `gpl embed` writes for this image.
    """
    fmap = embedder.feature_maps(pixels[None]).float()[0].cpu().numpy()
    parts = {s.key: decompose(fmap, s) for s in embedder.specs}
    maps = {s.key: cell_map(fmap, s, parts[s.key]) for s in embedder.specs}
    top, cams = [], None
    if head is not None and classes > 0:
        top = head.top_k(fmap.astype(np.float64).mean(axis=(1, 2))[None], classes)[0]
        cams = class_activation_maps(fmap, head.weight, [index for index, _, _ in top])
    return ImageExplanation(path, pixels.permute(1, 2, 0).numpy(), tuple(fmap.shape), parts, maps, top, cams)


def explain_files(embedder, paths: list[str], head=None, classes: int = 3,
                  timeout: float | None = 60.0) -> tuple[list[ImageExplanation], list]:
    """Each path decoded and preprocessed as `gpl embed` does, then explained; unreadable ones become
    Failures (path, reason), in input order."""
    done, failures = [], []
    for index, path in enumerate(paths):
        sample = load_sample(index, path, embedder.preprocess, timeout)
        if sample.failure:
            failures.append(sample.failure)
        else:
            done.append(explain_pixels(embedder, path, sample.pixels, head, classes))
    return done, failures


@dataclass(frozen=True)
class PairTerm:
    """Why two images are (dis)similar under one pooling: the cosine split over each image's cells."""

    key: str
    cosine: float
    map_a: np.ndarray  # h_A x w_A, sums to `cosine`
    map_b: np.ndarray  # h_B x w_B, sums to `cosine`
    rule: str


def explain_pair(a: ImageExplanation, b: ImageExplanation) -> list[PairTerm]:
    return [PairTerm(key, *cosine_maps(a.parts[key], b.parts[key]), a.parts[key].rule) for key in a.parts]


def _grid(values: np.ndarray) -> list:
    return [[float(v) for v in row] for row in values]


def explanation_json(images: list[ImageExplanation], pair: list[PairTerm] | None, failures: list,
                     metadata: dict) -> dict:
    """What `gpl explain --json` writes: per image and pooling an h x w map, the cosines, the top classes."""
    doc = {**metadata, "images": [], "failures": [{"path": f.path, "reason": f.reason} for f in failures]}
    for im in images:
        entry = {
            "path": im.path,
            "input_size": list(im.pixels.shape[:2]),
            "feature_map": list(im.fmap_shape),
            "maps": {},
            "top_classes": [{"index": i, "name": n, "probability": p} for i, n, p in im.top],
        }
        for key, m in im.maps.items():
            entry["maps"][key] = {"meaning": m.meaning, "values": _grid(m.values)}
            if m.regions:
                entry["maps"][key]["regions"] = [vars(r) for r in m.regions]
        if im.cams is not None:
            entry["cam"] = [{"index": i, "name": n, "probability": p, "values": _grid(cam)}
                            for (i, n, p), cam in zip(im.top, im.cams)]
        doc["images"].append(entry)
    if pair is not None:
        doc["cosines"] = {t.key: t.cosine for t in pair}
        doc["pair"] = {t.key: {"cosine": t.cosine, "rule": t.rule, "a": _grid(t.map_a), "b": _grid(t.map_b)}
                       for t in pair}
    return doc
