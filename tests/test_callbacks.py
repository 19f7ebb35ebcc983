"""fastbp.callbacks and fastbp.plot_history: stopping rules, checkpoints, CSV
logs, the progress bar, learning-rate schedules (held against
torch.optim.lr_scheduler's rates, recorded in
tests/fixtures/torch_lr_schedulers.npz) and history plots."""
import csv
import io
import math
import re
import sys
import warnings

import numpy as np
import pytest

import fastbp
from fastbp import callbacks as cb

import torch_cases as tc

FIT = dict(loss="mse", batch_size=16, verbose=0)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=n)
    return X, y


def _classes(n=64, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    return X, (X[:, 0] + X[:, 1] > 0).astype(int)


def _net(seed=0, out=1):
    return fastbp.Sequential([fastbp.Dense(6, activation="tanh"), fastbp.Dense(out)],
                             dtype="float64", seed=seed)


class Script(cb.Callback):
    """Overwrites logs[key] with a scripted value before the callbacks after it see it."""

    def __init__(self, key, values):
        self.key, self.values = key, list(values)

    def on_epoch_end(self, net, epoch, logs):
        logs[self.key] = self.values[epoch - 1]


class Record(cb.Callback):
    """Keeps params after every epoch and the lr every epoch trains with."""

    def __init__(self):
        self.params, self.lrs = [], []

    def on_epoch_begin(self, net, epoch):
        self.lrs.append(net.optimizer.lr)

    def on_epoch_end(self, net, epoch, logs):
        self.params.append(net.params.copy())


# -- base class ------------------------------------------------------------------------
def test_callback_base_hooks_are_noops_and_subclass_hooks_run():
    calls = []

    class Spy(cb.Callback):
        def on_epoch_end(self, net, epoch, logs):
            calls.append((epoch, sorted(logs)))

    X, y = _data()
    net = _net()
    net.fit(X, y, epochs=2, callbacks=[cb.Callback(), Spy()], **FIT)
    assert [c[0] for c in calls] == [1, 2]
    assert calls[0][1] == ["loss", "samples_per_s", "time"]


# -- EarlyStopping ---------------------------------------------------------------------
def _keras_stop(values, patience, min_delta=0.0, mode="min"):
    """Expected (stopped epoch or None, best epoch), Keras's rule written out."""
    best, best_epoch, wait = None, 0, 0
    for e, v in enumerate(values, 1):
        wait += 1
        better = best is None or (v < best - min_delta if mode == "min" else v > best + min_delta)
        if better:
            best, best_epoch, wait = v, e, 0
        elif wait >= patience:
            return e, best_epoch
    return None, best_epoch


VALS = [5.0, 4.0, 4.5, 3.9, 3.8, 3.95, 3.97, 3.96, 1.0, 0.5]
TIES = [2.0, 1.0, 1.0, 0.75, 0.5, 0.5, 0.25, 0.0, 0.0, 0.0]  # equal is no improvement


@pytest.mark.parametrize("vals,patience,min_delta,expected", [
    (VALS, 0, 0.0, 3), (VALS, 1, 0.0, 3), (VALS, 2, 0.0, 7), (VALS, 3, 0.0, 8),
    (VALS, 2, 0.15, 4), (TIES, 2, 0.0, 10), (TIES, 1, 0.0, 3), (TIES, 1, 0.25, 3),
    (TIES, 2, 0.25, 4)])
def test_early_stopping_stops_at_the_keras_epoch(vals, patience, min_delta, expected):
    assert _keras_stop(vals, patience, min_delta)[0] == expected
    X, y = _data()
    net = _net()
    es = cb.EarlyStopping(patience=patience, min_delta=min_delta)
    net.fit(X, y, epochs=len(vals), callbacks=[Script("val_loss", vals), es], **FIT)
    assert net.history.n_epochs == expected == es.stopped_epoch


def test_early_stopping_restores_the_best_weights_bitwise():
    vals = [3.0, 2.0, 1.0, 1.5, 1.2, 0.9, 0.95, 0.97, 0.99, 0.5, 0.4, 0.3]
    stop, best = _keras_stop(vals, patience=3)
    assert (stop, best) == (9, 6)
    X, y = _data()
    rec = Record()
    net = _net()
    es = cb.EarlyStopping(patience=3, restore_best_weights=True)
    net.fit(X, y, epochs=12, callbacks=[Script("val_loss", vals), es, rec], **FIT)
    assert net.history.n_epochs == 9 == es.stopped_epoch and es.best_epoch == 6 and es.best == 0.9
    assert not np.array_equal(rec.params[-1], rec.params[5])
    assert net.params.tobytes() == rec.params[5].tobytes()
    # the run is the uninterrupted one up to the stop: same weights at each epoch
    ref = _net()
    rec_ref = Record()
    ref.fit(X, y, epochs=9, callbacks=[rec_ref], **FIT)
    assert all(np.array_equal(a, b) for a, b in zip(rec.params, rec_ref.params))


def test_early_stopping_restores_the_best_epochs_running_statistics_too():
    """With BatchNorm the best epoch's validation loss was computed with its
    running statistics: they are restored with the parameters (only the
    parameters were), so evaluate gives the best val_loss again."""
    X, y = _data(n=96)
    X_val, y_val = X[64:], y[64:]
    vals = [3.0, 2.0, 1.0, 1.5, 1.2, 1.1]

    class Keep(cb.Callback):
        def __init__(self):
            self.buffers = []

        def on_epoch_end(self, net, epoch, logs):
            self.buffers.append(net._buffers.copy())

    keep = Keep()
    net = fastbp.Sequential([fastbp.Dense(8, activation="tanh"), fastbp.BatchNorm(),
                             fastbp.Dense(1)], seed=0, dtype="float64")
    es = cb.EarlyStopping(patience=3, restore_best_weights=True)
    net.fit(X[:64], y[:64], epochs=6, validation_data=(X_val, y_val),
            callbacks=[Script("val_loss", vals), es, keep], **FIT)
    assert es.best_epoch == 3 and net.history.n_epochs == 6
    assert not np.array_equal(keep.buffers[-1], keep.buffers[2])
    assert net._buffers.tobytes() == keep.buffers[2].tobytes()
    assert net.evaluate(X_val, y_val) == net.history["val_loss"][2]


def test_early_stopping_without_restore_keeps_last_weights_and_restores_when_not_stopped():
    X, y = _data()
    vals = [3.0, 2.0, 2.5]
    rec = Record()
    net = _net()
    net.fit(X, y, epochs=3, callbacks=[Script("val_loss", vals), cb.EarlyStopping(patience=5),
                                       rec], **FIT)
    assert net.params.tobytes() == rec.params[-1].tobytes()
    # restore_best_weights also applies when the fit ran out of epochs (Keras 3)
    rec = Record()
    net = _net()
    es = cb.EarlyStopping(patience=5, restore_best_weights=True)
    net.fit(X, y, epochs=3, callbacks=[Script("val_loss", vals), es, rec], **FIT)
    assert es.stopped_epoch == 0 and net.params.tobytes() == rec.params[1].tobytes()


def test_early_stopping_on_real_validation_loss_and_accuracy_mode():
    X, y = _classes()
    Xv, yv = _classes(seed=2)
    net = _net(out=2)
    es = cb.EarlyStopping(monitor="val_accuracy", patience=1)
    assert es.mode == "max" and cb.EarlyStopping(monitor="loss").mode == "min"
    net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.SGD(lr=0.0), epochs=6,
            batch_size=16, verbose=0, validation_data=(Xv, yv), callbacks=[es])
    # lr=0: the accuracy never changes, so the second epoch is no improvement
    assert net.history.n_epochs == 2 and es.best_epoch == 1


