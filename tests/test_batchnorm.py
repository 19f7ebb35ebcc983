"""BatchNorm against torch.nn.BatchNorm1d (its results recorded in
tests/fixtures/torch_batchnorm.npz) and the reference."""
import re

import numpy as np
import pytest

import fastbp
from fastbp import reference

import torch_cases as tc
from helpers import DTYPES, assert_close


def _net(dtype="float64", seed=0):
    return fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.BatchNorm(),
                              fastbp.Dense(6, activation="tanh"), fastbp.BatchNorm(momentum=0.3),
                              fastbp.Dense(3)], dtype=dtype, seed=seed).build(5)


def test_training_and_predict_match_torch_batchnorm1d():
    """Two epochs of SGD through Dense-ReLU-BatchNorm-Dense-Tanh-BatchNorm-Dense
    (the first BatchNorm with each library's default momentum), then predict
    in eval mode, against torch's recorded run from the same weights and batches."""
    theirs = tc.load("torch_batchnorm")
    spec = tc.BATCHNORM
    tc.check_spec(theirs, "batchnorm", spec)
    X, y = theirs["batchnorm/X"], theirs["batchnorm/y"]
    net = _net()
    dense, bns = net.layers[0::2], net.layers[1::2]
    assert [(d.n_in, d.units) for d in dense] == [tuple(s) for s in spec["dense"]]
    for layer, (W, b) in zip(dense, tc.unflatten(theirs["batchnorm/weights"], spec["dense"])):
        layer.W[...] = W
        layer.b[...] = b
    for i, bn in enumerate(bns):  # fastbp starts where torch starts
        for name in ("gamma", "beta", "running_mean", "running_var"):
            np.testing.assert_array_equal(getattr(bn, name),
                                          theirs[f"batchnorm/initial_bn{i}_{name}"], err_msg=name)
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=spec["lr"]),
            epochs=spec["epochs"], batch_size=spec["batch"], shuffle=False, verbose=0)
    for i, bn in enumerate(bns):
        for name in ("gamma", "beta", "running_mean", "running_var"):
            np.testing.assert_allclose(getattr(bn, name), theirs[f"batchnorm/final_bn{i}_{name}"],
                                       rtol=1e-10, atol=1e-12, err_msg=f"BatchNorm {i} {name}")
    for i, (layer, (W, b)) in enumerate(zip(dense, tc.unflatten(theirs["batchnorm/dense"],
                                                                 spec["dense"]))):
        np.testing.assert_allclose(layer.W, W, rtol=1e-10, atol=1e-12, err_msg=f"Dense {i} W")
        np.testing.assert_allclose(layer.b, b, rtol=1e-10, atol=1e-12, err_msg=f"Dense {i} b")
    np.testing.assert_allclose(net.predict(X), theirs["batchnorm/predict"], rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_matches_reference(rng, dtype):
    X, y = rng.normal(size=(48, 5)).astype(dtype), rng.integers(0, 3, 48)
    net = _net(dtype)
    params, buffers = net.params.copy(), net._buffers.copy()
    reference.train_batches(X, np.eye(3, dtype=dtype)[y], np.arange(48), 12, net._program, params,
                            "cross_entropy",
                            lambda p, g: reference.sgd_step(p, g, None, 1, 0.1, 0, 0, False, 0),
                            floats=net._floats, counter=net._dropout_rng.copy(), buffers=buffers)
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=0.1), epochs=1,
            batch_size=12, shuffle=False, verbose=0)
    assert_close(net.params, params, dtype)
    assert_close(net._buffers, buffers, dtype)


def test_eval_mode_gradient_and_reference(rng):
    net = _net()
    net.layers[1].running_mean[...] = rng.normal(size=8)
    net.layers[1].running_var[...] = rng.uniform(0.5, 2, 8)
    X, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    value, grad = net.loss_and_grad(X, y, loss="cross_entropy")
    value_ref, grad_ref = reference.loss_grad(X, np.eye(3)[y], net._program, net.params,
                                              "cross_entropy", floats=net._floats,
                                              buffers=net._buffers.copy())
    assert_close(value, value_ref, "float64")
    assert_close(grad, grad_ref, "float64")
    assert fastbp.gradcheck(net, X, y, loss="cross_entropy") < 1e-5


