"""fastbp against torch: the same network, initial weights and mini-batches
trained by fastbp (engine + compiled optimizers) and by torch.nn + torch.optim
give the same parameters to float64 rounding; loss_and_grad equals autograd.

torch is a test dependency (the ``test`` extra), imported unconditionally.
"""
import numpy as np
import pytest
import torch

import fastbp
from fastbp import optim

# (id, class name (same in fastbp.optim and torch.optim), kwargs valid for both)
CONFIGS = [
    ("sgd-defaults", "SGD", dict()),
    ("sgd", "SGD", dict(lr=0.1)),
    ("sgd-wd", "SGD", dict(lr=0.1, weight_decay=0.05)),
    ("sgd-momentum", "SGD", dict(lr=0.05, momentum=0.9)),
    ("sgd-momentum-dampening-wd", "SGD", dict(lr=0.05, momentum=0.8, dampening=0.3,
                                              weight_decay=0.02)),
    ("sgd-nesterov-wd", "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam-defaults", "Adam", dict()),
    ("adam", "Adam", dict(lr=0.01)),
    ("adam-betas-wd", "Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("adam-beta1-above-half", "Adam", dict(lr=0.01, betas=(0.3, 0.9))),  # lerp's 2nd formula
    ("adam-amsgrad-wd", "Adam", dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    ("adamw-defaults", "AdamW", dict()),
    ("adamw", "AdamW", dict(lr=0.01)),
    ("adamw-amsgrad", "AdamW", dict(lr=0.02, betas=(0.7, 0.95), weight_decay=0.2, amsgrad=True)),
    ("rmsprop-defaults", "RMSprop", dict()),
    ("rmsprop-centered", "RMSprop", dict(lr=0.01, alpha=0.9, centered=True)),
    ("rmsprop-centered-alpha-below-half", "RMSprop", dict(lr=0.01, alpha=0.3, centered=True)),
    ("rmsprop-momentum-wd", "RMSprop", dict(lr=0.01, momentum=0.9, weight_decay=0.05)),
    ("rmsprop-centered-momentum-wd", "RMSprop", dict(lr=0.005, alpha=0.95, eps=1e-6,
                                                     centered=True, momentum=0.5,
                                                     weight_decay=0.01)),
    ("rprop-defaults", "Rprop", dict()),
    ("rprop-etas-clipped", "Rprop", dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(0.02, 0.1))),
    ("adagrad-defaults", "Adagrad", dict()),
    ("adagrad", "Adagrad", dict(lr=0.1)),
    ("adagrad-decay-wd-init", "Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.01,
                                              initial_accumulator_value=0.5)),
    ("adagrad-eps", "Adagrad", dict(lr=0.05, initial_accumulator_value=0.1, eps=1e-3)),
]
IDS = [c[0] for c in CONFIGS]


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    # The tensors are tiny: torch's intra-op thread pool only fights the BLAS
    # threads (25x slower on 2 cores).  One thread; restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64}
TORCH_ACT = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid,
             "identity": None, None: None}
TORCH_LOSS = {"mse": torch.nn.MSELoss, "cross_entropy": torch.nn.CrossEntropyLoss,
              "binary_cross_entropy": torch.nn.BCEWithLogitsLoss}

# Network variants: hidden widths and activations, and the loss they train with.
NETS = {
    "tanh-ce": dict(sizes=[8, 3], acts=["tanh", None], loss="cross_entropy"),
    "relu-mse": dict(sizes=[8, 6, 3], acts=["relu", "relu", None], loss="mse"),
}
N_IN, N_SAMPLES, BATCH, EPOCHS = 5, 40, 8, 4   # 5 batches per epoch, 20 steps


def _fastbp_net(spec, dtype, seed=0):
    rng = np.random.default_rng(seed + 100)
    net = fastbp.Sequential([fastbp.Dense(u, activation=a) for u, a in zip(spec["sizes"],
                                                                             spec["acts"])],
                            dtype=dtype, seed=seed)
    net.build(N_IN)
    for layer in net.layers:  # non-zero biases, so their path is exercised from the start
        layer.b[...] = rng.normal(scale=0.1, size=layer.b.shape)
    return net


def _torch_twin(net, dtype):
    """torch.nn.Sequential with the fastbp net's weights (torch weight = W.T)."""
    modules = []
    for layer in net.layers:
        lin = torch.nn.Linear(layer.n_in, layer.units, dtype=TORCH_DTYPE[dtype])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(layer.W.T.copy()))
            lin.bias.copy_(torch.from_numpy(layer.b.copy()))
        modules.append(lin)
        if TORCH_ACT[layer.activation] is not None:
            modules.append(TORCH_ACT[layer.activation]())
    return torch.nn.Sequential(*modules)


def _linears(model):
    return [m for m in model if isinstance(m, torch.nn.Linear)]


