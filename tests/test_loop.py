"""fastbp._loop: the one epoch loop of Sequential.fit (mini-batch optimizers
and Levenberg-Marquardt) and of the estimators' sgd/adam solvers, and its
contract: once training has begun, the end (``on_train_end`` of every
callback that began; an estimator's copy of the weights into ``coefs_``)
runs exactly once, however the fit ends: all epochs, a stop, a divergence,
Ctrl-C within or after an epoch, an exception, Ctrl-C during the end."""
import signal
import warnings

import numpy as np
import pytest

import fastbp
from fastbp import _loop
from fastbp import _sklearn_stochastic as fsk
from fastbp.callbacks import Callback
from fastbp.lm import LevenbergMarquardt

from helpers import adversarial


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    return X, np.sin(X @ np.array([1.0, -2.0, 0.5]))[:, None]


def _net():
    return fastbp.Sequential([fastbp.Dense(6, activation="tanh"), fastbp.Dense(1)],
                             dtype="float64", seed=0)


class Ends(Callback):
    """Counts its hooks; ``act`` maps a hook name to what it does then
    (after counting): "sigint" presses Ctrl-C, "stop" sets stop_training,
    "raise" raises RuntimeError, "nan_lr" breaks the optimizer."""

    def __init__(self, **act):
        self.act = act
        self.calls = {"on_train_begin": 0, "on_train_end": 0, "ended_fully": 0}

    def _hook(self, name, net):
        self.calls[name] = self.calls.get(name, 0) + 1
        what = self.act.get(name)
        if what == "sigint":
            signal.raise_signal(signal.SIGINT)
        elif what == "stop":
            net.stop_training = True
        elif what == "raise":
            raise RuntimeError(f"from {name}")
        elif what == "nan_lr":
            if isinstance(net.optimizer, LevenbergMarquardt):
                net.optimizer.mu = -1.0
            else:
                net.optimizer.lr = float("nan")

    def on_train_begin(self, net):
        self._hook("on_train_begin", net)

    def on_epoch_end(self, net, epoch, logs):
        self._hook("on_epoch_end", net)

    def on_batches_end(self, net, epoch, batch):
        if batch < net.fit_params["n_batches"]:
            self._hook("on_batches_end", net)

    def on_train_end(self, net):
        self._hook("on_train_end", net)
        self.calls["ended_fully"] += 1  # reached when the hook was not cut short


def _optimizer(kind):
    return LevenbergMarquardt() if kind == "lm" else fastbp.optim.Adam(lr=1e-2)


# (what the callback does, what fit raises or None, the kinds it applies to)
PATHS = {
    "all epochs": ({}, None),
    "a callback stops": ({"on_epoch_end": "stop"}, None),
    "Ctrl-C after an epoch": ({"on_epoch_end": "sigint"}, KeyboardInterrupt),
    "an exception in a hook": ({"on_epoch_end": "raise"}, RuntimeError),
    "invalid hyperparameters": ({"on_epoch_end": "nan_lr"}, ValueError),
    "Ctrl-C during on_train_end": ({"on_train_end": "sigint"}, KeyboardInterrupt),
    "Ctrl-C during on_train_begin": ({"on_train_begin": "sigint"}, KeyboardInterrupt),
}