def test_early_stopping_nan_is_never_an_improvement():
    X, y = _data()
    net = _net()
    es = cb.EarlyStopping(patience=2)
    net.fit(X, y, epochs=6, callbacks=[Script("val_loss", [math.nan, 1.0, math.nan, math.nan,
                                                           0.5, 0.4]), es], **FIT)
    assert es.best == 1.0 and es.best_epoch == 2 and es.stopped_epoch == 4


def test_early_stopping_missing_metric_is_a_clear_error():
    X, y = _data()
    with pytest.raises(ValueError, match=r"'val_loss'.*loss, samples_per_s, time.*validation_data"):
        _net().fit(X, y, epochs=2, callbacks=[cb.EarlyStopping()], **FIT)
    with pytest.raises(ValueError, match="mode"):
        cb.EarlyStopping(mode="up")
    with pytest.raises(ValueError, match="patience"):
        cb.EarlyStopping(patience=-1)


# -- StopAtLoss, StopOnSmallUpdate, TerminateOnNaN --------------------------------------
def test_stop_at_loss_stops_at_the_first_epoch_at_or_below_target():
    X, y = _data()
    ref = _net()
    opt = dict(optimizer=fastbp.optim.Adam(lr=0.02))
    ref.fit(X, y, epochs=30, **opt, **FIT)
    losses = ref.history["loss"]
    target = losses[11]
    expected = next(e for e, v in enumerate(losses, 1) if v <= target)
    assert 1 < expected <= 12
    net = _net()
    stop = cb.StopAtLoss(target)
    net.fit(X, y, epochs=30, callbacks=[stop], optimizer=fastbp.optim.Adam(lr=0.02), **FIT)
    assert net.history.n_epochs == expected == stop.stopped_epoch
    assert net.history["loss"] == losses[:expected]


def test_stop_at_loss_accuracy_reaches_from_below():
    X, y = _data()
    net = _net()
    stop = cb.StopAtLoss(0.9, monitor="val_accuracy")
    net.fit(X, y, epochs=6, callbacks=[Script("val_accuracy", [0.5, 0.8, 0.9, 0.95, 1, 1]), stop],
            **FIT)
    assert stop.mode == "max" and net.history.n_epochs == 3


