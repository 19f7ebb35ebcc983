"""fastbp.history and what a fit says about how it ended (issue 16, "Progress
and history that tell the truth"): History as a mapping, ``stop_reason`` and
``stopped_by`` for every kind of stop, the line ``fit(verbose=1)`` prints
when it stops (nothing at verbose=0), and ``samples_per_s`` of an epoch
resumed part way."""
import pickle
import signal

import numpy as np
import pytest

import fastbp
import fastbp._runner as fm
from fastbp import callbacks as cb
from fastbp.optim import LevenbergMarquardt

from helpers import adversarial


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=n)
    return X, y


def _net(seed=0):
    return fastbp.Sequential([fastbp.Dense(6, activation="tanh"), fastbp.Dense(1)],
                             dtype="float64", seed=seed)


class Script(cb.Callback):
    """Overwrites logs[key] with a scripted value before the callbacks after it see it."""

    def __init__(self, key, values):
        self.key, self.values = key, list(values)

    def on_epoch_end(self, net, epoch, logs):
        logs[self.key] = self.values[epoch - 1]


def _stop_line(out):
    """The lines of ``out`` that say how a fit ended."""
    return [line for line in out.splitlines() if line.startswith(("Stopped ", "Finished "))]


# -- History as a mapping ----------------------------------------------------------------
def test_history_reads_as_metric_names_to_per_epoch_lists():
    X, y = _data()
    net = _net()
    h = net.fit(X, y, loss="mse", epochs=3, validation_data=(X, y), verbose=0)
    assert "loss" in h and "val_loss" in h and "epoch" not in h and "nope" not in h
    assert list(h.keys()) == ["loss", "time", "samples_per_s", "val_loss"]
    assert dict(h) == h.history and h["loss"] is h.history["loss"]
    # len counts epochs (rows), as a DataFrame's does and as fastbp's always
    # has: resume code written as epochs=E - len(net.history) stays right
    assert len(h) == 3 and h.n_epochs == 3 and h.epoch == [1, 2, 3]
    assert list(h) == list(h.history) and h.get("nope") is None
    assert list(h.values()) == list(h.history.values())
    assert dict(h.items())["val_loss"] == h.history["val_loss"]
    with pytest.raises(KeyError):
        h["nope"]


def test_an_empty_history_and_one_read_back_from_a_file_or_a_pickle(tmp_path):
    assert len(fastbp.History()) == 0 and fastbp.History().n_epochs == 0
    assert dict(fastbp.History()) == {} and not fastbp.History()
    X, y = _data()
    net = _net()
    net.fit(X, y, loss="mse", epochs=2, verbose=0)
    net.save(tmp_path / "m.fbp")
    for h in (fastbp.load(tmp_path / "m.fbp").history, pickle.loads(pickle.dumps(net)).history):
        assert dict(h) == dict(net.history) and h.n_epochs == 2 and "loss" in h


def test_fit_numbers_epochs_by_n_epochs_not_by_the_number_of_metrics():
    X, y = _data()
    net = _net()
    net.fit(X, y, loss="mse", epochs=2, validation_data=(X, y), verbose=0)  # 4 metrics
    net.fit(X, y, epochs=1, verbose=0)
    assert net.history.epoch == [1, 2, 3]


def test_len_of_a_history_counts_epochs_so_resume_arithmetic_holds():
    # the README's resume form before n_epochs existed: 5 - len(h) epochs more
    X, y = _data()
    net = _net()
    net.fit(X, y, loss="mse", epochs=2, validation_data=(X, y), verbose=0)  # 4 metrics
    net.fit(X, y, loss="mse", epochs=5 - len(net.history), validation_data=(X, y), verbose=0)
    assert net.history.n_epochs == 5 == len(net.history)


# -- stop_reason, stopped_by and the line at verbose=1 ------------------------------------
def _early_stopping(restore):
    X, y = _data()
    net = _net()
    es = cb.EarlyStopping(patience=2, restore_best_weights=restore)
    net.fit(X, y, loss="mse", epochs=20, validation_data=(X, y), batch_size=16, verbose=1,
            callbacks=[Script("val_loss", [0.5, 0.1234, 0.2, 0.3] + [0.0] * 16), es])
    return net, es


