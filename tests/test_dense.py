"""Compiled dense kernels (fastbp._ext.dense) against fastbp.reference."""
import numpy as np
import pytest

from fastbp import activations, reference
from fastbp._ext import dense

from helpers import DTYPES, assert_close

ACTS = list(activations.ACTIVATION_CODES)


def _data(rng, dtype, m=7, n_in=5, n_out=4, scale=2.0):
    x = (scale * rng.normal(size=(m, n_in))).astype(dtype)
    w = rng.normal(size=(n_in, n_out)).astype(dtype)
    b = rng.normal(size=n_out).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_matches_numpy(rng, dtype, trans_a, trans_b):
    a = rng.normal(size=(6, 3) if trans_a else (3, 6)).astype(dtype)
    b = rng.normal(size=(4, 6) if trans_b else (6, 4)).astype(dtype)
    out = dense.gemm(a, b, trans_a, trans_b)
    assert out.dtype == dtype and out.shape == (3, 4)
    assert_close(out, reference.gemm(a, b, trans_a, trans_b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_dense_forward_matches_reference(rng, dtype, act):
    x, w, b = _data(rng, dtype)
    code = activations.code(act)
    out = dense.dense_forward(x, w, b, code)
    assert out.dtype == dtype
    assert_close(out, reference.dense_forward(x, w, b, code), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_dense_backward_matches_reference(rng, dtype, act):
    x, w, b = _data(rng, dtype)
    code = activations.code(act)
    a = reference.dense_forward(x, w, b, code)
    g = rng.normal(size=a.shape).astype(dtype)
    got = dense.dense_backward(x, w, a, g, code)
    want = reference.dense_backward(x, w, a, g, code)
    for name, got_i, want_i in zip(("dW", "db", "dX"), got, want):
        assert got_i.dtype == dtype, name
        assert_close(got_i, want_i, dtype)


@pytest.mark.parametrize("act", ACTS)
def test_activation_derivative_matches_finite_differences(rng, act):
    """The derivative written in terms of the output equals d f / d x."""
    code = activations.code(act)
    x = np.concatenate([rng.normal(scale=3, size=200), [-30.0, -5.0, 5.0, 19.0, 21.0, 30.0]])
    x = x[np.abs(x) > 1e-3]  # stay off the kink of relu-like functions
    eps = 1e-6
    numeric = (reference.activation(x + eps, code) - reference.activation(x - eps, code)) / (2 * eps)
    analytic = reference.activation_derivative(reference.activation(x, code), code)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_preactivations_stay_finite(dtype):
    big = 1000.0 if dtype == "float64" else 100.0
    x = np.array([[-big, big, 0.0]], dtype=dtype)
    w = np.eye(3, dtype=dtype)
    b = np.zeros(3, dtype=dtype)
    with np.errstate(all="raise"):
        for act in ACTS:
            out = dense.dense_forward(x, w, b, activations.code(act))
            assert np.isfinite(out).all(), act


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_accept_read_only_inputs_and_do_not_modify_them(rng, dtype):
    x, w, b = _data(rng, dtype)
    a = dense.dense_forward(x, w, b, 2)
    g = rng.normal(size=a.shape).astype(dtype)
    copies = [arr.copy() for arr in (x, w, b, a, g)]
    for arr in (x, w, b, a, g):
        arr.setflags(write=False)
    dense.dense_forward(x, w, b, 2)
    dense.dense_backward(x, w, a, g, 2)
    for arr, copy in zip((x, w, b, a, g), copies):
        np.testing.assert_array_equal(arr, copy)


def test_shape_mismatch_is_an_error(rng):
    x, w, b = _data(rng, "float64")
    with pytest.raises(ValueError, match="shapes"):
        dense.dense_forward(x, w, b[:-1], 0)