def test_stop_on_small_update_with_a_tiny_learning_rate():
    X, y = _data()
    rec = Record()

    class Start(cb.Callback):
        def on_epoch_begin(self, net, epoch):
            self.p = net.params.copy()

    start = Start()
    net = _net()
    small = cb.StopOnSmallUpdate(tol=1e-6)
    net.fit(X, y, epochs=10, optimizer=fastbp.optim.SGD(lr=1e-9), callbacks=[start, small, rec],
            **FIT)
    assert net.history.n_epochs == 1 and small.stopped_epoch == 1
    assert small.last_update == np.abs(rec.params[0] - start.p).max()
    assert 0 < small.last_update < 1e-6
    # a usable learning rate moves the weights by more than tol: no stop
    net = _net()
    moving = cb.StopOnSmallUpdate(tol=1e-6)
    net.fit(X, y, epochs=5, optimizer=fastbp.optim.SGD(lr=1e-2), callbacks=[moving], **FIT)
    assert net.history.n_epochs == 5 and moving.stopped_epoch == 0 and moving.last_update > 1e-6
    with pytest.raises(ValueError, match="tol"):
        cb.StopOnSmallUpdate(0)


def test_terminate_on_nan():
    X, y = _data()
    net = _net()
    t = cb.TerminateOnNaN()
    net.fit(X, y, epochs=5, callbacks=[Script("loss", [1.0, 0.5, math.nan, 0.1, 0.1]), t],
            **FIT)
    assert net.history.n_epochs == 3 and t.stopped_epoch == 3
    net = _net()
    t = cb.TerminateOnNaN()
    net.fit(X, y, epochs=3, callbacks=[Script("loss", [1.0, math.inf, 1.0]), t], **FIT)
    assert net.history.n_epochs == 2
    net = _net()
    net.fit(X, y, epochs=3, callbacks=[cb.TerminateOnNaN()], **FIT)
    assert net.history.n_epochs == 3


# -- ModelCheckpoint -------------------------------------------------------------------
def test_model_checkpoint_every_epoch_files_load(tmp_path):
    X, y = _data()
    rec = Record()
    net = _net()
    ck = cb.ModelCheckpoint(str(tmp_path / "m-{epoch:02d}.fbp"))
    net.fit(X, y, epochs=3, callbacks=[ck, rec], **FIT)
    assert [e for e, _ in ck.saved] == [1, 2, 3]
    for e in (1, 2, 3):
        loaded = fastbp.load(tmp_path / f"m-{e:02d}.fbp")
        assert loaded.params.tobytes() == rec.params[e - 1].tobytes()
        assert loaded.history.n_epochs == e
        np.testing.assert_array_equal(loaded.predict(X), _predict_with(net, rec.params[e - 1], X))
    single = tmp_path / "last.fbp"
    net2 = _net()
    net2.fit(X, y, epochs=2, callbacks=[cb.ModelCheckpoint(single)], **FIT)
    assert fastbp.load(single).params.tobytes() == net2.params.tobytes()


def _predict_with(net, params, X):
    keep = net.params.copy()
    net.params[...] = params
    out = net.predict(X)
    net.params[...] = keep
    return out


def test_model_checkpoint_save_best_only_saves_only_improvements(tmp_path):
    X, y = _data()
    vals = [3.0, 2.0, 2.5, 1.0, 1.0, 1.5, 0.5]
    rec = Record()
    path = tmp_path / "best.fbp"
    saves = []

    class CountSaves(cb.ModelCheckpoint):
        def on_epoch_end(self, net, epoch, logs):
            before = len(self.saved)
            super().on_epoch_end(net, epoch, logs)
            if len(self.saved) > before:
                saves.append(fastbp.load(path).params.copy())

    ck = CountSaves(path, monitor="val_loss", save_best_only=True)
    net = _net()
    net.fit(X, y, epochs=7, callbacks=[Script("val_loss", vals), ck, rec], **FIT)
    assert [e for e, _ in ck.saved] == [1, 2, 4, 7]
    for (e, _), p in zip(ck.saved, saves):
        assert p.tobytes() == rec.params[e - 1].tobytes()
    # max mode for an accuracy
    ck = cb.ModelCheckpoint(tmp_path / "acc.fbp", monitor="val_accuracy", save_best_only=True)
    net = _net()
    net.fit(X, y, epochs=4, callbacks=[Script("val_accuracy", [0.5, 0.4, 0.7, 0.7]), ck], **FIT)
    assert [e for e, _ in ck.saved] == [1, 3]
    with pytest.raises(ValueError, match="monitor"):
        cb.ModelCheckpoint(path, save_best_only=True)
    with pytest.raises(ValueError, match=r"cannot format.*loss, samples_per_s, time"):
        _net().fit(X, y, epochs=1, callbacks=[cb.ModelCheckpoint(str(tmp_path / "{val_loss}"))],
                   **FIT)


