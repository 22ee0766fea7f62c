"""--scales: each image run at several sizes, each pooling's per-scale vectors combined into one.

The references here are computed independently: single-scale runs at sizes written out by hand (not
derived with Preprocess.at), combined with numpy (each vector L2-normalised, then the mean), then the
post-processing done with numpy.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SAMPLE_IMAGES

import gpl_cli
from gpl_cli.embedding.config import EmbedConfig, RunOptions, parse_scales
from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.images import (
    Preprocess,
    Sample,
    collate,
    open_rgb,
    pixels_from_bytes,
    pixels_to_bytes,
    preprocess_image,
)
from gpl_cli.embedding.inputs import collect_inputs
from gpl_cli.embedding.job import Job
from gpl_cli.errors import GplError
from gpl_cli.pooling.scales import combine_scales, scale_key, scale_label
from gpl_cli.pooling.spec import parse_pool_list

IMAGES = [SAMPLE_IMAGES / n for n in ("giraffe.jpg", "coffee.png", "igloo.webp")]  # landscape, square, other sizes
SCALES = (1.0, 1.41, 2.0)
# lite0 resizes to 256 and crops 224: at 1.41, round(360.96) and round(315.84); at 2, 512 and 448.
CROP_SIZES = [(256, 224), (361, 316), (512, 448)]
POOLS = ["avg", "gem", "rmac"]


def unit(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def assert_rows_close(actual: np.ndarray, reference: np.ndarray, tolerance: float = 1e-5) -> None:
    """conftest.assert_vectors_close's criterion (within `tolerance` of each row's largest component), also for
    rows of length about 1 (combined, rmac), whose largest component is below the 0.5 that function asks for."""
    assert (np.linalg.norm(reference, axis=-1) > 0.5).all()  # real vectors, not near-zero ones
    scale = np.abs(reference).max(axis=-1, keepdims=True)
    worst = float((np.abs(actual - reference) / scale).max())
    assert worst <= tolerance, f"differs by {worst:.2e} of the largest component"


def combined_by_hand(vectors: list[np.ndarray]) -> np.ndarray:
    return np.mean([unit(v) for v in vectors], axis=0)


def raw_at(lite0, resize: int, crop: int) -> dict[str, np.ndarray]:
    """The images through a plain one-scale Embedder at these sizes: raw pooled vectors."""
    pre = replace(lite0.preprocess, resize=resize, crop=crop)
    embedder = Embedder(lite0, parse_pool_list(POOLS), device="cpu", preprocess=pre)
    pixels = torch.stack([preprocess_image(open_rgb(str(p)), pre) for p in IMAGES])
    return embedder.embed_pixels(pixels)


@pytest.fixture(scope="module")
def singles(lite0):
    return [raw_at(lite0, *sizes) for sizes in CROP_SIZES]


def multi(lite0, **settings):
    return gpl_cli.embed([str(p) for p in IMAGES], pool=POOLS, model=lite0, device="cpu", workers=0, scales=SCALES,
                         **settings)


# --- the rule ------------------------------------------------------------------------------------


def test_combine_scales_normalises_each_scale_then_averages():
    a = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    b = np.array([[10.0, 0.0], [0.0, 2.0]], np.float32)
    got = combine_scales([a, b])
    np.testing.assert_allclose(got, [[(0.6 + 1) / 2, 0.8 / 2], [0.0, 0.5]], rtol=1e-6)  # a zero row adds nothing
    assert got.dtype == np.float32
    assert np.array_equal(combine_scales([a]), a)  # one scale: as it is, not normalised
    with pytest.raises(ValueError):
        combine_scales([])


def test_scale_labels_and_keys():
    assert [scale_label(s) for s in (1.0, 1.41, 2, 0.5)] == ["1", "1.41", "2", "0.5"]
    assert scale_key("gem:p=4", 1.41) == "gem:p=4@1.41"


def test_preprocess_at_a_scale_scales_every_size():
    crop = Preprocess(256, 224, (0.5,) * 3, (0.5,) * 3, scales=SCALES)
    assert [(crop.at(s).resize, crop.at(s).crop) for s in SCALES] == CROP_SIZES
    keep = replace(crop, mode="keep-aspect", max_size=224)
    assert [keep.at(s).max_size for s in SCALES] == [224, 316, 448]
    assert keep.at(2).scales == (1.0,) and "scales" not in keep.as_dict()


@pytest.mark.parametrize("text, message", [
    ("1,x", "'x' in '1,x' is not one"),
    ("1,,2", "'' in '1,,2' is not one"),
    ("0", "numbers > 0, got 0.0"),
    ("1,-2", "numbers > 0, got -2.0"),
    ("1,nan", "numbers > 0, got nan"),
    ("1,2,1.0", "lists 1 twice"),
])
def test_a_bad_scales_list_is_refused(text, message):
    with pytest.raises(GplError, match="--scales") as caught:
        parse_scales(text)
    assert message in str(caught.value)


def test_config_checks_scales_given_from_python():
    assert parse_scales(" 1, 1.41 ,2") == SCALES
    for bad in ((), (1.0, "2"), (1.0, True)):
        with pytest.raises(GplError, match="--scales"):
            EmbedConfig(scales=bad).check()
    with pytest.raises(GplError, match="--scales 1,1000.*use scales that keep the largest input within"):
        EmbedConfig(scales=(1.0, 1000.0)).check()
    assert EmbedConfig(scales=(1, 2)).as_dict()["scales"] == [1.0, 2.0]  # 1 and 1.0 are the same run


def test_collate_groups_by_scale_and_shape_and_the_ray_packing_round_trips():
    def inputs(i, shapes):
        return tuple(torch.full(s, i, dtype=torch.uint8) for s in shapes)

    small, large = (3, 4, 6), (3, 8, 12)
    samples = [Sample(0, inputs(0, [small, large]), None), Sample(1, None, ("bad", "broken")),
               Sample(2, inputs(2, [small, large]), None), Sample(3, inputs(3, [(3, 6, 4), (3, 12, 8)]), None)]
    batch = collate(samples)
    assert batch.indices == [0, 2, 3]
    assert [(p, tuple(px.shape), s) for p, px, s in batch.groups] == [
        ([0, 1], (2, *small), 0), ([0, 1], (2, *large), 1), ([2], (1, 3, 6, 4), 0), ([2], (1, 3, 12, 8), 1)]
    for positions, pixels, _ in batch.groups:
        assert [int(pixels[k, 0, 0, 0]) for k in range(len(positions))] == [batch.indices[p] for p in positions]
    data, shapes = pixels_to_bytes(samples[3].pixels)
    back = pixels_from_bytes(data, shapes)
    assert isinstance(back, tuple) and all(torch.equal(a, b) for a, b in zip(back, samples[3].pixels))
    assert torch.equal(pixels_from_bytes(*pixels_to_bytes(samples[0].pixels[0])), samples[0].pixels[0])


# --- through the model ---------------------------------------------------------------------------


def test_several_scales_combine_separate_single_scale_runs(lite0, singles):
    emb = multi(lite0)
    assert emb.paths == [str(p) for p in IMAGES]
    for key in POOLS:
        assert_rows_close(emb.vectors[key], combined_by_hand([s[key] for s in singles]))
    assert emb.metadata["scales"] == list(SCALES) and emb.metadata["config"]["scales"] == list(SCALES)
    assert list(emb.summary.scale_seconds) == ["1", "1.41", "2"] and all(emb.summary.scale_seconds.values())


def test_post_processing_applies_to_the_combined_vector(lite0, singles):
    emb = multi(lite0, power=0.5, normalize="l2")
    for key in POOLS:
        v = combined_by_hand([s[key] for s in singles])
        # The square root magnifies float32 rounding near zero (its slope is 1 / 2 sqrt(x)): a looser bound.
        assert_rows_close(emb.vectors[key], unit(np.sign(v) * np.abs(v) ** 0.5), tolerance=1e-4)


def test_keep_aspect_scales_the_longer_side(lite0):
    files = [str(p) for p in IMAGES]
    singles = [gpl_cli.embed(files, pool="gem", model=lite0, device="cpu", workers=0, resize="keep-aspect",
                             max_size=side).vectors["gem"] for side in (224, 316, 448)]
    emb = gpl_cli.embed(files, pool="gem", model=lite0, device="cpu", workers=0, resize="keep-aspect",
                        scales="1,1.41,2")
    assert_rows_close(emb.vectors["gem"], combined_by_hand(singles))


def test_scale_one_alone_is_todays_run(lite0, singles):
    files = [str(p) for p in IMAGES]
    emb = gpl_cli.embed(files, pool=POOLS, model=lite0, device="cpu", workers=0, scales=1)
    today = gpl_cli.embed(files, pool=POOLS, model=lite0, device="cpu", workers=0)
    for key in POOLS:
        np.testing.assert_array_equal(emb.vectors[key], today.vectors[key])
        assert_rows_close(emb.vectors[key], singles[0][key])  # the raw vectors: not normalised, not averaged
    assert emb.metadata["preprocess"] == today.metadata["preprocess"] and "scales" not in emb.metadata["preprocess"]
    assert emb.metadata["scales"] == [1.0]


def test_one_other_scale_alone_is_a_plain_run_at_that_size(lite0, singles):
    emb = gpl_cli.embed([str(p) for p in IMAGES], pool=POOLS, model=lite0, device="cpu", workers=0, scales=[2])
    for key in POOLS:
        assert_rows_close(emb.vectors[key], singles[2][key])


def test_per_scale_gives_the_raw_vectors_of_each_scale(lite0, singles):
    """The contract the search over scales builds on: keys pooling@scale in pooling then scale order, raw
    vectors (no power, normalisation), and combine_scales + postprocess over any subset equal to that run."""
    from gpl_cli.pooling.postprocess import postprocess

    config = EmbedConfig(pools=tuple(POOLS), scales=SCALES, power=0.5, normalize="l2")
    inputs = collect_inputs([str(p) for p in IMAGES])
    job = Job(config, RunOptions(workers=0, device="cpu"), len(inputs.items), backbone=lite0, per_scale=True)
    emb = job.embeddings(inputs)
    assert list(emb.vectors) == [f"{k}@{s}" for k in POOLS for s in ("1", "1.41", "2")]
    assert emb.metadata["pool_keys"] == list(emb.vectors) and emb.metadata["per_scale"] is True
    assert emb.metadata["pools"]["gem@1.41"]["scale"] == 1.41
    for key in POOLS:
        for single, label in zip(singles, ("1", "1.41", "2")):
            assert_rows_close(emb.vectors[f"{key}@{label}"], single[key])
    pair = gpl_cli.embed([str(p) for p in IMAGES], pool="gem", model=lite0, device="cpu", workers=0, scales=(1, 2),
                         power=0.5, normalize="l2")
    subset = combine_scales([emb.vectors["gem@1"], emb.vectors["gem@2"]])
    np.testing.assert_allclose(postprocess(torch.from_numpy(subset), "l2", 0.5).numpy(), pair.vectors["gem"],
                               rtol=0, atol=1e-6)


def test_per_scale_is_for_memory_and_the_flattened_map_takes_no_scales(lite0, tmp_path):
    from gpl_cli.store.output import Output

    inputs = collect_inputs([str(IMAGES[0])])
    job = Job(EmbedConfig(scales=SCALES), RunOptions(workers=0, device="cpu"), 1, backbone=lite0, per_scale=True)
    with pytest.raises(ValueError, match="in memory"):
        job.write(inputs, Output.resolve(str(tmp_path / "e.h5")))
    with pytest.raises(GplError, match="takes no --scales"):
        Job(EmbedConfig(scales=(1.0, 2.0)), RunOptions(workers=0, device="cpu"), 1, backbone=lite0, flattened=True)
