"""Compiled loss kernels (fastbp._numba.losses, fastbp._ext.losses) against
fastbp.reference."""
import ctypes

import numpy as np
import pytest

from fastbp import reference
from fastbp._ext import dense
from fastbp._ext import losses as softmax_losses
from fastbp._numba import losses

from helpers import DTYPES, assert_close

LOSSES = list(losses.KERNELS)
#: losses whose G is the exact gradient of their value (sk_squared_error's
#: delta is sklearn's, which is the gradient only for a single output)
EXACT = [l for l in LOSSES if l != "sk_squared_error"]


def _targets(rng, loss, m, k, dtype):
    if loss in ("cross_entropy", "sk_log_loss"):
        return np.eye(k, dtype=dtype)[rng.integers(0, k, m)]
    if loss in ("binary_cross_entropy", "sk_binary_log_loss"):
        return rng.integers(0, 2, size=(m, k)).astype(dtype)
    if loss == "sk_poisson":
        return rng.poisson(2.0, size=(m, k)).astype(dtype)
    return rng.normal(size=(m, k)).astype(dtype)


def _weights(rng, m, dtype, uniform):
    return np.ones(m, dtype) if uniform else rng.uniform(0.2, 3.0, m).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("uniform", [True, False], ids=["unweighted", "weighted"])
def test_loss_and_gradient_match_reference(rng, dtype, loss, uniform):
    Z = (1.5 * rng.normal(size=(9, 4))).astype(dtype)
    Y = _targets(rng, loss, 9, 4, dtype)
    w = _weights(rng, 9, dtype, uniform)
    G, G_ref = np.empty_like(Z), np.empty_like(Z)
    value = losses.KERNELS[loss](Z, Y, w, G)
    value_ref = reference.LOSS_KERNELS[loss](Z, Y, w, G_ref)
    assert_close(value, value_ref, dtype)
    assert_close(G, G_ref, dtype, scale=np.abs(G_ref).max())


@pytest.mark.parametrize("loss", EXACT + ["sk_squared_error"])
def test_gradient_matches_finite_differences(rng, loss):
    k = 1 if loss == "sk_squared_error" else 3
    Z = rng.normal(size=(5, k))
    Y = _targets(rng, loss, 5, k, "float64")
    w = rng.uniform(0.5, 2.0, 5)
    G = np.empty_like(Z)
    losses.KERNELS[loss](Z, Y, w, G)
    eps = 1e-6
    numeric = np.empty_like(Z)
    for idx in np.ndindex(Z.shape):
        up, down = Z.copy(), Z.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (losses.KERNELS[loss](up, Y, w, np.empty_like(Z))
                        - losses.KERNELS[loss](down, Y, w, np.empty_like(Z))) / (2 * eps)
    np.testing.assert_allclose(G, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss", LOSSES)
def test_integer_weights_equal_repeated_rows(rng, loss):
    Z = rng.normal(size=(6, 3))
    Y = _targets(rng, loss, 6, 3, "float64")
    reps = np.array([1, 3, 2, 1, 4, 2])
    G_w, G_r = np.empty_like(Z), np.empty((reps.sum(), 3))
    value_w = losses.KERNELS[loss](Z, Y, reps.astype(float), G_w)
    value_r = losses.KERNELS[loss](np.repeat(Z, reps, 0), np.repeat(Y, reps, 0),
                                   np.ones(reps.sum()), G_r)
    assert value_w == pytest.approx(value_r, rel=1e-12)
    summed = np.add.reduceat(G_r, np.concatenate([[0], np.cumsum(reps)[:-1]]))
    np.testing.assert_allclose(G_w, summed, rtol=1e-12, atol=1e-15)


def test_cross_entropy_with_probability_targets(rng):
    Z = rng.normal(size=(6, 3))
    Y = rng.dirichlet(np.ones(3), size=6)
    w = np.ones(6)
    G, G_ref = np.empty_like(Z), np.empty_like(Z)
    assert_close(losses.cross_entropy_loss_grad(Z, Y, w, G),
                 reference.cross_entropy_loss_grad(Z, Y, w, G_ref), "float64")
    assert_close(G, G_ref, "float64")


def test_sklearn_losses_match_sklearn_definitions(rng):
    """The sk_ kernels give sklearn.neural_network._base's loss values."""
    from scipy.special import expit, softmax
    from sklearn.neural_network import _base

    Z = rng.normal(size=(8, 3))
    w = rng.uniform(0.5, 2, 8)
    cases = {"sk_squared_error": ("squared_error", Z),
             "sk_log_loss": ("log_loss", softmax(Z, axis=1)),
             "sk_binary_log_loss": ("binary_log_loss", expit(Z)),
             "sk_poisson": ("poisson", np.exp(Z))}
    for name, (sk_name, out) in cases.items():
        Y = _targets(rng, name, 8, 3, "float64")
        for sw in (None, w):
            ours = losses.KERNELS[name](Z, Y, np.ones(8) if sw is None else sw, np.empty_like(Z))
            assert ours == pytest.approx(_base.LOSS_FUNCTIONS[sk_name](Y, out, sw), rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", ["binary_cross_entropy", "cross_entropy", "sk_log_loss",
                                  "sk_binary_log_loss"])
