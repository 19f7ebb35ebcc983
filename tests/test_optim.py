"""Optimizers (fastbp.optim, compiled kernels in fastbp._numba.optim) against
the NumPy reference kernels (fastbp.reference), the C entry points used by the
training engine, state handling and argument checks.

The reference side of every comparison is driven independently of the
optimizer object: its arguments are written out here from the documented
torch.optim defaults, and its state is initialised here (zeros; Rprop's step
sizes at lr; Adagrad's sum at initial_accumulator_value).
"""
import ctypes

import numpy as np
import pytest

import fastbp
from fastbp import optim, reference
from fastbp._numba.optim import SPECS, step_cfunc

from helpers import adversarial

DTYPES = ["float32", "float64"]
#: compiled vs reference tolerance, relative to the compared array's scale
#: (as tests/helpers.assert_close): an entry that is a small difference of
#: O(1) terms (a momentum buffer near zero) is held to the absolute standard of
#: those terms, since the reference itself is only that accurate there.
RTOL = {"float32": 1e-5, "float64": 1e-10}

# (id, class name, kwargs, number of state slots these settings use; the
# optimizer holds all of its kernel's slots, SPECS[kernel].slots, whatever they use)
CONFIGS = [
    ("sgd", "SGD", dict(lr=0.1), 0),
    ("sgd-wd", "SGD", dict(lr=0.1, weight_decay=0.05), 0),
    ("sgd-momentum", "SGD", dict(lr=0.05, momentum=0.9), 1),
    ("sgd-momentum-dampening-wd", "SGD", dict(lr=0.05, momentum=0.8, dampening=0.3,
                                              weight_decay=0.02), 1),
    ("sgd-nesterov-wd", "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), 1),
    ("adam", "Adam", dict(lr=0.01), 2),
    ("adam-betas-wd", "Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), 2),
    ("adam-amsgrad", "Adam", dict(lr=0.01, amsgrad=True), 3),
    ("adam-amsgrad-wd", "Adam", dict(lr=0.01, weight_decay=0.01, amsgrad=True), 3),
    ("adamw", "AdamW", dict(lr=0.01), 2),
    ("adamw-amsgrad", "AdamW", dict(lr=0.02, betas=(0.7, 0.95), weight_decay=0.2, amsgrad=True), 3),
    ("rmsprop", "RMSprop", dict(lr=0.01), 1),
    ("rmsprop-centered", "RMSprop", dict(lr=0.01, alpha=0.9, centered=True), 2),
    ("rmsprop-momentum-wd", "RMSprop", dict(lr=0.01, momentum=0.9, weight_decay=0.05), 3),
    ("rmsprop-centered-momentum-wd", "RMSprop", dict(lr=0.005, alpha=0.95, eps=1e-6, centered=True,
                                                     momentum=0.5, weight_decay=0.01), 3),
    ("rprop", "Rprop", dict(lr=0.01), 2),
    ("rprop-etas-clipped", "Rprop", dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(0.02, 0.1)), 2),
    ("adagrad", "Adagrad", dict(lr=0.1), 1),
    ("adagrad-decay-wd-init", "Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.01,
                                              initial_accumulator_value=0.5), 1),
    ("adagrad-eps", "Adagrad", dict(lr=0.05, initial_accumulator_value=0.1, eps=1e-3), 1),
]
IDS = [c[0] for c in CONFIGS]
BY_ID = {c[0]: c for c in CONFIGS}
MAX_SLOTS = 3


def _make(config):
    _, cls, kwargs, _ = config
    return getattr(optim, cls)(**kwargs)


def _n_slots(config):
    """State slots the optimizer holds: all its kernel's, whatever it uses."""
    return len(SPECS[getattr(optim, config[1]).kernel].slots)


def _initial_state(config, n, dtype):
    """Reference state: MAX_SLOTS vectors, initialised as torch.optim does."""
    _, cls, kw, _ = config
    state = np.zeros((MAX_SLOTS, n), dtype=dtype)
    if cls == "Rprop":
        state[1] = kw.get("lr", 1e-2)  # step sizes start at lr
    if cls == "Adagrad":
        state[0] = kw.get("initial_accumulator_value", 0.0)
    return state


def _reference_step(config, p, g, S, t):
    """One update by fastbp.reference, arguments spelled out with torch's defaults."""
    _, cls, kw, _ = config
    if cls == "SGD":
        return reference.sgd_step(p, g, S[0], t, kw.get("lr", 1e-3), kw.get("momentum", 0.0),
                                  kw.get("dampening", 0.0), kw.get("nesterov", False),
                                  kw.get("weight_decay", 0.0))
    if cls in ("Adam", "AdamW"):
        b1, b2 = kw.get("betas", (0.9, 0.999))
        wd = kw.get("weight_decay", 0.01 if cls == "AdamW" else 0.0)
        return reference.adam_step(p, g, S[0], S[1], S[2], t, kw.get("lr", 1e-3), b1, b2,
                                   kw.get("eps", 1e-8), wd, kw.get("amsgrad", False),
                                   cls == "AdamW")
    if cls == "RMSprop":
        return reference.rmsprop_step(p, g, S[0], S[1], S[2], kw.get("lr", 1e-2),
                                      kw.get("alpha", 0.99), kw.get("eps", 1e-8),
                                      kw.get("weight_decay", 0.0), kw.get("momentum", 0.0),
                                      kw.get("centered", False))
    if cls == "Rprop":
        em, ep = kw.get("etas", (0.5, 1.2))
        smin, smax = kw.get("step_sizes", (1e-6, 50))
        return reference.rprop_step(p, g, S[0], S[1], em, ep, smin, smax)
    if cls == "Adagrad":
        return reference.adagrad_step(p, g, S[0], t, kw.get("lr", 1e-2), kw.get("lr_decay", 0.0),
                                      kw.get("weight_decay", 0.0), kw.get("eps", 1e-10))
    raise AssertionError(cls)


