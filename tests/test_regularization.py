"""kernel_regularizer (L1/L2, Keras definitions), gradient clipping (torch's
clip_grad_norm_ rule, its results recorded in tests/fixtures/torch_clip_grad_norm.npz)
and per-layer gradient norms."""
import numpy as np
import pytest

import fastbp
from fastbp import reference, regularizers

import torch_cases as tc
from helpers import DTYPES, assert_close


def _net(dtype="float64", seed=0, reg=None):
    return fastbp.Sequential([fastbp.Dense(8, activation="tanh", kernel_regularizer=reg),
                              fastbp.Dense(6, activation="relu", kernel_regularizer=reg),
                              fastbp.Dense(3)], dtype=dtype, seed=seed).build(5)


def _data(rng, n=48, dtype="float64"):
    return rng.normal(size=(n, 5)).astype(dtype), rng.integers(0, 3, n)


def test_penalty_is_l1_abs_plus_l2_square_on_weights_only(rng):
    X, y = _data(rng)
    reg = regularizers.l1_l2(l1=0.01, l2=0.03)
    a, b = _net(reg=reg), _net()
    value_a, grad_a = a.loss_and_grad(X, y, loss="cross_entropy")
    value_b, grad_b = b.loss_and_grad(X, y, loss="cross_entropy")
    penalty = sum(0.01 * np.abs(l.W).sum() + 0.03 * (l.W ** 2).sum() for l in a.layers[:2])
    assert value_a == pytest.approx(value_b + penalty, rel=1e-12)
    extra = np.zeros_like(grad_a)
    for layer, row in zip(a.layers[:2], a._program):
        extra[row[4]:row[5]] = (0.01 * np.sign(layer.W) + 2 * 0.03 * layer.W).ravel()
    np.testing.assert_allclose(grad_a - grad_b, extra, atol=1e-14)
    assert fastbp.gradcheck(a, X, y, loss="cross_entropy") < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [dict(clip_value=0.05), dict(clip_norm=0.3),
                                  dict(clip_value=0.05, clip_norm=0.1)])
def test_clipped_regularized_training_matches_reference(rng, dtype, clip):
    X, y = _data(rng, dtype=dtype)
    net = _net(dtype, reg=regularizers.l2(1e-3))
    params = net.params.copy()
    Y = np.eye(3, dtype=dtype)[y]
    _, norms = reference.train_batches(
        X, Y, np.arange(48), 12, net._program, params, "cross_entropy",
        lambda p, g: reference.sgd_step(p, g, None, 1, 0.5, 0, 0, False, 0),
        reg=net._reg, measure=True, **clip)
    hist = net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=0.5), epochs=1,
                   batch_size=12, shuffle=False, verbose=0, grad_norms=True, **clip)
    assert_close(net.params, params, dtype)
    np.testing.assert_allclose(hist["grad_norm"][0], norms[[0, 1, 2]] / 4,
                               rtol=1e-5 if dtype == "float32" else 1e-10)


def test_clip_norm_is_torch_clip_grad_norm():
    """A global norm over all layers, as torch.nn.utils.clip_grad_norm_ over one
    tensor of all the parameters."""
    theirs = tc.load("torch_clip_grad_norm")
    tc.check_spec(theirs, "clip_grad_norm", tc.CLIP)
    net = _net()
    grad = theirs["clip_grad_norm/grad"]
    assert grad.shape == (net.n_params,)
    ours = grad.copy()
    reference.clip_and_measure(net._program, ours, 0.0, tc.CLIP["max_norm"])
    np.testing.assert_allclose(ours, theirs["clip_grad_norm/clipped"], rtol=1e-14)
    assert np.linalg.norm(grad) > 2 * tc.CLIP["max_norm"]  # the clip had work to do


def test_grad_norms_show_vanishing_gradients(rng):
    """Deep sigmoid stacks: the first layers' gradients are far smaller."""
    X, y = _data(rng, n=200)
    net = fastbp.Sequential([fastbp.Dense(16, activation="sigmoid") for _ in range(8)]
                            + [fastbp.Dense(3)], dtype="float64", seed=0)
    hist = net.fit(X, y, loss="cross_entropy", epochs=2, verbose=0, grad_norms=True)
    norms = hist["grad_norm"][-1]
    assert len(norms) == 9 and all(n > 0 for n in norms)
    assert norms[0] < norms[-1] / 100


def test_regularizer_survives_save_and_load(rng, tmp_path):
    X, y = _data(rng)
    net = _net(reg=regularizers.l1(0.02))
    net.fit(X, y, loss="cross_entropy", epochs=1, verbose=0)
    net.save(tmp_path / "r.fbp")
    loaded = fastbp.load(tmp_path / "r.fbp")
    assert loaded.layers[0].kernel_regularizer == regularizers.l1(0.02)
    assert loaded.loss_and_grad(X, y, loss="cross_entropy")[0] == \
        net.loss_and_grad(X, y, loss="cross_entropy")[0]


def test_bad_arguments(rng):
    X, y = _data(rng)
    for bad in (-1.0, float("nan"), "big"):
        with pytest.raises(ValueError, match="clip_norm"):
            _net().fit(X, y, loss="cross_entropy", clip_norm=bad, verbose=0)
    with pytest.raises(ValueError, match="regularizer l2"):
        regularizers.l2(-0.1)
    with pytest.raises(ValueError, match="kernel_regularizer"):
        fastbp.Dense(3, kernel_regularizer="l2")