# -- CSVLogger -------------------------------------------------------------------------
def test_csv_logger_rows_header_and_grad_norm_columns(tmp_path):
    X, y = _classes()
    Xv, yv = _classes(seed=3)
    path = tmp_path / "log.csv"
    net = _net(out=2)
    fit = dict(loss="cross_entropy", batch_size=16, verbose=0, validation_data=(Xv, yv),
               grad_norms=True)
    net.fit(X, y, epochs=3, callbacks=[cb.CSVLogger(path)], **fit)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "loss", "time", "samples_per_s", "grad_norm_0", "grad_norm_1",
                       "val_loss", "val_accuracy"]
    assert len(rows) == 4
    h = net.history
    for i, row in enumerate(rows[1:]):
        assert int(row[0]) == i + 1
        for key in ("loss", "time", "samples_per_s", "val_loss", "val_accuracy"):
            assert float(row[rows[0].index(key)]) == h[key][i]  # repr: exact round trip
        assert [float(row[4]), float(row[5])] == h["grad_norm"][i]
    # append: a second fit continues the same columns, without a second header
    net.fit(X, y, epochs=2, callbacks=[cb.CSVLogger(path, append=True)], **fit)
    with open(path, newline="") as f:
        rows2 = list(csv.reader(f))
    assert rows2[:4] == rows and [r[0] for r in rows2[4:]] == ["4", "5"]
    assert float(rows2[5][1]) == h["loss"][4]
    # no append: the file starts over (this fit without the grad_norm columns)
    with warnings.catch_warnings():  # grad_norms changes no weight: no ResumeWarning
        warnings.simplefilter("error", fastbp.ResumeWarning)
        net.fit(X, y, epochs=1, loss="cross_entropy", batch_size=16, verbose=0,
                callbacks=[cb.CSVLogger(path)], grad_norms=False)
    with open(path, newline="") as f:
        rows3 = list(csv.reader(f))
    assert rows3 == [["epoch", "loss", "time", "samples_per_s"], rows3[1]] and rows3[1][0] == "6"


# -- ProgressBar -----------------------------------------------------------------------
def test_progress_bar_shows_epochs_and_losses(capsys):
    X, y = _data()
    Xv, yv = _data(seed=5)
    out = io.StringIO()
    net = _net()
    bar = cb.ProgressBar(total=3, file=out, ascii=True)
    net.fit(X, y, epochs=3, validation_data=(Xv, yv), callbacks=[bar], **FIT)
    text = out.getvalue()
    assert "3/3" in text and "loss=" in text and "val_loss=" in text
    assert f"{net.history['val_loss'][-1]:.4g}" in text
    assert bar.bar is None  # closed at the end
    # default: stderr, total from the fit's epochs (net.fit_params)
    net.fit(X, y, epochs=2, callbacks=[cb.ProgressBar()], **FIT)
    err = capsys.readouterr().err
    assert "2/2" in err and "loss=" in err


def _frames(text):
    """The successive states of a tqdm bar written to a file."""
    return [f.strip() for f in text.replace("\n", "\r").split("\r") if f.strip()]


def test_progress_bar_replaces_the_epoch_lines(capsys):
    """With a bar, fit(verbose=1) prints no per-epoch lines; a disabled bar
    gives them back."""
    X, y = _data()
    out = io.StringIO()
    net = _net()
    net.fit(X, y, loss="mse", epochs=3, callbacks=[cb.ProgressBar(file=out)])  # verbose=1
    assert capsys.readouterr().out == ""
    assert "3/3" in _frames(out.getvalue())[-1]
    net.fit(X, y, epochs=2, callbacks=[cb.ProgressBar(disable=True)], verbose=1)
    assert capsys.readouterr().out.count("samples/s") == 2
    # None: tqdm's "a bar on a terminal only"; to a file it printed nothing at all
    quiet = io.StringIO()
    net.fit(X, y, epochs=2, callbacks=[cb.ProgressBar(file=quiet, disable=None)], verbose=1)
    assert capsys.readouterr().out.count("samples/s") == 2 and quiet.getvalue() == ""


def test_progress_bar_advances_within_a_long_epoch(monkeypatch):
    """The bar moves after every run of batches, not only at the epoch's end.
    An epoch is made "long" by making every call into the engine one batch
    (as a slow epoch's calls of about 50 ms would be), not by making it slow."""
    import fastbp._runner as fm

    monkeypatch.setattr(fm, "_CALL_SECONDS", 1e-12)
    X, y = _data()
    out = io.StringIO()
    net = _net()
    net.fit(X, y, loss="mse", epochs=2, batch_size=16, verbose=1,  # 4 batches an epoch
            callbacks=[cb.ProgressBar(file=out, mininterval=0, miniters=0, ascii=True)])
    counts = [re.search(r"\| ([\d.]+/2) \[", f).group(1) for f in _frames(out.getvalue())]
    for n in ("0.25/2", "0.5/2", "0.75/2", "1/2", "1.25/2", "1.5/2", "1.75/2", "2/2"):
        assert n in counts, counts
    assert "loss=" in _frames(out.getvalue())[-1]