def _grad(rng, n, dtype, zeros=0.15):
    g = rng.normal(size=n)
    g[rng.random(n) < zeros] = 0.0  # exact zeros: Rprop's sign(0) branch, sparse updates
    return g.astype(dtype)


def _close(actual, expected, dtype, what):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, what
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaNs differ"
    ok = ~np.isnan(expected)
    scale = max(np.abs(expected[ok]).max(initial=0.0), 1.0)
    err = np.abs(actual[ok] - expected[ok]).max(initial=0.0) / scale
    assert err <= RTOL[np.dtype(dtype).name], (
        f"{what} ({dtype}): max error {err:.3g} relative to scale {scale:.3g}")


# --- (a) compiled kernel (Optimizer.step) vs the NumPy reference ------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_step_matches_reference(config, dtype):
    n_slots = _n_slots(config)
    rng = np.random.default_rng(2024)
    n = 37
    p = rng.normal(size=n).astype(dtype)
    p0, p_ref = p.copy(), p.copy()
    S = _initial_state(config, n, dtype)
    opt = _make(config)
    for t in range(1, 11):
        g = _grad(rng, n, dtype)
        g_copy = g.copy()
        ok = opt.step(p, g)
        ok_ref = _reference_step(config, p_ref, g, S, t)
        assert ok is True and ok_ref is True
        np.testing.assert_array_equal(g, g_copy, err_msg="step modified the gradient")
        assert opt.t == t
        assert opt.state.shape == (n_slots, n) and opt.state.dtype == np.dtype(dtype)
        assert p.dtype == np.dtype(dtype)
        _close(p, p_ref, dtype, f"params after step {t}")
        for j in range(n_slots):
            _close(opt.state[j], S[j], dtype, f"state slot {j} after step {t}")
        # the reference never touches a slot the optimizer does not have
        assert not np.any(S[n_slots:]), "reference used a state slot the optimizer lacks"
    assert np.abs(p - p0).max() > 1e-3, "parameters did not move"


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_step_reports_nonfinite(config, dtype):
    rng = np.random.default_rng(7)
    n = 9
    p = rng.normal(size=n).astype(dtype)
    p_ref = p.copy()
    S = _initial_state(config, n, dtype)
    opt = _make(config)
    g = _grad(rng, n, dtype, zeros=0)
    assert opt.step(p, g) is True
    assert _reference_step(config, p_ref, g, S, 1) is True
    # an infinite parameter stays non-finite under every optimizer
    p[4] = p_ref[4] = np.inf
    g = _grad(rng, n, dtype, zeros=0)
    assert opt.step(p, g) is False
    assert _reference_step(config, p_ref, g, S, 2) is False
    assert not np.isfinite(p[4]) and not np.isfinite(p_ref[4])
    mask = np.arange(n) != 4
    _close(p[mask], p_ref[mask], dtype, "finite params next to an infinite one")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_nan_gradient_matches_reference(config, dtype):
    """A NaN gradient entry: compiled kernel and reference agree on the
    returned flag, the parameters (NaN where NaN) and the state."""
    rng = np.random.default_rng(8)
    n = 9
    p = rng.normal(size=n).astype(dtype)
    p_ref = p.copy()
    S = _initial_state(config, n, dtype)
    opt = _make(config)
    for t in (1, 2):
        g = _grad(rng, n, dtype, zeros=0)
        if t == 2:
            g[4] = np.nan
        ok = opt.step(p, g)
        ok_ref = _reference_step(config, p_ref, g, S, t)
        assert ok == ok_ref, f"step {t}: kernel returned {ok}, reference {ok_ref}"
        _close(p, p_ref, dtype, f"params after step {t}")
        for j in range(_n_slots(config)):
            _close(opt.state[j], S[j], dtype, f"state slot {j} after step {t}")


def test_rprop_ignores_nan_gradient_like_torch():
    """torch.sign(nan) is 0, so torch's Rprop leaves a parameter with a NaN
    gradient in place (step size kept, NaN stored as previous gradient)."""
    opt = optim.Rprop(lr=0.01)
    p = np.array([1.0, 2.0])
    assert opt.step(p, np.array([0.5, 0.5])) is True
    assert opt.step(p, np.array([np.nan, 0.5])) is True
    np.testing.assert_array_equal(p, [0.99, 2.0 - 0.01 - 0.012])
    np.testing.assert_array_equal(opt.state[1], [0.01, 0.012])
    assert np.isnan(opt.state[0, 0]) and opt.state[0, 1] == 0.5


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_float32_step_rounds_like_reference(config):
    """float32 kernels do float32 arithmetic ("hyperparameters cast to the
    parameters' dtype as torch does", fastbp/_numba/optim.py), operation for
    operation as the reference: the same IEEE operations give the same bits.
    (No float64 counterpart: Numba's integer power beta ** t may differ from
    Python's pow in the last bit, which float32 rounding absorbs.)"""
    rng = np.random.default_rng(31)
    n = 64
    p = rng.normal(size=n).astype(np.float32)
    p_ref = p.copy()
    S = _initial_state(config, n, "float32")
    opt = _make(config)
    for t in range(1, 4):
        g = _grad(rng, n, "float32")
        opt.step(p, g)
        _reference_step(config, p_ref, g, S, t)
        np.testing.assert_array_equal(p, p_ref, err_msg=f"params after step {t}")
        for j in range(_n_slots(config)):
            np.testing.assert_array_equal(opt.state[j], S[j], err_msg=f"slot {j} after step {t}")


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("config", [c for c in CONFIGS if c[1] in ("Adam", "AdamW")],
                         ids=lambda c: c[0])