def test_early_stopping_with_restore_says_why_and_which_weights(capsys):
    net, es = _early_stopping(restore=True)
    h = net.history
    assert h.n_epochs == 4 and es.best_epoch == 2
    assert h.stopped_by == "early_stopping"
    assert h.stop_reason == "val_loss did not improve for 2 epochs (best 0.1234 at epoch 2)"
    assert _stop_line(capsys.readouterr().out) == [
        "Stopped at epoch 4 of 20: val_loss did not improve for 2 epochs (best 0.1234 at "
        "epoch 2); the model holds epoch 2's weights (restored by EarlyStopping)."]


def test_early_stopping_without_restore_says_the_last_epochs_weights(capsys):
    net, _ = _early_stopping(restore=False)
    assert net.history.stopped_by == "early_stopping"
    assert _stop_line(capsys.readouterr().out) == [
        "Stopped at epoch 4 of 20: val_loss did not improve for 2 epochs (best 0.1234 at "
        "epoch 2); the model holds epoch 4's weights, the last trained."]


def test_a_completed_fit_has_no_stop_reason_and_prints_no_stop_line(capsys):
    X, y = _data()
    net = _net()
    with pytest.raises(fastbp.DivergenceError):  # an earlier fit's reason is not kept
        net.fit(X, y * 1e200, loss="mse", optimizer=fastbp.optim.SGD(lr=1e3), epochs=5,
                verbose=0)
    assert net.history.stopped_by == "divergence"
    net = _net()
    net.fit(X, y, loss="mse", epochs=3, verbose=1)
    assert net.history.stop_reason is None and net.history.stopped_by is None
    out = capsys.readouterr().out
    assert "epoch 3/3" in out and _stop_line(out) == []


def test_a_completed_fit_holding_restored_weights_says_so(capsys):
    X, y = _data()
    net = _net()
    es = cb.EarlyStopping(patience=10, restore_best_weights=True)
    net.fit(X, y, loss="mse", epochs=4, validation_data=(X, y), verbose=1,
            callbacks=[Script("val_loss", [0.5, 0.25, 0.3, 0.4]), es])
    assert net.history.stop_reason is None and net.history.weights_epoch == 2
    assert _stop_line(capsys.readouterr().out) == [
        "Finished epoch 4 of 4; the model holds epoch 2's weights (best val_loss 0.25, "
        "restored by EarlyStopping)."]


class Halt(cb.Callback):
    def __init__(self, at, **attrs):
        self.at = at
        vars(self).update(attrs)

    def on_epoch_end(self, net, epoch, logs):
        if epoch == self.at:
            net.stop_training = True


@pytest.mark.parametrize("callback, kind, reason", [
    (Halt(2), "callback", "Halt set net.stop_training"),
    (Halt(2, stop_reason="my reason", stop_kind="not a kind"), "callback", "my reason"),
    (Halt(2, stop_reason="ran out", stop_kind="target"), "target", "ran out"),
    (cb.StopAtLoss(0.3), "target", "loss reached the target 0.3 (0.25)"),
    (cb.TerminateOnNaN(), "nan", "the epoch's loss is nan"),
])
@pytest.mark.parametrize("verbose", [0, 1])
def test_a_callback_stop_is_recorded_and_printed_at_verbose_1(callback, kind, reason, verbose,
                                                              capsys):
    X, y = _data()
    net = _net()
    net.fit(X, y, loss="mse", epochs=6, verbose=verbose,
            callbacks=[Script("loss", [1.0, 0.25, float("nan"), 1, 1, 1]), callback])
    stopped = 3 if kind == "nan" else 2
    assert net.history.n_epochs == stopped
    assert (net.history.stopped_by, net.history.stop_reason) == (kind, reason)
    out = capsys.readouterr().out
    expected = [f"Stopped at epoch {stopped} of 6: {reason}; the model holds epoch {stopped}'s "
                "weights, the last trained."]
    assert _stop_line(out) == (expected if verbose else [])
    if not verbose:
        assert out == ""


