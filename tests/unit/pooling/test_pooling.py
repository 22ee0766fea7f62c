"""Pooling operators against NumPy references written here from each paper's formula.

The references below never call gpl: they are the formulas, in float64, one image at a time.
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from gpl_cli.errors import GplError
from gpl_cli.pooling.ops import (
    FUNCTIONS,
    GlobalPool,
    avg_pool,
    avgmax_pool,
    gem_pool,
    lse_pool,
    max_pool,
    pool,
    rmac_regions,
)
from gpl_cli.pooling.spec import REGISTRY, operator_table, parse_pool_list, parse_pool_spec

# --- independent references (one image: C x H x W float64) -----------------------------


def ref_avg(x):
    return x.mean(axis=(1, 2))


def ref_max(x):
    return x.max(axis=(1, 2))


def ref_avgmax(x):
    return 0.5 * (ref_avg(x) + ref_max(x))


def ref_catavgmax(x):
    return np.concatenate([ref_avg(x), ref_max(x)])


def ref_gem(x, p=3.0, eps=1e-6):
    return (np.maximum(x, eps) ** p).mean(axis=(1, 2)) ** (1.0 / p)


def ref_lse(x, r=10.0):
    return np.log(np.exp(r * x).mean(axis=(1, 2))) / r


def ref_spoc(x, center=0):
    """Babenko & Lempitsky: psi = sum over (x, y) of alpha(x, y) f(x, y);
    alpha = exp(-((y - H/2)^2 + (x - W/2)^2) / (2 sigma^2)), sigma = 1/3 of the centre-to-nearest-border distance.
    Cells are taken at their centres (index + 0.5)."""
    _, h, w = x.shape
    if not center:
        return x.sum(axis=(1, 2))
    sigma = min(h / 2.0, w / 2.0) / 3.0
    alpha = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            alpha[i, j] = math.exp(-(((i + 0.5) - h / 2.0) ** 2 + ((j + 0.5) - w / 2.0) ** 2) / (2 * sigma**2))
    return (x * alpha).sum(axis=(1, 2))


def ref_rmac_regions(H, W, L):
    """Tolias et al. 2016, written after the authors' description and their region code:
    side wl = floor(2 min/(l+1)); n regions per axis spaced b = (extent - wl)/(n - 1) apart, floored."""
    w = min(W, H)
    Wd = Hd = 0
    if H != W:
        best, best_n = None, None
        for n in range(2, 8):
            b = (max(H, W) - w) / (n - 1)
            err = abs((w * w - w * b) / (w * w) - 0.4)
            if best is None or err < best:
                best, best_n = err, n
        if H < W:
            Wd = best_n - 1
        else:
            Hd = best_n - 1
    out = []
    for l in range(1, L + 1):  # noqa: E741 (the paper's symbol for the level)
        wl = math.floor(2 * w / (l + 1))
        if wl == 0:
            continue
        nw, nh = l + Wd, l + Hd
        bw = 0 if nw == 1 else (W - wl) / (nw - 1)
        bh = 0 if nh == 1 else (H - wl) / (nh - 1)
        for i in range(nh):
            for j in range(nw):
                # + 1e-9: floor the exact quotient, not float noise below an integer (10/3*3 = 9.999...)
                out.append((math.floor(i * bh + 1e-9), math.floor(j * bw + 1e-9), wl))
    return out


def ref_rmac(x, levels=3):
    _, h, w = x.shape
    total = np.zeros(x.shape[0])
    for top, left, side in ref_rmac_regions(h, w, levels):
        v = x[:, top : top + side, left : left + side].max(axis=(1, 2))
        n = np.linalg.norm(v)
        total += v / n if n > 0 else v
    n = np.linalg.norm(total)
    return total / n if n > 0 else total


def ref_crow(x, a=2.0, b=2.0, eps=1e-6):
    """Kalantidis et al. 2016: S'_ij = sum_k X_kij; S = (S' / (sum S'^a)^(1/a))^(1/b);
    Q_k = share of non-zero X_k; Omega_k = log((K eps + sum Q) / (eps + Q_k)); f_k = Omega_k sum_ij S_ij X_kij.
    On non-negative (post-ReLU) maps; negatives count as zero."""
    X = np.maximum(x, 0.0)
    K = X.shape[0]
    s = X.sum(axis=0)
    z = (s**a).sum() ** (1.0 / a)
    S = (s / z) ** (1.0 / b) if z > 0 else np.zeros_like(s)
    Q = (X > 0).reshape(K, -1).mean(axis=1)
    omega = np.log((K * eps + Q.sum()) / (eps + Q))
    return (X * S).sum(axis=(1, 2)) * omega


REFERENCES = {
    "avg": ref_avg, "max": ref_max, "avgmax": ref_avgmax, "catavgmax": ref_catavgmax, "gem": ref_gem,
    "lse": ref_lse, "spoc": ref_spoc, "rmac": ref_rmac, "crow": ref_crow,
}
# Every operator, with default and non-default parameters.
SPECS = ["avg", "max", "avgmax", "catavgmax", "gem", "gem:p=1.5", "gem:p=7", "lse", "lse:r=0.5", "spoc",
         "spoc:center=1", "rmac", "rmac:levels=1", "rmac:levels=5", "crow", "crow:a=1,b=3"]


def reference(spec_text: str, x: np.ndarray) -> np.ndarray:
    spec = parse_pool_spec(spec_text)
    return np.stack([REFERENCES[spec.op](img, **spec.params) for img in x.astype(np.float64)])


def gpl(spec_text: str, x: np.ndarray, mask=None) -> np.ndarray:
    out = pool(parse_pool_spec(spec_text), torch.from_numpy(x), mask)
    assert out.dtype == torch.float32
    return out.numpy()


def assert_close(got, want, rtol=1e-5):
    """Within rtol of the vector's own scale (float32 arithmetic against a float64 reference)."""
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


def test_every_registered_operator_has_a_reference_and_a_test_spec():
    assert set(FUNCTIONS) == set(REGISTRY)  # the torch-free registry and the functions name the same operators
    assert set(REGISTRY) == set(REFERENCES)
    assert {parse_pool_spec(s).op for s in SPECS} == set(REGISTRY)


# --- against the references ---------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 7), (3, 4, 6, 11), (2, 3, 9, 4)], ids=["square", "wide", "tall"])
def test_matches_reference_on_random_post_relu_maps(spec, shape):
    rng = np.random.default_rng(zlib.crc32(f"{spec}{shape}".encode()))
    x = np.maximum(rng.normal(0.5, 1.0, shape), 0).astype(np.float32)  # sparse, non-negative, like ReLU output
    assert_close(gpl(spec, x), reference(spec, x))


@pytest.mark.parametrize("spec", SPECS)
def test_matches_reference_with_negative_values(spec):
    """Maps without a final ReLU (ConvNeXt): GeM clamps at eps, CroW counts negatives as zero, the rest see them."""
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (2, 4, 6, 5)).astype(np.float32)
    assert (x < 0).any()
    assert_close(gpl(spec, x), reference(spec, x))


