"""Backpropagated gradients against central finite differences (float64)."""
import numpy as np
import pytest

import fastbp
from fastbp import activations, reference

ACTS = list(activations.ACTIVATION_CODES)
KINKED = {"relu", "leaky_relu", "elu"}


def _near_kink(net, X, margin=1e-4):
    """True if some pre-activation of a kinked activation is within margin of 0."""
    out = X
    for layer in net.layers:  # Dense layers only
        pre = out @ layer.W.astype(np.float64) + layer.b.astype(np.float64)
        if layer.activation in KINKED and np.abs(pre).min() < margin:
            return True
        out = reference.activation(pre, layer.activation)
    return False


def _random_case(seed):
    """A random network and data set; redrawn while a kink would be straddled
    (there the finite difference compares two one-sided slopes)."""
    rng = np.random.default_rng(seed)
    loss = ["mse", "binary_cross_entropy", "cross_entropy"][seed % 3]
    dtype = ["float32", "float64"][seed % 2]
    while True:
        depth = rng.integers(1, 5)
        widths = rng.integers(1, 9, size=depth)
        acts = rng.choice(ACTS, size=depth)
        n_out = int(rng.integers(2, 5))
        layers = [fastbp.Dense(int(w), activation=str(a)) for w, a in zip(widths, acts)]
        net = fastbp.Sequential(layers + [fastbp.Dense(n_out)], dtype=dtype,
                                seed=int(rng.integers(1 << 30)))
        X = rng.normal(size=(int(rng.integers(1, 30)), int(rng.integers(1, 7))))
        net.build(X.shape[1])
        if not _near_kink(net, X):
            break
    if loss == "cross_entropy":
        y = rng.integers(0, n_out, X.shape[0])
    elif loss == "binary_cross_entropy":
        y = rng.integers(0, 2, size=(X.shape[0], n_out)).astype(float)
    else:
        y = rng.normal(size=(X.shape[0], n_out))
    return net, X, y, loss


@pytest.mark.parametrize("seed", range(16))
def test_random_architectures(seed):
    net, X, y, loss = _random_case(seed)
    err = fastbp.gradcheck(net, X, y, loss=loss)
    assert err < 1e-5, (net.layers, loss, err)


@pytest.mark.parametrize("act", ACTS)
def test_every_activation_in_a_hidden_layer(act, rng):
    net = fastbp.Sequential([fastbp.Dense(6, activation=act), fastbp.Dense(6, activation=act),
                             fastbp.Dense(3)], dtype="float64", seed=1).build(4)
    X = rng.normal(size=(25, 4))
    assert not _near_kink(net, X)
    assert fastbp.gradcheck(net, X, rng.integers(0, 3, 25), loss="cross_entropy") < 1e-5


def test_gradcheck_detects_a_wrong_gradient(monkeypatch, rng):
    """A gradient that is off by 1% must be reported as such."""
    net = fastbp.Sequential([fastbp.Dense(3, activation="tanh"), fastbp.Dense(2)],
                            dtype="float64", seed=0)
    X, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 2))
    real = fastbp.Sequential.loss_and_grad

    def wrong(self, *args, **kwargs):
        value, grad = real(self, *args, **kwargs)
        return value, grad * 1.01
    monkeypatch.setattr(fastbp.Sequential, "loss_and_grad", wrong)
    assert fastbp.gradcheck(net, X, y, loss="mse") > 5e-3


@pytest.mark.parametrize("indices", [[[0, 1]], [1.5], [], [-1], [10 ** 6], ["a"]])
def test_indices_must_be_positions_of_parameters(indices):
    """A 2-D index perturbed two parameters at once and reported a wrong
    gradient (1.0); 1.5 was cut to 1; an empty list or an out-of-range one
    failed inside NumPy."""
    rng = np.random.default_rng(0)
    net = fastbp.Sequential([fastbp.Dense(3, activation="tanh"), fastbp.Dense(1)],
                            dtype="float64", seed=0)
    X, y = rng.normal(size=(8, 2)), rng.normal(size=8)
    net.build(2)
    with pytest.raises(ValueError, match="indices"):
        fastbp.gradcheck(net, X, y, indices=indices)
    assert fastbp.gradcheck(net, X, y, indices=[0, 3, 5]) < 1e-6


def test_a_frozen_layer_is_not_checked(rng):
    """gradcheck compared a frozen layer's zero gradient with its central
    differences and reported 1.0, a wrong gradient, for any model with a
    frozen Dense or BatchNorm, though every trainable entry was right."""
    X, y = rng.normal(size=(6, 4)), rng.integers(0, 3, 6)
    for frozen in (fastbp.Dense(5, activation="tanh", trainable=False),
                   fastbp.BatchNorm(trainable=False)):
        net = fastbp.Sequential([frozen, fastbp.Dense(3, activation="tanh"), fastbp.Dense(3)],
                                dtype="float64", seed=0).build(4)
        assert fastbp.gradcheck(net, X, y, loss="cross_entropy") < 1e-6
        with pytest.raises(ValueError, match="frozen layer"):
            fastbp.gradcheck(net, X, y, loss="cross_entropy", indices=[0])
    every = fastbp.Sequential([fastbp.Dense(3, trainable=False)], dtype="float64").build(4)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fastbp.gradcheck(every, X, y, loss="cross_entropy")