def test_progress_bar_ends_at_the_epochs_run_when_a_fit_stops_early(capsys):
    X, y = _data()
    out = io.StringIO()
    net = _net()
    bar = cb.ProgressBar(file=out, ascii=True)
    net.fit(X, y, loss="mse", epochs=20, validation_data=(X, y), verbose=1,
            callbacks=[Script("val_loss", [0.5, 0.1, 0.2, 0.3] + [0.0] * 16),
                       cb.EarlyStopping(patience=2), bar])
    last = _frames(out.getvalue())[-1]
    assert "100%" in last and "4/4" in last and "stopped=early_stopping" in last, last
    assert bar.bar is None
    assert capsys.readouterr().out == (
        "Stopped at epoch 4 of 20: val_loss did not improve for 2 epochs (best 0.1 at epoch "
        "2); the model holds epoch 4's weights, the last trained.\n")


def test_progress_bar_stopped_before_any_progress_keeps_its_total():
    import signal

    class Interrupt(cb.Callback):
        def on_epoch_begin(self, net, epoch):
            signal.raise_signal(signal.SIGINT)  # deferred: no batch of epoch 1 runs

    X, y = _data()
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        _net().fit(X, y, loss="mse", epochs=5, verbose=0,
                   callbacks=[Interrupt(), cb.ProgressBar(file=out, ascii=True)])
    last = _frames(out.getvalue())[-1]
    assert "0/5" in last and "stopped=interrupt" in last, last


def test_progress_bar_of_a_levenberg_marquardt_fit(capsys):
    X, y = _data()
    out = io.StringIO()
    net = _net()
    net.fit(X, y, loss="mse", optimizer=fastbp.optim.LevenbergMarquardt(), epochs=3,
            callbacks=[cb.ProgressBar(file=out)], verbose=1)
    assert capsys.readouterr().out == ""
    assert "3/3" in _frames(out.getvalue())[-1]


def test_progress_bar_without_tqdm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match=r'pip install "fastbp\[progress\]"'):
        cb.ProgressBar()


# -- learning-rate schedules against torch ------------------------------------------------
# torch's rates (each epoch's lr while stepping its scheduler after each epoch, and
# its _get_closed_form_lr) are recorded by tests/fixtures/make_torch_fixtures.py.
TORCH = tc.load("torch_lr_schedulers")


@pytest.mark.parametrize("case", tc.SCHEDULES, ids=[c[0] for c in tc.SCHEDULES])
def test_schedule_lrs_equal_torch(case):
    cid, name, kwargs = case
    key = f"schedule/{cid}"
    tc.check_spec(TORCH, key, tc.schedule_spec(case))
    X, y = _data(n=16)
    epochs, base = tc.SCHEDULE_EPOCHS, tc.SCHEDULE_LR
    rec = Record()
    sched = getattr(cb, name)(**kwargs)
    net = _net()
    net.fit(X, y, epochs=epochs, optimizer=fastbp.optim.SGD(lr=base), callbacks=[sched, rec],
            **FIT)
    assert rec.lrs == TORCH[f"{key}/closed"].tolist()  # bitwise: torch's _get_closed_form_lr
    np.testing.assert_allclose(rec.lrs, TORCH[f"{key}/stepped"], rtol=1e-12, atol=1e-15 * base)
    assert sched.lrs[:epochs] == rec.lrs and len(set(rec.lrs)) > 1


def test_schedule_sets_the_lr_fit_trains_with():
    X, y = _data()
    rec = Record()
    net = _net()
    net.fit(X, y, epochs=5, optimizer=fastbp.optim.SGD(lr=0.05), callbacks=[cb.StepLR(2, 0.0), rec],
            **FIT)
    assert rec.lrs == [0.05, 0.05, 0.0, 0.0, 0.0]
    assert not np.array_equal(rec.params[0], rec.params[1])
    assert all(np.array_equal(rec.params[1], p) for p in rec.params[2:])


def test_schedule_restarts_from_the_current_lr_each_fit():
    X, y = _data()
    net = _net()
    sched = cb.ExponentialLR(0.5)
    net.fit(X, y, epochs=2, optimizer=fastbp.optim.Adam(lr=0.1), callbacks=[sched], **FIT)
    assert net.optimizer.lr == 0.025
    rec = Record()
    net.fit(X, y, epochs=2, callbacks=[sched, rec], **FIT)
    assert sched.base_lr == 0.025 and rec.lrs == [0.025, 0.0125]


def test_schedule_needs_an_optimizer_with_a_learning_rate():
    X, y = _data()
    with pytest.raises(ValueError, match="Rprop"):
        _net().fit(X, y, epochs=1, optimizer=fastbp.optim.Rprop(), callbacks=[cb.StepLR(1)],
                   **FIT)
    with pytest.raises(ValueError, match="step_size"):
        cb.StepLR(0)
    with pytest.raises(ValueError, match="T_max must be an integer >= 1, got 0"):
        cb.CosineAnnealingLR(0)
    with pytest.raises(ValueError, match="factor"):
        cb.ReduceLROnPlateau(factor=1.0)


