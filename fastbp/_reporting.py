"""What a fit tells its callbacks and its user.

``Sequential.fit`` (``fastbp._fit``) makes one ``FitReport`` per fit, whatever
trains the model (a mini-batch optimizer or a full-batch solver such as
Levenberg-Marquardt), so callbacks, stop reasons and printed lines follow one
contract:

* the callbacks' hooks run in list order, and the report notes which
  callback set ``net.stop_training`` (its ``stop_reason`` and ``stop_kind``
  attributes, when it has them, say why);
* ``on_train_end`` runs once for each callback whose ``on_train_begin``
  returned, however the fit ends (the epoch loop, ``fastbp._loop.train``,
  calls ``end`` in a ``finally``);
* at ``verbose`` >= 1 one line is printed per epoch, unless a callback shows
  the progress itself (a true ``shows_progress``: the ProgressBar);
* every stop before the last epoch (a callback, a target, a divergence,
  Ctrl-C, ...) is recorded in ``net.history.stop_reason`` and
  ``net.history.stopped_by``, and at ``verbose`` >= 1 one line is printed
  when the fit ends (after ``on_train_end``, which may restore other
  weights) saying where and why it stopped and which weights the model
  holds.
"""
from .history import STOP_KINDS


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or parameter.

    The model keeps the weights of the last finite step.  Attributes
    ``epoch`` and ``batch`` (both 1-based) say where it happened.
    """

    def __init__(self, message, epoch, batch):
        super().__init__(message)
        self.epoch, self.batch = epoch, batch


class FitReport:
    """The hooks, the stop record and the printed lines of one fit.

    Parameters
    ----------
    net : Sequential
        The model being fitted; its ``history`` receives the stop record
        (cleared here: a fit that runs all its epochs leaves None).
    callbacks : list
        The fit's callbacks.
    last_epoch : int
        The last epoch this fit may train (cumulative numbering).
    verbose : int or bool
        Whether to print.
    """

    def __init__(self, net, callbacks, last_epoch, verbose):
        self.net = net
        self.callbacks = list(callbacks)
        self.last_epoch = last_epoch
        self.verbose = bool(verbose)
        self.epoch_lines = self.verbose and not any(getattr(c, "shows_progress", False)
                                                    for c in self.callbacks)
        self.epoch = None  # the epoch under way, or the last one begun
        self._stopper = None  # the callback that set net.stop_training
        self._stop = None  # (epoch, whether it ended, what weights the model holds)
        self._begun = []  # the callbacks whose on_train_begin returned: owed on_train_end
        net.history.stop_reason = None
        net.history.stopped_by = None

    # -- hooks -------------------------------------------------------------------------
    def _call(self, hook, *args):
        for callback in self.callbacks:
            self._call_one(callback, hook, *args)

    def _call_one(self, callback, hook, *args):
        method = getattr(callback, hook, None)
        if method is None:
            return
        asked = self.net.stop_training
        method(self.net, *args)
        if not self.net.stop_training:
            self._stopper = None  # (un)set again: no one's request stands
        elif not asked:
            self._stopper = callback

    def begin(self):
        """``on_train_begin`` of every callback.  When one raises, the
        callbacks before it (whose ``on_train_begin`` returned) get their
        ``on_train_end`` before the exception propagates: each callback that
        began ends, once."""
        self._begun = []
        try:
            for callback in self.callbacks:
                self._call_one(callback, "on_train_begin")
                self._begun.append(callback)
        except BaseException:
            self._end_hooks()
            raise

    def epoch_begin(self, epoch):
        """``on_epoch_begin`` of every callback."""
        self.epoch = epoch
        self._call("on_epoch_begin", epoch)

    def batches_hook(self):
        """A function ``after_batches(batch)`` that calls ``on_batches_end(net,
        epoch, batch)`` on the callbacks that have it, for the engine driver
        to call after each run of batches; None when none has it (the driver
        then calls nothing)."""
        if not any(callable(getattr(c, "on_batches_end", None)) for c in self.callbacks):
            return None

        def after_batches(batch):
            self._call("on_batches_end", self.epoch, batch)
        return after_batches

    def epoch_end(self, epoch, metrics):
        """The epoch's line, then ``on_epoch_end`` of every callback.  Returns
        True when the fit is to stop here (``net.stop_training``), the stop
        then recorded."""
        if self.epoch_lines:
            print_epoch(epoch, self.last_epoch, metrics)
        self._call("on_epoch_end", epoch, metrics)
        if not self.net.stop_training:
            return False
        self._record_callback_stop(epoch)
        return True

    def _record_callback_stop(self, epoch):
        stopper = self._stopper
        reason = getattr(stopper, "stop_reason", None)
        kind = getattr(stopper, "stop_kind", "callback")
        if not isinstance(reason, str) or not reason:
            reason = (f"{type(stopper).__name__} set net.stop_training" if stopper is not None
                      else "net.stop_training was set")
        self.stop(kind if kind in STOP_KINDS else "callback", reason, epoch)

    # -- stops -------------------------------------------------------------------------
    def stop(self, kind, reason, epoch, ended=True, weights=None):
        """Record why the fit stops (a later call overrides).

        Parameters
        ----------
        kind : str
            ``history.stopped_by``, one of ``fastbp.history.STOP_KINDS``.
        reason : str
            ``history.stop_reason``: a short sentence.
        epoch : int
            The epoch it stops at (after it, if ``ended``) or in.
        ended : bool
            Whether that epoch was finished and recorded.
        weights : str, optional
            What the model holds then, e.g. "the weights after batch 40 of
            epoch 7"; default: the last recorded epoch's.
        """
        self.net.history.stop_reason = reason
        self.net.history.stopped_by = kind
        self._stop = (epoch, ended, weights)

    def interrupted(self):
        """A KeyboardInterrupt ends the fit: record it unless a stop already
        says why (the fit's own handling of Ctrl-C records where)."""
        if self.net.history.stopped_by is not None:
            return
        if self.epoch is None:  # during on_train_begin: no epoch began
            first = getattr(self.net, "fit_params", {}).get("first_epoch", self.last_epoch)
            self.stop("interrupt", "interrupted by Ctrl-C", first, False,
                      "the weights it started with")
            return
        epoch = self.epoch
        ended = bool(self.net.history.epoch) and self.net.history.epoch[-1] == epoch
        weights = None if ended else f"the weights it had when interrupted, within epoch {epoch}"
        self.stop("interrupt", "interrupted by Ctrl-C", epoch, ended, weights)

    def end(self):
        """``on_train_end`` of every callback, then (verbose) the line that
        says how the fit ended."""
        self._end_hooks()
        if self.verbose:
            line = self.summary()
            if line is not None:
                print(line, flush=True)

    def _end_hooks(self):
        """``on_train_end`` of each callback that began, once: every one of
        them runs even if an earlier one raises (the first exception then
        propagates once they all ran)."""
        begun, self._begun = self._begun, []
        error = None
        for callback in begun:
            try:
                self._call_one(callback, "on_train_end")
            except BaseException as exc:  # noqa: PERF203  (the others still end)
                error = error or exc
        if error is not None:
            raise error

    def summary(self):
        """The line printed when the fit ends: where and why it stopped and
        which weights the model holds; None for a fit that ran all its epochs
        and holds the last one's weights."""
        history = self.net.history
        held = self._held()
        if history.stop_reason is None:
            restored = history.weights_epoch
            if restored is None or (history.epoch and restored == history.epoch[-1]):
                return None
            return (f"Finished epoch {history.epoch[-1]} of {self.last_epoch}; the model "
                    f"holds {held}.")
        epoch, ended = self._stop[:2] if self._stop else (self.epoch, True)
        head = f"Stopped {'at' if ended else 'in'} epoch {epoch} of {self.last_epoch}"
        return f"{head}: {history.stop_reason}; the model holds {held}."

    def _held(self):
        """Which weights the model holds, in words."""
        history = self.net.history
        if history.weights_epoch is not None:
            note = history.weights_note or "restored"
            return f"epoch {history.weights_epoch}'s weights ({note})"
        weights = self._stop[2] if self._stop else None
        if weights:
            return weights
        if history.epoch:
            return f"epoch {history.epoch[-1]}'s weights, the last trained"
        return "the weights it started with"


def print_epoch(epoch, last, metrics):
    """One line of an epoch's metrics (``fit(verbose=1)``)."""
    parts = [f"epoch {epoch}/{last}", f"loss {metrics['loss']:.4f}"]
    if "val_loss" in metrics:
        parts.append(f"val_loss {metrics['val_loss']:.4f}")
    if "val_accuracy" in metrics:
        parts.append(f"val_accuracy {metrics['val_accuracy']:.4f}")
    parts.append(f"{metrics['time']:.3f} s")
    parts.append(f"{metrics['samples_per_s']:,.0f} samples/s")
    print(" - ".join(parts), flush=True)