def test_extreme_logits_give_finite_loss_and_gradient(dtype, loss):
    big = 1000.0 if dtype == "float64" else 100.0
    Z = np.array([[big, -big], [-big, big]], dtype=dtype)
    Y = np.array([[0, 1], [0, 1]], dtype=dtype)  # one badly wrong, one right
    G = np.empty_like(Z)
    with np.errstate(all="raise"):
        value = losses.KERNELS[loss](Z, Y, np.ones(2, dtype), G)
    assert np.isfinite(value) and np.isfinite(G).all()
    # the wrong row costs about `big`, or -log(eps) where sklearn clips p;
    # the loss is the mean over the two rows
    floor = -np.log(np.finfo(dtype).eps) if loss.startswith("sk_") else big
    assert value > 0.45 * floor


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", LOSSES)
def test_cfunc_entry_point_matches_kernel(rng, dtype, loss):
    Z = rng.normal(size=(4, 3)).astype(dtype)
    Y = _targets(rng, loss, 4, 3, dtype)
    w = rng.uniform(0.5, 2, 4).astype(dtype)
    G1, G2 = np.empty_like(Z), np.empty_like(Z)
    ctype = ctypes.c_float if dtype == "float32" else ctypes.c_double
    P = ctypes.POINTER(ctype)
    fn = ctypes.CFUNCTYPE(ctypes.c_double, P, P, P, P, ctypes.c_int64, ctypes.c_int64)(
        losses.loss_cfunc(loss, dtype))
    v1 = fn(Z.ctypes.data_as(P), Y.ctypes.data_as(P), w.ctypes.data_as(P),
            G1.ctypes.data_as(P), 4, 3)
    v2 = losses.KERNELS[loss](Z, Y, w, G2)
    assert v1 == v2
    np.testing.assert_array_equal(G1, G2)


