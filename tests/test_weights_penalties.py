"""Sample weights and per-layer weight penalties in the engine, against the
reference, finite differences, and their meaning (weights = repeated rows)."""
import numpy as np
import pytest

import fastbp
from fastbp import reference

from helpers import DTYPES, assert_close


def _net(dtype="float64", seed=0):
    return fastbp.Sequential([fastbp.Dense(6, activation="tanh"), fastbp.Dense(5, activation="relu"),
                              fastbp.Dense(3)], dtype=dtype, seed=seed).build(4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_weight", [False, True])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "sk_log_loss", "sk_squared_error"])
def test_weighted_penalized_loss_and_grad_match_reference(rng, dtype, per_weight, loss):
    net = _net(dtype)
    net._reg[:, :2] = [[0.3, 0.0], [0.1, 0.05], [0.0, 0.2]]
    net._reg_per_weight = per_weight
    X = rng.normal(size=(30, 4)).astype(dtype)
    Y = np.eye(3, dtype=dtype)[rng.integers(0, 3, 30)]
    w = rng.uniform(0.1, 2.0, 30).astype(dtype)
    value, grad = net.loss_and_grad(X, Y, loss=loss, sample_weight=w)
    value_ref, grad_ref = reference.loss_grad(X, Y, net._program, net.params, loss, w,
                                              net._reg, per_weight)
    assert_close(value, value_ref, dtype)
    assert_close(grad, grad_ref, dtype)


@pytest.mark.parametrize("per_weight", [False, True])
def test_penalized_gradient_matches_finite_differences(rng, per_weight):
    net = _net()
    net._reg[:, :2] = [[0.3, 0.1], [0.2, 0.0], [0.0, 0.4]]
    net._reg_per_weight = per_weight
    X = rng.normal(size=(20, 4))
    y = rng.integers(0, 3, 20)
    w = rng.uniform(0.5, 1.5, 20)
    assert fastbp.gradcheck(net, X, y, loss="cross_entropy", sample_weight=w) < 1e-5


def test_integer_sample_weights_equal_repeated_rows(rng):
    X = rng.normal(size=(12, 4))
    y = rng.integers(0, 3, 12)
    reps = rng.integers(1, 4, 12)
    a, b = _net(), _net()
    va, ga = a.loss_and_grad(X, y, loss="cross_entropy", sample_weight=reps)
    vb, gb = b.loss_and_grad(np.repeat(X, reps, 0), np.repeat(y, reps), loss="cross_entropy")
    assert va == pytest.approx(vb, rel=1e-12)
    np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_penalized_training_matches_reference(rng, dtype):
    X = rng.normal(size=(50, 4)).astype(dtype)
    y = rng.integers(0, 3, 50)
    Y = np.eye(3, dtype=dtype)[y]
    w = rng.uniform(0.2, 2.0, 50).astype(dtype)
    net = _net(dtype)
    net._reg[:, 0] = 0.01
    net._reg_per_weight = True
    params = net.params.copy()
    velocity = np.zeros_like(params)
    for start in range(0, 50, 16):  # reference: plain mini-batches, sklearn SGD
        rows = slice(start, start + 16)
        _, grad = reference.loss_grad(X[rows], Y[rows], net._program, params, "sk_log_loss",
                                      w[rows], net._reg, True)
        reference.sk_sgd_step(params, grad, velocity, 0.1, 0.9, True)
    from fastbp.sklearn import _SklearnSGD

    net.fit(X, Y, loss="sk_log_loss", optimizer=_SklearnSGD(lr=0.1, momentum=0.9, nesterov=True),
            batch_size=16, shuffle=False, sample_weight=w, verbose=0, epochs=1)
    assert_close(net.params, params, dtype)


def test_sample_weight_validation(rng):
    net = _net()
    X, y = rng.normal(size=(5, 4)), rng.integers(0, 3, 5)
    for bad, message in [(np.ones(4), "shape"), (-np.ones(5), "non-negative"),
                         (np.zeros(5), "all zero"), (np.full(5, np.nan), "NaN")]:
        with pytest.raises(ValueError, match=message):
            net.fit(X, y, loss="cross_entropy", sample_weight=bad, verbose=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_in", [1, 2, 3, 5])
def test_penalty_partial_sums_cover_every_tail(rng, dtype, n_in):
    # The engine sums the penalty in four interleaved partial sums plus a
    # tail (n_in * 7 and 7 * 3 weights leave every remainder mod 4), with an
    # L2-only branch (first layer) and an L1 + L2 one (second).
    net = fastbp.Sequential([fastbp.Dense(7, activation="tanh"), fastbp.Dense(3)],
                            dtype=dtype, seed=1).build(n_in)
    net._reg[:, :2] = [[0.3, 0.0], [0.2, 0.1]]
    X = rng.normal(size=(10, n_in)).astype(dtype)
    Y = np.eye(3, dtype=dtype)[rng.integers(0, 3, 10)]
    value, grad = net.loss_and_grad(X, Y, loss="mse")
    value_ref, grad_ref = reference.loss_grad(X, Y, net._program, net.params, "mse",
                                              reg=net._reg)
    assert_close(value, value_ref, dtype)
    assert_close(grad, grad_ref, dtype)