def test_float32_adam_rounds_like_reference_at_every_magnitude(config):
    """Adam divides sqrt(v) by its bias correction without a division
    (div_by_constant in fastbp/_numba/optim.py); the bits must still be the reference's when
    the gradients span float32's range: v subnormal, tiny, huge and inf
    (a gradient above about 1e21 gives inf), and exact zeros."""
    rng = np.random.default_rng(8)
    n = 4096
    # parameters the size of an update, so that a last-bit difference in
    # an update shows in them
    p = (rng.normal(size=n) * 0.01).astype(np.float32)
    p_ref = p.copy()
    S = _initial_state(config, n, "float32")
    opt = _make(config)
    coupled_decay = config[2].get("weight_decay", 0) if config[1] == "Adam" else 0
    for t in range(1, 6):
        g = (rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-44, 25, n)).astype(np.float32)
        g[rng.random(n) < 0.1] = 0.0
        opt.step(p, g)
        _reference_step(config, p_ref, g, S, t)
        assert np.isinf(S[1]).any()
        if coupled_decay == 0:   # (weight decay added to g keeps v away from 0)
            assert (S[1][S[1] > 0] < np.finfo(np.float32).tiny).any()
        np.testing.assert_array_equal(p, p_ref, err_msg=f"params after step {t}")
        for j in range(_n_slots(config)):
            np.testing.assert_array_equal(opt.state[j], S[j], err_msg=f"slot {j} after step {t}")


def test_step_float32_hyperparameters_cast_like_torch():
    # lr = 0.1 is not a float32 number: the update must use float32(0.1) * g
    # in float32 arithmetic, exactly as torch does on a float32 tensor.
    p = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
    g = np.array([0.3, 0.7, -1.1, 1e-3], dtype=np.float32)
    expected = p - np.float32(0.1) * g
    opt = optim.SGD(lr=0.1)
    opt.step(p, g)
    np.testing.assert_array_equal(p, expected)


# --- (b) the C entry point the engine calls --------------------------------------

CFUNC_CONFIGS = ["adam-amsgrad-wd", "adamw", "sgd-nesterov-wd", "rmsprop-centered-momentum-wd",
                 "rprop-etas-clipped", "adagrad-decay-wd-init"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CFUNC_CONFIGS)
def test_cfunc_matches_njit(name, dtype):
    """Call the cfunc by address through ctypes, on two segments of the vector
    with state stride n (as the engine does around frozen layers), and compare
    with Optimizer.step (the njit kernel) over the whole vector."""
    config = BY_ID[name]
    rng = np.random.default_rng(99)
    n, split = 29, 11
    p = rng.normal(size=n).astype(dtype)
    p_c = p.copy()
    opt = _make(config)
    opt_c = _make(config)
    state = opt_c._bind(n, dtype)  # (n_slots, n), C-contiguous: slot j at j * n
    hyper = np.ascontiguousarray(opt_c._hyper(), dtype=np.float64)
    assert hyper.ndim == 1
    fn = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)(
        step_cfunc(opt_c.kernel, dtype))
    size = np.dtype(dtype).itemsize
    for t in range(1, 9):
        g = _grad(rng, n, dtype)
        assert opt.step(p, g) is True
        for start, stop in ((0, split), (split, n)):
            rc = fn(p_c.ctypes.data + start * size, g.ctypes.data + start * size,
                    state.ctypes.data + start * size if state.size else None,
                    stop - start, n, hyper.ctypes.data, t)
            assert rc == 1
        _close(p_c, p, dtype, f"params after step {t}")
        _close(state, opt.state, dtype, f"state after step {t}")
    # non-finite result -> 0, per segment
    g = _grad(rng, n, dtype)
    p_c[split + 2] = np.inf
    rcs = [fn(p_c.ctypes.data + start * size, g.ctypes.data + start * size,
              state.ctypes.data + start * size if state.size else None,
              stop - start, n, hyper.ctypes.data, 9)
           for start, stop in ((0, split), (split, n))]
    assert rcs == [1, 0]


# --- (c) state carries over between calls; reset() restarts -----------------------

