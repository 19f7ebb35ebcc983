"""Levenberg-Marquardt (fastbp.lm, fastbp.optim.LevenbergMarquardt).

The Jacobian products are held against an explicit Jacobian from central
finite differences of the residuals and against the compiled engine's
gradient; the mu schedule against closed-form steps on a linear model (where
J is [X, 1] exactly), with the error evaluation instrumented to force
rejections; the fit protocol (history, validation, callbacks, frozen layers,
float32, refusals) through ``Sequential.fit``.
"""
import subprocess
import sys

import numpy as np
import pytest

import fastbp
from fastbp import lm, optim
from fastbp._loop import Solver
from fastbp.optim import LevenbergMarquardt
from fastbp.reference import forward_all


def _net(dtype="float64", seed=0, frozen=False, n_features=4):
    """tanh -> sigmoid -> identity, 3 outputs; the middle layer optionally frozen."""
    net = fastbp.Sequential([fastbp.Dense(5, activation="tanh"),
                             fastbp.Dense(4, activation="sigmoid", trainable=not frozen),
                             fastbp.Dense(3)], dtype=dtype, seed=seed)
    return net.build(n_features)


def _data(rng, n=23, d=4, k=3):
    X = rng.normal(size=(n, d))
    Y = np.stack([np.sin(X[:, 0]), X[:, 1] * X[:, 2], np.tanh(X[:, 3])], axis=1)[:, :k]
    return X, Y


def _fd_jacobian(program, params, X, Y, index, h=1e-6):
    """Central differences of the residuals Z - Y (raveled) w.r.t. params[index]."""
    def residuals(p):
        return (forward_all(program, X, p)[0][-1] - Y).ravel()

    J = np.empty((Y.size, index.size))
    for c, i in enumerate(index):
        up, down = params.copy(), params.copy()
        up[i] += h
        down[i] -= h
        J[:, c] = (residuals(up) - residuals(down)) / (2 * h)
    return J, residuals(params)