# The softmax losses are C kernels (csrc/losses.h) with their own vector exp,
# compiled per instruction-set level; every level this machine runs is tested.
ISAS = list(range(dense.small_gemm_isa() + 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_vector_exp_is_within_one_ulp(rng, dtype, isa):
    lo, hi = (-745.5, 710.0) if dtype == "float64" else (-104.5, 89.0)
    x = np.concatenate([rng.uniform(-1, 1, 20000), rng.uniform(lo, hi, 20000),
                        rng.uniform(-40, 0, 20000)]).astype(dtype)
    # 61 values: not a multiple of any vector length, so the tail path runs
    x = x[: x.size - x.size % 64 + 61]
    exact = np.exp(x.astype(np.longdouble))  # 64-bit mantissa: a yardstick for both
    with np.errstate(over="ignore"):
        rounded = exact.astype(dtype)
    out = softmax_losses.exp(x, isa)
    assert out.dtype == dtype and out.shape == x.shape
    normal = np.isfinite(rounded) & (rounded != 0)
    ulp = np.spacing(np.abs(rounded[normal])).astype(np.longdouble)
    err = np.abs(out[normal].astype(np.longdouble) - exact[normal]) / ulp
    assert err.max() <= 1.05
    # where the exact result overflows or underflows, the same inf or 0
    np.testing.assert_array_equal(out[~normal], rounded[~normal])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_vector_exp_special_values(dtype, isa):
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0], dtype=dtype)
    out = softmax_losses.exp(x, isa)
    np.testing.assert_array_equal(out[:4], [1.0, 1.0, np.inf, 0.0])
    assert np.isnan(out[4])
    assert abs(out[5] - np.e) <= np.spacing(np.asarray(np.e, dtype))
    assert abs(out[6] - 1 / np.e) <= np.spacing(np.asarray(1 / np.e, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("loss", ["sk_log_loss", "cross_entropy"])
@pytest.mark.parametrize("m,k", [(1, 1), (1, 3), (3, 5), (7, 10), (200, 10), (5, 17)])
def test_softmax_losses_match_reference_at_every_isa(rng, dtype, isa, loss, m, k):
    Z = (3 * rng.normal(size=(m, k))).astype(dtype)
    Y = np.eye(k, dtype=dtype)[rng.integers(0, k, m)]
    w = rng.uniform(0.2, 3.0, m).astype(dtype)
    G, G_ref = np.full_like(Z, np.nan), np.empty_like(Z)
    kernel = getattr(softmax_losses, f"{loss}_loss_grad")
    value = kernel(Z, Y, w, G, isa)
    value_ref = reference.LOSS_KERNELS[loss](Z, Y, w, G_ref)
    assert_close(value, value_ref, dtype)
    # (one column: softmax is 1 and G exactly 0)
    assert_close(G, G_ref, dtype, scale=np.abs(G_ref).max() or 1.0)


def test_softmax_loss_address_is_the_kernel(rng):
    assert losses.loss_cfunc("sk_log_loss", "float64") == softmax_losses.loss_address(
        "sk_log_loss", np.float64)
    assert losses.KERNELS["cross_entropy"] is softmax_losses.cross_entropy_loss_grad


@pytest.mark.parametrize("loss, case", [(loss, "weight") for loss in LOSSES]
                         + [("mse", "residual"), ("sk_squared_error", "residual")])
def test_float32_terms_that_overflow_float32_give_the_float64_loss(loss, case):
    """Finite float32 inputs whose squared residual (2e19^2) or weighted
    term (a weight of 3e38) exceeds float32 used to give an inf loss; the
    loss is a float64 and must be the reference's, the gradient finite."""
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(4, 2)).astype(np.float32)
    Y = _targets(rng, loss, 4, 2, np.float32)
    w = np.ones(4, np.float32)
    if case == "residual":
        Y[1, 0] = 2e19
    else:
        w[:] = 3e38
    G, G_ref = np.empty_like(Z), np.empty_like(Z)
    value = losses.KERNELS[loss](Z, Y, w, G)
    want = getattr(reference, f"{loss}_loss_grad")(Z.astype(np.float64), Y.astype(np.float64),
                                                  w.astype(np.float64), G_ref.astype(np.float64))
    assert np.isfinite(value) and value == pytest.approx(want, rel=1e-5)
    assert np.isfinite(G).all()


@pytest.mark.parametrize("name", ["mse", "binary_cross_entropy", "sk_squared_error",
                                  "sk_binary_log_loss", "sk_poisson"])
@pytest.mark.parametrize("bad", ["G", "Y", "w"])
def test_numba_kernels_called_from_python_refuse_mismatched_shapes(name, bad):
    """fastbp._numba.losses' kernels are Python-callable: a G smaller than
    Z was written past, a short Y or w read past."""
    from fastbp._numba import losses as kernels
    kernel = getattr(kernels, f"{name}_loss_grad")
    Z, Y, w, G = np.ones((50, 3)), np.ones((50, 3)), np.ones(50), np.empty((50, 3))
    if bad == "G":
        G = np.empty((1, 3))
    elif bad == "Y":
        Y = np.ones((2, 3))
    else:
        w = np.ones(1)
    with pytest.raises(ValueError, match="Z's shape"):
        kernel(Z, Y, w, G)