@pytest.mark.parametrize("kwargs", tc.PLATEAU, ids=[tc.plateau_id(k) for k in tc.PLATEAU])
def test_reduce_lr_on_plateau_equals_torch(kwargs):
    key = f"plateau/{tc.plateau_id(kwargs)}"
    tc.check_spec(TORCH, key, tc.plateau_spec(kwargs))
    # a metric that improves, stalls, jitters and improves again (by 1e-13 at the end)
    vals = TORCH[f"{key}/metric"].tolist()
    X, y = _data(n=16)
    rec = Record()
    sched = cb.ReduceLROnPlateau(**kwargs)
    net = _net()
    net.fit(X, y, epochs=len(vals), optimizer=fastbp.optim.SGD(lr=tc.PLATEAU_LR),
            callbacks=[Script("val_loss", vals), sched, rec], **FIT)
    assert rec.lrs == TORCH[f"{key}/stepped"].tolist()
    assert len(set(rec.lrs)) > 1 or kwargs == {}


def test_reduce_lr_on_plateau_monitor_and_min_lr():
    X, y = _data()
    sched = cb.ReduceLROnPlateau(monitor="loss", patience=0, factor=0.5, min_lr=0.02)
    net = _net()
    net.fit(X, y, epochs=5, optimizer=fastbp.optim.SGD(lr=0.1),
            callbacks=[Script("loss", [1.0] * 5), sched], **FIT)
    assert sched.lrs == [0.1, 0.1, 0.05, 0.025, 0.02, 0.02]
    with pytest.raises(ValueError, match="'val_loss'"):
        _net().fit(X, y, epochs=1, callbacks=[cb.ReduceLROnPlateau()], **FIT)


# -- plot_history ----------------------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n"


def _labels(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_plot_history_writes_a_png_with_val_loss_and_accuracy(tmp_path):
    X, y = _classes()
    Xv, yv = _classes(seed=4)
    net = _net(out=2)
    net.fit(X, y, loss="cross_entropy", epochs=4, batch_size=16, verbose=0,
            validation_data=(Xv, yv))
    path = tmp_path / "hist.png"
    fig = fastbp.plot_history(net, path)
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 1000
    axes = fig.get_axes()
    assert len(axes) == 2
    assert _labels(axes[0]) == ["loss", "val_loss"] and _labels(axes[1]) == ["val_accuracy"]
    x, yy = axes[0].get_lines()[1].get_data()
    assert list(x) == [1, 2, 3, 4] and list(yy) == net.history["val_loss"]
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["loss", "val_loss"]


def test_plot_history_without_validation_and_with_metrics(tmp_path):
    X, y = _data()
    net = _net()
    hist = net.fit(X, y, epochs=3, grad_norms=True, **FIT)
    fig = fastbp.plot_history(hist)  # a History, no file
    assert len(fig.get_axes()) == 1 and _labels(fig.get_axes()[0]) == ["loss"]
    path = tmp_path / "h"  # no extension: PNG, written to that exact name
    fig = fastbp.plot_history(net, path, metrics=["loss", "grad_norm", "time"])
    assert path.read_bytes()[:8] == PNG
    assert [_labels(a) for a in fig.get_axes()] == [["loss"], ["grad_norm 0", "grad_norm 1"],
                                                   ["time"]]
    with pytest.raises(ValueError, match="val_loss"):
        fastbp.plot_history(net, metrics=["val_loss"])
    with pytest.raises(ValueError, match="no epochs"):
        fastbp.plot_history(_net())


def test_plot_history_metric_recorded_in_later_epochs_only():
    X, y = _data()
    net = _net()
    net.fit(X, y, epochs=2, **FIT)
    net.fit(X, y, epochs=2, validation_data=(X, y), **FIT)
    with pytest.warns(RuntimeWarning, match="val_loss is recorded for 2 of 4 epochs"):
        fig = fastbp.plot_history(net)
    x, _ = fig.get_axes()[0].get_lines()[1].get_data()
    assert list(x) == [3, 4]


def test_plot_history_without_matplotlib_names_the_extra(monkeypatch):
    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)
    X, y = _data()
    net = _net()
    net.fit(X, y, epochs=1, **FIT)
    with pytest.raises(ImportError, match=r'pip install "fastbp\[plot\]"'):
        fastbp.plot_history(net)