def _rel(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


# -- the Jacobian ------------------------------------------------------------------

@pytest.mark.parametrize("frozen", [False, True], ids=["all-trainable", "middle-frozen"])
def test_normal_equations_match_finite_difference_jacobian(rng, frozen):
    net = _net(frozen=frozen)
    X, Y = _data(rng)
    program, params = net._program, net.params.copy()
    cols, index = lm.trainable_columns(program)
    assert index.size == net.n_params - (5 * 4 + 4 if frozen else 0)
    J_fd, e = _fd_jacobian(program, params, X, Y, index)
    ones = np.ones(X.shape[0])
    A, g, error = lm.normal_equations(program, params, X, Y, ones, cols, index.size, 1000)
    assert _rel(A, J_fd.T @ J_fd) < 1e-6
    assert _rel(g, J_fd.T @ e) < 1e-6
    assert error == pytest.approx(float(e @ e), rel=1e-12)
    # the explicit J itself, row (i, j) = d e_ij / d theta
    J, e2 = lm.jacobian(program, params, X, Y, cols, index.size)
    assert _rel(J, J_fd) < 1e-6
    np.testing.assert_allclose(e2, e, rtol=0, atol=1e-14)


def test_block_accumulation_equals_one_block(rng):
    net = _net()
    X, Y = _data(rng, n=37)
    program, params = net._program, net.params.copy()
    cols, index = lm.trainable_columns(program)
    sw = np.sqrt(rng.uniform(0.5, 2.0, size=X.shape[0]))
    whole = lm.normal_equations(program, params, X, Y, sw, cols, index.size, X.shape[0])
    for rows in (1, 2, 5, 36):
        blocks = lm.normal_equations(program, params, X, Y, sw, cols, index.size, rows)
        assert _rel(blocks[0], whole[0]) < 1e-13, rows
        assert _rel(blocks[1], whole[1]) < 1e-13, rows
        assert blocks[2] == pytest.approx(whole[2], rel=1e-13), rows


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_jte_is_scaled_mse_gradient_of_compiled_engine(rng, weighted):
    net = _net(frozen=True)
    X, Y = _data(rng, n=31)
    w = rng.uniform(0.2, 3.0, size=X.shape[0]) if weighted else np.ones(X.shape[0])
    cols, index = lm.trainable_columns(net._program)
    _, g, error = lm.normal_equations(net._program, net.params.copy(), X, Y, np.sqrt(w), cols,
                                      index.size, 8)
    loss, grad = net.loss_and_grad(X, Y, loss="mse", sample_weight=w if weighted else None)
    scale = w.sum() * Y.shape[1] / 2  # mse gradient = 2 J^T (w e) / (k sum w)
    assert _rel(g, scale * grad[index]) < 1e-10
    assert error / (2 * scale) == pytest.approx(loss, rel=1e-10)
    # frozen parameters have no column, and the engine's gradient there is 0
    assert np.all(grad[np.setdiff1d(np.arange(net.n_params), index)] == 0)


# -- the mu schedule on a linear model ------------------------------------------------
# One identity Dense layer: e = X W + b - Y is linear in theta = [W, b], J is
# [x_i, 1] per output, so every LM step has a closed form.

def _linear(rng, n=40, d=3, dtype="float64"):
    net = fastbp.Sequential([fastbp.Dense(1)], dtype=dtype, seed=1).build(d)
    X = rng.normal(size=(n, d))
    y = X @ np.array([0.5, -1.0, 2.0]) + 0.3 + 0.01 * rng.normal(size=n)
    return net, X, y[:, None]


def _closed_form_step(net, X, Y, mu):
    theta = net.params.astype(np.float64)
    Z = X @ theta[:-1, None] + theta[-1]
    J = np.hstack([X, np.ones((X.shape[0], 1))])
    e = (Z - Y).ravel()
    return theta - np.linalg.solve(J.T @ J + mu * np.eye(theta.size), J.T @ e)


def test_accepted_step_is_the_damped_gauss_newton_step_and_divides_mu(rng):
    net, X, Y = _linear(rng)
    opt = LevenbergMarquardt()
    expected = _closed_form_step(net, X, Y, 1e-3)
    before = net.evaluate(X, Y)
    net.fit(X, Y, optimizer=opt, epochs=1, verbose=0)
    np.testing.assert_allclose(net.params, expected, rtol=1e-10, atol=1e-12)
    assert opt.mu == 1e-3 * 0.1 and opt.t == 1
    assert net.history["loss"][0] < before
    assert net.history["loss"][0] == pytest.approx(net.evaluate(X, Y), rel=1e-12)


class _CountingError:
    """Instrumented ``fastbp.lm.sum_squared_error``: the first len(fake)
    calls return the given (bad) values, the later ones the true error."""

    def __init__(self, fake):
        self.fake, self.calls, self.real = list(fake), 0, lm.sum_squared_error

    def __call__(self, *args):
        self.calls += 1
        if self.calls <= len(self.fake):
            return self.fake[self.calls - 1]
        return self.real(*args)


def test_rejected_steps_multiply_mu_by_mu_inc(rng, monkeypatch):
    net, X, Y = _linear(rng)
    # two rejections (a NaN and an infinite error: never accepted), then accept
    counter = _CountingError([np.nan, np.inf])
    monkeypatch.setattr(lm, "sum_squared_error", counter)
    opt = LevenbergMarquardt(mu=1e-3, mu_inc=10.0, mu_dec=0.1)
    expected = _closed_form_step(net, X, Y, 1e-3 * 10 * 10)
    net.fit(X, Y, optimizer=opt, epochs=1, verbose=0)
    assert counter.calls == 3
    np.testing.assert_allclose(net.params, expected, rtol=1e-10, atol=1e-12)
    assert opt.mu == pytest.approx(1e-3 * 10 * 10 * 0.1, rel=1e-15)
    assert np.isfinite(net.params).all()


def test_mu_max_stops_training_and_keeps_params(rng, monkeypatch):
    net, X, Y = _linear(rng)
    counter = _CountingError([np.inf] * 100)  # no step is ever accepted
    monkeypatch.setattr(lm, "sum_squared_error", counter)
    opt = LevenbergMarquardt(mu=1e-3, mu_max=1.0)
    before = net.params.copy()
    loss0 = net.evaluate(X, Y)
    hist = net.fit(X, Y, optimizer=opt, epochs=5, verbose=0)
    assert counter.calls == 4  # mu = 1e-3, 1e-2, 1e-1, 1; then 10 > mu_max
    assert hist.n_epochs == 1 and hist.stop_reason and "mu_max" in hist.stop_reason
    assert opt.mu > opt.mu_max and opt.t == 0
    np.testing.assert_array_equal(net.params, before)
    assert hist["loss"][0] == pytest.approx(loss0, rel=1e-12)
    # mu is kept: fitting again stops at once, without a trial; reset() starts over
    net.fit(X, Y, epochs=3, verbose=0)
    assert counter.calls == 4 and net.history.n_epochs == 2
    opt.reset()
    assert opt.mu == 1e-3
    monkeypatch.setattr(lm, "sum_squared_error", counter.real)
    net.fit(X, Y, epochs=2, verbose=0)
    assert net.history.n_epochs == 4 and net.history["loss"][-1] < loss0


def test_damped_step_refuses_indefinite_matrix():
    A = -np.eye(3)
    assert lm._damped_step(A, np.ones(3), 1e-3) is None  # not positive definite
    step = lm._damped_step(A, np.ones(3), 2.0)  # A + 2 I = I
    np.testing.assert_allclose(step, -np.ones(3))


# -- against Adam ------------------------------------------------------------------

def _first_below(losses, threshold):
    below = np.nonzero(np.asarray(losses) < threshold)[0]
    return int(below[0]) + 1 if below.size else None


def test_lm_beats_full_batch_adam_on_sine_regression():
    X = np.linspace(-3, 3, 200)[:, None]
    y = np.sin(X)

    def net():
        return fastbp.Sequential([fastbp.Dense(10, activation="tanh"), fastbp.Dense(1)],
                                 dtype="float64", seed=0)

    lm_net, adam_net = net(), net()
    lm_hist = lm_net.fit(X, y, optimizer=LevenbergMarquardt(), epochs=100, verbose=0)
    adam_hist = adam_net.fit(X, y, optimizer=optim.Adam(lr=1e-2), batch_size=None,
                             epochs=1000, verbose=0)
    lm_30, adam_300 = lm_hist["loss"][29], adam_hist["loss"][299]
    lm_epochs, adam_epochs = (_first_below(lm_hist["loss"], 1e-3),
                              _first_below(adam_hist["loss"], 1e-3))
    message = (f"mse: LM after 30 epochs {lm_30:.3g}, full-batch Adam(lr=1e-2) after 300 epochs "
               f"{adam_300:.3g}; epochs to mse < 1e-3: LM {lm_epochs}, Adam {adam_epochs}")
    assert lm_30 < adam_300, message
    assert lm_epochs is not None and (adam_epochs is None or lm_epochs < adam_epochs), message
    assert lm_hist["loss"][-1] < 1e-3, message
    # the recorded loss is the model's mse
    assert lm_hist["loss"][-1] == pytest.approx(lm_net.evaluate(X, y), rel=1e-12)
    # an accepted step always decreases the error
    assert np.all(np.diff(lm_hist["loss"]) <= 0), message


# -- fit protocol ------------------------------------------------------------------

class _Recorder:
    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def on_train_begin(self, net):
        self.calls.append(("train_begin",))

    def on_epoch_begin(self, net, epoch):
        self.calls.append(("epoch_begin", epoch))

    def on_epoch_end(self, net, epoch, logs):
        self.calls.append(("epoch_end", epoch, sorted(logs)))
        if epoch == self.stop_at:
            net.stop_training = True

    def on_train_end(self, net):
        self.calls.append(("train_end",))


def test_history_validation_callbacks_and_continuation(rng, capsys):
    net = _net(seed=3)
    X, Y = _data(rng, n=60)
    Xv, Yv = _data(rng, n=15)
    rec = _Recorder()
    opt = LevenbergMarquardt()
    hist = net.fit(X, Y, optimizer=opt, epochs=3, validation_data=(Xv, Yv), callbacks=[rec],
                   verbose=1)
    assert hist is net.history and hist.epoch == [1, 2, 3]
    assert set(hist.history) == {"loss", "time", "samples_per_s", "val_loss"}
    assert all(len(v) == 3 for v in hist.history.values())
    assert hist["val_loss"][-1] == pytest.approx(net.evaluate(Xv, Yv), rel=1e-12)
    keys = ["loss", "samples_per_s", "time", "val_loss"]
    assert rec.calls == [("train_begin",), ("epoch_begin", 1), ("epoch_end", 1, keys),
                         ("epoch_begin", 2), ("epoch_end", 2, keys),
                         ("epoch_begin", 3), ("epoch_end", 3, keys), ("train_end",)]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3 - loss ") and "val_loss" in lines[0]
    # continuing: same optimizer (net.optimizer), epoch numbers go on; a
    # callback's stop_training ends the fit after that epoch
    stopper = _Recorder(stop_at=5)
    net.fit(X, Y, epochs=10, callbacks=[stopper], verbose=0)
    assert net.optimizer is opt and net.history.epoch == [1, 2, 3, 4, 5]
    assert stopper.calls[-1] == ("train_end",) and ("epoch_begin", 6) not in stopper.calls
    assert len(net.history["loss"]) == 5 and len(net.history["val_loss"]) == 3


def test_block_rows_does_not_change_training(rng):
    X, Y = _data(rng, n=50)
    a, b = _net(seed=4), _net(seed=4)
    a.fit(X, Y, optimizer=LevenbergMarquardt(), epochs=4, verbose=0)
    b.fit(X, Y, optimizer=LevenbergMarquardt(block_rows=3), epochs=4, verbose=0)
    np.testing.assert_allclose(b.params, a.params, rtol=1e-9, atol=1e-12)


def test_float32_model(rng):
    net = _net(dtype="float32", seed=5)
    X, Y = _data(rng, n=80)
    hist = net.fit(X, Y, optimizer=LevenbergMarquardt(), epochs=8, verbose=0)
    assert net.params.dtype == np.float32 and np.isfinite(net.params).all()
    assert net.layers[0].W.base is not None and np.shares_memory(net.layers[0].W, net.params)
    assert hist.n_epochs == 8 and np.all(np.diff(hist["loss"]) <= 0)
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert hist["loss"][-1] == pytest.approx(net.evaluate(X, Y), rel=1e-4)
    # the recorded loss is the float64 mse of the float32 parameters as stored
    # (and of the data as the model sees it, in float32)
    X32, Y32 = (a.astype(np.float32).astype(np.float64) for a in (X, Y))
    stored = lm.sum_squared_error(net._program, net.params.astype(np.float64), X32, Y32,
                                  np.ones(X.shape[0])) / Y.size
    assert hist["loss"][-1] == pytest.approx(stored, rel=1e-13)


def test_frozen_layer_unchanged_and_sample_weights(rng):
    net = _net(frozen=True, seed=6)
    X, Y = _data(rng, n=50)
    w = rng.uniform(0.1, 2.0, size=X.shape[0])
    frozen = net.layers[1].W.copy(), net.layers[1].b.copy()
    first = net.layers[0].W.copy()
    hist = net.fit(X, Y, optimizer=LevenbergMarquardt(), epochs=5, sample_weight=w, verbose=0)
    np.testing.assert_array_equal(net.layers[1].W, frozen[0])
    np.testing.assert_array_equal(net.layers[1].b, frozen[1])
    assert not np.array_equal(net.layers[0].W, first)
    # the recorded loss is the weighted mse
    assert hist["loss"][-1] == pytest.approx(net.evaluate(X, Y, sample_weight=w), rel=1e-12)


def test_refusals(rng, tmp_path):
    X, Y = _data(rng, n=20)
    with pytest.raises(ValueError, match="mse"):
        _net().fit(X, (Y > 0).astype(float), loss="binary_cross_entropy",
                   optimizer=LevenbergMarquardt(), verbose=0)
    dropout = fastbp.Sequential([fastbp.Dense(5, activation="tanh"), fastbp.Dropout(0.2),
                                 fastbp.Dense(3)], dtype="float64", seed=0)
    with pytest.raises(ValueError, match="Dropout"):
        dropout.fit(X, Y, optimizer=LevenbergMarquardt(), verbose=0)
    penalized = fastbp.Sequential([fastbp.Dense(3, kernel_regularizer={"l2": 1e-3})],
                                  dtype="float64", seed=0)
    with pytest.raises(ValueError, match="penalties"):
        penalized.fit(X, Y, optimizer=LevenbergMarquardt(), verbose=0)
    # the mini-batch options, batch_size and shuffle included (they were
    # silently accepted, though the README said refused)
    for option in (dict(batch_size=5), dict(shuffle=True), dict(clip_norm=1.0),
                   dict(grad_norms=True), dict(n_threads=1)):
        with pytest.raises(ValueError, match=f"does not support {next(iter(option))}"):
            _net().fit(X, Y, optimizer=LevenbergMarquardt(), verbose=0, **option)
    net = fastbp.Sequential([fastbp.Dense(3, trainable=False)], dtype="float64", seed=0)
    with pytest.raises(ValueError, match="no trainable"):
        net.fit(X, Y, optimizer=LevenbergMarquardt(), verbose=0)
    # a model trained with LM cannot be saved with its optimizer
    net = _net()
    net.fit(X, Y, optimizer=LevenbergMarquardt, epochs=1, verbose=0)  # the class works too
    assert isinstance(net.optimizer, LevenbergMarquardt)
    with pytest.raises(ValueError, match="cannot save optimizer LevenbergMarquardt"):
        net.save(tmp_path / "m.fbp")
    # a solver, not an optimizer: it has no step() from a gradient (it used
    # to subclass Optimizer with a step() that only raised TypeError)
    assert not isinstance(net.optimizer, optim.Optimizer)
    assert not hasattr(net.optimizer, "step")


@pytest.mark.parametrize("kwargs", [dict(mu=0), dict(mu=-1), dict(mu=float("nan")),
                                    dict(mu_dec=1.0), dict(mu_dec=0), dict(mu_inc=1.0),
                                    dict(mu_max=0), dict(block_rows=0), dict(block_rows=2.5),
                                    # mu * mu_inc would overflow (mu became inf)
                                    dict(mu_max=1.7976931348623157e308), dict(mu_inc=1e9),
                                    dict(block_rows=True), dict(mu="a")])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        LevenbergMarquardt(**kwargs)


def test_config_and_exports():
    opt = LevenbergMarquardt(mu=0.01, mu_dec=0.2, mu_inc=5, mu_max=1e8, block_rows=64)
    config = opt.get_config()
    assert config == {"mu": 0.01, "mu_dec": 0.2, "mu_inc": 5.0, "mu_max": 1e8, "block_rows": 64}
    assert LevenbergMarquardt(**config).get_config() == config
    opt.mu = 3.0
    assert opt.get_config()["mu"] == 0.01 and "LevenbergMarquardt(mu=0.01" in repr(opt)
    assert LevenbergMarquardt.full_batch_solver is True and LevenbergMarquardt.kernel is None
    assert "LevenbergMarquardt" in optim.__all__ and optim.LevenbergMarquardt is lm.LevenbergMarquardt
    # a full-batch Solver that fit accepts, not an Optimizer subclass
    assert isinstance(opt, Solver) and not isinstance(opt, optim.Optimizer)


def test_import_order(tmp_path):
    """fastbp.optim imports fastbp.lm (for the name
    fastbp.optim.LevenbergMarquardt): importing fastbp.lm first, in a fresh interpreter, works too.  (Run from
    an empty folder so the installed package is imported, not the sources.)"""
    subprocess.run([sys.executable, "-c", "import fastbp.lm, fastbp.optim; "
                    "assert fastbp.optim.LevenbergMarquardt is fastbp.lm.LevenbergMarquardt"],
                   check=True, cwd=tmp_path)


LM_CHANGED = """
import numpy as np, fastbp
from fastbp.optim import LevenbergMarquardt
X = np.random.default_rng(0).normal(size=(50, 2))
y = np.sin(X[:, :1])
for name, value in {changes!r}:
    net = fastbp.Sequential([fastbp.Dense(4, activation="tanh"), fastbp.Dense(1)],
                            dtype="float64", seed=0)
    opt = LevenbergMarquardt()
    net.fit(X, y, loss="mse", optimizer=opt, epochs=2, verbose=0)
    setattr(opt, name, value)
    try:
        net.fit(X, y, loss="mse", epochs=300, verbose=0)
    except ValueError as exc:
        assert name in str(exc), exc
        print("refused", name)
"""


def test_settings_changed_after_construction_are_checked_before_each_iteration():
    """mu_inc <= 1 or mu = 0 set on the object made the damping loop spin
    forever once no step was accepted (issue 13, item 1: every optimizer's
    settings are checked again before it runs).  In a subprocess with a
    timeout, since the failure was a hang."""
    import subprocess
    import sys

    changes = [("mu_inc", 1.0), ("mu_inc", 0.5), ("mu", 0.0), ("mu_dec", 1.0),
               ("mu_max", -1.0)]
    try:
        proc = subprocess.run([sys.executable, "-P", "-c", LM_CHANGED.format(changes=changes)],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a fit with an invalid setting did not end (the damping loop spun)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:-1] == [f"refused {name}" for name, _ in changes]


@pytest.mark.parametrize("on_divergence", ["raise", "warn"])
def test_non_finite_error_is_a_divergence_not_an_inf_loss(rng, on_divergence):
    """Targets of 1e160 make every squared residual overflow float64: LM
    used to record loss=inf in the history and stop as if at a minimum.
    Now it stops as Sequential.fit does on a non-finite loss: nothing
    recorded, parameters unchanged, DivergenceError (or a warning), and
    on_train_end still called."""
    net = _net(seed=1)
    X, Y = _data(rng)
    before = net.params.copy()
    rec = _Recorder()
    fit = dict(optimizer=LevenbergMarquardt(), epochs=3, verbose=0, callbacks=[rec],
               on_divergence=on_divergence)
    if on_divergence == "raise":
        with pytest.raises(fastbp.DivergenceError, match="Levenberg-Marquardt diverged at "
                                                         "epoch 1") as info:
            net.fit(X, Y * 1e160, **fit)
        assert info.value.epoch == 1
    else:
        with pytest.warns(RuntimeWarning, match="NaN or infinite"):
            net.fit(X, Y * 1e160, **fit)
    assert net.history.n_epochs == 0
    assert "diverged" in net.history.stop_reason
    np.testing.assert_array_equal(net.params, before)
    assert rec.calls == [("train_begin",), ("epoch_begin", 1), ("train_end",)]


@pytest.mark.parametrize("value", [None, "sgd", optim.SGD(lr=0.01)])
def test_replacing_the_solver_from_a_callback_is_refused(rng, value):
    """It was ignored: the fit went on with Levenberg-Marquardt."""
    X, Y = _data(rng, n=20)

    class Swap(fastbp.callbacks.Callback):
        def on_epoch_end(self, net, epoch, logs):
            net.optimizer = value
    net = _net()
    with pytest.raises(ValueError, match="cannot change solvers"):
        net.fit(X, Y, optimizer=LevenbergMarquardt(), epochs=3, verbose=0, callbacks=[Swap()])
    assert net.history.n_epochs == 1


def test_ctrl_c_during_a_long_search_for_a_step_drops_the_iteration(rng):
    """With mu_inc just above 1 at a minimum, one iteration tries steps for
    hours, and Ctrl-C was held to its end. Now a Ctrl-C while rejected steps
    go on drops the iteration: the model and mu as it began, so that
    fitting again redoes it."""
    import os
    import signal
    import threading
    import time

    X, Y = _data(rng, n=20)
    net = _net()
    opt = LevenbergMarquardt(mu_inc=1.0000001, mu_max=1e300)
    opt.mu = 1e200   # every step this damped is far too small to lower the error
    before, t_before = net.params.copy(), opt.t
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    start = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            net.fit(X, Y, optimizer=opt, epochs=1, verbose=0)
    finally:
        timer.cancel()
    assert time.perf_counter() - start < 30
    np.testing.assert_array_equal(net.params, before)
    assert opt.mu == 1e200 and opt.t == t_before and net.history.n_epochs == 0