@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_second_step_continues_state(config):
    """step() twice on one object = two reference steps with persistent state;
    a fresh object taking the second gradient (its first step) differs
    wherever the optimizer has state."""
    rng = np.random.default_rng(5)
    n = 15
    p = rng.normal(size=n)
    p_ref = p.copy()
    g1, g2 = _grad(rng, n, "float64", zeros=0), _grad(rng, n, "float64", zeros=0)
    opt = _make(config)
    opt.step(p, g1)
    p1 = p.copy()
    opt.step(p, g2)
    assert opt.t == 2
    S = _initial_state(config, n, "float64")
    _reference_step(config, p_ref, g1, S, 1)
    _reference_step(config, p_ref, g2, S, 2)
    _close(p, p_ref, "float64", "params after two steps")
    fresh = _make(config)
    q = p1.copy()
    fresh.step(q, g2)
    assert fresh.t == 1
    if config[3] > 0:
        assert np.abs(p - q).max() > 1e-8, "second step ignored the optimizer's state"
    else:  # plain SGD is stateless: both are p1 - lr (g2 + wd p1)
        np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_reset_restarts(config):
    rng = np.random.default_rng(11)
    n = 12
    opt = _make(config)
    p = rng.normal(size=n)
    for _ in range(3):
        opt.step(p, _grad(rng, n, "float64"))
    opt.reset()
    assert opt.state is None and opt.t == 0
    # after reset it behaves exactly as a new object, and may bind another size
    for m in (n, n + 5):
        opt.reset()
        fresh = _make(config)
        a = rng.normal(size=m)
        b = a.copy()
        for _ in range(3):
            g = _grad(rng, m, "float64")
            opt.step(a, g)
            fresh.step(b, g)
        assert opt.t == 3
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(opt.state, fresh.state)


@pytest.mark.parametrize("name", ["adam-amsgrad-wd", "rmsprop-centered-momentum-wd",
                                  "sgd-momentum-dampening-wd", "adagrad-decay-wd-init"])
def test_fit_continues_optimizer_state(name):
    """Two fit calls with one optimizer object equal one fit of two epochs."""
    config = BY_ID[name]
    rng = np.random.default_rng(3)
    X = rng.normal(size=(24, 4))
    y = rng.integers(0, 3, 24)

    def net():
        return fastbp.Sequential([fastbp.Dense(6, activation="tanh"), fastbp.Dense(3)],
                                 dtype="float64", seed=0)

    kw = dict(loss="cross_entropy", batch_size=8, shuffle=False, verbose=0)
    a, b, c = net(), net(), net()
    opt_a, opt_b = _make(config), _make(config)
    a.fit(X, y, optimizer=opt_a, epochs=1, **kw)
    a.fit(X, y, optimizer=opt_a, epochs=1, **kw)
    b.fit(X, y, optimizer=opt_b, epochs=2, **kw)
    c.fit(X, y, optimizer=_make(config), epochs=1, **kw)
    c.fit(X, y, optimizer=_make(config), epochs=1, **kw)
    assert opt_a.t == opt_b.t == 6
    np.testing.assert_allclose(a.params, b.params, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(opt_a.state, opt_b.state, rtol=1e-12, atol=1e-14)
    # a fresh optimizer for the second fit restarts the state: a different result
    assert np.abs(c.params - b.params).max() > 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["adam-amsgrad-wd", "adamw", "rmsprop-centered-momentum-wd",
                                  "sgd-nesterov-wd", "rprop", "adagrad-decay-wd-init"])
def test_fit_step_equals_reference_with_frozen_layer(name, dtype):
    """Full-batch fit (engine + cfunc over the trainable segments) equals
    loss_and_grad + the reference kernel applied to the trainable entries only;
    the frozen layer's parameters and state are left alone."""
    config = BY_ID[name]
    rng = np.random.default_rng(17)
    X = rng.normal(size=(20, 4))
    y = rng.integers(0, 3, 20)
    net = fastbp.Sequential([fastbp.Dense(5, activation="tanh"),
                             fastbp.Dense(4, activation="tanh", trainable=False),
                             fastbp.Dense(3)], dtype=dtype, seed=1)
    net.build(4)
    for layer in net.layers:
        layer.b[...] = rng.normal(scale=0.1, size=layer.b.shape)
    frozen = np.zeros(net.n_params, dtype=bool)
    frozen[_offsets(net, 1)] = True
    assert frozen.sum() == 5 * 4 + 4
    trainable = ~frozen
    p_ref = net.params.copy()
    start = net.params.copy()
    S = _initial_state(config, net.n_params, dtype)
    opt = _make(config)
    for epoch in range(1, 5):
        twin = fastbp.Sequential([fastbp.Dense(5, activation="tanh"),
                                  fastbp.Dense(4, activation="tanh", trainable=False),
                                  fastbp.Dense(3)], dtype=dtype, seed=1)
        twin.build(4)
        twin.set_params(p_ref)
        _, grad = twin.loss_and_grad(X, y, loss="cross_entropy")
        assert not np.any(grad[frozen])
        sub_p, sub_S = p_ref[trainable].copy(), S[:, trainable].copy()
        _reference_step(config, sub_p, grad[trainable].copy(), sub_S, epoch)
        p_ref[trainable], S[:, trainable] = sub_p, sub_S
        net.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=None,
                shuffle=False, verbose=0)
        assert opt.t == epoch
        _close(net.params, p_ref, dtype, f"params after epoch {epoch}")
        for j in range(_n_slots(config)):
            _close(opt.state[j], S[j], dtype, f"state slot {j} after epoch {epoch}")
    np.testing.assert_array_equal(net.params[frozen], start[frozen])
    assert np.abs(net.params[trainable] - start[trainable]).max() > 1e-3
    initial = _initial_state(config, net.n_params, dtype)
    np.testing.assert_array_equal(opt.state[:, frozen], initial[:_n_slots(config), frozen])


def _offsets(net, i):
    """Indices of layer i's W and b in the flat parameter vector."""
    base = net.params.ctypes.data
    size = net.params.itemsize
    w0 = (net.layers[i].W.ctypes.data - base) // size
    b0 = (net.layers[i].b.ctypes.data - base) // size
    return np.r_[w0:w0 + net.layers[i].W.size, b0:b0 + net.layers[i].b.size]