def test_stop_training_set_from_on_epoch_begin_is_recorded(capsys):
    class Early(cb.Callback):
        def on_epoch_begin(self, net, epoch):
            net.stop_training = True

    X, y = _data()
    net = _net()
    net.fit(X, y, loss="mse", epochs=5, verbose=0, callbacks=[Early()])
    assert net.history.n_epochs == 1 and net.history.stopped_by == "callback"
    assert net.history.stop_reason == "Early set net.stop_training"


def test_stop_on_small_update_is_recorded(capsys):
    X, y = _data()
    net = _net()
    net.fit(X, y, loss="mse", optimizer=fastbp.optim.SGD(lr=1e-12), epochs=5, verbose=1,
            callbacks=[cb.StopOnSmallUpdate(tol=1e-6)])
    assert net.history.n_epochs == 1 and net.history.stopped_by == "small_update"
    assert net.history.stop_reason.startswith("no parameter changed by tol=1e-06 or more in "
                                              "epoch 1 (largest change ")
    line, = _stop_line(capsys.readouterr().out)
    assert line.startswith("Stopped at epoch 1 of 5: no parameter changed")
    assert line.endswith("; the model holds epoch 1's weights, the last trained.")


@pytest.mark.parametrize("on_divergence", ["raise", "warn"])
@pytest.mark.parametrize("verbose", [0, 1])
def test_divergence_is_recorded_before_it_is_raised(on_divergence, verbose, capsys):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(64, 5)), rng.normal(size=(64, 3)) * 100
    net = fastbp.Sequential([fastbp.Dense(8, activation="tanh"), fastbp.Dense(3)],
                            dtype="float64", seed=0)
    fit = dict(loss="mse", optimizer=fastbp.optim.SGD(lr=100.0), epochs=500, verbose=verbose,
               on_divergence=on_divergence)
    if on_divergence == "raise":
        with pytest.raises(fastbp.DivergenceError) as info:
            net.fit(X, y, **fit)
        epoch, batch = info.value.epoch, info.value.batch
    else:
        with pytest.warns(RuntimeWarning, match="diverged"):
            net.fit(X, y, **fit)
        epoch, batch = net.history.n_epochs + 1, None
    h = net.history
    assert h.stopped_by == "divergence" and h.stop_reason.startswith("training diverged in batch")
    assert f"of epoch {epoch}: " in h.stop_reason
    if batch is not None:
        assert h.stop_reason.startswith(f"training diverged in batch {batch} of epoch {epoch}")
    lines = _stop_line(capsys.readouterr().out)
    if not verbose:
        assert lines == []
        return
    line, = lines
    assert line.startswith(f"Stopped in epoch {epoch} of 500: {h.stop_reason}; the model holds ")
    assert ("the weights of the last finite step, after batch" in line
            or f"the weights epoch {epoch} started with" in line)