@pytest.mark.parametrize("spec", SPECS)
def test_all_zero_map_gives_finite_reference_values(spec):
    x = np.zeros((2, 3, 5, 6), np.float32)
    got = gpl(spec, x)
    assert np.isfinite(got).all()
    assert_close(got, reference(spec, x))


def test_gem_on_all_zero_map_is_eps():
    """The clamp makes GeM of nothing the clamp value, as in the formula."""
    np.testing.assert_allclose(gpl("gem", np.zeros((1, 2, 3, 3), np.float32)), 1e-6, rtol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("hw", [(1, 1), (1, 5), (2, 3), (3, 1)], ids=["1x1", "1x5", "2x3", "3x1"])
def test_tiny_maps_including_smaller_than_the_rmac_grid(spec, hw):
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 3, (2, 4, *hw)).astype(np.float32)
    assert_close(gpl(spec, x), reference(spec, x))


def test_one_by_one_map_values():
    """On a 1x1 map every 'mean-like' pooling is the value itself; R-MAC is its L2 normalisation."""
    x = np.array([3.0, 4.0, 0.0], np.float32).reshape(1, 3, 1, 1)
    for spec in ("avg", "max", "avgmax", "gem", "gem:p=5", "lse", "spoc", "spoc:center=1"):
        np.testing.assert_allclose(gpl(spec, x)[0], [3.0, 4.0, 0.0], rtol=1e-5, atol=2e-6)  # GeM: 0 -> eps
    np.testing.assert_allclose(gpl("rmac", x)[0], [0.6, 0.8, 0.0], rtol=1e-6)