# --- (d) invalid hyperparameters ---------------------------------------------------

INVALID = [
    ("SGD", dict(lr=-0.1)),
    ("SGD", dict(momentum=-0.5)),
    ("SGD", dict(weight_decay=-1e-3)),
    ("SGD", dict(nesterov=True)),  # no momentum
    ("SGD", dict(momentum=0.9, dampening=0.1, nesterov=True)),
    ("Adam", dict(lr=-1e-3)),
    ("Adam", dict(eps=-1e-8)),
    ("Adam", dict(betas=(1.0, 0.999))),
    ("Adam", dict(betas=(0.9, 1.0))),
    ("Adam", dict(betas=(-0.1, 0.999))),
    ("Adam", dict(betas=(0.9,))),
    ("Adam", dict(weight_decay=-0.01)),
    ("AdamW", dict(weight_decay=-0.01)),
    ("AdamW", dict(betas=(0.9, 1.5))),
    ("RMSprop", dict(lr=-0.01)),
    ("RMSprop", dict(alpha=-0.5)),
    ("RMSprop", dict(eps=-1.0)),
    ("RMSprop", dict(momentum=-0.9)),
    ("RMSprop", dict(weight_decay=-0.1)),
    ("Rprop", dict(lr=-0.01)),
    ("Rprop", dict(etas=(1.2, 0.5))),
    ("Rprop", dict(etas=(0.5, 1.0))),
    ("Rprop", dict(etas=(0.0, 1.2))),
    ("Rprop", dict(step_sizes=(1.0, 0.1))),
    ("Rprop", dict(step_sizes=(-1e-6, 50))),
    ("Adagrad", dict(lr=-0.01)),
    ("Adagrad", dict(lr_decay=-0.1)),
    ("Adagrad", dict(weight_decay=-0.1)),
    ("Adagrad", dict(initial_accumulator_value=-0.1)),
    ("Adagrad", dict(eps=-1e-10)),
]


@pytest.mark.parametrize("cls,kwargs", INVALID,
                         ids=[f"{c}-{'-'.join(k)}-{i}" for i, (c, k) in enumerate(INVALID)])
def test_invalid_hyperparameters_raise(cls, kwargs):
    with pytest.raises(ValueError):
        getattr(optim, cls)(**kwargs)


@pytest.mark.parametrize("cls,kwargs", [
    ("SGD", dict(lr=0.0, momentum=0.0, dampening=0.5)),
    ("Adam", dict(lr=0.0, betas=(0.0, 0.0), eps=0.0)),
    ("AdamW", dict(weight_decay=0.0)),
    ("RMSprop", dict(alpha=0.0, eps=0.0)),
    ("Rprop", dict(lr=0.0, step_sizes=(0.0, 0.0))),
    ("Adagrad", dict(lr=0.0, eps=0.0)),
])
def test_boundary_hyperparameters_accepted(cls, kwargs):
    opt = getattr(optim, cls)(**kwargs)
    for k, v in kwargs.items():
        assert getattr(opt, k) == v


def test_step_rejects_bad_arrays():
    opt = optim.Adam()
    p = np.zeros(5)
    with pytest.raises(ValueError):
        opt.step(p, np.zeros(4))
    with pytest.raises(ValueError):
        opt.step(p, np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError):
        opt.step(np.zeros(5, dtype=np.int64), np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError):
        opt.step(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError):
        opt.step(np.zeros(10)[::2], np.zeros(5))
    ro = np.zeros(5)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        opt.step(ro, np.zeros(5))
    assert opt.t == 0 and opt.state is None


# --- (e) an optimizer is bound to its first parameter vector -------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_used_optimizer_rejects_other_size_or_dtype(config):
    rng = np.random.default_rng(0)
    opt = _make(config)
    p = rng.normal(size=10)
    opt.step(p, _grad(rng, 10, "float64"))
    state = opt.state.copy()
    with pytest.raises(ValueError):
        opt.step(rng.normal(size=11), _grad(rng, 11, "float64"))
    with pytest.raises(ValueError):
        opt.step(rng.normal(size=9), _grad(rng, 9, "float64"))
    with pytest.raises(ValueError):
        opt.step(p.astype(np.float32), _grad(rng, 10, "float32"))
    # the failed calls changed nothing
    assert opt.t == 1
    np.testing.assert_array_equal(opt.state, state)
    opt.reset()
    assert opt.step(rng.normal(size=11), _grad(rng, 11, "float64")) is True
    assert opt.state.shape[1] == 11


def test_used_optimizer_rejects_other_model():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(16, 3)), rng.normal(size=16)
    opt = optim.Adam(lr=0.01)
    small = fastbp.Sequential([fastbp.Dense(4, activation="tanh"), fastbp.Dense(1)],
                              dtype="float64", seed=0)
    small.fit(X, y, optimizer=opt, epochs=1, verbose=0)
    big = fastbp.Sequential([fastbp.Dense(5, activation="tanh"), fastbp.Dense(1)],
                            dtype="float64", seed=0)
    with pytest.raises(ValueError):
        big.fit(X, y, optimizer=opt, epochs=1, verbose=0)
    same32 = fastbp.Sequential([fastbp.Dense(4, activation="tanh"), fastbp.Dense(1)],
                               dtype="float32", seed=0)
    with pytest.raises(ValueError):
        same32.fit(X, y, optimizer=opt, epochs=1, verbose=0)
    opt.reset()
    big.fit(X, y, optimizer=opt, epochs=1, verbose=0)
    assert opt.state.shape[1] == big.n_params


