"""The post-processing chain: power, whitening (L2, project, L2), normalisation, checked with NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpl_cli.pooling.postprocess import l2_normalize, postprocess, signed_power


def np_l2(v):
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return np.where(n > 0, v / np.where(n > 0, n, 1), 0)


def test_signed_power_keeps_signs():
    v = np.array([[-4.0, -0.25, 0.0, 0.25, 9.0]], np.float32)
    got = signed_power(torch.from_numpy(v), 0.5).numpy()
    np.testing.assert_allclose(got, [[-2.0, -0.5, 0.0, 0.5, 3.0]], rtol=1e-6)
    np.testing.assert_allclose(signed_power(torch.from_numpy(v), 1.0).numpy(), v)


def test_l2_rows_are_unit_and_zero_rows_stay_zero():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(l2_normalize(v).numpy(), [[0.6, 0.8], [0.0, 0.0]])


class _Affine:
    """A stand-in projection: x -> (x - m) A^T, as a whitening does."""

    def __init__(self, m, a):
        self.m, self.a = m, a
        self.out_dim = a.shape[0]

    def project(self, v):
        return (v - torch.from_numpy(self.m)) @ torch.from_numpy(self.a).T


@pytest.mark.parametrize("normalize", ["none", "l2"])
@pytest.mark.parametrize("power", [None, 0.5])
@pytest.mark.parametrize("whitened", [False, True])
def test_chain_order_power_then_whiten_then_normalize(normalize, power, whitened):
    rng = np.random.default_rng(0)
    v = rng.normal(0, 2, (5, 6)).astype(np.float32)
    m = rng.normal(0, 0.1, 6).astype(np.float32)
    a = rng.normal(0, 1, (4, 6)).astype(np.float32)
    want = v.astype(np.float64)
    if power is not None:
        want = np.sign(want) * np.abs(want) ** power
    if whitened:
        want = np_l2((np_l2(want) - m) @ a.T)
    if normalize == "l2":
        want = np_l2(want)
    got = postprocess(torch.from_numpy(v), normalize, power, _Affine(m, a) if whitened else None)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="valid: none, l2"):
        postprocess(torch.ones(1, 2), "l1")