def test_rmac_regions_worked_by_hand():
    # 7 x 7, L = 3: one 7-region; four 4-regions at 0 and 3; nine 3-regions at 0, 2, 4.
    assert rmac_regions(7, 7, 3) == (
        [(0, 0, 7)] + [(y, x, 4) for y in (0, 3) for x in (0, 3)] + [(y, x, 3) for y in (0, 2, 4) for x in (0, 2, 4)]
    )
    # 5 x 10: three regions along the long side give the overlap closest to 40 % (50 %, vs 0 % for two).
    # Level 1: side 5 at x = 0, 2 (2.5 floored), 5. Level 2: side 3, y in {0, 2}, x in {0, 2, 4, 7}.
    # Level 3: side 2, y in {0, 1, 3}, x in {0, 2, 4, 6, 8}.
    assert rmac_regions(5, 10, 3) == (
        [(0, x, 5) for x in (0, 2, 5)]
        + [(y, x, 3) for y in (0, 2) for x in (0, 2, 4, 7)]
        + [(y, x, 2) for y in (0, 1, 3) for x in (0, 2, 4, 6, 8)]
    )
    # A 1 x 1 map has only the level-1 region; smaller levels would be under one cell.
    assert rmac_regions(1, 1, 3) == [(0, 0, 1)]


@pytest.mark.parametrize("hw", [(7, 7), (5, 10), (10, 5), (6, 17), (13, 9), (1, 4), (30, 40)])
def test_rmac_regions_match_the_reference_geometry(hw):
    assert sorted(rmac_regions(*hw, 4)) == sorted(ref_rmac_regions(*hw, 4))


def test_rmac_output_is_unit_length():
    x = np.random.default_rng(3).uniform(0, 1, (3, 8, 7, 9)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(gpl("rmac", x), axis=1), 1.0, rtol=1e-6)


def test_spoc_is_avg_times_area():
    """What tells SPoC from avg: it is not divided by the area, so direction is equal and length grows with size."""
    x = np.random.default_rng(4).uniform(0, 1, (2, 3, 6, 9)).astype(np.float32)
    np.testing.assert_allclose(gpl("spoc", x), gpl("avg", x) * 54, rtol=1e-5)


def test_large_p_and_r_do_not_overflow():
    x = np.random.default_rng(5).uniform(0, 50, (2, 3, 4, 4)).astype(np.float32)
    for spec in ("gem:p=200", "lse:r=100"):
        got = gpl(spec, x)
        assert np.isfinite(got).all()
        assert (got <= x.max(axis=(2, 3)) + 1e-4).all()
        assert (got >= x.max(axis=(2, 3)) * 0.9).all()


@pytest.mark.parametrize("spec", SPECS)
def test_reduced_precision_maps_pool_in_float32(spec):
    x = torch.rand(2, 4, 5, 6).to(torch.bfloat16)
    got = pool(parse_pool_spec(spec), x)
    assert got.dtype == torch.float32
    want = reference(spec, x.float().numpy())
    assert_close(got.numpy(), want)