# --- (f) settings changed after the state exists (issue 13, item 1) -----------------

# (id, class, kwargs, {step before which to apply: changes}): each change
# turns on (or off and on) a state slot the first settings did not use.
CHANGES = [
    ("sgd-momentum-on", "SGD", dict(lr=0.05, dampening=0.3, weight_decay=0.02),
     {4: dict(momentum=0.8)}),
    ("sgd-nesterov-on", "SGD", dict(lr=0.05), {3: dict(momentum=0.9, nesterov=True)}),
    ("sgd-momentum-off-on", "SGD", dict(lr=0.05, momentum=0.9),
     {3: dict(momentum=0.0), 6: dict(momentum=0.5)}),
    ("adam-amsgrad-on", "Adam", dict(lr=0.01), {4: dict(amsgrad=True)}),
    ("adamw-amsgrad-off-on", "AdamW", dict(lr=0.01, amsgrad=True),
     {3: dict(amsgrad=False), 6: dict(amsgrad=True)}),
    ("rmsprop-centered-on", "RMSprop", dict(lr=0.01), {4: dict(centered=True)}),
    ("rmsprop-momentum-on", "RMSprop", dict(lr=0.01, weight_decay=0.05), {4: dict(momentum=0.9)}),
    ("rmsprop-both-on", "RMSprop", dict(lr=0.01), {3: dict(centered=True), 5: dict(momentum=0.5)}),
]


def _reference_run(cls, kwargs, changes, p, grads):
    """The reference kernels over ``grads`` with the settings changed before
    the steps named in ``changes``: a slot a change turns on starts from what
    it holds (zeros unless it was on before); SGD's buffer is created, a copy
    of that step's gradient, at the first step with momentum (as torch)."""
    kw, S, start = dict(kwargs), _initial_state(("", cls, kwargs, 0), p.size, p.dtype), 0
    for t, g in enumerate(grads, 1):
        kw.update(changes.get(t, {}))
        if cls == "SGD":
            if kw.get("momentum", 0) and not start:
                start = t
            reference.sgd_step(p, g, S[0], t, kw["lr"], kw.get("momentum", 0.0),
                               kw.get("dampening", 0.0), kw.get("nesterov", False),
                               kw.get("weight_decay", 0.0), start)
        else:
            _reference_step(("", cls, kw, 0), p, g, S, t)
    return S


@pytest.mark.parametrize("case", CHANGES, ids=[c[0] for c in CHANGES])
def test_step_after_a_setting_change_matches_reference(case):
    _, cls, kwargs, changes = case
    rng = np.random.default_rng(8)
    n = 23
    p = rng.normal(size=n)
    p_ref = p.copy()
    grads = [_grad(rng, n, "float64", zeros=0) for _ in range(8)]
    opt = getattr(optim, cls)(**kwargs)
    for t, g in enumerate(grads, 1):
        for key, value in changes.get(t, {}).items():
            setattr(opt, key, value)
        assert opt.step(p, g) is True
    S = _reference_run(cls, kwargs, changes, p_ref, grads)
    _close(p, p_ref, "float64", "params")
    _close(opt.state, S[:_n_slots(("", cls, kwargs, 0))], "float64", "state")


class _ChangeAt:
    """Callback: apply ``changes[epoch]`` to the optimizer before that epoch."""

    def __init__(self, changes):
        self.changes = changes

    def on_epoch_begin(self, net, epoch):
        for key, value in self.changes.get(epoch, {}).items():
            setattr(net.optimizer, key, value)


CHILD_CHANGES = """
import numpy as np, fastbp, sys
sys.path.insert(0, {tests!r})
from test_optim import CHANGES, _ChangeAt
X = np.random.default_rng(0).normal(size=(30, 4))
y = np.random.default_rng(1).integers(0, 3, 30)
kw = dict(loss="cross_entropy", batch_size=10, shuffle=False, verbose=0)
for name, cls, kwargs, changes in CHANGES:
    def net():
        return fastbp.Sequential([fastbp.Dense(5, activation="tanh"), fastbp.Dense(3)],
                                 dtype="float64", seed=0)
    # one step per epoch (full batch): the change lands before the step it names
    a = net()
    opt = getattr(fastbp.optim, cls)(**kwargs)
    a.fit(X, y, optimizer=opt, epochs=1, **dict(kw, batch_size=None))
    for e in range(2, 9):  # between fits
        _ChangeAt(changes).on_epoch_begin(a, e)
        a.fit(X, y, epochs=1, **dict(kw, batch_size=None))
    b = net()  # from a callback, within one fit
    b.fit(X, y, optimizer=getattr(fastbp.optim, cls)(**kwargs), epochs=8,
          callbacks=[_ChangeAt(changes)], **dict(kw, batch_size=None))
    assert np.isfinite(a.params).all() and a.optimizer.t == b.optimizer.t == 8, name
    assert a.params.tobytes() == b.params.tobytes(), name
    assert a.optimizer.state.tobytes() == b.optimizer.state.tobytes(), name
    # and with several steps per engine call (3 batches per epoch)
    c = net()
    c.fit(X, y, optimizer=getattr(fastbp.optim, cls)(**kwargs), epochs=8,
          callbacks=[_ChangeAt(changes)], **kw)
    assert np.isfinite(c.params).all(), name
print("ok", len(CHANGES))
"""


