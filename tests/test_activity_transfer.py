"""L1 activity penalty (sparse codes) and transfer of weights between models."""
import numpy as np
import pytest

import fastbp
from fastbp import reference, regularizers

from helpers import DTYPES, assert_close


def _net(dtype="float64", c=0.05, seed=0):
    return fastbp.Sequential([
        fastbp.Dense(7, activation="tanh", activity_regularizer=regularizers.l1(c)),
        fastbp.Dense(5, activation="relu", activity_regularizer=regularizers.l1(c / 2)),
        fastbp.Dense(3)], dtype=dtype, seed=seed).build(4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activity_penalty_matches_reference(rng, dtype):
    net = _net(dtype)
    X = rng.normal(size=(30, 4)).astype(dtype)
    Y = rng.normal(size=(30, 3)).astype(dtype)
    value, grad = net.loss_and_grad(X, Y, loss="mse")
    value_ref, grad_ref = reference.loss_grad(X, Y, net._program, net.params, "mse",
                                              reg=net._reg)
    assert_close(value, value_ref, dtype)
    assert_close(grad, grad_ref, dtype)
    # the value is the data loss plus c/m sum |a| of the penalized outputs
    plain = fastbp.Sequential([fastbp.Dense(7, activation="tanh"), fastbp.Dense(5, activation="relu"),
                               fastbp.Dense(3)], dtype=dtype).build(4)
    plain.set_params(net.params)
    outs, _ = reference.forward_all(net._program, X, net.params)
    expected = plain.loss_and_grad(X, Y, loss="mse")[0] + \
        0.05 / 30 * np.abs(outs[1]).sum() + 0.025 / 30 * np.abs(outs[2]).sum()
    assert value == pytest.approx(expected, rel=1e-5 if dtype == "float32" else 1e-12)


def test_activity_penalty_gradient_matches_finite_differences(rng):
    net = _net()
    X, Y = rng.normal(size=(20, 4)), rng.normal(size=(20, 3))
    assert fastbp.gradcheck(net, X, Y, loss="mse") < 1e-5


def test_sparse_autoencoder_example_gives_sparser_codes():
    from fastbp.examples import sparse_autoencoder

    _, dense_code, dense_mse = sparse_autoencoder.train(0.0, epochs=15)
    _, sparse_code, sparse_mse = sparse_autoencoder.train(1e-3, epochs=15)
    assert sparse_code < 0.6 * dense_code
    assert sparse_mse < 0.05  # still reconstructs


def test_copy_weights_and_freeze_for_transfer(rng):
    X, y = rng.normal(size=(80, 4)), rng.integers(0, 3, 80)
    source = fastbp.Sequential([fastbp.Dense(6, activation="relu"), fastbp.Dense(3)], seed=1)
    source.fit(X, y, loss="cross_entropy", epochs=3, verbose=0)
    target = fastbp.Sequential([fastbp.Dense(6, activation="relu", trainable=False),
                                fastbp.Dense(2)], seed=2).build(4)
    assert target.copy_weights_from(source) == [0]  # the output layers differ
    np.testing.assert_array_equal(target.layers[0].W, source.layers[0].W)
    before = target.layers[0].W.copy()
    target.fit(X, y % 2, loss="cross_entropy", epochs=2, verbose=0)
    np.testing.assert_array_equal(target.layers[0].W, before)  # frozen: untouched
    with pytest.raises(ValueError, match="does not match"):
        target.copy_weights_from(source, layers=[1])


def test_get_and_set_weights(rng):
    a = fastbp.Sequential([fastbp.Dense(3), fastbp.Dropout(0.5), fastbp.Dense(2)], seed=0).build(4)
    b = fastbp.Sequential([fastbp.Dense(3), fastbp.Dropout(0.5), fastbp.Dense(2)], seed=9).build(4)
    b.set_weights(a.get_weights())
    np.testing.assert_array_equal(a.params, b.params)
    with pytest.raises(ValueError, match="expected W"):
        b.set_weights([(np.ones((4, 3)), np.ones(3)), (np.ones((2, 2)), np.ones(2))])
    with pytest.raises(ValueError, match="NaN"):
        b.set_weights([(np.full((4, 3), np.nan), np.ones(3)), (np.ones((3, 2)), np.ones(2))])
    with pytest.raises(ValueError, match="activity_regularizer supports an L1"):
        fastbp.Dense(3, activity_regularizer=regularizers.l2(0.1))
