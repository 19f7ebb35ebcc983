r"""Training callbacks: early stopping, checkpoints, logging, progress bars
and learning-rate schedules for ``Sequential.fit(..., callbacks=[...])``.

The protocol
------------
``fit`` calls, on every callback that has them, these methods (a callback may
define any subset; :class:`Callback` is a base class with all but
``on_batches_end`` as no-ops):

``on_train_begin(net)``
    Once, when the fit starts (after the optimizer is set on
    ``net.optimizer`` and ``net.stop_training`` is reset to False).
``on_epoch_begin(net, epoch)``
    Before each epoch.  ``epoch`` is the epoch's number in ``net.history``:
    1-based and cumulative over successive fits.
``on_batches_end(net, epoch, batch)``
    After each run of batches within an epoch, the last one included: each
    run is one call into the compiled engine of about 50 ms of training (one
    batch when a batch takes longer), so an epoch of a second has about 20.
    ``batch`` is the number of the epoch's batches done so far, out of
    ``net.fit_params["n_batches"]``.  Nothing is called when no callback
    defines it.  (:class:`Callback` does not define it.)
``on_epoch_end(net, epoch, logs)``
    After each epoch, once its metrics are recorded in ``net.history``
    (and, with ``fit(checkpoint=...)``, saved).  ``logs`` is a dict of the
    epoch's metrics: ``loss``, ``time``, ``samples_per_s``, and when asked
    for ``val_loss``, ``val_accuracy`` and ``grad_norm`` (a list, one mean
    gradient norm per Dense layer).
``on_train_end(net)``
    Once, when the fit ends, however it ends: all epochs done, stopped by
    ``net.stop_training``, or on a divergence or Ctrl-C (before the
    ``DivergenceError`` or ``KeyboardInterrupt`` propagates).  It is not
    called when ``on_train_begin`` raised.

Callbacks are called in list order.  Setting ``net.stop_training = True``
ends the fit after the current epoch.  The callback that set it may say why
in two attributes, read then: ``stop_reason`` (a short sentence, recorded as
``net.history.stop_reason``; default "<ClassName> set net.stop_training")
and ``stop_kind`` (``net.history.stopped_by``; default "callback").  With
``fit(verbose=1)`` a line saying where and why the fit stopped, and which
weights the model holds, is printed once the ``on_train_end`` hooks have
run.  A callback with a true ``shows_progress`` attribute
(:class:`ProgressBar`) shows the epochs itself: ``fit`` then prints no
per-epoch lines.

Optimizer hyperparameters (``net.optimizer.lr``, ``momentum``, ...) changed
by a callback take effect from the next epoch: ``fit`` re-reads and checks
them before every epoch (after ``on_epoch_begin``; an invalid value raises
ValueError before that epoch runs).  A setting that uses more optimizer
state (momentum, amsgrad, centered) may be turned on too: its state starts
as torch.optim starts it.  ``net.params`` is the flat parameter vector: copy
it to keep weights, assign into it (``net.params[...] = saved``) to restore
them.

Callback state (counters, best values) lives in the callback object and is
reset by ``on_train_begin``: each fit starts afresh, and none of it is stored
in model files.

Learning-rate schedules
-----------------------
:class:`StepLR`, :class:`ExponentialLR`, :class:`CosineAnnealingLR` and
:class:`ReduceLROnPlateau` follow the definitions of the classes of the same
names in ``torch.optim.lr_scheduler``, stepped once per epoch, at the end of
the epoch (``scheduler.step()`` after each epoch of training, as torch's
documentation shows).  They set ``net.optimizer.lr``; the base learning rate
:math:`\eta_0` is the optimizer's ``lr`` when the fit begins, and :math:`t`
counts the epochs finished in this fit, so epoch :math:`t + 1` of the fit
trains with :math:`\eta_t`.

Size: about 940 lines: twelve independent callbacks under one public
namespace (``fastbp.callbacks.EarlyStopping``, ...), each short, most of
the module their numpydoc docstrings and the protocol above; splitting them
into files would scatter the one contract they share.
"""
import csv
import math
import os

import numpy as np

from . import _files

