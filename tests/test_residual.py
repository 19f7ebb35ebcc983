"""Residual blocks: y = x + block(x), nestable, against the reference and torch
(its results recorded in tests/fixtures/torch_residual.npz)."""
import numpy as np
import pytest

import fastbp
from fastbp import reference

import torch_cases as tc
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
                            floats=net._floats, counter=counter)
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=0.1), batch_size=10,
            shuffle=False, verbose=0)
    assert_close(net.params, params, "float64")


def test_matches_torch_residual_mlp():
    """One epoch of Adam on tanh(x W0) -> h + relu(h W1) W2 -> W3, against
    torch's recorded run from the same weights and batches."""
    theirs = tc.load("torch_residual")
    spec = tc.RESIDUAL
    tc.check_spec(theirs, "residual", spec)
    net = fastbp.Sequential([fastbp.Dense(5, activation="tanh"),
                             fastbp.Residual([fastbp.Dense(5, activation="relu"), fastbp.Dense(5)]),
                             fastbp.Dense(2)], dtype="float64", seed=1).build(3)
    dense = [l for l in net.layers if isinstance(l, fastbp.Dense)]
    assert [(d.n_in, d.units) for d in dense] == [tuple(s) for s in spec["dense"]]
    for layer, (W, b) in zip(dense, tc.unflatten(theirs["residual/weights"], spec["dense"])):
        layer.W[...] = W
        layer.b[...] = b
    net.fit(theirs["residual/X"], theirs["residual/y"], loss="cross_entropy",
            optimizer=fastbp.optim.Adam(lr=spec["lr"]), batch_size=spec["batch"], shuffle=False,
            verbose=0)
    for i, (layer, (W, b)) in enumerate(zip(dense, tc.unflatten(theirs["residual/final"],
                                                                 spec["dense"]))):
        np.testing.assert_allclose(layer.W, W, rtol=1e-10, atol=1e-12, err_msg=f"Dense {i} W")
        np.testing.assert_allclose(layer.b, b, rtol=1e-10, atol=1e-12, err_msg=f"Dense {i} b")


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