@pytest.mark.parametrize("kind", ["minibatch", "lm"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_on_train_end_runs_once_on_every_path(kind, path):
    act, raises = PATHS[path]
    X, Y = _data()
    spy, other = Ends(**act), Ends()
    fit = dict(loss="mse", optimizer=_optimizer(kind), epochs=4, verbose=0,
               callbacks=[spy, other])
    if kind == "minibatch":
        fit["batch_size"] = 8
    net = _net()
    if raises is None:
        net.fit(X, Y, **fit)
    else:
        with pytest.raises(raises):
            net.fit(X, Y, **fit)
    for callback in (spy, other):
        assert callback.calls["on_train_begin"] == 1
        assert callback.calls["on_train_end"] == 1, path
        # a Ctrl-C during on_train_end waits for it: no hook is cut short
        assert callback.calls["ended_fully"] == 1, path
    if raises is KeyboardInterrupt:
        assert net.history.stopped_by == "interrupt", path
    if path == "Ctrl-C during on_train_begin":
        # held until the first call boundary: the mini-batch fit stops before
        # its first batch, LM after its first iteration
        assert net.history.n_epochs == (1 if kind == "lm" else 0)


def test_on_train_end_runs_once_after_ctrl_c_within_an_epoch():
    X, Y = _data()
    spy, other = Ends(on_batches_end="sigint"), Ends()
    net = _net()
    with pytest.raises(KeyboardInterrupt, match="before batch 2 of epoch 1"):
        net.fit(X, Y, loss="mse", batch_size=8, epochs=3, verbose=0, callbacks=[spy, other])
    assert net._position is not None and net._position["batch"] == 1
    assert [c.calls["on_train_end"] for c in (spy, other)] == [1, 1]


@pytest.mark.parametrize("kind", ["minibatch", "lm"])
@pytest.mark.parametrize("on_divergence", ["raise", "warn"])
def test_on_train_end_runs_once_after_a_divergence(kind, on_divergence):
    X, Y = _data()
    opt = LevenbergMarquardt() if kind == "lm" else fastbp.optim.SGD(lr=1e6)
    spy = Ends()
    fit = dict(loss="mse", optimizer=opt, epochs=50, verbose=0, callbacks=[spy],
               on_divergence=on_divergence)
    Y = Y * 1e160 if kind == "lm" else Y * 1e3
    if on_divergence == "raise":
        with pytest.raises(fastbp.DivergenceError):
            _net().fit(X, Y, **fit)
    else:
        with pytest.warns(RuntimeWarning, match="diverged") as record:
            _net().fit(X, Y, **fit)
        # the warning points at the caller of fit, not into fastbp
        assert record[0].filename == __file__
    assert spy.calls["on_train_end"] == 1


def test_levenberg_marquardt_without_progress_ends_once():
    X, Y = _data()
    spy = Ends()
    net = _net()
    net.fit(X, Y, optimizer=LevenbergMarquardt(mu=10.0, mu_max=1.0), epochs=5, verbose=0,
            callbacks=[spy])
    assert net.history.stopped_by == "no_progress" and net.history.n_epochs == 1
    assert spy.calls["on_train_end"] == 1


@pytest.mark.parametrize("kind", ["minibatch", "lm"])
def test_a_failing_on_train_begin_ends_the_callbacks_that_began(kind):
    # The callbacks before the one that raised began: each gets on_train_end
    # once (it used to get none, and e.g. a ProgressBar stayed open); the
    # one that raised and those after it never began and get none.
    X, Y = _data()
    first, failing, last = Ends(), Ends(on_train_begin="raise"), Ends()
    with pytest.raises(RuntimeError, match="from on_train_begin"):
        _net().fit(X, Y, loss="mse", optimizer=_optimizer(kind), epochs=2, verbose=0,
                   callbacks=[first, failing, last])
    assert [c.calls["on_train_end"] for c in (first, failing, last)] == [1, 0, 0]
    assert last.calls["on_train_begin"] == 0


@pytest.mark.parametrize("kind", ["minibatch", "lm"])
def test_a_failing_on_train_end_does_not_skip_the_others(kind):
    # Each callback's on_train_end runs even when an earlier one raises
    # (it used to stop at the first); the first exception propagates.
    X, Y = _data()
    failing, other = Ends(on_train_end="raise"), Ends()
    with pytest.raises(RuntimeError, match="from on_train_end"):
        _net().fit(X, Y, loss="mse", optimizer=_optimizer(kind), epochs=2, verbose=0,
                   callbacks=[failing, other])
    assert [c.calls["on_train_end"] for c in (failing, other)] == [1, 1]
    assert other.calls["ended_fully"] == 1


# -- the estimators -------------------------------------------------------------------
@pytest.fixture
def estimator_ends(monkeypatch):
    """Counts the ends of the estimators' sgd/adam fits, and checks that each
    leaves coefs_ equal to the network's weights (the end's job)."""
    ends = []
    real = fsk._StochasticFront.end

    def end(front):
        real(front)
        ends.append([layer.W.copy() for layer in front.estimator._dense(front.net)])
    monkeypatch.setattr(fsk._StochasticFront, "end", end)
    return ends


def _regression():
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    return X, y


def _count_epochs_then(monkeypatch, after, action):
    """Make the estimators' bookkeeping do ``action`` after ``after`` epochs."""
    real = fsk._StochasticSolvers._epoch_end
    seen = []

    def epoch_end(self, *args):
        seen.append(1)
        if len(seen) == after:
            if action == "sigint":
                signal.raise_signal(signal.SIGINT)
            else:
                raise RuntimeError("from the bookkeeping")
        return real(self, *args)
    monkeypatch.setattr(fsk._StochasticSolvers, "_epoch_end", epoch_end)


@pytest.mark.parametrize("path", ["max_iter", "no improvement", "early stopping", "divergence",
                                  "divergence, early stopping", "Ctrl-C", "exception",
                                  "partial_fit"])
def test_an_estimator_fit_ends_once_on_every_path(monkeypatch, estimator_ends, path):
    X, y = _regression()
    kw = dict(hidden_layer_sizes=(5,), solver="sgd", learning_rate_init=0.01, max_iter=6,
              random_state=0)
    if path == "no improvement":
        kw.update(tol=10.0, n_iter_no_change=1)
    elif path == "early stopping":
        kw.update(early_stopping=True, tol=10.0, n_iter_no_change=1)
    elif path.startswith("divergence"):
        kw.update(hidden_layer_sizes=100, activation="identity", learning_rate_init=1.0,
                  max_iter=20, early_stopping=path.endswith("stopping"))
    elif path in ("Ctrl-C", "exception"):
        _count_epochs_then(monkeypatch, 2, "sigint" if path == "Ctrl-C" else "raise")
    est = fastbp.MLPRegressor(**kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if path == "divergence":
            with pytest.raises(ValueError, match="non-finite parameter weights"):
                est.fit(X, y)
        elif path == "exception":
            with pytest.raises(RuntimeError, match="from the bookkeeping"):
                est.fit(X, y)
        elif path == "partial_fit":
            est.partial_fit(X, y)
        else:
            est.fit(X, y)
    assert len(estimator_ends) == 1, path
    if path == "Ctrl-C":
        assert any("Training interrupted by user" in str(w.message) for w in caught)
        assert est.n_iter_ == 2  # Ctrl-C in epoch 2's bookkeeping: it finishes, then stops
    if not path.endswith("early stopping") and path != "divergence, early stopping":
        # the end copied the network's weights into coefs_
        for ours, net_W in zip(est.coefs_, estimator_ends[0]):
            np.testing.assert_array_equal(ours, net_W)


def test_solver_protocol():
    # fit accepts a Solver class or instance as optimizer=
    assert _loop.is_solver(LevenbergMarquardt) and _loop.is_solver(LevenbergMarquardt())
    assert not _loop.is_solver(fastbp.optim.Adam()) and not _loop.is_solver("adam")
    X, Y = _data()
    with pytest.raises(ValueError, match="does not support checkpoint"):
        _net().fit(X, Y, optimizer=LevenbergMarquardt(), checkpoint="x.fbp", verbose=0)


def test_a_few_adversarial_trials():
    """A few trials of tests/adversarial/fit_endings.py (the full run is its
    ``main``): random fits through each front, ended by random events, in a
    child interpreter."""
    fit_endings = adversarial("fit_endings")
    counts, ended = fit_endings.run(trials=40, seed=5)
    assert counts["trials"] == 40 and counts["passed"] == 40, counts
    assert len(ended) >= 4, ended  # several kinds of ending were tried


class _Swap(Callback):
    """Replaces net.optimizer at the end of epoch ``at``."""

    def __init__(self, at, new):
        self.at, self.new = at, new

    def on_epoch_end(self, net, epoch, logs):
        if epoch == self.at:
            net.optimizer = self.new


def test_an_optimizer_replaced_by_a_callback_takes_over_at_the_next_epoch(tmp_path):
    """A callback's ``net.optimizer = SGD(...)`` was ignored for the rest of
    the fit (the run kept the optimizer it started with), though checkpoints
    and the next fit used the new one. Now the next epoch runs it: the same
    bits as two fits, Adam then SGD, and as a run resumed from a checkpoint
    written at the swap."""
    X, Y = _data()
    new = lambda: fastbp.optim.SGD(lr=0.05, momentum=0.9)  # noqa: E731
    swapped = _net()
    swapped.fit(X, Y, epochs=4, batch_size=16, shuffle=False, verbose=0,
                callbacks=[_Swap(2, new())])
    assert isinstance(swapped.optimizer, fastbp.optim.SGD)
    assert swapped.optimizer.t == 2 * 4  # its own steps only
    two_fits = _net()
    two_fits.fit(X, Y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    two_fits.fit(X, Y, epochs=2, batch_size=16, shuffle=False, verbose=0, optimizer=new())
    assert np.array_equal(swapped.params, two_fits.params)
    # stopped right after the swap, its checkpoint resumed in a fresh model
    path = tmp_path / "ckpt.fbp"

    class Stop(Callback):
        def on_epoch_end(self, net, epoch, logs):
            net.stop_training = epoch == 2

    stopped = _net()
    stopped.fit(X, Y, epochs=4, batch_size=16, shuffle=False, verbose=0,
                callbacks=[_Swap(2, new()), Stop()], checkpoint=path)
    resumed = fastbp.load(path)
    assert resumed.history.n_epochs == 2 and isinstance(resumed.optimizer, fastbp.optim.SGD)
    resumed.fit(X, Y, epochs=2, verbose=0)  # epochs more, with the recorded settings
    assert np.array_equal(resumed.params, swapped.params)


@pytest.mark.parametrize("value", [None, "sgd", fastbp.optim.SGD, LevenbergMarquardt()])
def test_an_optimizer_replaced_by_something_else_is_refused_clearly(value):
    X, Y = _data()
    net = _net()
    with pytest.raises(ValueError, match="net.optimizer was set to .* during fit"):
        net.fit(X, Y, epochs=3, batch_size=16, verbose=0, callbacks=[_Swap(1, value)])
    assert net.history.n_epochs == 1
    if value is not None and not isinstance(value, LevenbergMarquardt):
        # the next fit names it (it failed inside with an AttributeError)
        with pytest.raises(ValueError, match="net.optimizer is .*, not an optimizer instance"):
            net.fit(X, Y, epochs=1, verbose=0)
        net.fit(X, Y, epochs=1, verbose=0, optimizer="sgd")   # passing one works


def test_a_fit_that_would_take_the_step_count_to_2_53_is_refused_before_it_runs():
    """The engine took a last call ending at t = 2**53, which every other
    check refuses: the fit "succeeded" and left a model that could not be
    saved or fitted again."""
    X, Y = _data()
    net = _net()
    opt = fastbp.optim.Adam(lr=0.01)
    net.fit(X, Y, optimizer=opt, epochs=1, batch_size=16, verbose=0)
    opt.t = 2 ** 53 - 4   # 4 batches an epoch
    before = net.params.copy()
    with pytest.raises(ValueError, match="2\\*\\*53"):
        net.fit(X, Y, epochs=1, verbose=0)
    assert np.array_equal(net.params, before) and opt.t == 2 ** 53 - 4
    opt.t = 2 ** 53 - 5
    net.fit(X, Y, epochs=1, verbose=0)
    assert opt.t == 2 ** 53 - 1



class _AtBatch(Callback):
    """Calls ``change(net)`` at the first call boundary at batch ``at`` of
    epoch ``epoch`` (checkpoint_every puts a boundary there)."""

    def __init__(self, epoch, at, change):
        self.epoch, self.at, self.change, self.done = epoch, at, change, False

    def on_batches_end(self, net, epoch, batch):
        if (epoch, batch) == (self.epoch, self.at) and not self.done:
            self.done = True
            self.change(net)


_WITHIN_EPOCH = {
    "lr": lambda net: setattr(net.optimizer, "lr", 0.05),
    "momentum": lambda net: setattr(net.optimizer, "betas", (0.5, 0.9)),
    "reset": lambda net: net.optimizer.reset(),
    "replaced": lambda net: setattr(net, "optimizer", fastbp.optim.SGD(lr=0.05, momentum=0.9)),
}


@pytest.mark.parametrize("change", list(_WITHIN_EPOCH))
def test_a_change_within_an_epoch_resumes_bitwise_from_a_checkpoint_written_then(tmp_path,
                                                                                 change):
    """A callback's change to the optimizer within an epoch (on_batches_end)
    was taken up at the next epoch, but a checkpoint (or Ctrl-C's position)
    written at that boundary already held it: the resumed run used it for
    the rest of the epoch, the uninterrupted one did not (weights 0.03-0.47
    apart). Now it takes effect at the next call into the engine, in both."""
    X, Y = _data(n=160)
    kw = dict(batch_size=8, shuffle=False, verbose=0, checkpoint_every=3)
    whole = _net()
    whole.fit(X, Y, optimizer=fastbp.optim.Adam(lr=0.01), epochs=3,
              callbacks=[_AtBatch(2, 6, _WITHIN_EPOCH[change])],
              checkpoint=tmp_path / "whole.fbp", **kw)
    path = tmp_path / "cut.fbp"

    class StopAfterSave(Callback):   # a crash after the checkpoint at (2, 6), before (2, 9)'s
        def on_batches_end(self, net, epoch, batch):
            if (epoch, batch) == (2, 9):
                raise RuntimeError("simulated crash")

    cut = _net()
    with pytest.raises(RuntimeError, match="simulated crash"):
        cut.fit(X, Y, optimizer=fastbp.optim.Adam(lr=0.01), epochs=3,
                callbacks=[_AtBatch(2, 6, _WITHIN_EPOCH[change]), StopAfterSave()],
                checkpoint=path, **kw)
    resumed = fastbp.load(path)
    assert resumed._position["batch"] == 6
    resumed.fit(X, Y, epochs=3 - resumed.history.n_epochs, verbose=0)
    np.testing.assert_array_equal(resumed.params, whole.params)


def test_a_divergence_after_a_change_within_an_epoch_rolls_back_to_its_last_finite_step(
        tmp_path):
    """The rollback replayed the epoch's finite steps from its start with
    the settings of the failing call: a learning rate raised within the
    epoch was applied to the batches before the change too. It now replays
    from where the settings last changed."""
    X, Y = _data(n=160)

    def run(n_rows, name):
        net, opt = _net(), fastbp.optim.SGD(lr=0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # the divergence's warning
            net.fit(X[:n_rows], Y[:n_rows], optimizer=opt, epochs=1, batch_size=8,
                    shuffle=False, verbose=0, on_divergence="warn", checkpoint_every=3,
                    checkpoint=tmp_path / name,
                    callbacks=[_AtBatch(1, 6, lambda n: setattr(n.optimizer, "lr", 1e300))])
        return net, opt

    net, opt = run(len(X), "a.fbp")
    steps = opt.t
    assert 6 <= steps < 20 and np.isfinite(net.params).all()
    twin, _ = run(8 * steps, "b.fbp")   # the same steps, and no divergence
    np.testing.assert_array_equal(net.params, twin.params)


def test_a_non_finite_validation_loss_is_said():
    """float32 validation data in range but overflowing the outputs: val_loss
    was recorded and printed as nan without a word (evaluate raises)."""
    X, Y = _data(n=32)
    X, Y = X.astype(np.float32), Y.astype(np.float32)
    net = fastbp.Sequential([fastbp.Dense(4), fastbp.Dense(1)], seed=0).build(3)
    net.layers[0].W[...] = 10.0   # 3 x 10 x 3.3e38: beyond float32
    with pytest.warns(RuntimeWarning, match="val_loss is (nan|inf).*overflow float32"):
        net.fit(X, Y, epochs=1, verbose=0, validation_data=(np.full((4, 3), 3.3e38,
                                                                    np.float32), Y[:4]))
    assert not np.isfinite(net.history["val_loss"][0])


@pytest.mark.parametrize("verbose", ["0", None, 3, -1, 0.5])
def test_verbose_takes_0_1_or_2_only(verbose):
    """Any truthy value printed (verbose="0" did)."""
    X, Y = _data(n=16)
    with pytest.raises(ValueError, match="verbose must be 0, 1 or 2"):
        _net().fit(X, Y, epochs=1, verbose=verbose)


def test_verbose_2_prints_a_line_an_epoch_as_1(capsys):
    X, Y = _data(n=16)
    _net().fit(X, Y, epochs=2, verbose=2)
    assert capsys.readouterr().out.count("samples/s") == 2
