"""fastbp against torch: the same network, initial weights and mini-batches
trained by fastbp (engine + compiled optimizers) and by torch.nn + torch.optim
give the same parameters to float64 rounding; loss_and_grad equals autograd.

torch's side is recorded in ``tests/fixtures/torch_optim.npz`` by
``tests/fixtures/make_torch_fixtures.py`` (the cases are in
``tests/torch_cases.py``), so these tests need no torch; ``.ci/run``
regenerates the record with torch 2.13.0 and fails if it differs.
"""
import numpy as np
import pytest

import fastbp
from fastbp import optim

import torch_cases as tc
from torch_cases import BATCH, CHANGES, CHANGES_NET, CONFIGS, EPOCHS, NETS, N_IN, N_SAMPLES

TORCH = tc.load("torch_optim")


def _fastbp_net(units, acts, weights, dtype="float64"):
    """A Sequential of Dense layers holding the recorded initial ``weights``, set
    through the public layer views (so net.params' layout is checked, not assumed)."""
    net = fastbp.Sequential([fastbp.Dense(u, activation=a) for u, a in zip(units, acts)],
                            dtype=dtype, seed=0).build(N_IN)
    for layer, (W, b) in zip(net.layers, tc.unflatten(weights, tc.chain(N_IN, units))):
        layer.W[...] = W
        layer.b[...] = b
    _assert_params_equal(net, weights, 0, 0, "initial weights")
    return net


def _recorded_net(net_name, dtype):
    key = f"init/{net_name}/{dtype}"
    tc.check_spec(TORCH, key, tc.net_spec(net_name, dtype))
    spec = NETS[net_name]
    return _fastbp_net(spec["sizes"], spec["acts"], TORCH[f"{key}/weights"], dtype)


def _recorded_data(net_name):
    key = f"data/{net_name}"
    tc.check_spec(TORCH, key, tc.data_spec(net_name))
    return TORCH[f"{key}/X"], TORCH[f"{key}/y"]


def _assert_params_equal(net, expected, rtol, atol, what):
    # layer by layer through the public views (no layout assumption) ...
    shapes = [(layer.n_in, layer.units) for layer in net.layers]
    for i, (layer, (W, b)) in enumerate(zip(net.layers, tc.unflatten(expected, shapes))):
        np.testing.assert_allclose(layer.W, W, rtol=rtol, atol=atol, err_msg=f"{what}: layer {i} W")
        np.testing.assert_allclose(layer.b, b, rtol=rtol, atol=atol, err_msg=f"{what}: layer {i} b")
    # ... and the flat vector, whose layout the gradient comparison relies on
    np.testing.assert_allclose(net.params, expected, rtol=rtol, atol=atol,
                               err_msg=f"{what}: flat params")


def _train(config, net_name, dtype, rtol, atol):
    """fastbp one epoch at a time, against torch's weights and mean loss after each."""
    cid, cls, kwargs = config
    key = f"train/{cid}/{net_name}/{dtype}"
    tc.check_spec(TORCH, key, tc.train_spec(config, net_name, dtype))
    net = _recorded_net(net_name, dtype)
    start = net.params.copy()
    X, y = _recorded_data(net_name)
    opt = getattr(optim, cls)(**kwargs)
    for epoch in range(1, EPOCHS + 1):
        net.fit(X, y, loss=NETS[net_name]["loss"], optimizer=opt, epochs=1, batch_size=BATCH,
                shuffle=False, verbose=0)
        assert opt.t == epoch * (N_SAMPLES // BATCH)
        _assert_params_equal(net, TORCH[f"{key}/params"][epoch - 1], rtol, atol,
                             f"{cls} {kwargs} {dtype}, epoch {epoch}")
        np.testing.assert_allclose(net.history["loss"][-1], TORCH[f"{key}/loss"][epoch - 1],
                                   rtol=max(rtol, 1e-12), err_msg=f"mean loss, epoch {epoch}")
    return start, net.params.copy()


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_training_matches_torch_float64(config, net_name):
    start, end = _train(config, net_name, "float64", rtol=1e-10, atol=1e-12)
    assert np.abs(end - start).max() > 1e-4, "training did not move the parameters"


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("config", tc.FLOAT32_CONFIGS, ids=[c[0] for c in tc.FLOAT32_CONFIGS])
def test_training_matches_torch_float32(config, net_name):
    start, end = _train(config, net_name, "float32", rtol=1e-4, atol=1e-6)
    assert np.abs(end - start).max() > 1e-3


class _ChangeAt:
    def __init__(self, changes):
        self.changes = changes

    def on_epoch_begin(self, net, epoch):
        for key, value in self.changes.get(epoch, {}).items():
            setattr(net.optimizer, key, value)


@pytest.mark.parametrize("case", CHANGES, ids=[c[0] for c in CHANGES])
def test_setting_changed_during_training_matches_torch(case):
    """Settings changed from a callback (fastbp) and on torch's param_groups
    (the recording).  SGD momentum turned on after 5 steps: torch creates the
    buffer at that step as a copy of its gradient (not from zeros: with
    dampening 0.3 the two differ), and so does fastbp; a setting turned off
    keeps its state for when it is turned on again."""
    cid, cls, kwargs, changes = case
    key = f"changes/{cid}"
    tc.check_spec(TORCH, key, tc.change_spec(case))
    net = _recorded_net(CHANGES_NET, "float64")
    X, y = _recorded_data(CHANGES_NET)
    net.fit(X, y, loss=NETS[CHANGES_NET]["loss"], optimizer=getattr(optim, cls)(**kwargs),
            epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0,
            callbacks=[_ChangeAt(changes)])
    _assert_params_equal(net, TORCH[f"{key}/params"], 1e-10, 1e-12,
                         f"{cls} {kwargs} then {changes}")


def test_rprop_nan_gradient_matches_torch():
    """torch.sign(nan) == 0: a NaN gradient leaves the parameter and its step
    size in place, and is stored as the previous gradient."""
    tc.check_spec(TORCH, "rprop_nan", tc.rprop_nan_spec())
    spec = tc.RPROP_NAN
    p = np.array(spec["p"])
    opt = optim.Rprop(lr=spec["lr"])
    for i, g in enumerate(spec["grads"]):
        opt.step(p, np.array(g))
        np.testing.assert_allclose(p, TORCH["rprop_nan/params"][i], rtol=1e-15)
        np.testing.assert_allclose(opt.state[1], TORCH["rprop_nan/step_size"][i], rtol=1e-15)


# --- one loss and gradient against autograd ---------------------------------------

@pytest.mark.parametrize("case,act", tc.LOSS_CASES)
def test_loss_and_grad_matches_autograd(case, act):
    key = f"loss_grad/{case}/{act}"
    tc.check_spec(TORCH, key, tc.loss_grad_spec(case, act))
    weights = TORCH[f"{key}/weights"]
    net = _fastbp_net(tc.LOSS_UNITS, [act, None], weights)
    X, y = TORCH[f"{key}/X"], TORCH[f"{key}/y"]
    value, grad = net.loss_and_grad(X, y, loss=tc.loss_of(case))
    np.testing.assert_allclose(value, TORCH[f"{key}/value"], rtol=1e-10)
    expected = TORCH[f"{key}/grad"]
    assert grad.shape == net.params.shape
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)
    assert np.abs(expected).max() > 1e-3  # a gradient worth comparing
    # and the weights were left as they were
    np.testing.assert_array_equal(net.params, weights)