def test_on_train_end_runs_after_a_divergence_and_bad_rates_are_refused():
    import fastbp as fb

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(64, 5)), rng.normal(size=(64, 3)) * 100
    ended = []

    class Spy(fb.callbacks.Callback):
        def on_train_end(self, net):
            ended.append(True)
    net = fb.Sequential([fb.Dense(8, activation="tanh"), fb.Dense(3)], dtype="float64", seed=0)
    with pytest.raises(fb.DivergenceError):
        net.fit(X, y, loss="mse", optimizer=fb.optim.SGD(lr=100.0), epochs=500, verbose=0,
                callbacks=[Spy()])
    assert ended == [True]

    class Broken(fb.callbacks.Callback):
        def on_epoch_end(self, net, epoch, logs):
            net.optimizer.lr = float("nan")
    net = fb.Sequential([fb.Dense(3)], dtype="float64", seed=0)
    with pytest.raises(ValueError, match="invalid hyperparameters"):
        net.fit(X, y / 100, loss="mse", optimizer=fb.optim.SGD(lr=0.01), epochs=3, verbose=0,
                callbacks=[Broken()])


# -- what the writers may write (issue 13, item 10) ---------------------------------
def _fifo_with_reader(tmp_path, name="pipe"):
    """A FIFO with a non-blocking reader held open, so that a writer that
    (wrongly) opens it does not block the test: it just writes into it."""
    import os

    path = tmp_path / name
    os.mkfifo(path)
    return path, os.open(path, os.O_RDONLY | os.O_NONBLOCK)


@pytest.mark.parametrize("append", [False, True])
def test_csv_logger_refuses_a_fifo_and_writes_through_a_symlink(tmp_path, append):
    import os
    import stat

    X, y = _data()
    fifo, reader = _fifo_with_reader(tmp_path)
    try:
        with pytest.raises(ValueError, match="is a FIFO"):
            _net().fit(X, y, epochs=1, callbacks=[cb.CSVLogger(fifo, append=append)], **FIT)
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
        assert os.read(reader, 1) == b""  # nothing was written into the pipe
    finally:
        os.close(reader)
    (tmp_path / "logs").mkdir()
    link = tmp_path / "log.csv"
    os.symlink(os.path.join("logs", "real.csv"), link)
    _net().fit(X, y, epochs=2, callbacks=[cb.CSVLogger(link, append=append)], **FIT)
    assert os.path.islink(link)
    rows = list(csv.reader(open(tmp_path / "logs" / "real.csv")))
    assert rows[0][0] == "epoch" and [r[0] for r in rows[1:]] == ["1", "2"]
    with pytest.raises(FileNotFoundError) as info:
        _net().fit(X, y, epochs=1, callbacks=[cb.CSVLogger(tmp_path / "none" / "log.csv",
                                                           append=append)], **FIT)
    assert info.value.filename == str(tmp_path / "none")


