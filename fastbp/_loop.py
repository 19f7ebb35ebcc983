"""The epoch loop of every fit, and what it runs.

One loop, ``train``, drives ``Sequential.fit`` (with a mini-batch optimizer
or a full-batch solver such as Levenberg-Marquardt) and the scikit-learn
estimators' stochastic solvers.  It talks to two parties:

* a *run* (one fit's training of one model, one epoch at a time):
  ``refresh()`` takes up what changed between epochs (hyperparameters a
  callback set), ``run_epoch(epoch, interrupt)`` trains one epoch and
  returns an ``Epoch``, ``interrupt_reason(epoch, last, result)`` says how
  a Ctrl-C noticed after an epoch is recorded.  ``MiniBatch`` (here) runs an
  ``Optimizer``'s compiled steps through ``fastbp._runner``; a ``Solver``
  (``fastbp.lm.LevenbergMarquardt``) makes its own run with ``_start``.
* a *front* (what the caller does around epochs): the model API's
  callbacks, history, checkpoints and printed lines (``fastbp._fit``), or
  scikit-learn's bookkeeping (``fastbp.sklearn``).  Its methods: ``begin``,
  ``epoch_begin``, ``epoch_end`` (True: stop), ``diverged``,
  ``interrupted_in`` (Ctrl-C within an epoch), ``interrupted_after`` (Ctrl-C
  noticed after an epoch, with the run's reason), ``interrupted`` (a KeyboardInterrupt is ending
  the fit) and ``end``.

The contract kept here, once for every front and run: Ctrl-C is held
from ``front.begin()`` on until a call boundary (``_DeferredInterrupt``; a
second Ctrl-C interrupts at once); once ``front.begin()`` has returned,
``front.end()`` runs exactly once, in a ``finally``, however the fit ends
(all epochs, a stop, a divergence, Ctrl-C, an exception), with Ctrl-C
still held; a Ctrl-C that arrives during it raises KeyboardInterrupt once
it has run.

It imports neither the model nor the fronts (they import it).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import NamedTuple

from ._runner import STATUS_LOSS_NONFINITE, STATUS_OK
from ._threads import _DeferredInterrupt
from .layers import Dense


class Stop(NamedTuple):
    """Why a fit stops: ``history.stopped_by`` (``kind``) and
    ``history.stop_reason`` (``reason``), and which weights the model then
    holds, in words (None: the last recorded epoch's)."""

    kind: str
    reason: str
    weights: str | None = None


class Divergence(NamedTuple):
    """A loss or weight became non-finite: the full ``message`` (of the
    DivergenceError or warning), the short ``reason`` recorded in the
    history, the weights the model holds, and the 1-based ``batch``."""

    message: str
    reason: str
    weights: str
    batch: int


class Epoch:
    """What one ``run_epoch`` did.

    Attributes
    ----------
    loss : float or None
        The epoch's mean training loss (None when it did not finish).
    rows : int
        Rows trained by this run of the epoch (samples/s).
    steps : int
        Updates applied.
    metrics : dict
        Further metrics to record (``grad_norm``).
    stop : Stop or None
        The run asks the fit to stop after this epoch (Levenberg-Marquardt
        found no step).
    divergence : Divergence or None
        The epoch ended on a non-finite loss or weight (not finished).
    interrupted : Stop or None
        Ctrl-C stopped the epoch before its end (not finished).
    """

    __slots__ = ("loss", "rows", "steps", "metrics", "stop", "divergence", "interrupted")

    def __init__(self, loss=None, rows=0, steps=0, metrics=None, stop=None, divergence=None,
                 interrupted=None):
        self.loss, self.rows, self.steps = loss, rows, steps
        self.metrics = {} if metrics is None else metrics
        self.stop, self.divergence, self.interrupted = stop, divergence, interrupted


class Solver:
    """Base class of full-batch solvers that ``Sequential.fit`` accepts as
    ``optimizer=`` (``fastbp.lm.LevenbergMarquardt``): they train on the whole
    data at once, one iteration per epoch, and none of the mini-batch
    options applies to them.

    A subclass implements ``_start(net, X, Y, W, loss)``: check that it can
    train ``net`` (ValueError otherwise, before anything changes) and return
    a run (see this module's docstring) for dense X (n, n_features), targets
    Y (n, k) and sample weights W (n,); and ``reset()`` and
    ``get_config()`` as an optimizer has them.
    """

    #: Sequential.fit hands it the whole data (kept for code that checks it)
    full_batch_solver = True
    #: it has no compiled update (kept for code that checks it)
    kernel = None

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def is_solver(optimizer):
    """Whether ``optimizer`` (an instance or a class) is a full-batch Solver."""
    return isinstance(optimizer, Solver) or (isinstance(optimizer, type)
                                             and issubclass(optimizer, Solver))


def train(run, front, epochs, held=None):
    """Run ``epochs`` (an iterable of epoch numbers) of ``run`` under
    ``front``, with the contract of this module's docstring; ``held``: the
    caller's object already holding Ctrl-C, used instead of a new
    ``_DeferredInterrupt`` (a data-parallel fit holds it from its first
    collective, and agrees on it across ranks)."""
    try:
        with nullcontext(held) if held is not None else _DeferredInterrupt() as interrupt:
            # A Ctrl-C during on_train_begin is held too: the first epoch
            # then stops before its first call (mini-batch) or after its
            # iteration (a solver), recorded like any other.
            front.begin()
            try:
                _epochs(run, front, epochs, interrupt)
            except KeyboardInterrupt:
                front.interrupted()
                raise
            finally:
                front.end()
    except KeyboardInterrupt:  # one that arrived during front.begin() or front.end()
        front.interrupted()
        raise


def _epochs(run, front, epochs, interrupt):
    for e in epochs:
        front.epoch_begin(e)
        run.refresh()  # a callback may have changed the hyperparameters
        start = time.perf_counter()
        result = run.run_epoch(e, interrupt)
        seconds = time.perf_counter() - start
        if result.divergence is not None:
            front.diverged(e, result.divergence)
            return
        if result.interrupted is not None:
            front.interrupted_in(e, result.interrupted)
            return
        stop = front.epoch_end(e, result, seconds)
        if interrupt.requested:  # during the epoch's last call, or after it
            front.interrupted_after(e, run.interrupt_reason(e, result))
        if stop:
            return


class MiniBatch:
    """A run of an optimizer's mini-batch steps through an ``_EpochRunner``.

    Parameters
    ----------
    runner : _EpochRunner
        The fit's engine runner (its optimizer state bound).
    pending : dict or None
        The unfinished epoch the first epoch resumes (``net._position``).
    resumable : bool
        Record where an unfinished epoch stands in ``net._position`` when
        Ctrl-C or a checkpoint stops within it (the model API).
    save : callable or None
        Called with no argument to write a checkpoint within an epoch.
    checkpoint_every : int or None
        Batches between checkpoints within an epoch.
    grad_norms : bool
        Report each Dense layer's mean gradient norm (``grad_norm``).
    order : callable or None
        Called before each epoch for that epoch's sample order (an int64
        permutation); None: the runner's own (shuffled or not).
    last_epoch : int or None
        The fit's last epoch (for the Ctrl-C record).
    need_steps : bool
        An epoch that applied no update (every batch's weights summed to
        zero) raises ValueError: the estimators' mean loss, counted by
        samples, would divide by zero (as scikit-learn's does).
    """

    def __init__(self, runner, *, pending=None, resumable=False, save=None,
                 checkpoint_every=None, grad_norms=False, order=None, last_epoch=None,
                 need_steps=False):
        self.runner = runner
        # A model's fit follows net.optimizer: a callback may replace it
        # (warm-up with Adam, then SGD), as it may change its settings.
        runner.follow_model = resumable
        self.net = runner.net
        self.pending = pending
        self.resumable, self.save = resumable, save
        self.checkpoint_every = checkpoint_every
        self.dense = ([i for i, layer in enumerate(self.net.layers) if isinstance(layer, Dense)]
                      if grad_norms else None)
        self.order = order
        self.last_epoch = last_epoch
        self.need_steps = need_steps

    def refresh(self):
        # what a callback changed between epochs (the runner also takes up
        # changes at each call into the engine, within an epoch)
        self.runner.refresh_optimizer()
        self.runner.settings_current = True

    def run_epoch(self, epoch, interrupt):
        """Batches of ``epoch`` in runs that end at the epoch's end, a
        checkpoint or Ctrl-C."""
        run, net = self.runner, self.net
        if self.resumable:
            net._position = None
        b = run.start_epoch(self.pending, order=None if self.order is None else self.order())
        self.pending = None
        n = run.n_batches
        every = self.checkpoint_every
        while b < n:
            stop = n if not every else min(n, (b // every + 1) * every)
            status, b = run.run(b, stop, interrupt)
            if status != STATUS_OK:
                return Epoch(divergence=_divergence(status, epoch, b))
            if b < n and (interrupt.requested or b == stop):
                if self.resumable:
                    net._position = run.position(epoch, b)
                if self.save is not None:
                    self.save()
                if interrupt.requested:
                    return Epoch(interrupted=_interrupted_within(epoch, b, n))
                if self.resumable:
                    net._position = None
        if self.need_steps and run.steps == 0:
            raise ValueError("the sample weights of every mini-batch of this epoch sum to zero "
                             "(positive and negative weights cancel): nothing can be learned; "
                             "change batch_size or the weights")
        metrics = {}
        if self.dense is not None:
            steps = run.steps_before + run.steps  # a resumed epoch's too
            metrics["grad_norm"] = [float(run.grad_norms[i]) / max(steps, 1)
                                    for i in self.dense]
        # a resumed epoch ran only its batches from the saved position on
        return Epoch(loss=run.epoch_loss(), rows=run.rows_run(), steps=run.steps,
                     metrics=metrics)

    def interrupt_reason(self, epoch, result):
        """The stop reason of a Ctrl-C noticed after ``epoch`` ended."""
        if self.last_epoch is None or epoch < self.last_epoch:
            return (f"interrupted by Ctrl-C before batch 1 of epoch {epoch + 1}; fit again "
                    "to continue")
        return (f"interrupted by Ctrl-C as epoch {epoch} ended, the last this fit had to "
                "train: the fit is complete")


def _interrupted_within(epoch, batch, n_batches):
    """Ctrl-C stopped ``epoch`` after ``batch`` of its ``n_batches``."""
    held = (f"the weights after batch {batch} of {n_batches} of epoch {epoch}" if batch
            else f"the weights epoch {epoch} started with")
    return Stop("interrupt", f"interrupted by Ctrl-C before batch {batch + 1} of epoch {epoch}; "
                "fit again to continue", held)


def _divergence(status, epoch, failed):
    """Batch ``failed`` (0-based) of ``epoch`` made the loss or a weight
    non-finite; the model holds the weights from before it."""
    what = "the loss" if status == STATUS_LOSS_NONFINITE else "an updated weight"
    batch = failed + 1
    message = (f"training diverged at epoch {epoch}, batch {batch}: {what} became NaN or "
               "infinite; training stopped and the weights of the last finite step were kept "
               "(try a smaller learning rate)")
    held = (f"the weights of the last finite step, after batch {failed} of epoch {epoch}"
            if failed else f"the weights epoch {epoch} started with")
    reason = (f"training diverged in batch {batch} of epoch {epoch}: {what} became NaN or "
              "infinite (try a smaller learning rate)")
    return Divergence(message, reason, held, batch)

