"""Compiled loss kernels (fastbp._numba.losses) against fastbp.reference."""
import ctypes

import numpy as np
import pytest

from fastbp import reference
from fastbp._numba import losses

from helpers import DTYPES, assert_close

LOSSES = list(losses.KERNELS)


def _targets(rng, loss, m, k, dtype):
    if loss == "cross_entropy":
        return np.eye(k, dtype=dtype)[rng.integers(0, k, m)]
    if loss == "binary_cross_entropy":
        return rng.integers(0, 2, size=(m, k)).astype(dtype)
    return rng.normal(size=(m, k)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_and_gradient_match_reference(rng, dtype, loss):
    Z = (3 * rng.normal(size=(9, 4))).astype(dtype)
    Y = _targets(rng, loss, 9, 4, dtype)
    G, G_ref = np.empty_like(Z), np.empty_like(Z)
    value = losses.KERNELS[loss](Z, Y, G)
    value_ref = reference.LOSS_KERNELS[loss](Z, Y, G_ref)
    assert_close(value, value_ref, dtype)
    assert_close(G, G_ref, dtype, scale=np.abs(G_ref).max())


@pytest.mark.parametrize("loss", LOSSES)
def test_gradient_matches_finite_differences(rng, loss):
    Z = rng.normal(size=(5, 3))
    Y = _targets(rng, loss, 5, 3, "float64")
    G = np.empty_like(Z)
    losses.KERNELS[loss](Z, Y, G)
    eps = 1e-6
    numeric = np.empty_like(Z)
    for idx in np.ndindex(Z.shape):
        up, down = Z.copy(), Z.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (losses.KERNELS[loss](up, Y, np.empty_like(Z))
                        - losses.KERNELS[loss](down, Y, np.empty_like(Z))) / (2 * eps)
    np.testing.assert_allclose(G, numeric, rtol=1e-6, atol=1e-9)


def test_cross_entropy_with_probability_targets(rng):
    Z = rng.normal(size=(6, 3))
    Y = rng.dirichlet(np.ones(3), size=6)
    G, G_ref = np.empty_like(Z), np.empty_like(Z)
    assert_close(losses.cross_entropy_loss_grad(Z, Y, G),
                 reference.cross_entropy_loss_grad(Z, Y, G_ref), "float64")
    assert_close(G, G_ref, "float64")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", ["binary_cross_entropy", "cross_entropy"])
def test_extreme_logits_give_finite_loss_and_gradient(dtype, loss):
    big = 1000.0 if dtype == "float64" else 100.0
    Z = np.array([[big, -big], [-big, big]], dtype=dtype)
    Y = np.array([[0, 1], [0, 1]], dtype=dtype)  # one badly wrong, one right
    G = np.empty_like(Z)
    with np.errstate(all="raise"):
        value = losses.KERNELS[loss](Z, Y, G)
    assert np.isfinite(value) and np.isfinite(G).all()
    assert value > big / 4  # the wrong row costs about `big`, not inf or 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", LOSSES)
def test_cfunc_entry_point_matches_kernel(rng, dtype, loss):
    Z = rng.normal(size=(4, 3)).astype(dtype)
    Y = _targets(rng, loss, 4, 3, dtype)
    G1, G2 = np.empty_like(Z), np.empty_like(Z)
    ctype = ctypes.c_float if dtype == "float32" else ctypes.c_double
    P = ctypes.POINTER(ctype)
    fn = ctypes.CFUNCTYPE(ctypes.c_double, P, P, P, ctypes.c_int64, ctypes.c_int64)(
        losses.loss_cfunc(loss, dtype))
    v1 = fn(Z.ctypes.data_as(P), Y.ctypes.data_as(P), G1.ctypes.data_as(P), 4, 3)
    v2 = losses.KERNELS[loss](Z, Y, G2)
    assert v1 == v2
    np.testing.assert_array_equal(G1, G2)