# --- masked pooling: padded batch == each image alone ------------------------------------


def padded_batch(maps: list[np.ndarray], offsets: list[tuple[int, int]], rng):
    """Maps of different sizes placed in one N x C x H x W batch filled with hostile padding, and their mask."""
    c = maps[0].shape[0]
    H = max(m.shape[1] + oy for m, (oy, _) in zip(maps, offsets)) + 1
    W = max(m.shape[2] + ox for m, (_, ox) in zip(maps, offsets)) + 2
    batch = rng.choice([1e4, -1e4, 0.0, 50.0], size=(len(maps), c, H, W)).astype(np.float32)
    mask = np.zeros((len(maps), 1, H, W), bool)
    for i, (m, (oy, ox)) in enumerate(zip(maps, offsets)):
        batch[i, :, oy : oy + m.shape[1], ox : ox + m.shape[2]] = m
        mask[i, :, oy : oy + m.shape[1], ox : ox + m.shape[2]] = True
    return batch, torch.from_numpy(mask)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("placed", ["top-left", "anywhere"])
def test_padded_batch_equals_each_map_alone(spec, placed):
    rng = np.random.default_rng(11)
    sizes = [(7, 7), (5, 9), (1, 1), (9, 4), (2, 3), (6, 6)]
    maps = [np.maximum(rng.normal(0.3, 1, (5, h, w)), 0).astype(np.float32) for h, w in sizes]
    offsets = [(0, 0)] * len(maps) if placed == "top-left" else [tuple(rng.integers(0, 3, 2)) for _ in maps]
    batch, mask = padded_batch(maps, offsets, rng)
    got = gpl(spec, batch, mask)
    for i, m in enumerate(maps):
        alone = gpl(spec, m[None])[0]
        assert_close(got[i], alone)
        assert_close(got[i], reference(spec, m[None])[0])


def test_mask_must_fit_and_leave_something_valid():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="does not fit"):
        avg_pool(x, torch.ones(2, 1, 3, 4, dtype=torch.bool))
    empty = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match="at least one valid"):
        max_pool(x, empty)
    ragged = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    ragged[0, 0, 0, 0] = False  # not a rectangle
    with pytest.raises(ValueError, match="rectangle"):
        pool(parse_pool_spec("rmac"), x, ragged)


# --- properties (hypothesis) -----------------------------------------------------------------

positive_maps = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)).flatmap(
    lambda shape: arrays(np.float32, shape, elements=st.floats(0.015625, 10.0, width=32))
)
any_maps = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)).flatmap(
    lambda shape: arrays(np.float32, shape, elements=st.floats(-5.0, 5.0, width=32))
)