def test_running_statistics_are_saved_and_one_row_batches_refused(rng, tmp_path):
    X, y = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    net = _net()
    net.fit(X, y, loss="cross_entropy", epochs=2, batch_size=8, verbose=0)
    net.save(tmp_path / "bn.fbp")
    loaded = fastbp.load(tmp_path / "bn.fbp")
    np.testing.assert_array_equal(loaded._buffers, net._buffers)
    np.testing.assert_array_equal(loaded.predict(X), net.predict(X))
    with pytest.raises(ValueError, match="BatchNorm needs at least 2 rows"):
        net.fit(X[:33], y[:33], loss="cross_entropy", batch_size=8, verbose=0)
    for bad in (dict(momentum=0), dict(eps=-1), dict(momentum="x")):
        with pytest.raises(ValueError, match="BatchNorm"):
            fastbp.BatchNorm(**bad)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_diverged_fit_leaves_the_running_statistics_of_the_last_finite_step(dtype):
    """A non-finite loss leaves the weights as they were, but the failing
    batch's forward pass had already moved the running statistics (left
    NaN or infinite): they are rolled back with the rest of the model."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 4)), rng.normal(size=(200, 1)) * 1e3

    def model():
        return fastbp.Sequential([fastbp.Dense(16, activation="relu"), fastbp.BatchNorm(),
                                  fastbp.Dense(1)], seed=0, dtype=dtype)
    net = model()
    with pytest.raises(fastbp.DivergenceError, match=r"batch (\d+)") as info:
        net.fit(X, y, loss="mse", optimizer=fastbp.optim.SGD(lr=1e3, momentum=0.9),
                epochs=5, batch_size=16, verbose=0, n_threads=1, shuffle=False)
    failed = int(re.search(r"batch (\d+)", str(info.value)).group(1))
    assert "loss became NaN or infinite" in str(info.value)
    assert np.isfinite(net._buffers).all()
    twin = model()  # the batches before the failing one, and nothing else
    twin.fit(X[:16 * (failed - 1)], y[:16 * (failed - 1)], loss="mse",
             optimizer=fastbp.optim.SGD(lr=1e3, momentum=0.9), epochs=1, batch_size=16,
             verbose=0, n_threads=1, shuffle=False)
    assert net._buffers.tobytes() == twin._buffers.tobytes()
    assert net.params.tobytes() == twin.params.tobytes()


def test_an_eps_beyond_float32s_range_is_refused_in_a_float32_model():
    """eps=1e300 became inf in a float32 model (with only NumPy's cast
    warning) and the layer's output a constant."""
    net = fastbp.Sequential([fastbp.Dense(4), fastbp.BatchNorm(eps=1e300), fastbp.Dense(1)],
                            dtype="float32")
    with pytest.raises(ValueError, match="beyond the model's dtype's range"):
        net.build(3)
    fastbp.Sequential([fastbp.Dense(4), fastbp.BatchNorm(eps=1e300), fastbp.Dense(1)],
                      dtype="float64").build(3)


def test_an_eps_that_is_zero_in_float32_is_refused_in_a_float32_model():
    """eps=1e-50 became 0 in a float32 model: a constant feature divided by
    zero and the fit "diverged" (try a smaller learning rate)."""
    net = fastbp.Sequential([fastbp.Dense(4), fastbp.BatchNorm(eps=1e-50), fastbp.Dense(1)],
                            dtype="float32")
    with pytest.raises(ValueError, match="is 0 in the model's dtype"):
        net.build(3)
    fastbp.Sequential([fastbp.Dense(4), fastbp.BatchNorm(eps=1e-50), fastbp.Dense(1)],
                      dtype="float64").build(3)
    fastbp.Sequential([fastbp.Dense(4), fastbp.BatchNorm(eps=1e-40), fastbp.Dense(1)],
                      dtype="float32").build(3)   # subnormal, not 0
