"""Callbacks that stop training: ``EarlyStopping``, ``StopAtLoss``,
``StopOnSmallUpdate`` and ``TerminateOnNaN`` (protocol: ``fastbp.callbacks``)."""
import math

import numpy as np

from ._base import Callback, _check_monitor, _count, _monitored, _number, _resolve_mode

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
    copies the parameters, and BatchNorm's running statistics, at every
    improvement and writes the best copies back when the fit ends (whether
    or not it stopped early), as Keras 3 does (its moving mean and variance
    are weights); the optimizer state and history are left as they are.
    Not when Ctrl-C ends the fit: the model then stays as it was stopped,
    in step with its optimizer, history and unfinished epoch, so that
    fitting again continues the run (Keras's fit ends without its
    on_train_end there).

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
    best_buffers : ndarray or None
        Copy of the best epoch's running statistics (BatchNorm's; empty
        without BatchNorm; ``restore_best_weights`` only).
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
        self.best_buffers = None
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
                self.best_buffers = net._buffers.copy()
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
        if net.history.stopped_by == "interrupt":
            # restored weights beside epoch 5's optimizer state and position
            # made "fit again to continue" differ from the uninterrupted run
            return
        if self.restore_best_weights and self.best_weights is not None:
            net.params[...] = self.best_weights
            # the statistics the best epoch's validation loss was computed with
            net._buffers[...] = self.best_buffers
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