@settings(max_examples=60, deadline=None)
@given(positive_maps)
def test_gem_with_p_1_is_avg(x):
    t = torch.from_numpy(x)
    np.testing.assert_allclose(gem_pool(t, p=1.0), avg_pool(t), rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(positive_maps, st.sampled_from([10.0, 50.0, 300.0, 2000.0]))
def test_gem_tends_to_max(x, p):
    """max * n^(-1/p) <= GeM_p <= max: the gap closes as p grows."""
    t = torch.from_numpy(x)
    n = x.shape[2] * x.shape[3]
    g, m = gem_pool(t, p=p).numpy(), max_pool(t).numpy()
    assert (g <= m * (1 + 1e-5)).all()
    assert (g >= m * n ** (-1.0 / p) * (1 - 1e-5)).all()


@settings(max_examples=60, deadline=None)
@given(any_maps)
def test_lse_lies_between_avg_and_max_and_tends_to_each(x):
    t = torch.from_numpy(x)
    avg, mx = avg_pool(t).numpy(), max_pool(t).numpy()
    spread = x.max(axis=(2, 3)) - x.min(axis=(2, 3))
    n = x.shape[2] * x.shape[3]
    for r in (1e-4, 0.1, 1.0, 10.0, 1e3):
        got = lse_pool(t, r=r).numpy()
        tol = 1e-5 * (1 + np.abs(x).max())
        assert (got >= avg - tol).all() and (got <= mx + tol).all()  # Jensen
        assert (got <= avg + r * spread**2 / 8 + tol).all()  # Hoeffding: approaches avg as r -> 0
        assert (got >= mx - math.log(n) / r - tol).all()  # approaches max as r -> inf


@settings(max_examples=60, deadline=None)
@given(any_maps)
def test_avg_le_avgmax_le_max(x):
    t = torch.from_numpy(x)
    avg, mid, mx = avg_pool(t), avgmax_pool(t), max_pool(t)
    assert (avg <= mid + 1e-6).all() and (mid <= mx + 1e-6).all()


@settings(max_examples=30, deadline=None)
@given(any_maps, st.randoms(use_true_random=False))
def test_every_operator_is_equivariant_to_permuting_the_batch(x, random):
    perm = list(range(x.shape[0]))
    random.shuffle(perm)
    t = torch.from_numpy(x)
    for spec in SPECS:
        f = parse_pool_spec(spec)
        np.testing.assert_allclose(pool(f, t[perm]).numpy(), pool(f, t).numpy()[perm], rtol=1e-6, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(positive_maps, st.floats(0.1, 10.0))
def test_gem_avg_max_are_positively_homogeneous(x, scale):
    t = torch.from_numpy(x)
    for spec in ("avg", "max", "gem", "gem:p=4.5"):
        f = parse_pool_spec(spec)
        np.testing.assert_allclose(pool(f, t * scale).numpy(), scale * pool(f, t).numpy(), rtol=2e-5, atol=1e-6)


# --- names, parameters, module form -----------------------------------------------------------


def test_keys_are_canonical():
    assert parse_pool_spec("gem:p=4").key == "gem:p=4"
    assert parse_pool_spec("GEM : p = 3").key == "gem"  # defaults are not spelled out
    assert parse_pool_spec("crow:a=2,b=2").key == "crow"
    assert parse_pool_spec("rmac:levels=3.0").key == "rmac"
    assert parse_pool_spec("mac").key == "max"
    assert [s.key for s in parse_pool_list(["avg,crow:a=1,b=3", "rmac:levels=2"])] == ["avg", "crow:a=1,b=3", "rmac:levels=2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sum", "unknown pooling 'sum'; valid: avg, avgmax, catavgmax, crow, gem, lse, max, rmac, spoc, mac (= max)"),
        ("gem:q=2", "its parameters: p (default 3), eps (default 1e-06)"),
        ("gem:p=abc", "must be a number"),
        ("gem:p=0", "must be > 0"),
        ("gem:p=inf", "must be finite"),
        ("rmac:levels=2.5", "must be a whole number"),
        ("rmac:levels=0", "must be > 0"),
        ("spoc:center=2", "must be 0 or 1"),
        ("lse:r=-1", "must be > 0"),
        ("avg:p=1", "its parameters: none"),
    ],
)
def test_bad_names_and_parameters_are_clear_errors(text, message):
    with pytest.raises(GplError) as err:
        parse_pool_spec(text)
    assert message in str(err.value)


def test_module_form_equals_functional_form():
    x = torch.rand(2, 6, 5, 7)
    mask = torch.zeros(2, 1, 5, 7, dtype=torch.bool)
    mask[:, :, :4, :6] = True
    for spec in SPECS:
        parsed = parse_pool_spec(spec)
        module = GlobalPool(parsed.op, **parsed.params)
        assert isinstance(module, torch.nn.Module) and module.spec.key == parsed.key
        np.testing.assert_array_equal(module(x, mask).numpy(), FUNCTIONS[parsed.op](x, mask, **parsed.all_params()).numpy())
        assert module(x).shape == (2, module.out_dim(6))
    assert "gem:p=4" in repr(GlobalPool("gem", p=4))


