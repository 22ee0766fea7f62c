"""gpl explain: exact cosine decompositions, per-pooling maps, CAMs, figures and the command.

The cosines the decompositions must sum to are computed independently: from the NumPy
references of tests/unit/pooling/test_pooling.py on random maps, from the embedder's batch vectors and from
the vectors `gpl embed` writes on real photos; CAMs are checked against the timm model's own
forward pass.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from gpl_cli.analysis.explain import (
    cell_map,
    class_activation_maps,
    cosine_maps,
    decompose,
    explain_pair,
    explain_pixels,
    explanation_json,
)
from gpl_cli.embedding.embedder import Embedder
from gpl_cli.embedding.images import open_rgb, preprocess_image
from gpl_cli.models.heads import classifier_head
from gpl_cli.pooling.ops import rmac_regions
from gpl_cli.pooling.spec import parse_pool_list
from gpl_cli.report.explain_figure import draw_images, draw_pair, figure_pixels
from tests.conftest import SAMPLE_IMAGES, run_gpl
from tests.unit.pooling.test_pooling import REFERENCES

ALL_SPECS = ["avg", "max", "avgmax", "catavgmax", "gem", "gem:p=7", "lse", "lse:r=0.5", "spoc", "spoc:center=1",
             "rmac", "rmac:levels=1", "rmac:levels=4", "crow", "crow:a=1,b=3"]


def reference_cosine(spec_text: str, a: np.ndarray, b: np.ndarray) -> float:
    spec = parse_pool_list([spec_text])[0]
    ref = REFERENCES[spec.op]
    va, vb = (ref(x.astype(np.float64), **spec.all_params()) for x in (a, b))
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- exactness on random maps -----------------------------------------------------------


@st.composite
def map_pairs(draw):
    """Two maps of the same channels and their own sizes: post-ReLU-like (zeros included), or signed
    like a map without a final ReLU (ConvNeXt's)."""
    channels = draw(st.integers(2, 24))
    shapes = [(draw(st.integers(1, 9)), draw(st.integers(1, 9))) for _ in range(2)]
    signed = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    maps = []
    for h, w in shapes:
        x = rng.normal(0.3, 1.0, (channels, h, w)) * rng.uniform(0.1, 3.0)
        if not signed:
            x = np.maximum(x, 0)
        x[:, 0, 0] = np.abs(x[:, 0, 0]) + 0.01  # every channel positive somewhere: every vector has a direction
        maps.append(x.astype(np.float32))
    return maps


@settings(max_examples=40, deadline=None)
@given(pair=map_pairs(), spec_text=st.sampled_from(ALL_SPECS))
def test_each_image_s_cells_sum_to_the_cosine_of_the_reference_vectors(pair, spec_text):
    a, b = pair
    spec = parse_pool_list([spec_text])[0]
    cos, map_a, map_b = cosine_maps(decompose(a, spec), decompose(b, spec))
    expected = reference_cosine(spec_text, a, b)
    assert map_a.shape == a.shape[1:] and map_b.shape == b.shape[1:]
    assert abs(cos - expected) <= 1e-5
    assert abs(map_a.sum() - expected) <= 1e-5
    assert abs(map_b.sum() - expected) <= 1e-5


@settings(max_examples=20, deadline=None)
@given(pair=map_pairs(), spec_text=st.sampled_from(ALL_SPECS))
def test_parts_sum_to_the_reference_vector(pair, spec_text):
    x = pair[0]
    spec = parse_pool_list([spec_text])[0]
    vector = REFERENCES[spec.op](x.astype(np.float64), **spec.all_params())
    parts = decompose(x, spec).parts
    np.testing.assert_allclose(parts.sum(axis=(1, 2)), vector, rtol=1e-5, atol=1e-6 * np.abs(vector).max())


def test_avg_follows_the_issue_s_formula():
    """cos = sum over cells c of A of <f_A(c), avg_B> / (H_A W_A |avg_A| |avg_B|)."""
    rng = np.random.default_rng(1)
    a, b = rng.random((16, 5, 6)), rng.random((16, 7, 3))
    avg_a, avg_b = a.mean(axis=(1, 2)), b.mean(axis=(1, 2))
    by_hand = np.einsum("chw,c->hw", a, avg_b) / (30 * np.linalg.norm(avg_a) * np.linalg.norm(avg_b))
    _, map_a, _ = cosine_maps(*(decompose(x, parse_pool_list(["avg"])[0]) for x in (a, b)))
    np.testing.assert_allclose(map_a, by_hand, rtol=1e-12)


def test_max_terms_sit_at_each_channel_s_first_maximum():
    x = np.zeros((3, 2, 3))
    x[0, 1, 2] = 5.0  # channel 0 peaks at (1, 2)
    x[1, 0, 1] = x[1, 1, 0] = 2.0  # a tie: the first cell in row-major order, (0, 1)
    x[2] = 1.0  # constant: its term sits at (0, 0) but it peaks nowhere in the count map
    spec = parse_pool_list(["max"])[0]
    parts = decompose(x, spec).parts
    assert parts[0, 1, 2] == 5.0 and parts[1, 0, 1] == 2.0 and parts[1, 1, 0] == 0.0 and parts[2, 0, 0] == 1.0
    counts = cell_map(x, spec, decompose(x, spec))
    assert counts.values.tolist() == [[0, 1, 0], [0, 0, 1]]
    assert "2 of 3" in counts.meaning


def test_gem_parts_spread_each_channel_by_its_share_of_x_to_the_p():
    rng = np.random.default_rng(2)
    x = rng.random((4, 3, 3)) + 0.1
    spec = parse_pool_list(["gem:p=4"])[0]
    parts = decompose(x, spec).parts
    gem = (x**4).mean(axis=(1, 2)) ** 0.25
    np.testing.assert_allclose(parts, gem[:, None, None] * x**4 / (x**4).sum(axis=(1, 2), keepdims=True), rtol=1e-6)


# --- one-image maps -------------------------------------------------------------------------


def test_one_image_maps_by_hand():
    rng = np.random.default_rng(3)
    x = np.maximum(rng.normal(size=(32, 4, 5)), 0).astype(np.float32)
    maps = {s.key: cell_map(x, s, decompose(x, s)) for s in parse_pool_list(["avg,max,gem:p=3,crow,rmac"])}
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(maps["avg"].values, x64.sum(axis=0) / x64.sum(), rtol=1e-12)
    g = np.maximum(x64, 1e-6) ** 3
    np.testing.assert_allclose(maps["gem"].values, g.sum(axis=0) / g.sum(), rtol=1e-9)
    peaks = np.zeros((4, 5))
    for channel in x64:
        if channel.max() > channel.min():
            first = np.argwhere(channel == channel.max())[0]
            peaks[tuple(first)] += 1
    np.testing.assert_array_equal(maps["max"].values, peaks)
    s = x64.sum(axis=0)
    np.testing.assert_allclose(maps["crow"].values, np.sqrt(s / np.sqrt((s**2).sum())), rtol=1e-5)
    # R-MAC: each region's weight is its unit vector's projection on the final vector over |sum of units|.
    units = []
    for top, left, side in rmac_regions(4, 5, 3):
        m = x64[:, top:top + side, left:left + side].max(axis=(1, 2))
        units.append(m / np.linalg.norm(m))
    total = np.sum(units, axis=0)
    weights = [u @ total / np.linalg.norm(total) ** 2 for u in units]
    np.testing.assert_allclose([r.weight for r in maps["rmac"].regions], weights, rtol=1e-9)
    assert abs(sum(weights) - 1) < 1e-12 and abs(maps["rmac"].values.sum() - 1) < 1e-12


# --- real photos through the embedder ---------------------------------------------------------


@pytest.fixture(scope="module")
def photos(lite0):
    embedder = Embedder(lite0, parse_pool_list([",".join(ALL_SPECS)]))
    head = classifier_head(lite0)
    pixels = {n: preprocess_image(open_rgb(str(SAMPLE_IMAGES / n)), lite0.preprocess)
              for n in ("cat_chelsea.png", "coffee.png")}
    explained = {n: explain_pixels(embedder, n, p, head, 3) for n, p in pixels.items()}
    return embedder, head, pixels, explained


def test_real_photos_decompose_to_the_embedder_s_batch_vectors(photos):
    embedder, _, pixels, explained = photos
    batch = embedder.embed_pixels(torch.stack(list(pixels.values())))  # the path gpl embed takes
    a, b = explained["cat_chelsea.png"], explained["coffee.png"]
    for term in explain_pair(a, b):
        expected = cosine(batch[term.key][0], batch[term.key][1])
        assert abs(term.map_a.sum() - expected) <= 1e-5, term.key
        assert abs(term.map_b.sum() - expected) <= 1e-5, term.key
        assert abs(term.cosine - expected) <= 1e-5, term.key


def test_cam_top_class_and_logits_match_the_model_s_own_forward(photos, timm_lite0):
    embedder, head, pixels, explained = photos
    model = timm_lite0  # its own pooling and classifier, batch norms unfolded
    for name, (low, high) in (("cat_chelsea.png", (281, 285)), ("coffee.png", (967, 968))):
        with torch.inference_mode():
            logits = model((pixels[name][None].float() / 255 - 0.5) / 0.5)[0].double().numpy()
        top = explained[name].top
        assert low <= top[0][0] <= high and top[0][0] == int(np.argmax(logits))
        fmap = embedder.feature_maps(pixels[name][None]).float()[0].numpy()
        every_class = class_activation_maps(fmap, head.weight, list(range(len(head.bias))))
        from_cams = every_class.mean(axis=(1, 2)) + head.bias
        assert int(np.argmax(from_cams)) == top[0][0]
        np.testing.assert_allclose(from_cams, logits, atol=2e-3 * np.abs(logits).max())
        np.testing.assert_allclose(explained[name].cams, every_class[[i for i, _, _ in top]])


def test_figures_have_one_panel_per_pooling_and_cam(photos):
    _, _, _, explained = photos
    a, b = explained["cat_chelsea.png"], explained["coffee.png"]
    fig = draw_images([a], "efficientnet_lite0")
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 1 + len(ALL_SPECS) + 3  # the input, one per pooling, one per CAM class
    assert all(ax.get_title().startswith(key) for ax, key in zip(drawn[1:], ALL_SPECS))
    terms = explain_pair(a, b)
    fig = draw_pair(a, b, terms, "efficientnet_lite0")
    assert len([ax for ax in fig.axes if ax.images]) == 2 * (1 + len(ALL_SPECS))
    doc = explanation_json([a, b], terms, [], {})
    assert set(doc["images"][0]["maps"]) == set(ALL_SPECS) == set(doc["cosines"])
    assert len(doc["images"][1]["maps"]["avg"]["values"]) == 7 and len(doc["pair"]["max"]["b"][0]) == 7


# --- location: a small object on a plain background --------------------------------------------


@pytest.mark.parametrize("top,left", [(48, 144), (112, 48), (144, 112)])
def test_maps_peak_on_a_small_object(lite0, top, left):
    """A 64-pixel cat face pasted on grey: the avg share, the max count and the top CAM peak on its cells.

    The canvas is 256 x 256, so the backbone's resize leaves it alone and its centre crop cuts 16
    pixels from each side: the face covers crop pixels top..top+63, left..left+63, which lie on the
    32-pixel cells below (a face the head still recognises as a cat at this size).
    """
    face = Image.open(SAMPLE_IMAGES / "cat_chelsea.png").convert("RGB")
    side = min(face.size)
    face = face.crop(((face.size[0] - side) // 2, 0, (face.size[0] + side) // 2, side)).resize((64, 64), Image.BICUBIC)
    canvas = Image.new("RGB", (256, 256), (128, 128, 128))
    canvas.paste(face, (16 + left, 16 + top))
    embedder = Embedder(lite0, parse_pool_list(["avg,max"]))
    im = explain_pixels(embedder, "synthetic", preprocess_image(canvas, lite0.preprocess), classifier_head(lite0), 1)
    assert 281 <= im.top[0][0] <= 285
    on_object = {(row, col) for row in range(top // 32, (top + 63) // 32 + 1)
                 for col in range(left // 32, (left + 63) // 32 + 1)}
    for values in (im.maps["avg"].values, im.maps["max"].values, im.cams[0]):
        peak = np.unravel_index(np.argmax(values), values.shape)
        assert (int(peak[0]), int(peak[1])) in on_object


# --- the command ----------------------------------------------------------------------------------


def test_cli_pair_json_matches_gpl_embed_vectors(tmp_path):
    images = [str(SAMPLE_IMAGES / "cat_chelsea.png"), str(SAMPLE_IMAGES / "coffee.png")]
    pools = "avg,max,gem,rmac,crow,lse,spoc:center=1"
    run_gpl("embed", *images, "-o", str(tmp_path / "e.h5"), "-p", pools, "-q", check=True)
    proc = run_gpl("explain", *images, "-o", str(tmp_path / "why.png"), "-p", pools, "--json", str(tmp_path / "why.json"),
                   "--dpi", "50", check=True)
    doc = json.loads((tmp_path / "why.json").read_text())
    with h5py.File(tmp_path / "e.h5") as f:
        for key in doc["poolings"]:
            rows = f[f"embeddings/{key}"][...]
            expected = cosine(rows[0], rows[1])
            assert abs(np.sum(doc["pair"][key]["a"]) - expected) <= 1e-5, key
            assert abs(np.sum(doc["pair"][key]["b"]) - expected) <= 1e-5, key
            assert abs(doc["cosines"][key] - expected) <= 1e-5, key
    assert doc["panels"] == {"rows": 2, "columns": 1 + len(doc["poolings"])}
    with Image.open(tmp_path / "why.png") as png:
        assert png.format == "PNG" and png.size == figure_pixels(2, 1 + len(doc["poolings"]), 50)
    lines = proc.stdout.decode().splitlines()
    assert [line.split("\t")[0] for line in lines] == doc["poolings"]
    assert doc["images"][0]["top_classes"][0]["index"] in range(281, 286)


def test_cli_missing_single_image_is_one_line_and_exit_2(tmp_path):
    proc = run_gpl("explain", str(tmp_path / "nope.jpg"), "-o", str(tmp_path / "x.png"))
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1
    assert err[0].startswith("gpl: error: cannot explain") and "nope.jpg" in err[0] and "not found" in err[0]
    assert "Traceback" not in proc.stderr.decode() and not (tmp_path / "x.png").exists()


def test_cli_pair_with_a_corrupt_image_has_nothing_to_compare(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = run_gpl("explain", str(SAMPLE_IMAGES / "coffee.png"), str(bad), "-o", str(tmp_path / "x.png"))
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1
    assert err[0].startswith("gpl: error: nothing to compare:") and "bad.png" in err[0]
    assert "Traceback" not in proc.stderr.decode() and not (tmp_path / "x.png").exists()


def test_cli_each_draws_the_readable_images_and_exits_3(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    images = [str(SAMPLE_IMAGES / "cat_chelsea.png"), str(bad), str(SAMPLE_IMAGES / "coffee.png")]
    proc = run_gpl("explain", *images, "-o", str(tmp_path / "rows.png"), "-p", "avg,max", "--classes", "2",
                   "--json", str(tmp_path / "rows.json"), "--dpi", "40")
    assert proc.returncode == 3, proc.stderr.decode()
    assert "bad.jpg" in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()
    doc = json.loads((tmp_path / "rows.json").read_text())
    assert [im["path"] for im in doc["images"]] == [images[0], images[2]]
    assert [f["path"] for f in doc["failures"]] == [images[1]]
    assert doc["panels"] == {"rows": 4, "columns": 3}  # per image: input + 2 poolings; 2 CAMs below
    with Image.open(tmp_path / "rows.png") as png:
        assert png.size == figure_pixels(4, 3, 40)


def test_cli_never_replaces_an_existing_file_without_overwrite(tmp_path):
    figure = tmp_path / "mine.png"
    figure.write_bytes(b"a user's picture")
    proc = run_gpl("explain", str(SAMPLE_IMAGES / "coffee.png"), "-o", str(figure), "-p", "avg", "--classes", "0")
    assert proc.returncode == 2 and b"output exists" in proc.stderr
    assert figure.read_bytes() == b"a user's picture"
    again = run_gpl("explain", str(SAMPLE_IMAGES / "coffee.png"), "-o", str(figure), "-p", "avg", "--classes", "0",
                    "--dpi", "40", "--overwrite")
    assert again.returncode == 0, again.stderr.decode()
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "mine.png.partial").exists()


def test_cli_json_never_replaces_an_existing_file_without_overwrite(tmp_path):
    """Bug report: `gpl explain IMG -o fig.png --json out.json` replaced an existing out.json without --overwrite.
    It is refused, exit 2, naming --overwrite; out.json is unchanged and the figure is not written either."""
    earlier = tmp_path / "out.json"
    earlier.write_text('{"earlier": true}\n')
    figure = tmp_path / "fig.png"
    proc = run_gpl("explain", str(SAMPLE_IMAGES / "coffee.png"), "-o", str(figure), "--json", str(earlier),
                   "-p", "avg", "--classes", "0", "--dpi", "20")
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert str(earlier) in err and "--overwrite" in err and "Traceback" not in err
    assert earlier.read_text() == '{"earlier": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no figure, no temporary


def test_cli_json_is_written_atomically(tmp_path):
    """Bug: `gpl explain --json out.json` wrote the JSON with a plain open(), truncating out.json in place.
    It is written as a temporary renamed over out.json (gpl_cli.atomic), so a failed write leaves the
    earlier file whole: here the temporary cannot be created (a folder holds its name, out.json.partial),
    and the run fails with a one-line error, out.json as it was."""
    earlier = tmp_path / "out.json"
    earlier.write_text('{"earlier": true}\n')
    (tmp_path / "out.json.partial").mkdir()
    args = ("explain", str(SAMPLE_IMAGES / "coffee.png"), "-o", str(tmp_path / "fig.png"), "--json", str(earlier),
            "-p", "avg", "--classes", "0", "--dpi", "20", "--overwrite")
    proc = run_gpl(*args)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err and "out.json" in err, err
    assert earlier.read_text() == '{"earlier": true}\n'
    # Renamed into place, not rewritten in place: another name for the earlier file keeps the earlier bytes.
    if (tmp_path / "out.json.partial").exists():  # the failed write may have cleared its temporary's name itself
        (tmp_path / "out.json.partial").rmdir()
    (tmp_path / "kept.json").hardlink_to(earlier)
    proc = run_gpl(*args)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(earlier.read_text())["poolings"] == ["avg"]
    assert (tmp_path / "kept.json").read_text() == '{"earlier": true}\n'
    assert not (tmp_path / "out.json.partial").exists()


def test_cli_quiet_leaves_only_the_images_that_cannot_be_read_on_stderr(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    args = ("explain", str(SAMPLE_IMAGES / "coffee.png"), str(broken), "--each", "-p", "avg", "--classes", "0",
            "--dpi", "20")
    loud = run_gpl(*args, "-o", str(tmp_path / "loud.png"))
    quiet = run_gpl(*args, "-o", str(tmp_path / "quiet.png"), "-q")
    assert loud.returncode == quiet.returncode == 3, quiet.stderr.decode()
    said = loud.stderr.decode().splitlines()
    assert said[0].startswith(f"gpl: cannot read {broken}: ") and said[-1].startswith("gpl: explained 1 image(s)")
    assert quiet.stderr.decode().splitlines() == said[:1] and quiet.stdout == loud.stdout == b""
    assert (tmp_path / "quiet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