def test_model_checkpoint_and_plot_refuse_a_fifo(tmp_path):
    import os
    import stat

    X, y = _data()
    fifo, reader = _fifo_with_reader(tmp_path)
    try:
        net = _net()
        with pytest.raises(ValueError, match="is a FIFO"):
            net.fit(X, y, epochs=1, callbacks=[cb.ModelCheckpoint(fifo)], **FIT)
        assert net.history.n_epochs == 0   # refused before training
        net.fit(X, y, epochs=1, **FIT)
        with pytest.raises(ValueError, match="is a FIFO"):
            fastbp.plot_history(net, fifo)
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
        assert os.read(reader, 1) == b""
    finally:
        os.close(reader)
    link = tmp_path / "plot.png"
    os.symlink("real.png", link)
    fastbp.plot_history(net, link)
    assert os.path.islink(link) and (tmp_path / "real.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="supported formats"):
        fastbp.plot_history(net, tmp_path / "plot.xyz")
    assert not (tmp_path / "plot.xyz").exists()


@pytest.mark.parametrize("t", [3.5, -1, True, "3"])
def test_a_step_count_set_by_a_callback_is_checked(t):
    """optimizer.t set from a callback failed inside the engine, naming its
    argument ("step0 must be an int64"); it is checked as at fit's start."""
    class SetT(cb.Callback):
        def on_batches_end(self, net, epoch, batch):
            net.optimizer.t = t

    X, y = _data()
    net = _net()
    with pytest.raises(ValueError, match="the step count t of this Adam must be an integer"):
        net.fit(X, y, epochs=2, callbacks=[SetT()], **FIT)


def test_early_stopping_leaves_a_model_stopped_by_ctrl_c_as_it_was(tmp_path):
    """restore_best_weights wrote an earlier epoch's weights back when Ctrl-C
    ended the fit, beside the last epoch's optimizer state, history and
    unfinished epoch: "fit again to continue" then differed from the
    uninterrupted run."""
    import signal

    class CtrlC(cb.Callback):
        def on_batches_end(self, net, epoch, batch):
            if (epoch, batch) == (4, 2):
                signal.raise_signal(signal.SIGINT)   # held to the call boundary

    X, y = _data(n=96)
    # checkpoint_every puts a call boundary at batch 2 of each epoch
    kw = dict(FIT, epochs=6, shuffle=False, checkpoint_every=2)
    whole = _net()
    whole.fit(X, y, optimizer=fastbp.optim.Adam(lr=0.05), checkpoint=tmp_path / "a.fbp", **kw)
    cut = _net()
    es = cb.EarlyStopping(monitor="loss", patience=10, restore_best_weights=True)
    with pytest.raises(KeyboardInterrupt):
        cut.fit(X, y, optimizer=fastbp.optim.Adam(lr=0.05), callbacks=[CtrlC(), es],
                checkpoint=tmp_path / "b.fbp", **kw)
    assert cut.history.stopped_by == "interrupt" and cut._position is not None
    assert es.best_weights is not None and not np.array_equal(cut.params, es.best_weights)
    cut.fit(X, y, epochs=6 - cut.history.n_epochs, verbose=0)
    np.testing.assert_array_equal(cut.params, whole.params)


@pytest.mark.parametrize("separator", ["", ";;", None, "\n", '"'])
def test_csv_logger_refuses_a_separator_csv_cannot_write(separator):
    """They were taken, and failed (or wrote a value a line) only once an
    epoch had trained."""
    with pytest.raises(ValueError, match="separator must be one character"):
        cb.CSVLogger("log.csv", separator=separator)


def test_csv_logger_appends_only_to_a_log_of_epochs_and_on_a_line_of_its_own(tmp_path):
    """Appending to a file with other columns (or one written with another
    separator) wrote rows of empty cells; a spreadsheet's BOM hid the epoch
    column; a file without a final newline had the first new row glued to
    its last line; a folder where no file can be made failed after epoch 1."""
    X, y = _data()
    path = tmp_path / "log.csv"
    for foreign in ("a,b,c\n1,2,3\n", "epoch;loss\n1;0.5\n"):
        path.write_text(foreign)
        net = _net()
        with pytest.raises(ValueError, match="does not start with a header of epoch logs"):
            net.fit(X, y, epochs=1, callbacks=[cb.CSVLogger(path, append=True)], **FIT)
        assert net.history.n_epochs == 0 and path.read_text() == foreign
    path.write_bytes("\ufeffepoch,loss\r\n1,0.5".encode("utf-8"))   # a BOM, no final newline
    _net().fit(X, y, epochs=2, callbacks=[cb.CSVLogger(path, append=True)], **FIT)
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "loss"] and rows[1] == ["1", "0.5"]
    assert [r[0] for r in rows[2:]] == ["1", "2"] and all(len(r) == 2 for r in rows)
    net = _net()
    with pytest.raises(FileNotFoundError):
        net.fit(X, y, epochs=1, callbacks=[cb.CSVLogger(tmp_path / "no" / "log.csv",
                                                        append=True)], **FIT)
    assert net.history.n_epochs == 0


@pytest.mark.parametrize("make", [lambda: cb.StepLR(3, gamma=0.5, base_lr=0.05),
                                  lambda: cb.ExponentialLR(0.8, base_lr=0.05),
                                  lambda: cb.CosineAnnealingLR(6, eta_min=0.001, base_lr=0.05)])
def test_a_schedule_with_a_fixed_base_lr_continues_across_fits_and_checkpoints(tmp_path, make):
    """Every fit restarted a schedule from the optimizer's current rate, so
    a run resumed from a checkpoint got other rates (StepLR 0.025 against
    0.0125 after 12 epochs). With base_lr the rate follows the model's
    epoch count: one long fit, two fits, and a checkpoint resumed in a new
    model give the same bits."""
    X, y = _data()
    one = _net()
    one.fit(X, y, optimizer=fastbp.optim.SGD(lr=0.05), epochs=8, callbacks=[make()], **FIT)
    two = _net()
    two.fit(X, y, optimizer=fastbp.optim.SGD(lr=0.05), epochs=3, callbacks=[make()],
            checkpoint=tmp_path / "run.fbp", **FIT)
    resumed = fastbp.load(tmp_path / "run.fbp")
    resumed.fit(X, y, epochs=5, callbacks=[make()], **FIT)
    two.fit(X, y, epochs=5, callbacks=[make()], **FIT)
    for other in (two, resumed):
        np.testing.assert_array_equal(other.params, one.params)
        assert other.optimizer.lr == one.optimizer.lr


def test_checkpoint_paths_are_checked_before_training(tmp_path):
    """A folder, a missing folder or an empty path failed only at the first
    save, after an epoch had trained."""
    X, y = _data()
    for bad, error in ((tmp_path, IsADirectoryError), (tmp_path / "no" / "m.fbp",
                                                       FileNotFoundError)):
        for kw in (dict(checkpoint=bad), dict(callbacks=[cb.ModelCheckpoint(bad)])):
            net = _net()
            with pytest.raises(error):
                net.fit(X, y, epochs=1, **kw, **FIT)
            assert net.history.n_epochs == 0
    with pytest.raises(ValueError, match="non-empty"):
        cb.ModelCheckpoint("")
    with pytest.raises(ValueError, match="non-empty"):
        _net().fit(X, y, epochs=1, checkpoint="", **FIT)
