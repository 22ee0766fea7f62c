"""--resize keep-aspect: no crop, mixed shapes in one batch, each vector equal to the image embedded alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_photo_like
from PIL import Image

from gpl_cli.cli import cli
from gpl_cli.embedding.config import EmbedConfig
from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.images import Preprocess, Sample, collate, keep_aspect_size, open_rgb, preprocess_image
from gpl_cli.embedding.inputs import collect_inputs
from gpl_cli.embedding.local import LocalEngine
from gpl_cli.embedding.settings import resolve_settings
from gpl_cli.errors import GplError
from gpl_cli.pooling.spec import REGISTRY, parse_pool_list
from gpl_cli.store.formats import read_embeddings

ALL_POOLS = ["avg,max,avgmax,catavgmax,gem,lse,spoc,spoc:center=1,rmac,crow"]
MAX_SIZE = 64
# (width, height): three share a 43 x 64 shape at MAX_SIZE (one of them scaled up), one is portrait.
# (Few distinct shapes on purpose: the CPU backend sets up its kernels once per new shape, which is slow.)
SIZES = [(96, 64), (48, 32), (64, 96), (90, 60)]


@pytest.fixture
def mixed_folder(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    for i, size in enumerate(SIZES):
        Image.fromarray(make_photo_like(size, seed=10 + i)).save(root / f"{i:02d}.png")
    return root


def test_keep_aspect_size_by_hand():
    assert keep_aspect_size(400, 300, 224) == (168, 224)
    assert keep_aspect_size(300, 400, 224) == (224, 168)
    assert keep_aspect_size(100, 100, 224) == (224, 224)  # smaller images are scaled up
    assert keep_aspect_size(10000, 4, 224) == (1, 224)  # never a zero side


def test_keep_aspect_preprocess_is_a_plain_resize_without_crop():
    im = Image.fromarray(make_photo_like((90, 60), seed=1))
    pre = Preprocess(256, 224, (0.5,) * 3, (0.5,) * 3, "bicubic", mode="keep-aspect", max_size=120)
    got = preprocess_image(im, pre)
    want = np.asarray(im.resize((120, 80), Image.Resampling.BICUBIC, reducing_gap=None)).transpose(2, 0, 1)
    assert got.shape == (3, 80, 120)
    np.testing.assert_array_equal(got.numpy(), want)


def test_collate_groups_equal_shapes_and_keeps_input_order():
    shapes = [(3, 4, 6), (3, 6, 4), (3, 4, 6), None, (3, 6, 4), (3, 4, 6)]
    samples = [
        Sample(i, None, ("bad", "broken")) if s is None else Sample(i, torch.full(s, i, dtype=torch.uint8), None)
        for i, s in enumerate(shapes)
    ]
    batch = collate(samples)
    assert batch.indices == [0, 1, 2, 4, 5]
    assert [(positions, scale) for positions, _, scale in batch.groups] == [([0, 2, 4], 0), ([1, 3], 0)]
    for positions, pixels, _ in batch.groups:
        assert [int(pixels[k, 0, 0, 0]) for k in range(len(positions))] == [batch.indices[p] for p in positions]
    assert batch.failures == [(3, ("bad", "broken"))]


def _alone(embedder: Embedder, path) -> dict[str, np.ndarray]:
    pixels = preprocess_image(open_rgb(str(path)), embedder.preprocess)[None]
    return {k: v[0] for k, v in embedder.embed_pixels(pixels).items()}


def _assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))


class _ListSink:
    def __init__(self):
        self.names, self.rows = [], {}

    def write(self, names, vectors, stats):
        self.names += names
        for key, rows in vectors.items():
            self.rows.setdefault(key, []).append(rows)

    def fail(self, name, reason):
        raise AssertionError(f"{name}: {reason}")


def test_mixed_shape_batch_equals_each_image_alone(lite0, mixed_folder):
    """Every operator, through the backbone: one batch of four images in two shapes, compared one by one."""
    specs = parse_pool_list(ALL_POOLS)
    assert {s.op for s in specs} == set(REGISTRY)
    pre = EmbedConfig(resize="keep-aspect", max_size=MAX_SIZE).preprocess_for(lite0)
    embedder = Embedder(lite0, specs, device="cpu", preprocess=pre)
    items = collect_inputs([str(mixed_folder)]).items
    sink = _ListSink()
    LocalEngine(embedder).run(items, sink, resolve_settings("cpu", workers=0, batch_size=len(items)))
    assert sink.names == [it.name for it in items]  # input order, although computed shape by shape
    for key in sink.rows:
        rows = np.concatenate(sink.rows[key])
        for i, item in enumerate(items):
            _assert_close(rows[i], _alone(embedder, item.path)[key])


def test_cli_keep_aspect_end_to_end(lite0, mixed_folder, tmp_path):
    out = tmp_path / "e.h5"
    result = CliRunner().invoke(cli, ["embed", str(mixed_folder), "-o", str(out), "-p", *ALL_POOLS, "--resize",
                                      "keep-aspect", "--max-size", str(MAX_SIZE), "--batch-size", "4", "--workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    emb = read_embeddings(str(out))
    pre = emb.metadata["preprocess"]
    assert (pre["mode"], pre["max_size"]) == ("keep-aspect", MAX_SIZE)
    assert emb.metadata["config"]["resize"] == "keep-aspect"
    embedder = Embedder(lite0, parse_pool_list(ALL_POOLS), device="cpu",
                        preprocess=EmbedConfig(resize="keep-aspect", max_size=MAX_SIZE).preprocess_for(lite0))
    for i, name in enumerate(emb.paths):
        alone = _alone(embedder, mixed_folder / name)
        for key, vectors in emb.vectors.items():
            _assert_close(vectors[i], alone[key])


def test_keep_aspect_defaults_to_the_crop_size(lite0):
    pre = EmbedConfig(resize="keep-aspect").preprocess_for(lite0)
    assert (pre.mode, pre.max_size) == ("keep-aspect", lite0.preprocess.crop)
    assert EmbedConfig().preprocess_for(lite0) == lite0.preprocess


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (EmbedConfig(max_size=300), "--max-size applies only with --resize keep-aspect"),
        (EmbedConfig(power=0), "--power must be > 0"),
        (EmbedConfig(resize="stretch"), "unknown --resize"),
        (EmbedConfig(pools=("gem:p=-1",)), "must be > 0"),
    ],
)
def test_config_check(config, message):
    with pytest.raises(GplError, match=message):
        config.check()