def test_a_parsed_spec_is_callable_and_pools_as_the_functions_do():
    """Bug: `parse_pool_spec("gem:p=4")(fmap, mask)`, the registry form the README shows, raised TypeError:
    'PoolSpec' object is not callable. A spec applies its operator: checked against independent references
    (GeM with p=1 is the mean, max is the maximum) over each image's valid cells, and against the functions."""
    rng = np.random.default_rng(3)
    x = rng.uniform(0.1, 2.0, (2, 4, 5, 6))  # positive: GeM's clamp at eps changes nothing
    mask = np.zeros((2, 1, 5, 6), dtype=bool)
    mask[0, :, :, :] = True
    mask[1, :, :3, :4] = True  # the second image is padded: only its top-left 3 x 4 cells count
    fmap, valid = torch.from_numpy(x).float(), torch.from_numpy(mask)
    regions = [x[0], x[1][:, :3, :4]]
    np.testing.assert_allclose(parse_pool_spec("gem:p=1")(fmap, valid).numpy(), [ref_avg(r) for r in regions], rtol=1e-5)
    np.testing.assert_allclose(parse_pool_spec("max")(fmap, valid).numpy(), [ref_max(r) for r in regions], rtol=1e-6)
    np.testing.assert_allclose(parse_pool_spec("mac")(fmap).numpy(), x.max(axis=(2, 3)), rtol=1e-6)
    for spec in SPECS:
        parsed = parse_pool_spec(spec)
        np.testing.assert_array_equal(parsed(fmap, valid).numpy(), pool(parsed, fmap, valid).numpy())


def test_operator_table_describes_every_operator():
    table = {row["name"]: row for row in operator_table()}
    assert set(table) == set(REGISTRY)
    assert table["catavgmax"]["dim"] == "2C" and table["gem"]["dim"] == "C"
    assert table["gem"]["usage"] == "gem:p=3,eps=1e-06"
    assert table["max"]["aliases"] == ["mac"]
    assert all(row["reference"] and row["formula"] for row in table.values())


def test_pools_command_lists_every_operator():
    from click.testing import CliRunner

    from gpl_cli.cli import cli

    runner = CliRunner()
    text = runner.invoke(cli, ["pools"])
    assert text.exit_code == 0
    for op in REGISTRY.values():
        assert op.reference in text.stdout and op.summary in text.stdout
    assert "--pool gem:p=3,eps=1e-06" in text.stdout and "max, mac" in text.stdout
    as_json = json.loads(runner.invoke(cli, ["pools", "--json"]).stdout)
    assert [row["name"] for row in as_json] == list(REGISTRY)


@pytest.mark.parametrize("values,words", [
    ([""], "is empty"), (["avg,,max"], "empty item"), (["avg,"], "empty item"), ([], "no pooling given"),
    (["gem:p=3,p=4"], "parameter p given twice"), (["crow:a=2,a=2"], "parameter a given twice"),
])
def test_empty_and_repeated_items_in_pool_lists_are_errors(values, words):
    with pytest.raises(GplError, match=words):
        parse_pool_list(values)


@pytest.mark.parametrize("spec,key", [
    ("lse:r=1e30", "lse:r=1e+30"), ("gem:p=3.5", "gem:p=3.5"), ("gem:p=4.0", "gem:p=4"), ("gem:eps=1e-7", "gem:eps=1e-07"),
    ("lse:r=12345678", "lse:r=12345678"),
])
def test_keys_print_parameters_in_their_shortest_round_trip_form(spec, key):
    parsed = parse_pool_spec(spec)
    assert parsed.key == key
    assert parse_pool_spec(key).params == parsed.params  # the key parses back to the same values