def _torch_flat(model, grad=False):
    """torch parameters (or their gradients) in fastbp's layout: per layer W
    (n_in, n_out) row-major, then b."""
    parts = []
    for lin in _linears(model):
        w, b = (lin.weight.grad, lin.bias.grad) if grad else (lin.weight, lin.bias)
        parts += [w.detach().T.reshape(-1), b.detach().reshape(-1)]
    return torch.cat(parts).numpy().astype(np.float64)


def _data(loss, n, k, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_IN))
    if loss == "cross_entropy":
        return X, rng.integers(0, k, n)
    if loss == "binary_cross_entropy":
        return X, rng.random(size=(n, k))  # soft targets in [0, 1]
    return X, rng.normal(size=(n, k))


def _torch_targets(y, loss, dtype):
    if loss == "cross_entropy" and y.ndim == 1:
        return torch.from_numpy(y.astype(np.int64))
    return torch.from_numpy(np.asarray(y, dtype=dtype))


def _assert_params_equal(net, model, rtol, atol, what):
    # layer by layer through the public views (no layout assumption) ...
    for i, (layer, lin) in enumerate(zip(net.layers, _linears(model))):
        np.testing.assert_allclose(layer.W, lin.weight.detach().numpy().T, rtol=rtol, atol=atol,
                                   err_msg=f"{what}: layer {i} W")
        np.testing.assert_allclose(layer.b, lin.bias.detach().numpy(), rtol=rtol, atol=atol,
                                   err_msg=f"{what}: layer {i} b")
    # ... and the flat vector, whose layout the gradient comparison relies on
    np.testing.assert_allclose(net.params, _torch_flat(model), rtol=rtol, atol=atol,
                               err_msg=f"{what}: flat params")


