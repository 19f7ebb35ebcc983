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
    Exactly once for each callback whose ``on_train_begin`` returned,
    however the fit ends: all epochs done, stopped by ``net.stop_training``
    or by the solver (Levenberg-Marquardt without progress), on a
    divergence, on Ctrl-C, or on an exception raised by a hook or by
    training (before the ``DivergenceError``, ``KeyboardInterrupt`` or
    other exception propagates).  Ctrl-C is held while these hooks run: a
    Ctrl-C pressed then raises KeyboardInterrupt once they have all run.
    Every one runs even if an earlier one raises; the first exception then
    propagates.  When a callback's ``on_train_begin`` raises, the callbacks
    before it get ``on_train_end``; it and those after it get neither.
    This holds for every fit: mini-batch optimizers and full-batch solvers
    (``optimizer=LevenbergMarquardt()``) run the same epoch loop
    (``fastbp._loop``).

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

The classes live in modules by kind (``_stopping``: EarlyStopping,
StopAtLoss, StopOnSmallUpdate, TerminateOnNaN; ``_output``:
ModelCheckpoint, CSVLogger, ProgressBar; ``_schedules``: the learning-rate
schedules; ``_base``: Callback and the argument checks); import them from
here.
"""
from ._base import Callback
from ._output import CSVLogger, ModelCheckpoint, ProgressBar
from ._schedules import CosineAnnealingLR, ExponentialLR, ReduceLROnPlateau, StepLR
from ._stopping import EarlyStopping, StopAtLoss, StopOnSmallUpdate, TerminateOnNaN

__all__ = ["Callback", "EarlyStopping", "StopAtLoss", "StopOnSmallUpdate", "ModelCheckpoint",
           "TerminateOnNaN", "CSVLogger", "ProgressBar", "StepLR", "ExponentialLR",
           "CosineAnnealingLR", "ReduceLROnPlateau"]

# They are documented and pickled as fastbp.callbacks.X, where users import them.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
