"""Residual blocks: y = x + block(x), nestable, against the reference and torch."""
import numpy as np
import pytest
import torch

import fastbp
from fastbp import reference

from helpers import DTYPES, assert_close


def _net(dtype="float64", seed=0, inner=None):
    inner = inner or [fastbp.Dense(6, activation="relu"),
                      fastbp.Residual([fastbp.Dense(6, activation="tanh")]), fastbp.Dense(6)]
    return fastbp.Sequential([fastbp.Dense(6, activation="tanh"), fastbp.Residual(inner),
                              fastbp.Dense(3)], dtype=dtype, seed=seed).build(4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nested_blocks_match_reference(rng, dtype):
    net = _net(dtype)
    X, y = rng.normal(size=(25, 4)).astype(dtype), rng.integers(0, 3, 25)
    value, grad = net.loss_and_grad(X, y, loss="cross_entropy")
    value_ref, grad_ref = reference.loss_grad(X, np.eye(3, dtype=dtype)[y], net._program,
                                              net.params, "cross_entropy")
    assert_close(value, value_ref, dtype)
    assert_close(grad, grad_ref, dtype)
    assert_close(net.predict(X), reference.forward(X, net._program, net.params), dtype)
    assert fastbp.gradcheck(net, X, y, loss="cross_entropy") < 1e-5


def test_training_with_dropout_inside_a_block_matches_reference(rng):
    net = _net(inner=[fastbp.Dense(6, activation="relu"), fastbp.Dropout(0.3), fastbp.Dense(6)])
    X, y = rng.normal(size=(40, 4)), rng.integers(0, 3, 40)
    params, counter = net.params.copy(), net._dropout_rng.copy()
    reference.train_batches(X, np.eye(3)[y], np.arange(40), 10, net._program, params,
                            "cross_entropy",
                            lambda p, g: reference.sgd_step(p, g, None, 1, 0.1, 0, 0, False, 0),
                            rates=net._rates, counter=counter)
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=0.1), batch_size=10,
            shuffle=False, verbose=0)
    assert_close(net.params, params, "float64")


def test_matches_torch_residual_mlp(rng):
    net = fastbp.Sequential([fastbp.Dense(5, activation="tanh"),
                             fastbp.Residual([fastbp.Dense(5, activation="relu"), fastbp.Dense(5)]),
                             fastbp.Dense(2)], dtype="float64", seed=1).build(3)
    lins = [torch.nn.Linear(3, 5), torch.nn.Linear(5, 5), torch.nn.Linear(5, 5),
            torch.nn.Linear(5, 2)]
    dense = [l for l in net.layers if isinstance(l, fastbp.Dense)]
    with torch.no_grad():
        for t, f in zip(lins, dense):
            t.double()
            t.weight.copy_(torch.from_numpy(f.W.T.copy()))
            t.bias.copy_(torch.from_numpy(f.b.copy()))

    def model(x):
        h = torch.tanh(lins[0](x))
        h = h + lins[2](torch.relu(lins[1](h)))
        return lins[3](h)
    params = [p for t in lins for p in t.parameters()]
    opt = torch.optim.Adam(params, lr=0.01)
    X, y = rng.normal(size=(32, 3)), rng.integers(0, 2, 32)
    for s in range(0, 32, 8):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(X[s:s + 8])),
                                          torch.from_numpy(y[s:s + 8])).backward()
        opt.step()
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.Adam(lr=0.01), batch_size=8,
            shuffle=False, verbose=0)
    for t, f in zip(lins, dense):
        np.testing.assert_allclose(f.W, t.weight.detach().numpy().T, rtol=1e-10, atol=1e-12)


def test_save_load_and_structure_errors(rng, tmp_path):
    net = _net()
    X = rng.normal(size=(10, 4))
    net.save(tmp_path / "res.fbp")
    np.testing.assert_array_equal(fastbp.load(tmp_path / "res.fbp").predict(X), net.predict(X))
    with pytest.raises(ValueError, match="keep its width"):
        fastbp.Sequential([fastbp.Dense(4), fastbp.Residual([fastbp.Dense(5)]), fastbp.Dense(2)]).build(3)
    with pytest.raises(ValueError, match="last layer cannot be a Residual"):
        fastbp.Sequential([fastbp.Residual([fastbp.Dense(3)])])
    with pytest.raises(ValueError, match="at least one layer"):
        fastbp.Residual([])
    with pytest.raises(ValueError, match="without its"):
        fastbp.Sequential([fastbp.layers.ResidualEnd(), fastbp.Dense(2)])
