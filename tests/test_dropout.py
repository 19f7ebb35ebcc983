"""Dropout: compiled engine against the reference (same mask stream), off in
predict, inverted scaling, reproducible, resumable."""
import numpy as np
import pytest

import fastbp
from fastbp import reference

from helpers import DTYPES, assert_close


def _net(dtype="float64", seed=0, rate=0.3):
    return fastbp.Sequential([fastbp.Dense(16, activation="relu"), fastbp.Dropout(rate),
                              fastbp.Dense(8, activation="tanh"), fastbp.Dropout(rate / 2),
                              fastbp.Dense(3)], dtype=dtype, seed=seed)


def _data(rng, n=64, dtype="float64"):
    return rng.normal(size=(n, 5)).astype(dtype), rng.integers(0, 3, n)


def _assert_sgd_matches_reference(net, X, y, lr, epochs, dtype):
    """``epochs`` of plain SGD on X (batches of 16 in order, cross-entropy)
    in the engine and in fastbp.reference, from the same weights and mask
    stream: same weights after, and the stream advanced as far."""
    params = net.params.copy()
    counter = net._dropout_rng.copy()
    Y = np.eye(3, dtype=dtype)[y]
    for _ in range(epochs):
        reference.train_batches(X, Y, np.arange(len(X)), 16, net._program, params,
                                "cross_entropy",
                                lambda p, g: reference.sgd_step(p, g, None, 1, lr, 0, 0, False, 0),
                                floats=net._floats, counter=counter)
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=lr), epochs=epochs,
            batch_size=16, shuffle=False, verbose=0)
    assert net._dropout_rng[0] == counter[0]
    assert_close(net.params, params, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_with_dropout_matches_reference(rng, dtype):
    X, y = _data(rng, dtype=dtype)
    _assert_sgd_matches_reference(_net(dtype).build(5), X, y, 0.1, 2, dtype)


def test_predict_and_loss_and_grad_have_no_dropout(rng):
    X, y = _data(rng)
    net = _net().build(5)
    plain = fastbp.Sequential([fastbp.Dense(16, activation="relu"), fastbp.Dense(8, activation="tanh"),
                               fastbp.Dense(3)], dtype="float64").build(5)
    plain.set_params(net.params)
    np.testing.assert_array_equal(net.predict(X), plain.predict(X))
    a, b = net.loss_and_grad(X, y, loss="cross_entropy"), plain.loss_and_grad(X, y, loss="cross_entropy")
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    assert fastbp.gradcheck(net, X, y, loss="cross_entropy") < 1e-5


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_masks_drop_the_rate_and_scale_the_rest(rate):
    mask, counter = reference.dropout_mask(np.uint64(12345), (400, 500), rate, np.float64)
    assert abs((mask == 0).mean() - rate) < 0.005
    assert set(np.unique(mask)) == {0.0, 1.0 / (1.0 - rate)}
    assert abs(mask.mean() - 1.0) < 0.02  # inverted dropout keeps the expectation


def test_dropout_changes_training_and_is_reproducible(rng):
    X, y = _data(rng, n=200)
    runs = []
    for seed in (1, 1, 2):
        net = _net(seed=seed)
        net.fit(X, y, loss="cross_entropy", epochs=3, batch_size=16, verbose=0)
        runs.append(net.params.copy())
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    no_drop = _net(seed=1, rate=0.0)
    no_drop.fit(X, y, loss="cross_entropy", epochs=3, batch_size=16, verbose=0)
    assert not np.array_equal(no_drop.params, runs[0])


def test_checkpoint_resume_with_dropout_is_bitwise(rng, tmp_path):
    X, y = _data(rng, n=300)
    ref = _net(seed=4)
    ref.fit(X, y, loss="cross_entropy", epochs=3, batch_size=10, verbose=0)
    path = tmp_path / "d.fbp"
    count = []
    real = fastbp.Sequential.save

    def crash_after_four(self, p):
        real(self, p)
        count.append(1)
        if len(count) == 4:
            raise RuntimeError("crash")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastbp.Sequential, "save", crash_after_four)
        with pytest.raises(RuntimeError):
            _net(seed=4).fit(X, y, loss="cross_entropy", epochs=3, batch_size=10, verbose=0,
                             checkpoint=path, checkpoint_every=7)
    net = fastbp.load(path)
    assert net._position is not None and net.layers[1].rate == 0.3
    net.fit(X, y, loss="cross_entropy", epochs=3 - net.history.n_epochs, batch_size=10, verbose=0)
    np.testing.assert_array_equal(net.params, ref.params)


def test_bad_dropout():
    for rate in (-0.1, 1.0, "x"):
        with pytest.raises(ValueError, match="dropout rate"):
            fastbp.Dropout(rate)
    with pytest.raises(ValueError, match="last layer cannot be Dropout"):
        fastbp.Sequential([fastbp.Dense(3), fastbp.Dropout(0.5)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropconnect_training_matches_reference(rng, dtype):
    """DropConnect masks W per mini-batch (same stream as dropout)."""
    X, y = _data(rng, dtype=dtype)
    net = fastbp.Sequential([fastbp.Dense(10, activation="tanh", dropconnect=0.4),
                             fastbp.Dropout(0.2),
                             fastbp.Dense(3, dropconnect=0.25)], dtype=dtype, seed=3).build(5)
    _assert_sgd_matches_reference(net, X, y, 0.2, 1, dtype)


def test_dropconnect_is_off_in_predict_and_reproducible(rng):
    X, y = _data(rng, n=120)
    make = lambda seed, dc: fastbp.Sequential([fastbp.Dense(12, activation="relu", dropconnect=dc),
                                               fastbp.Dense(3)], dtype="float64", seed=seed)
    a, b, c = make(1, 0.5), make(1, 0.5), make(1, 0.0)
    plain = make(1, 0.0).build(5)
    a.build(5)
    plain.set_params(a.params)
    np.testing.assert_array_equal(a.predict(X), plain.predict(X))
    for net in (a, b, c):
        net.fit(X, y, loss="cross_entropy", epochs=2, batch_size=8, verbose=0)
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)
    for bad in (-0.1, 1.0, "x"):
        with pytest.raises(ValueError, match="dropconnect"):
            fastbp.Dense(3, dropconnect=bad)
