"""BatchNorm against torch.nn.BatchNorm1d and the reference."""
import numpy as np
import pytest
import torch

import fastbp
from fastbp import reference

from helpers import DTYPES, assert_close


def _net(dtype="float64", seed=0):
    return fastbp.Sequential([fastbp.Dense(8, activation="relu"), fastbp.BatchNorm(),
                              fastbp.Dense(6, activation="tanh"), fastbp.BatchNorm(momentum=0.3),
                              fastbp.Dense(3)], dtype=dtype, seed=seed).build(5)


def _torch_twin(net):
    d = net.layers
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 6), torch.nn.Tanh(),
                                torch.nn.BatchNorm1d(6, momentum=0.3), torch.nn.Linear(6, 3)).double()
    with torch.no_grad():
        for t, f in ((model[0], d[0]), (model[3], d[2]), (model[6], d[4])):
            t.weight.copy_(torch.from_numpy(f.W.T.copy()))
            t.bias.copy_(torch.from_numpy(f.b.copy()))
    return model


def test_training_and_predict_match_torch_batchnorm1d(rng):
    X, y = rng.normal(size=(64, 5)), rng.integers(0, 3, 64)
    net = _net()
    model = _torch_twin(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(2):
        for s in range(0, 64, 16):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(torch.from_numpy(X[s:s + 16])),
                                              torch.from_numpy(y[s:s + 16])).backward()
            opt.step()
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=0.1), epochs=2,
            batch_size=16, shuffle=False, verbose=0)
    for t, f in ((model[2], net.layers[1]), (model[5], net.layers[3])):
        np.testing.assert_allclose(f.gamma, t.weight.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(f.beta, t.bias.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(f.running_mean, t.running_mean.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(f.running_var, t.running_var.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(net.layers[0].W, model[0].weight.detach().numpy().T, rtol=1e-10,
                               atol=1e-12)
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(net.predict(X), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_matches_reference(rng, dtype):
    X, y = rng.normal(size=(48, 5)).astype(dtype), rng.integers(0, 3, 48)
    net = _net(dtype)
    params, buffers = net.params.copy(), net._buffers.copy()
    reference.train_batches(X, np.eye(3, dtype=dtype)[y], np.arange(48), 12, net._program, params,
                            "cross_entropy",
                            lambda p, g: reference.sgd_step(p, g, None, 1, 0.1, 0, 0, False, 0),
                            rates=net._rates, counter=net._dropout_rng.copy(), buffers=buffers)
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
                                              "cross_entropy", buffers=net._buffers.copy())
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