__all__ = ["Callback", "EarlyStopping", "StopAtLoss", "StopOnSmallUpdate", "ModelCheckpoint",
           "TerminateOnNaN", "CSVLogger", "ProgressBar", "StepLR", "ExponentialLR",
           "CosineAnnealingLR", "ReduceLROnPlateau"]


# -- helpers ---------------------------------------------------------------------------
def _monitored(logs, monitor, who):
    """The value of ``monitor`` in ``logs`` as a float; ValueError naming the
    available metrics when it is missing."""
    if monitor not in logs:
        available = ", ".join(sorted(logs)) or "none"
        hint = (" (val_* metrics need fit(..., validation_data=(X_val, y_val)))"
                if monitor.startswith("val_") else "")
        raise ValueError(f"{who} monitors {monitor!r}, which is not among this epoch's "
                         f"metrics: {available}{hint}")
    value = logs[monitor]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{who} monitors {monitor!r}, which is not a number "
                         f"(got {value!r})") from None


def _resolve_mode(mode, monitor, who):
    """'min' or 'max'; 'auto' is 'max' for accuracy-like names (containing "acc")."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"{who}: mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        return "max" if "acc" in monitor else "min"
    return mode


def _check_monitor(monitor, who):
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"{who}: monitor must be a metric name, got {monitor!r}")
    return monitor


def _count(value, name, who):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{who}: {name} must be an integer >= 0, got {value!r}")
    return int(value)


def _number(value, name, who, low=None, low_open=False, high=None, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{who}: {name} must be a number, got {value!r}")
    value = float(value)
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}, "
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        rng = f" in {lo or '(-inf, '}{hi or 'inf)'}" if (lo or hi) else ""
        raise ValueError(f"{who}: {name} must be a finite number{rng}, got {value!r}")
    return value


# -- base class ------------------------------------------------------------------------
class Callback:
    """Base class of fit callbacks: every hook is a no-op.

    Subclass it and override any of the hooks; ``fit`` calls them at the
    points described in the module docstring (:mod:`fastbp.callbacks`).
    Deriving from this class is optional: ``fit`` calls whichever of the four
    methods an object has.

    Examples
    --------
    >>> class PrintLR(Callback):
    ...     def on_epoch_end(self, net, epoch, logs):
    ...         print(epoch, net.optimizer.lr)
    """

    def on_train_begin(self, net):
        """Called once when ``fit`` starts, before the first epoch."""

    def on_epoch_begin(self, net, epoch):
        """Called before epoch ``epoch`` (1-based, cumulative over fits)."""

    def on_epoch_end(self, net, epoch, logs):
        """Called after epoch ``epoch`` with its metrics ``logs`` (a dict)."""

    def on_train_end(self, net):
        """Called once when ``fit`` ends normally."""


# -- stopping ----------------------------------------------------------------------------
class EarlyStopping(Callback):
    """Stop training when a monitored metric has stopped improving (Keras's
    ``EarlyStopping`` semantics).

    After every epoch the monitored value is compared with the best so far:
    it is an improvement when it is lower than ``best - min_delta`` (mode
    "min") or higher than ``best + min_delta`` (mode "max"); the first epoch
    of a fit is always one, and NaN never is.  An improvement resets a
    counter of epochs without improvement; every other epoch increments it,
    and when it reaches ``patience`` the callback sets ``net.stop_training``,
    so the fit ends ``max(patience, 1)`` epochs after the best one
    (``patience`` 0 and 1 both stop at the first epoch without improvement:
    Keras's counter, which this follows).  With ``restore_best_weights`` it
    copies the parameters at every improvement and writes the best copy back
    into ``net.params`` when the fit ends (whether or not it stopped early),
    as Keras 3 does; the optimizer state and history are left as they are.

    Parameters
    ----------
    monitor : str, default "val_loss"
        Metric to watch (a key of the epoch logs).  A ValueError listing the
        available metrics is raised at the end of the first epoch when it is
        missing (``val_*`` need ``validation_data``).
    patience : int, default 0
        Epochs without improvement tolerated before stopping.
    min_delta : float, default 0.0
        Smallest change counted as an improvement (its absolute value is
        used, as in Keras).
    mode : {"auto", "min", "max"}, default "auto"
        Whether lower or higher is better; "auto" is "max" when the metric's
        name contains "acc", else "min".
    restore_best_weights : bool, default False
        Restore the parameters of the best epoch when the fit ends.

    Attributes
    ----------
    best : float or None
        Best monitored value of the current fit.
    best_epoch : int
        Epoch (as in ``net.history``) of the best value; 0 before any.
    stopped_epoch : int
        Epoch at which this callback stopped the fit; 0 if it did not.
    wait : int
        Epochs since the last improvement.
    best_weights : ndarray or None
        Copy of the best epoch's parameters (``restore_best_weights`` only).
    stop_reason : str or None
        Why it stopped the fit (e.g. "val_loss did not improve for 10 epochs
        (best 0.1234 at epoch 63)"), recorded by ``fit`` as
        ``net.history.stop_reason``; None if it did not.  When it restores
        the best weights, ``net.history.weights_epoch`` and ``weights_note``
        say so.
    """

    stop_kind = "early_stopping"

    def __init__(self, monitor="val_loss", patience=0, min_delta=0.0, mode="auto",
                 restore_best_weights=False):
        who = "EarlyStopping"
        self.monitor = _check_monitor(monitor, who)
        self.patience = _count(patience, "patience", who)
        self.min_delta = abs(_number(min_delta, "min_delta", who))
        self.mode = _resolve_mode(mode, monitor, who)
        self.restore_best_weights = bool(restore_best_weights)
        self._reset()

    def _reset(self):
        self.best = None
        self.best_epoch = 0
        self.stopped_epoch = 0
        self.wait = 0
        self.best_weights = None
        self.stop_reason = None

    def _improved(self, current):
        if math.isnan(current):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return current < self.best - self.min_delta
        return current > self.best + self.min_delta

    def on_train_begin(self, net):
        self._reset()

    def on_epoch_end(self, net, epoch, logs):
        current = _monitored(logs, self.monitor, "EarlyStopping")
        self.wait += 1
        if self._improved(current):
            self.best, self.best_epoch, self.wait = current, epoch, 0
            if self.restore_best_weights:
                self.best_weights = net.params.copy()
            return
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.stop_reason = self._why()
            net.stop_training = True

    def _why(self):
        by = f" by more than {self.min_delta:g}" if self.min_delta else ""
        epochs = "epoch" if self.wait == 1 else "epochs"
        best = (f"best {self.best:.4g} at epoch {self.best_epoch}" if self.best is not None
                else "no value yet, only NaN")
        return f"{self.monitor} did not improve{by} for {self.wait} {epochs} ({best})"

    def on_train_end(self, net):
        if self.restore_best_weights and self.best_weights is not None:
            net.params[...] = self.best_weights
            # for the line fit prints and for plot_history
            net.history.weights_epoch = self.best_epoch
            net.history.weights_note = (
                "restored by EarlyStopping" if self.stopped_epoch
                else f"best {self.monitor} {self.best:.4g}, restored by EarlyStopping")


class StopAtLoss(Callback):
    """Stop training once a metric reaches a target value.

    At the end of every epoch, the fit is stopped (``net.stop_training``)
    when the monitored value is at or below ``target`` (mode "min") or at or
    above it (mode "max").

    Parameters
    ----------
    target : float
        Value to reach.
    monitor : str, default "loss"
        Metric to watch; a ValueError listing the available metrics is
        raised when it is missing from the epoch logs.
    mode : {"auto", "min", "max"}, default "auto"
        "auto" is "max" (stop when value >= target) when the name contains
        "acc", else "min" (stop when value <= target).

    Attributes
    ----------
    stopped_epoch : int
        Epoch at which the target was reached; 0 if it was not.
    stop_reason : str or None
        Why it stopped the fit (``net.history.stop_reason``); None if it
        did not.
    """

    stop_kind = "target"

    def __init__(self, target, monitor="loss", mode="auto"):
        who = "StopAtLoss"
        self.target = _number(target, "target", who)
        self.monitor = _check_monitor(monitor, who)
        self.mode = _resolve_mode(mode, monitor, who)
        self.stopped_epoch = 0
        self.stop_reason = None

    def on_train_begin(self, net):
        self.stopped_epoch = 0
        self.stop_reason = None

    def on_epoch_end(self, net, epoch, logs):
        value = _monitored(logs, self.monitor, "StopAtLoss")
        if value <= self.target if self.mode == "min" else value >= self.target:
            self.stopped_epoch = epoch
            self.stop_reason = (f"{self.monitor} reached the target {self.target:g} "
                                f"({value:.4g})")
            net.stop_training = True


class StopOnSmallUpdate(Callback):
    """Stop training when the parameters have stopped moving.

    At the beginning of every epoch the parameter vector is copied; at its
    end the largest absolute change of any parameter over the epoch,
    ``max |params_end - params_begin|``, is computed and the fit is stopped
    when it is below ``tol``.

    Parameters
    ----------
    tol : float
        Threshold (> 0) on the largest absolute parameter change per epoch,
        in the units of the parameters.

    Attributes
    ----------
    last_update : float or None
        Largest absolute change in the last epoch.
    stopped_epoch : int
        Epoch at which the fit was stopped; 0 if it was not.
    stop_reason : str or None
        Why it stopped the fit (``net.history.stop_reason``); None if it
        did not.
    """

    stop_kind = "small_update"

    def __init__(self, tol):
        self.tol = _number(tol, "tol", "StopOnSmallUpdate", low=0, low_open=True)
        self._start = None
        self.last_update = None
        self.stopped_epoch = 0
        self.stop_reason = None

    def on_train_begin(self, net):
        self._start = None
        self.last_update = None
        self.stopped_epoch = 0
        self.stop_reason = None

    def on_epoch_begin(self, net, epoch):
        if self._start is None or self._start.shape != net.params.shape:
            self._start = net.params.copy()
        else:
            np.copyto(self._start, net.params)

    def on_epoch_end(self, net, epoch, logs):
        if self._start is None:  # an epoch_end without its epoch_begin
            return
        change = np.abs(net.params.astype(np.float64) - self._start).max(initial=0.0)
        self.last_update = float(change)
        if self.last_update < self.tol:
            self.stopped_epoch = epoch
            self.stop_reason = (f"no parameter changed by tol={self.tol:g} or more in epoch "
                                f"{epoch} (largest change {self.last_update:.3g})")
            net.stop_training = True


class TerminateOnNaN(Callback):
    """Stop training when the epoch's loss is NaN or infinite.

    Sets ``net.stop_training`` when ``logs["loss"]`` is not finite.  fastbp
    already stops a fit as soon as a loss or a weight becomes non-finite
    within an epoch (``fit(on_divergence=...)``: a ``DivergenceError`` or a
    warning), so this rarely fires; it exists for code written for Keras.

    Attributes
    ----------
    stopped_epoch : int
        Epoch at which the fit was stopped; 0 if it was not.
    stop_reason : str or None
        Why it stopped the fit (``net.history.stop_reason``); None if it
        did not.
    """

    stop_kind = "nan"

    def __init__(self):
        self.stopped_epoch = 0
        self.stop_reason = None

    def on_train_begin(self, net):
        self.stopped_epoch = 0
        self.stop_reason = None

    def on_epoch_end(self, net, epoch, logs):
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.stopped_epoch = epoch
            self.stop_reason = f"the epoch's loss is {float(loss)}"
            net.stop_training = True


# -- files and output ---------------------------------------------------------------------
class ModelCheckpoint(Callback):
    """Save the model with ``net.save`` at the end of epochs.

    Without ``save_best_only`` the model is saved after every epoch.  With
    it, the model is saved only after epochs whose ``monitor`` value is
    strictly better than every earlier one of this fit (the first epoch
    always is; NaN never is).  Files are written atomically by ``net.save``
    and hold the weights, optimizer state and history up to that epoch; read
    them back with ``fastbp.load``.

    Parameters
    ----------
    path : str or path-like
        File to write.  A string containing ``{`` is formatted with
        ``epoch`` and the epoch's metrics, e.g. ``"model-{epoch:03d}.fbp"``
        or ``"best-{val_loss:.4f}.fbp"``, to keep one file per save.
    monitor : str, optional
        Metric deciding what is best; required with ``save_best_only`` and
        unused without it.  A ValueError listing the available metrics is
        raised when it is missing from the epoch logs.
    mode : {"auto", "min", "max"}, default "auto"
        "auto" is "max" when the name contains "acc", else "min".
    save_best_only : bool, default False
        Save only improvements of ``monitor``.

    Attributes
    ----------
    best : float or None
        Best monitored value of this fit (``save_best_only``).
    saved : list of (int, str)
        (epoch, path) of every file written during this fit.
    """

    def __init__(self, path, monitor=None, mode="auto", save_best_only=False):
        who = "ModelCheckpoint"
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"{who}: path must be a str or path-like, got {path!r}")
        self.path = path
        if save_best_only and monitor is None:
            raise ValueError(f"{who}: save_best_only=True needs a monitor (e.g. "
                             "monitor='val_loss')")
        self.monitor = None if monitor is None else _check_monitor(monitor, who)
        self.mode = _resolve_mode(mode, monitor or "", who)
        self.save_best_only = bool(save_best_only)
        self.best = None
        self.saved = []

    def on_train_begin(self, net):
        self.best = None
        self.saved = []

    def _filepath(self, epoch, logs):
        path = os.fspath(self.path)
        if isinstance(path, str) and "{" in path:
            try:
                return path.format(epoch=epoch, **logs)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"ModelCheckpoint: cannot format the path {path!r} with epoch "
                                 f"and this epoch's metrics ({', '.join(sorted(logs))}): "
                                 f"{exc!r}") from None
        return path

    def on_epoch_end(self, net, epoch, logs):
        if self.save_best_only:
            current = _monitored(logs, self.monitor, "ModelCheckpoint")
            better = not math.isnan(current) and (
                self.best is None
                or (current < self.best if self.mode == "min" else current > self.best))
            if not better:
                return
            self.best = current
        path = self._filepath(epoch, logs)
        net.save(path)
        self.saved.append((epoch, os.fsdecode(path)))


class CSVLogger(Callback):
    """Write the metrics of every epoch to a CSV file, one row per epoch.

    The columns are ``epoch`` followed by the keys of the first epoch's logs
    in their order.  Floats are written with ``repr`` (shortest text that
    reads back to the same float).  ``grad_norm`` (a list, one value per
    Dense layer) is spread over the columns ``grad_norm_0``, ``grad_norm_1``,
    ... (the k-th Dense layer).  Later epochs write an empty cell for a
    column they lack and ignore metrics that are not columns.  The file is
    opened, appended to and closed at every epoch, so each finished row is
    on disk even if the fit is interrupted.

    Parameters
    ----------
    path : str or path-like
        CSV file.
    append : bool, default False
        False truncates the file when the fit begins.  True appends to it;
        when it already has a header line its columns are used (and no new
        header is written), so the rows of successive fits line up.
    separator : str, default ","
        Field delimiter.
    """

    def __init__(self, path, append=False, separator=","):
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"CSVLogger: path must be a str or path-like, got {path!r}")
        self.path = path
        self.append = bool(append)
        self.separator = separator
        self.columns = None

    @staticmethod
    def _flatten(logs):
        row = {}
        for key, value in logs.items():
            if isinstance(value, (list, tuple, np.ndarray)):
                for i, v in enumerate(np.asarray(value, dtype=np.float64).ravel()):
                    row[f"{key}_{i}"] = float(v)
            else:
                row[key] = value
        return row

    @staticmethod
    def _text(value):
        if isinstance(value, (float, np.floating)):
            return repr(float(value))
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return str(int(value))
        return str(value)

    def on_train_begin(self, net):
        self.columns = None
        if self.append and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with self._open("r") as f:
                header = next(csv.reader(f, delimiter=self.separator), None)
            if header:
                self.columns = header
        elif not self.append:
            with self._open("w"):
                pass
        else:
            _files.target(self.path, "a CSV log")  # a bad path fails now, not after an epoch

    def _open(self, mode):
        # a regular file only: a FIFO would block the fit, a device be written
        return _files.open_regular(self.path, mode, "a CSV log", newline="", encoding="utf-8")

    def on_epoch_end(self, net, epoch, logs):
        row = {"epoch": epoch, **self._flatten(logs)}
        lines = []
        if self.columns is None:
            self.columns = list(row)
            lines.append(self.columns)
        lines.append(["" if row.get(c) is None else self._text(row[c]) for c in self.columns])
        with self._open("a") as f:
            csv.writer(f, delimiter=self.separator).writerows(lines)


class ProgressBar(Callback):
    """A tqdm progress bar of the fit's epochs, showing loss and val_loss.

    The bar counts epochs.  It advances after every run of batches within
    an epoch (``on_batches_end``: about every 50 ms of training, so the bar
    of a long epoch moves during it, e.g. 36.41/200; tqdm redraws at most
    every ``mininterval``, 0.1 s by default), and to the whole number at
    the end of each epoch, when its postfix shows the epoch's ``loss`` and,
    when present, ``val_loss`` and ``val_accuracy``.  While it is among the
    callbacks, ``fit(verbose=1)`` prints no per-epoch lines (the bar's
    postfix carries them), but still prints its line saying why a fit
    stopped, after the bar is closed.  When the fit stops before its last
    epoch, the bar ends at the epochs actually run (its total becomes
    them) with ``stopped=<history.stopped_by>`` in its postfix.  It is
    created when the fit begins and closed when the fit ends, however it
    ends.  Needs tqdm (``pip install "fastbp[progress]"``), imported when
    the callback is created.

    Parameters
    ----------
    total : int, optional
        Epochs expected (the length of the bar); by default the ``epochs``
        of the fit (``net.fit_params``).
    **tqdm_kwargs
        Passed to ``tqdm.tqdm`` (e.g. ``file``, ``leave``, ``desc``,
        ``mininterval``, ``disable``).  With ``disable=True`` there is no
        bar, and fit prints its per-epoch lines again.

    Attributes
    ----------
    bar : tqdm or None
        The bar of the fit under way.
    """

    def __init__(self, total=None, **tqdm_kwargs):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ImportError('ProgressBar needs tqdm: pip install "fastbp[progress]"') from None
        self._tqdm = tqdm
        self.total = None if total is None else _count(total, "total", "ProgressBar")
        self.tqdm_kwargs = {"desc": "fit", "unit": "epoch", **tqdm_kwargs}
        self.bar = None
        self._epochs = 0  # epochs finished in this fit
        self._n_batches = 0
        self._postfix = {}

    @property
    def shows_progress(self):
        """True unless the bar is disabled: fit then prints no epoch lines."""
        return self.tqdm_kwargs.get("disable") is not True

    def on_train_begin(self, net):
        self._close()
        params = getattr(net, "fit_params", None) or {}
        total = self.total if self.total is not None else params.get("epochs")
        self._epochs, self._n_batches, self._postfix = 0, params.get("n_batches") or 0, {}
        self.bar = self._tqdm(total=total, **self.tqdm_kwargs)

    def on_batches_end(self, net, epoch, batch):
        if self.bar is not None and self._n_batches:
            # two decimals: tqdm prints the count as str(n)
            self._advance(round(self._epochs + min(batch / self._n_batches, 0.99), 2))

    def on_epoch_end(self, net, epoch, logs):
        if self.bar is None:
            return
        self._postfix = {k: f"{logs[k]:.4g}" for k in ("loss", "val_loss", "val_accuracy")
                         if k in logs}
        self.bar.set_postfix(self._postfix, refresh=False)
        self._epochs += 1
        self._advance(self._epochs)

    def _advance(self, n):
        """Move the bar to ``n`` epochs (exactly: not a sum of fractions),
        redrawn as tqdm's throttling allows."""
        if n > self.bar.n:
            self.bar.n = n
            self.bar.update(0)

    def on_train_end(self, net):
        history = getattr(net, "history", None)
        kind = getattr(history, "stopped_by", None)
        if self.bar is not None and kind is not None:
            # Stopped early: end at the epochs run, not frozen part way
            # (a bar stopped before any progress keeps its total: 0/E).
            if self.bar.n:
                self.bar.total = self.bar.n
            self.bar.set_postfix({**self._postfix, "stopped": kind}, refresh=False)
        self._close()

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# -- learning-rate schedules -----------------------------------------------------------
class _LRSchedule(Callback):
    """Shared part of the schedules: the optimizer check, base lr and step count."""

    def __init__(self):
        self.base_lr = None
        self.last_epoch = 0
        self.lrs = []

    def _optimizer(self, net):
        opt = getattr(net, "optimizer", None)
        name = type(self).__name__
        if opt is None or not hasattr(opt, "lr"):
            raise ValueError(f"{name} needs an optimizer with an lr attribute, got {opt!r}")
        if type(opt).__name__ == "Rprop":
            raise ValueError(f"{name}: Rprop's lr is only its initial step size (each weight "
                             "then adapts its own), so a schedule would have no effect")
        return opt

    def on_train_begin(self, net):
        self.base_lr = float(self._optimizer(net).lr)
        self.last_epoch = 0
        self.lrs = [self.base_lr]

    def _set(self, net, lr):
        net.optimizer.lr = float(lr)
        self.lrs.append(float(lr))

    def on_epoch_end(self, net, epoch, logs):
        if self.base_lr is None:
            raise RuntimeError(f"{type(self).__name__}: on_epoch_end before on_train_begin")
        self.last_epoch += 1
        self._set(net, self._closed_form(self.base_lr, self.last_epoch))

    def _closed_form(self, base_lr, t):
        raise NotImplementedError


_SCHEDULE_NOTE = """
    Attributes
    ----------
    base_lr : float
        :math:`\\eta_0`, the optimizer's lr when this fit began.
    last_epoch : int
        :math:`t`, epochs finished in this fit.
    lrs : list of float
        :math:`\\eta_0, \\eta_1, ...`: the rate of every epoch of this fit
        (the last one is set for the epoch after the fit).

    Notes
    -----
    Stepped once per epoch, at the epoch's end, following
    ``torch.optim.lr_scheduler.{name}``.  The rate is computed from the
    closed form above, written as the expression of torch's
    ``{name}._get_closed_form_lr`` in the same order, so it equals that
    bitwise.  Stepping torch's scheduler (its ``get_lr`` updates the current
    rate recursively) gives the same rates up to rounding: a few ulps (the
    tests hold them to a relative 1e-12 over 20 epochs).
    ``net.optimizer.lr`` is set, not multiplied, each epoch, so other changes
    to it during the fit are overwritten.  The base rate is re-read when
    every fit begins: a second fit restarts the schedule from the rate the
    first one left.
"""


class StepLR(_LRSchedule):
    __doc__ = r"""Decay the learning rate by ``gamma`` every ``step_size`` epochs.

    .. math::

        \eta_t = \eta_0 \, \gamma^{\lfloor t / \mathrm{step\_size} \rfloor}

    Parameters
    ----------
    step_size : int
        Epochs between decays (>= 1).
    gamma : float, default 0.1
        Multiplicative factor (>= 0).
""" + _SCHEDULE_NOTE.format(name="StepLR")

    def __init__(self, step_size, gamma=0.1):
        super().__init__()
        self.step_size = _count(step_size, "step_size", "StepLR")
        if self.step_size < 1:
            raise ValueError(f"StepLR: step_size must be >= 1, got {step_size!r}")
        self.gamma = _number(gamma, "gamma", "StepLR", low=0)

    def _closed_form(self, base_lr, t):
        return base_lr * self.gamma ** (t // self.step_size)


class ExponentialLR(_LRSchedule):
    __doc__ = r"""Decay the learning rate by ``gamma`` every epoch.

    .. math::

        \eta_t = \eta_0 \, \gamma^{t}

    Parameters
    ----------
    gamma : float
        Multiplicative factor per epoch (>= 0).
""" + _SCHEDULE_NOTE.format(name="ExponentialLR")

    def __init__(self, gamma):
        super().__init__()
        self.gamma = _number(gamma, "gamma", "ExponentialLR", low=0)

    def _closed_form(self, base_lr, t):
        return base_lr * self.gamma ** t


class CosineAnnealingLR(_LRSchedule):
    __doc__ = r"""Anneal the learning rate from its base value to ``eta_min``
    along half a cosine over ``T_max`` epochs (SGDR without restarts).

    .. math::

        \eta_t = \eta_{min} + \tfrac12 (\eta_0 - \eta_{min})
                 \left(1 + \cos\left(\pi \, t / T_{max}\right)\right)

    Past ``T_max`` the formula continues (the rate rises again, with period
    :math:`2 T_{max}`), as torch's does.

    Parameters
    ----------
    T_max : int
        Epochs of the half period (>= 1).
    eta_min : float, default 0
        Minimum learning rate (>= 0).
""" + _SCHEDULE_NOTE.format(name="CosineAnnealingLR")

    def __init__(self, T_max, eta_min=0):
        super().__init__()
        self.T_max = _count(T_max, "T_max", "CosineAnnealingLR")
        if self.T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be >= 1, got {T_max!r}")
        self.eta_min = _number(eta_min, "eta_min", "CosineAnnealingLR", low=0)

    def _closed_form(self, base_lr, t):
        # the expression of torch's CosineAnnealingLR._get_closed_form_lr, same order
        return (self.eta_min + (base_lr - self.eta_min)
                * (1 + math.cos(math.pi * t / self.T_max)) / 2)


class ReduceLROnPlateau(_LRSchedule):
    r"""Reduce the learning rate when a monitored metric stops improving.

    Follows ``torch.optim.lr_scheduler.ReduceLROnPlateau`` step for step,
    with ``scheduler.step(logs[monitor])`` at the end of every epoch:

    - the value :math:`a` is better than the best so far :math:`b` when
      :math:`a < b (1 - \mathrm{threshold})` (mode "min", threshold_mode
      "rel"), :math:`a < b - \mathrm{threshold}` ("min", "abs"),
      :math:`a > b (1 + \mathrm{threshold})` ("max", "rel") or
      :math:`a > b + \mathrm{threshold}` ("max", "abs"); :math:`b` starts
      at :math:`+\infty` ("min") or :math:`-\infty` ("max");
    - a better value becomes the best and resets the count of bad epochs;
      any other value increments it;
    - during a cooldown (``cooldown`` epochs after a reduction) the cooldown
      counter decreases by one and the bad-epoch count is reset to 0;
    - when the bad-epoch count exceeds ``patience``, the rate becomes
      :math:`\eta \leftarrow \max(\eta \cdot \mathrm{factor}, \mathrm{min\_lr})`
      (only if that lowers it by more than ``eps``), the cooldown starts and
      the count is reset.

    The rate is read from and written to ``net.optimizer.lr``, as torch reads
    and writes the param group's lr, so the rates equal torch's bitwise for
    the same metric values.  Counters and the best value are reset when a fit
    begins.

    Parameters
    ----------
    monitor : str, default "val_loss"
        Metric to watch; a ValueError listing the available metrics is
        raised when it is missing from the epoch logs.
    mode : {"min", "max"}, default "min"
    factor : float, default 0.1
        Multiplier of the rate at a reduction (0 <= factor < 1).
    patience : int, default 10
        Bad epochs tolerated before a reduction.
    threshold : float, default 1e-4
    threshold_mode : {"rel", "abs"}, default "rel"
    cooldown : int, default 0
    min_lr : float, default 0
        Lower bound of the rate.
    eps : float, default 1e-8
        Reductions smaller than this are skipped (torch's ``eps``).

    Attributes
    ----------
    best : float
    num_bad_epochs : int
    cooldown_counter : int
    lrs : list of float
        The rate of every epoch of this fit (the last one is set for the
        epoch after the fit).
    """

    def __init__(self, monitor="val_loss", mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0, eps=1e-8):
        super().__init__()
        who = "ReduceLROnPlateau"
        self.monitor = _check_monitor(monitor, who)
        if mode not in ("min", "max"):
            raise ValueError(f"{who}: mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"{who}: threshold_mode must be 'rel' or 'abs', "
                             f"got {threshold_mode!r}")
        self.mode, self.threshold_mode = mode, threshold_mode
        self.factor = _number(factor, "factor", who, low=0, high=1, high_open=True)
        self.patience = _count(patience, "patience", who)
        self.threshold = _number(threshold, "threshold", who)
        self.cooldown = _count(cooldown, "cooldown", who)
        self.min_lr = _number(min_lr, "min_lr", who, low=0)
        self.eps = _number(eps, "eps", who, low=0)
        self._reset()

    def _reset(self):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def _is_better(self, a, best):
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def on_train_begin(self, net):
        super().on_train_begin(net)
        self._reset()

    def on_epoch_end(self, net, epoch, logs):
        current = _monitored(logs, self.monitor, "ReduceLROnPlateau")
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in a cooldown do not count
        lr = float(net.optimizer.lr)
        if self.num_bad_epochs > self.patience:
            new_lr = max(lr * self.factor, self.min_lr)
            if lr - new_lr > self.eps:
                lr = new_lr
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._set(net, lr)