def test_setting_changes_after_state_exists_never_crash_and_paths_agree():
    """The engine path: a slot-using setting turned on between fits or from a
    callback (once segfaulted: the kernel wrote past the state).  Run in a
    subprocess so a crash is reported, not fatal; between fits and from a
    callback give the same bits."""
    import os
    import subprocess
    import sys

    code = CHILD_CHANGES.format(tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.split() == ["ok", str(len(CHANGES))]


BAD_SETTINGS = [
    ("SGD", "momentum", np.array([0.9, 0.5])), ("SGD", "momentum", -0.5),
    ("SGD", "momentum", True), ("SGD", "momentum", float("nan")), ("SGD", "momentum", "0.9"),
    ("SGD", "momentum", None), ("SGD", "momentum", 10 ** 400), ("SGD", "nesterov", "yes"),
    ("SGD", "nesterov", np.array([True, False])), ("SGD", "dampening", 2.0),
    ("Adam", "amsgrad", "yes"), ("Adam", "amsgrad", 2), ("Adam", "amsgrad", np.array([1, 0])),
    ("Adam", "betas", 0.9), ("Adam", "betas", (0.9, 1.0)), ("Adam", "betas", (0.9, 0.99, 0.9)),
    ("Adam", "lr", np.inf), ("AdamW", "weight_decay", -1.0),
    ("RMSprop", "centered", None), ("RMSprop", "momentum", np.array([0.9])),
    ("RMSprop", "alpha", -0.1), ("Rprop", "etas", (1.2, 0.5)), ("Rprop", "step_sizes", 5),
    ("Adagrad", "lr_decay", -1.0), ("Adagrad", "eps", "x"),
]


@pytest.mark.parametrize("cls,name,value", BAD_SETTINGS,
                         ids=[f"{c}-{n}-{i}" for i, (c, n, _) in enumerate(BAD_SETTINGS)])
def test_invalid_setting_made_after_construction_raises_before_any_update(cls, name, value):
    """Through step() and through fit: ValueError naming the setting, and
    nothing changed (parameters, state, step count)."""
    rng = np.random.default_rng(2)
    opt = getattr(optim, cls)()
    p = rng.normal(size=7)
    opt.step(p, rng.normal(size=7))
    before = (p.copy(), opt.state.copy(), opt.t)
    setattr(opt, name, value)
    with pytest.raises(ValueError, match="invalid"):
        opt.step(p, rng.normal(size=7))
    np.testing.assert_array_equal(p, before[0])
    np.testing.assert_array_equal(opt.state, before[1])
    assert opt.t == before[2]
    X, y = rng.normal(size=(12, 3)), rng.normal(size=12)
    net = fastbp.Sequential([fastbp.Dense(1)], dtype="float64", seed=0)
    fresh = getattr(optim, cls)()
    net.fit(X, y, optimizer=fresh, verbose=0)
    params = net.params.copy()
    setattr(fresh, name, value)
    with pytest.raises(ValueError, match="invalid"):
        net.fit(X, y, verbose=0)
    np.testing.assert_array_equal(net.params, params)


@pytest.mark.parametrize("value", [2 ** 63 - 1, 2 ** 53, -1, 1.5, True, "3"])
def test_invalid_step_count_raises(value):
    opt = optim.Adam()
    p = np.zeros(4)
    opt.step(p, np.ones(4))
    opt.t = value
    with pytest.raises(ValueError, match="step count"):
        opt.step(p, np.ones(4))
    np.testing.assert_array_equal(opt.state[:, 0] != 0, [True, True, False])


def test_replaced_state_with_too_few_slots_is_refused():
    """A state the kernel would read past (fewer slots, another layout) never
    reaches compiled code."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(12, 3)), rng.normal(size=12)
    net = fastbp.Sequential([fastbp.Dense(1)], dtype="float64", seed=0)
    opt = optim.Adam(amsgrad=True)
    net.fit(X, y, optimizer=opt, verbose=0)
    for bad in (opt.state[:2].copy(), np.asfortranarray(opt.state), opt.state[:, ::1][:, :-1],
                np.zeros((3, net.n_params), dtype=np.float32), [[0.0] * net.n_params] * 3):
        opt.state = bad
        with pytest.raises(ValueError):
            net.fit(X, y, verbose=0)
        with pytest.raises(ValueError):
            opt.step(net.params.copy(), np.ones(net.n_params))


def test_slots_are_declared_once_and_match_the_kernels():
    """SPECS (fastbp._numba.optim) names each kernel's slots, step count and
    hyperparameters in the order of the kernel's own arguments; every
    optimizer sizes its state and packs its hyperparameters from it."""
    import inspect

    from fastbp._numba import optim as kernels
    from fastbp.sklearn import _SklearnAdam, _SklearnSGD

    for name, spec in SPECS.items():
        args = list(inspect.signature(getattr(kernels, name + "_step").py_func).parameters)
        assert args == ["p", "g", *spec.slots, *(["t"] if spec.uses_step else []), *spec.hyper]
    classes = [optim.SGD, optim.Adam, optim.AdamW, optim.RMSprop, optim.Rprop, optim.Adagrad,
               _SklearnSGD, _SklearnAdam]
    for cls in classes:
        opt = cls()
        spec = SPECS[opt.kernel]
        assert opt._n_slots() == len(spec.slots)
        assert opt._bind(5, "float64").shape == (len(spec.slots), 5)
        assert opt._hyper().shape == (len(spec.hyper),)


def test_optimizer_settings_script_finds_no_failure():
    """A few trials of tests/adversarial/optimizer_settings.py (the full run is
    its own command): hostile settings changed after the state exists, in
    child processes with glibc's heap checks on."""
    optimizer_settings = adversarial("optimizer_settings")
    counts, failures = optimizer_settings.run(trials=150, seed=5)
    assert not failures, failures[:10]
    assert sum(counts.values()) == 150 and counts.get("ok", 0) > 20
    assert counts.get("ValueError", 0) > 20


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernels_finiteness_flag_agrees_with_isfinite(dtype):
    """or_nonfinite / all_finite (the kernels' return value) on every kind of
    value: zeros, subnormals, the extremes, infinities, NaNs of any sign and
    payload, and random bit patterns."""
    from numba import njit

    from fastbp._numba.optim import all_finite, no_nonfinite, or_nonfinite

    @njit
    def flags(x):
        out = np.empty(x.shape[0], dtype=np.bool_)
        for i in range(x.shape[0]):
            out[i] = all_finite(or_nonfinite(no_nonfinite(x[0]), x[i]))
        return out

    @njit
    def whole(x):
        acc = no_nonfinite(x[0])
        for i in range(x.shape[0]):
            acc = or_nonfinite(acc, x[i])
        return all_finite(acc)

    info = np.finfo(dtype)
    uint = np.uint32 if dtype == "float32" else np.uint64
    special = np.array([0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal,
                        info.tiny, info.max, -info.max, np.inf, -np.inf, np.nan, -np.nan,
                        1.0, -3.5], dtype=dtype)
    rng = np.random.default_rng(0)
    bits = rng.integers(0, np.iinfo(uint).max, size=200_000, dtype=uint, endpoint=True)
    # the exponent field all ones (inf, NaN payloads) and all zeros (subnormals)
    exp = uint(((1 << info.nexp) - 1) << info.nmant)
    bits[::4] |= exp
    bits[1::4] &= ~exp
    x = np.concatenate([special, bits.view(dtype)])
    np.testing.assert_array_equal(flags(x), np.isfinite(x))
    for v in special:
        arr = np.full(37, 1.0, dtype=dtype)
        arr[rng.integers(37)] = v
        assert whole(arr) == bool(np.isfinite(v)), v


def test_sk_adam_reports_a_float32_overflow():
    """scikit-learn's Adam computes its update in float64: an update that is
    finite there but beyond float32's range leaves an inf in float32
    parameters, and the kernel must say so (it checked the float64 value,
    and said all was finite)."""
    from fastbp._numba.optim import sk_adam_step

    p = np.array([-3.0e38, 1.0], dtype=np.float32)
    g = np.array([1.0, 1.0], dtype=np.float32)
    m, v = np.zeros(2, np.float32), np.zeros(2, np.float32)
    p_ref, m_ref, v_ref = p.copy(), m.copy(), v.copy()
    with np.errstate(over="ignore"):
        assert sk_adam_step(p, g, m, v, 1, 1e38, 0.9, 0.999, 1e-8) is False
        reference.sk_adam_step(p_ref, g, m_ref, v_ref, 1, 1e38, 0.9, 0.999, 1e-8)
    assert p[0] == -np.inf
    np.testing.assert_array_equal(p, p_ref)


@pytest.mark.parametrize("kernel", ["adam", "sk_adam"])
def test_bias_corrections_are_pythons_to_the_last_bit(kernel):
    """Adam's bias corrections are computed in Python by torch.optim, by
    scikit-learn and by the reference: beta ** t and (1 - beta2 ** t) ** 0.5
    with the C library's pow.  The kernels must give the same bits in
    float64 at every step (Numba's x ** t by repeated multiplication and
    ** 0.5 as sqrt differed in the last bit from t = 4 on)."""
    from fastbp._numba import optim as kernels

    rng = np.random.default_rng(3)
    n = 8
    p = rng.standard_normal(n)
    m, v, vmax = np.zeros(n), np.zeros(n), np.zeros(n)
    ours = [p.copy(), m.copy(), v.copy(), vmax.copy()]
    for t in range(1, 3001):
        g = rng.standard_normal(n)
        if kernel == "adam":
            args = (t, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False)
            kernels.adam_step(ours[0], g, ours[1], ours[2], ours[3], *args)
            reference.adam_step(p, g, m, v, vmax, *args)
        else:
            args = (t, 1e-3, 0.9, 0.999, 1e-8)
            kernels.sk_adam_step(ours[0], g, ours[1], ours[2], *args)
            reference.sk_adam_step(p, g, m, v, *args)
        assert np.array_equal(ours[0], p), f"step {t}: {ours[0] - p}"


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop", "rprop", "adagrad", "sk_sgd",
                                  "sk_adam"])
@pytest.mark.parametrize("short", ["g", "a slot"])
def test_kernels_called_from_python_refuse_short_arrays(name, short):
    """The update kernels are Python-callable (fastbp._numba.optim); a short
    gradient or state slot was written past (a segfault or heap
    corruption)."""
    from fastbp._numba import optim as kernels
    spec = kernels.SPECS[name]
    n = 1000
    p = np.ones(n)
    g = np.ones(3 if short == "g" else n)
    slots = [np.ones(n) for _ in spec.slots]
    if short == "a slot":
        slots[-1] = np.ones(1)
    args = [p, g, *slots] + ([2] if spec.uses_step else [])
    args += [False if h in spec.flags else 0.1 for h in spec.hyper]
    before = p.copy()
    with pytest.raises(ValueError, match="as long as its parameters"):
        kernels.step_function(name)(*args)
    assert np.array_equal(p, before)