def _train_both(config, net_name, dtype, rtol, atol):
    _, cls, kwargs = config
    spec = NETS[net_name]
    net = _fastbp_net(spec, dtype)
    model = _torch_twin(net, dtype)
    _assert_params_equal(net, model, 0, 0, "initial weights")
    start = net.params.copy()
    X, y = _data(spec["loss"], N_SAMPLES, spec["sizes"][-1], seed=1)
    Xt, yt = torch.from_numpy(X.astype(dtype)), _torch_targets(y, spec["loss"], dtype)
    loss_fn = TORCH_LOSS[spec["loss"]]()
    opt = getattr(optim, cls)(**kwargs)
    topt = getattr(torch.optim, cls)(model.parameters(), **kwargs)
    for epoch in range(1, EPOCHS + 1):
        net.fit(X, y, loss=spec["loss"], optimizer=opt, epochs=1, batch_size=BATCH,
                shuffle=False, verbose=0)
        batch_losses = []
        for s in range(0, N_SAMPLES, BATCH):
            topt.zero_grad()
            loss = loss_fn(model(Xt[s:s + BATCH]), yt[s:s + BATCH])
            loss.backward()
            topt.step()
            batch_losses.append(loss.item())
        assert opt.t == epoch * (N_SAMPLES // BATCH)
        _assert_params_equal(net, model, rtol, atol, f"{cls} {kwargs} {dtype}, epoch {epoch}")
        np.testing.assert_allclose(net.history["loss"][-1], np.mean(batch_losses),
                                   rtol=max(rtol, 1e-12), err_msg=f"mean loss, epoch {epoch}")
    return start, net.params.copy()


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_training_matches_torch_float64(config, net_name):
    start, end = _train_both(config, net_name, "float64", rtol=1e-10, atol=1e-12)
    assert np.abs(end - start).max() > 1e-4, "training did not move the parameters"


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("config", [c for c in CONFIGS if c[0] in ("adam", "adam-amsgrad-wd",
                                                                   "adamw")],
                         ids=lambda c: c[0])
def test_training_matches_torch_float32(config, net_name):
    start, end = _train_both(config, net_name, "float32", rtol=1e-4, atol=1e-6)
    assert np.abs(end - start).max() > 1e-3


# (id, class, kwargs, {epoch: changes applied before it}): settings changed
# during training, from a callback (fastbp) and on param_groups (torch).
CHANGES = [
    ("sgd-momentum-on-after-5-steps", "SGD", dict(lr=0.05, dampening=0.3, weight_decay=0.02),
     {2: dict(momentum=0.8)}),
    ("sgd-nesterov-on", "SGD", dict(lr=0.05), {3: dict(momentum=0.9, nesterov=True)}),
    ("sgd-momentum-off-then-on", "SGD", dict(lr=0.05, momentum=0.9),
     {2: dict(momentum=0.0), 3: dict(momentum=0.5)}),
    ("adamw-amsgrad-off-then-on", "AdamW", dict(lr=0.01, amsgrad=True),
     {2: dict(amsgrad=False), 3: dict(amsgrad=True)}),
    ("adam-amsgrad-on", "Adam", dict(lr=0.01), {2: dict(amsgrad=True)}),
    ("rmsprop-centered-then-momentum-on", "RMSprop", dict(lr=0.01),
     {2: dict(centered=True), 3: dict(momentum=0.5)}),
]
#: state torch creates only at its first step (KeyError when the setting
#: that needs it is turned on later); fastbp starts these at zeros, as
#: torch's first step does: the comparison gives torch the same zeros.
_TORCH_LATE_STATE = {"amsgrad": "max_exp_avg_sq", "centered": "grad_avg",
                     "momentum": "momentum_buffer"}


class _ChangeAt:
    def __init__(self, changes):
        self.changes = changes

    def on_epoch_begin(self, net, epoch):
        for key, value in self.changes.get(epoch, {}).items():
            setattr(net.optimizer, key, value)


def _torch_change(topt, cls, changes):
    group = topt.param_groups[0]
    for key, value in changes.items():
        group[key] = value
        late = _TORCH_LATE_STATE.get(key)
        if cls != "SGD" and late and value:
            for p in group["params"]:
                topt.state[p].setdefault(late, torch.zeros_like(p))


@pytest.mark.parametrize("case", CHANGES, ids=[c[0] for c in CHANGES])
def test_setting_changed_during_training_matches_torch(case):
    """SGD momentum turned on after 5 steps: torch creates the buffer at that
    step as a copy of its gradient (not from zeros: with dampening 0.3 the
    two differ), and so does fastbp; a setting turned off keeps its state
    for when it is turned on again."""
    _, cls, kwargs, changes = case
    spec = NETS["tanh-ce"]
    net = _fastbp_net(spec, "float64")
    model = _torch_twin(net, "float64")
    X, y = _data(spec["loss"], N_SAMPLES, spec["sizes"][-1], seed=1)
    Xt, yt = torch.from_numpy(X), _torch_targets(y, spec["loss"], "float64")
    loss_fn = TORCH_LOSS[spec["loss"]]()
    topt = getattr(torch.optim, cls)(model.parameters(), **kwargs)
    net.fit(X, y, loss=spec["loss"], optimizer=getattr(optim, cls)(**kwargs), epochs=EPOCHS,
            batch_size=BATCH, shuffle=False, verbose=0, callbacks=[_ChangeAt(changes)])
    for epoch in range(1, EPOCHS + 1):
        _torch_change(topt, cls, changes.get(epoch, {}))
        for s in range(0, N_SAMPLES, BATCH):
            topt.zero_grad()
            loss_fn(model(Xt[s:s + BATCH]), yt[s:s + BATCH]).backward()
            topt.step()
    _assert_params_equal(net, model, 1e-10, 1e-12, f"{cls} {kwargs} then {changes}")


def test_rprop_nan_gradient_matches_torch():
    """torch.sign(nan) == 0: a NaN gradient leaves the parameter and its step
    size in place, and is stored as the previous gradient."""
    g1, g2, g3 = (np.array(v) for v in ([0.5, -0.5, 0.2], [np.nan, -0.3, -0.1],
                                        [0.4, -0.2, 0.3]))
    p = np.array([1.0, 2.0, 3.0])
    tp = torch.nn.Parameter(torch.tensor(p.copy()))
    opt, topt = optim.Rprop(lr=0.01), torch.optim.Rprop([tp], lr=0.01)
    for g in (g1, g2, g3):
        opt.step(p, g)
        tp.grad = torch.tensor(g.copy())
        topt.step()
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-15)
        np.testing.assert_allclose(opt.state[1], topt.state[tp]["step_size"].numpy(), rtol=1e-15)


# --- one loss and gradient against autograd ---------------------------------------

LOSS_CASES = [
    ("mse", "tanh"),
    ("cross_entropy", "tanh"),
    ("cross_entropy_probs", "relu"),   # 2-D y: rows of class probabilities
    ("binary_cross_entropy", "sigmoid"),
]


@pytest.mark.parametrize("case,act", LOSS_CASES)
def test_loss_and_grad_matches_autograd(case, act):
    loss = "cross_entropy" if case == "cross_entropy_probs" else case
    net = _fastbp_net(dict(sizes=[8, 3], acts=[act, None]), "float64", seed=4)
    model = _torch_twin(net, "float64")
    X, y = _data(loss, 16, 3, seed=2)
    if case == "cross_entropy_probs":
        y = np.random.default_rng(3).dirichlet(np.ones(3), size=16)
    # a scale that puts logits where the softmax / sigmoid is not saturated nor linear
    X = 2.0 * X
    value, grad = net.loss_and_grad(X, y, loss=loss)
    out = TORCH_LOSS[loss]()(model(torch.from_numpy(X)), _torch_targets(y, loss, "float64"))
    out.backward()
    np.testing.assert_allclose(value, out.item(), rtol=1e-10)
    expected = _torch_flat(model, grad=True)
    assert grad.shape == net.params.shape
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)
    assert np.abs(expected).max() > 1e-3  # a gradient worth comparing
    # and the weights were left as they were
    np.testing.assert_array_equal(net.params, _torch_flat(model))