def test_divergence_with_restored_best_weights_names_them(capsys):
    """on_train_end runs before the line: it names the weights EarlyStopping put back."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(64, 5)), rng.normal(size=(64, 3))
    net = fastbp.Sequential([fastbp.Dense(8, activation="tanh"), fastbp.Dense(3)],
                            dtype="float64", seed=0)

    class Explode(cb.Callback):
        def on_epoch_end(self, net, epoch, logs):
            if epoch == 4:
                net.optimizer.lr = 1e30

    es = cb.EarlyStopping(monitor="loss", patience=100, restore_best_weights=True)
    with pytest.raises(fastbp.DivergenceError):
        net.fit(X, y, loss="mse", optimizer=fastbp.optim.SGD(lr=1e-3), epochs=50,
                verbose=1, callbacks=[Explode(), es])
    assert net.history.n_epochs >= 4
    assert net.history.stopped_by == "divergence" and net.history.weights_epoch == es.best_epoch
    line, = _stop_line(capsys.readouterr().out)
    assert line.endswith(f"; the model holds epoch {es.best_epoch}'s weights (best loss "
                         f"{es.best:.4g}, restored by EarlyStopping).")


def _interrupt_after_calls(monkeypatch, calls):
    """Ctrl-C (a real SIGINT) right after the engine's ``calls``-th call, one
    batch per call: fit stops at that call boundary."""
    monkeypatch.setattr(fm, "_CALL_SECONDS", 1e-12)  # one batch per call
    real, count = fm._EpochRunner._call, []

    def call(self, first, n):
        result = real(self, first, n)
        count.append(n)
        if len(count) == calls:
            signal.raise_signal(signal.SIGINT)
        return result
    monkeypatch.setattr(fm._EpochRunner, "_call", call)


@pytest.mark.parametrize("verbose", [0, 1])
def test_ctrl_c_mid_epoch_is_recorded_then_raised(monkeypatch, capsys, verbose):
    X, y = _data()
    net = _net()
    net.fit(X, y, loss="mse", epochs=1, batch_size=16, verbose=0)
    _interrupt_after_calls(monkeypatch, 6)  # after batch 2 of 4 of epoch 3 (the 2nd fitted)
    with pytest.raises(KeyboardInterrupt):
        net.fit(X, y, epochs=5, verbose=verbose)
    h = net.history
    assert h.n_epochs == 2 and h.stopped_by == "interrupt"
    assert h.stop_reason == ("interrupted by Ctrl-C before batch 3 of epoch 3; fit again to "
                             "continue")
    expected = ["Stopped in epoch 3 of 6: interrupted by Ctrl-C before batch 3 of epoch 3; fit "
                "again to continue; the model holds the weights after batch 2 of 4 of epoch 3."]
    assert _stop_line(capsys.readouterr().out) == (expected if verbose else [])


def test_ctrl_c_at_an_epochs_end_is_recorded_then_raised(monkeypatch, capsys):
    X, y = _data()
    net = _net()
    _interrupt_after_calls(monkeypatch, 4)  # the last batch of epoch 1
    with pytest.raises(KeyboardInterrupt):
        net.fit(X, y, loss="mse", epochs=5, batch_size=16, verbose=1)
    assert net.history.n_epochs == 1 and net.history.stopped_by == "interrupt"
    assert _stop_line(capsys.readouterr().out) == [
        "Stopped at epoch 1 of 5: interrupted by Ctrl-C before batch 1 of epoch 2; fit again "
        "to continue; the model holds epoch 1's weights, the last trained."]


def test_a_keyboard_interrupt_from_a_callback_is_recorded(capsys):
    class Boom(cb.Callback):
        def on_epoch_end(self, net, epoch, logs):
            if epoch == 2:
                raise KeyboardInterrupt

    X, y = _data()
    net = _net()
    with pytest.raises(KeyboardInterrupt):
        net.fit(X, y, loss="mse", epochs=5, verbose=1, callbacks=[Boom()])
    assert net.history.stopped_by == "interrupt"
    assert net.history.stop_reason == "interrupted by Ctrl-C"
    assert _stop_line(capsys.readouterr().out) == [
        "Stopped at epoch 2 of 5: interrupted by Ctrl-C; the model holds epoch 2's weights, "
        "the last trained."]


# -- Levenberg-Marquardt follows the same rules ---------------------------------------------
def _lm_net():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 2))
    return _net(seed=1), X, np.sin(X[:, :1])


@pytest.mark.parametrize("verbose", [0, 1])
def test_levenberg_marquardt_no_progress_stop(verbose, capsys):
    net, X, Y = _lm_net()
    net.fit(X, Y, optimizer=LevenbergMarquardt(mu=10.0, mu_max=1.0), epochs=5, verbose=verbose)
    h = net.history
    assert h.n_epochs == 1 and h.stopped_by == "no_progress" and "mu_max" in h.stop_reason
    expected = [f"Stopped at epoch 1 of 5: {h.stop_reason}; the model holds epoch 1's weights "
                "(no step was accepted in it: the same as before it)."]
    assert _stop_line(capsys.readouterr().out) == (expected if verbose else [])


def test_levenberg_marquardt_callback_stop_and_divergence(capsys):
    net, X, Y = _lm_net()
    net.fit(X, Y, optimizer=LevenbergMarquardt(), epochs=5, verbose=1,
            callbacks=[cb.StopAtLoss(10.0)])
    h = net.history
    assert h.n_epochs == 1 and h.stopped_by == "target"
    assert _stop_line(capsys.readouterr().out) == [
        f"Stopped at epoch 1 of 5: {h.stop_reason}; the model holds epoch 1's weights, the "
        "last trained."]
    net.fit(X, Y, epochs=3, verbose=0)
    assert h.n_epochs == 4 and h.stop_reason is None and h.stopped_by is None
    with pytest.raises(fastbp.DivergenceError):
        net.fit(X, Y * 1e160, epochs=3, verbose=1)
    assert h.stopped_by == "divergence" and "diverged" in h.stop_reason
    assert _stop_line(capsys.readouterr().out) == [
        f"Stopped in epoch 5 of 7: {h.stop_reason}; the model holds the weights epoch 5 "
        "started with."]


def test_levenberg_marquardt_ctrl_c_is_recorded(capsys):
    class Interrupt(cb.Callback):
        def on_epoch_end(self, net, epoch, logs):
            if epoch == 2:
                signal.raise_signal(signal.SIGINT)  # deferred to the iteration's end

    net, X, Y = _lm_net()
    with pytest.raises(KeyboardInterrupt):
        net.fit(X, Y, optimizer=LevenbergMarquardt(), epochs=5, verbose=1,
                callbacks=[Interrupt()])
    h = net.history
    assert h.n_epochs == 2 and h.stopped_by == "interrupt"
    assert _stop_line(capsys.readouterr().out) == [
        "Stopped at epoch 2 of 5: interrupted by Ctrl-C after epoch 2; fit again to continue; "
        "the model holds epoch 2's weights, the last trained."]


# -- samples_per_s of a resumed epoch ---------------------------------------------------------
def test_samples_per_s_of_a_resumed_epoch_counts_the_samples_run(monkeypatch):
    """An epoch interrupted after 3 of its 4 batches and resumed runs 16 rows
    in the resumed fit: its rate is 16 rows / its time, not 64 / its time."""
    X, y = _data()
    net = _net()
    _interrupt_after_calls(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        net.fit(X, y, loss="mse", epochs=2, batch_size=16, verbose=0)
    assert net._position["batch"] == 3
    monkeypatch.undo()
    net.fit(X, y, epochs=2, verbose=0)
    rates, times = net.history["samples_per_s"], net.history["time"]
    assert rates[0] * times[0] == pytest.approx(16, rel=1e-9)  # the resumed part: 1 batch
    assert rates[1] * times[1] == pytest.approx(64, rel=1e-9)  # a whole epoch


def test_a_history_pickled_before_stopped_by_still_works():
    X, y = _data()
    net = _net()
    net.fit(X, y, loss="mse", epochs=1, verbose=0)
    for name in ("stopped_by", "weights_note"):
        del net.history.__dict__[name]  # as unpickled from an older fastbp
    h = pickle.loads(pickle.dumps(net)).history
    assert h.stopped_by is None and h.weights_note is None and "loss" in h
    net.fit(X, y, epochs=1, verbose=0, callbacks=[Halt(2)])
    assert net.history.stopped_by == "callback"


def test_a_few_adversarial_trials():
    """A few trials of tests/adversarial/progress.py (the full run is its
    ``main``): random fits, stops, bars and resumes, in a child interpreter."""
    progress = adversarial("progress")
    counts, ended = progress.run(trials=25, seed=3)
    assert counts["trials"] == 25 and counts["passed"] == 25, counts
    assert len(ended) >= 3, ended  # several kinds of ending were tried
