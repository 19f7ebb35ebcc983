"""The fit driver of ``Sequential.fit``: its argument checks (a ``_Plan``),
the run it trains with, and what the model API does around each epoch.

``fit`` resolves the settings (``fastbp._resume``), checks them and the
data, then starts a run: a full-batch ``Solver``'s (Levenberg-Marquardt,
given as ``optimizer=``), or an optimizer's mini-batch steps through an
``_EpochRunner`` (``fastbp._loop.MiniBatch``).  The epoch loop itself is
``fastbp._loop.train``, shared with the scikit-learn estimators; the
``_ModelFront`` here is what the model API does around it: the callbacks'
hooks and printed lines (a ``FitReport``), the history and validation
metrics, checkpoints after epochs, and DivergenceError or KeyboardInterrupt
with the stop recorded.

It works on a ``Sequential`` passed in as ``net`` and imports neither
``fastbp.model`` (which imports it) nor anything that imports the model.
"""
from __future__ import annotations

import functools
import numbers
import os
import warnings

import numpy as np

from . import _files, _loop, _reporting, _resume
from . import optim as _optim
from ._loop import MiniBatch, is_solver
from ._optimizer import _flag
from ._reporting import DivergenceError
from ._runner import _dense_rows, _EpochRunner
from ._threads import _blas_threads, _DeferredInterrupt
from ._validation import check_kernel_dim, check_n_threads, check_positive_int
from .layers import BatchNorm
from .losses import data_loss


class _Plan:
    """What one fit will do, checked before anything changes: the data
    (checked X, targets Y and weights W; validation pair or None), the batch
    size, thread count and clipping, the unfinished epoch it resumes (or
    None), the optimizer, and the settings to record on the model."""

    __slots__ = ("X", "Y", "W", "validation", "n", "epochs", "batch", "checkpoint_every",
                 "n_threads", "clip", "pending",
                 "opt", "loss", "shuffle", "on_divergence", "grad_norms", "fitted", "ignored",
                 "ranks")


def fit(net, X, y, loss, optimizer, epochs, batch_size, shuffle, validation_data, verbose,
        n_threads, on_divergence, checkpoint, checkpoint_every, sample_weight, clip_norm,
        clip_value, grad_norms, callbacks, comm=None, shard=False, sync_batchnorm=False,
        sync_every=1):
    """``Sequential.fit``'s work (its docstring says what each argument
    means); the caller holds the model."""
    # 0, 1 or 2 (Keras's one line an epoch, as 1 here), or a bool; not any
    # truthy value: verbose="0" printed
    if isinstance(verbose, (int, np.integer)) and verbose in (0, 1, 2):
        verbose = int(bool(verbose))
    else:
        raise ValueError(f"verbose must be 0, 1 or 2 (or True or False), got {verbose!r}")
    ranks = _ranks(comm, shard, sync_batchnorm, sync_every)
    plan = _plan(net, X, y, loss, optimizer, epochs, batch_size, shuffle, validation_data,
                 n_threads, on_divergence, checkpoint, checkpoint_every, sample_weight,
                 clip_norm, clip_value, grad_norms, ranks)
    callbacks = list(callbacks or [])
    first_epoch = net.history.n_epochs + 1
    last_epoch = first_epoch + plan.epochs - 1
    if ranks is not None:
        if is_solver(plan.opt):
            raise ValueError(f"{type(plan.opt).__name__} trains on the whole data in one "
                             "process: it does not support comm")
        if ranks.rank != 0:
            # rank 0 prints and writes; every rank runs the rest, so that
            # histories and stopping decisions agree
            verbose, checkpoint = 0, None
            callbacks = [c for c in callbacks if ranks.keeps(c)]
        return _fit_ranks(net, plan, verbose, callbacks, checkpoint, first_epoch, last_epoch)
    if checkpoint is not None:
        # a folder, a FIFO or a missing folder fails now, not at the first
        # save after an epoch of training (with comm, rank 0's first save
        # says so: a check on one rank alone would leave the others waiting)
        _files.target(checkpoint, "a model file")
    run = _start(net, plan, checkpoint, last_epoch)
    _record_settings(net, plan)
    front = _model_front(net, plan, run, callbacks, verbose, checkpoint, first_epoch,
                         last_epoch)
    with _blas_threads(plan.n_threads):
        _loop.train(run, front, range(first_epoch, last_epoch + 1))
    return net.history


def _fit_ranks(net, plan, verbose, callbacks, checkpoint, first_epoch, last_epoch):
    """A data-parallel fit (``comm``): from the first collective on, Ctrl-C
    is held (and agreed on: ``AgreedInterrupt``) so that no rank leaves a
    collective the others are in; the ranks check their data and settings
    against each other and take rank 0's model before the runner is made."""
    from .distributed import AgreedInterrupt

    opt, ranks = plan.opt, plan.ranks
    state = opt._bind(net.n_params, net.dtype)
    _record_settings(net, plan)
    with _DeferredInterrupt() as interrupt:
        ranks.check_data(plan.X, plan.Y, plan.W, plan.batch)
        ranks.check_settings(net, plan, opt)
        ranks.broadcast_model(net, state, opt)
        run = _minibatch(net, plan, state, checkpoint, last_epoch)
        agreed = AgreedInterrupt(interrupt, ranks)
        front = _model_front(net, plan, run, callbacks, verbose, checkpoint, first_epoch,
                             last_epoch, agreed)
        with _blas_threads(plan.n_threads):
            _loop.train(run, front, range(first_epoch, last_epoch + 1), held=agreed)
    return net.history


def _record_settings(net, plan):
    """What the model keeps of this fit: its optimizer, loss and settings."""
    net.optimizer = plan.opt
    net._last_loss, net._fit_settings = plan.loss, plan.fitted


def _model_front(net, plan, run, callbacks, verbose, checkpoint, first_epoch, last_epoch,
                 agreed=None):
    """The fit's ``_ModelFront``, with ``net.fit_params`` set for callbacks."""
    net.stop_training = False
    batch, n_batches = ((plan.n, 1) if is_solver(plan.opt)
                        else (plan.batch, run.runner.n_batches))
    # What callbacks may want to know about this fit.
    net.fit_params = {"epochs": plan.epochs, "first_epoch": first_epoch, "last_epoch": last_epoch,
                      "n_samples": plan.n, "batch_size": batch, "n_batches": n_batches}
    report = _reporting.FitReport(net, callbacks, last_epoch, verbose)
    if isinstance(run, MiniBatch):
        run.runner.after_batches = report.batches_hook()
    return _ModelFront(net, report, plan.validation, plan.loss, plan.on_divergence, checkpoint,
                       plan.ranks, agreed)


def _ranks(comm, shard, sync_batchnorm, sync_every=1):
    """A ``fastbp.distributed.Ranks`` for ``comm`` (importing MPI only
    then), or None."""
    if comm is None:
        if shard is not False or sync_batchnorm is not False or sync_every != 1:
            raise ValueError("shard, sync_batchnorm and sync_every need comm (the ranks that "
                             "train together)")
        return None
    from .distributed import Ranks
    return Ranks(comm, shard, sync_batchnorm, sync_every)


def _plan(net, X, y, loss, optimizer, epochs, batch_size, shuffle, validation_data, n_threads,
          on_divergence, checkpoint, checkpoint_every, sample_weight, clip_norm, clip_value,
          grad_norms, ranks=None):
    """Resolve the settings (``fastbp._resume``: a setting not passed is the
    last fit's), check every argument and the data, and issue the
    ResumeWarning: a ``_Plan``, or ValueError before the model changes
    (except a first build for X's width)."""
    given = dict(loss=loss, batch_size=batch_size, shuffle=shuffle, clip_value=clip_value,
                 clip_norm=clip_norm, on_divergence=on_divergence, grad_norms=grad_norms)
    settings, changes = _resume.resolve(net._fit_settings, given, sample_weight is not None)
    (loss, batch_size, shuffle, clip_value, clip_norm, on_divergence,
     grad_norms) = (settings[name] for name in given)
    # a yes/no, not any truthy value: shuffle="False" shuffled
    shuffle, grad_norms = _flag(shuffle, "shuffle"), _flag(grad_norms, "grad_norms")
    plan = _Plan()
    plan.epochs = check_positive_int(epochs, "epochs")
    if on_divergence not in ("raise", "warn"):
        raise ValueError(f"on_divergence must be 'raise' or 'warn', got {on_divergence!r}")
    plan.checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every",
                                               allow_none=True)
    if plan.checkpoint_every and checkpoint is None:
        raise ValueError("checkpoint_every needs a checkpoint path")
    if checkpoint is not None and (not isinstance(checkpoint, (str, os.PathLike))
                                   or not os.fspath(checkpoint)):
        raise ValueError(f"checkpoint must be a non-empty path, got {checkpoint!r}")
    plan.X, plan.Y, plan.W = net._prepare(X, y, loss, sample_weight=sample_weight)
    plan.validation = None
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("validation_data must be a pair (X_val, y_val)")
        Xv, Yv, _ = net._prepare(*validation_data, loss, name_x="X_val", name_y="y_val")
        plan.validation = (Xv, Yv)
    n = plan.n = plan.X.shape[0]
    plan.ranks = ranks
    if ranks is not None and ranks.shard:
        batch = _sharded_batch(ranks, plan, batch_size)
    else:
        batch = n if batch_size is None else min(check_positive_int(batch_size, "batch_size"), n)
    what = "batch_size" if batch_size is not None else "the batch size (batch_size=None: all rows)"
    check_kernel_dim(batch, what, "pass a smaller batch_size")
    if any(isinstance(l, BatchNorm) for l in net.layers):
        _check_batchnorm_rows(n, batch, ranks)
    plan.batch = batch
    plan.n_threads = check_n_threads(n_threads)
    plan.clip = [_checked_clip(name, value)
                 for name, value in (("clip_value", clip_value), ("clip_norm", clip_norm))]
    if ranks is not None:
        net._position = ranks.comm.bcast(net._position, root=0)
        if ranks.shard and net._position is not None:
            raise ValueError("a sharded fit cannot resume an unfinished epoch: resume with "
                             "shard=False, or call discard_partial_epoch()")
    pending = plan.pending = net._position
    if pending is not None and (pending["n_samples"], pending["batch_size"],
                                pending["shuffle"]) != (n, batch, bool(shuffle)):
        raise ValueError(
            f"the model holds an unfinished epoch of {pending['n_samples']} samples in "
            f"batches of {pending['batch_size']} (shuffle={pending['shuffle']}); resume it "
            "with the same data and settings, or call discard_partial_epoch()")
    # past _fit.fit, Sequential.fit and _holding_the_model's wrapper: the caller
    _resume.warn(changes, stacklevel=6)
    plan.fitted = _resume.record(dict(settings, batch_size=batch_size,
                                      clip_value=clip_value, clip_norm=clip_norm),
                                 sample_weight is not None)
    if optimizer is None and net.optimizer is not None:
        instance = (isinstance(net.optimizer, _optim.Optimizer)
                    or is_solver(net.optimizer) and not isinstance(net.optimizer, type))
        if not instance:
            # set by hand or by a callback (fit refuses it there too): the
            # next fit failed inside with an AttributeError
            raise ValueError(f"net.optimizer is {net.optimizer!r}, not an optimizer instance; "
                             "set one (e.g. net.optimizer = fastbp.optim.Adam()) or pass "
                             "fit(optimizer=...)")
        plan.opt = net.optimizer
    else:
        plan.opt = _optimizer_or_solver(optimizer)
    plan.loss, plan.shuffle = loss, shuffle
    plan.on_divergence, plan.grad_norms = on_divergence, grad_norms
    # What a full-batch solver cannot do, if asked for in this call (settings
    # recorded by an earlier fit, not passed now, do not apply).
    plan.ignored = [name for name, value in (
        ("batch_size", batch_size), ("shuffle", shuffle),
        ("checkpoint", checkpoint), ("clip_norm", clip_norm), ("clip_value", clip_value),
        ("grad_norms", grad_norms), ("n_threads", plan.n_threads))
        if value and given.get(name, None) is not _resume.LAST]
    return plan


def _sharded_batch(ranks, plan, batch_size):
    """This rank's rows of each global batch (shard=True)."""
    if batch_size is None:
        raise ValueError("shard=True needs a batch_size (the global batch)")
    if not isinstance(plan.X, np.ndarray):
        raise ValueError("shard=True needs a dense X; pass X.toarray() or shard=False")
    return ranks.local_batch(check_positive_int(batch_size, "batch_size"))


def _check_batchnorm_rows(n, batch, ranks):
    """BatchNorm's batch statistics need 2 rows in each batch, and with
    comm in each rank's part of it (its statistics are the rank's own); with
    sync_batchnorm, 2 in each batch and 1 in each rank's part (every rank
    takes part in the statistics' sums)."""
    sizes = {batch, n % batch or batch}
    if ranks is not None and not ranks.shard:
        # each rank's contiguous slice of a batch of m rows
        parts = {m * (r + 1) // ranks.size - m * r // ranks.size
                 for m in sizes for r in range(ranks.size)}
    if ranks is not None and ranks.sync_batchnorm:
        if min(sizes) < 2 or min(parts) < 1:
            raise ValueError(f"sync_batchnorm needs at least 2 rows in every batch and 1 in "
                             f"every rank's part of it: {n} samples in batches of {batch} on "
                             f"{ranks.size} ranks leave a batch of {min(sizes)} or a part of "
                             f"{min(parts)}; change batch_size")
        return
    if ranks is not None and not ranks.shard:
        sizes = parts
    elif ranks is not None:
        sizes |= {0} if ranks.any(n < batch * ranks.n_batches(n, batch)) else set()
    if min(sizes) < 2:
        raise ValueError(f"BatchNorm needs at least 2 rows in every batch"
                         f"{' on every rank' if ranks is not None else ''}: {n} samples in "
                         f"batches of {batch} leave a batch of {min(sizes)} (as torch, which "
                         "refuses one-row batches in training); change batch_size")


def _optimizer_or_solver(optimizer):
    """``fit``'s optimizer argument as an object: a Solver instance or class
    (Levenberg-Marquardt), or what ``fastbp.optim.get`` makes of it."""
    if is_solver(optimizer):
        return optimizer() if isinstance(optimizer, type) else optimizer
    return _optim.get(optimizer)


def _checked_clip(name, value):
    """clip_value or clip_norm as the engine takes it (0.0: off)."""
    # numbers.Real: NumPy's scalars too (np.float32(1.0) was refused)
    if value is not None and (isinstance(value, (bool, np.bool_))
                              or not isinstance(value, numbers.Real)
                              or not value > 0 or not np.isfinite(value)):
        raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    return 0.0 if value is None else float(value)


def _start(net, plan, checkpoint, last_epoch):
    """The run of this fit: a Solver's (checked by it, on the whole data made
    dense: its Jacobian holds all rows anyway) or an optimizer's mini-batch
    steps (its state bound).  ValueError before the model changes."""
    opt = plan.opt
    if not (np.isfinite(net._params).all() and np.isfinite(net._buffers).all()):
        # set so by hand (layer.W[...] = ...): the first step would "diverge"
        # and report the weights of a last finite step that never was
        raise ValueError("the model's parameters (or BatchNorm's running statistics) "
                         "contain NaN or infinity before training; set finite values, or "
                         "call build(n_features) again")
    if is_solver(opt):
        if plan.ignored:
            raise ValueError(f"{type(opt).__name__} trains on the whole data at once and "
                             f"does not support {', '.join(plan.ignored)}")
        if plan.validation is not None:
            plan.validation = (_dense_rows(plan.validation[0]), plan.validation[1])
        return opt._start(net, _dense_rows(plan.X), plan.Y, plan.W, plan.loss)
    return _minibatch(net, plan, opt._bind(net.n_params, net.dtype), checkpoint, last_epoch)


def _minibatch(net, plan, state, checkpoint, last_epoch):
    """The optimizer's mini-batch steps, its state bound as ``state``."""
    runner = _EpochRunner(net, plan.X, plan.Y, plan.W, plan.batch, plan.shuffle, plan.loss,
                          plan.opt, state, clip=plan.clip, grad_norms=plan.grad_norms,
                          ranks=plan.ranks)
    steps = plan.epochs * runner.n_batches   # at most (a resumed epoch takes fewer)
    if plan.opt.t + steps >= _optim.MAX_STEPS:
        raise ValueError(f"this fit's {steps} steps would take the optimizer's step count t "
                         f"from {plan.opt.t} to 2**53 or beyond, where it is no longer exact; "
                         "call optimizer.reset() or fit with a new optimizer")
    save = None if checkpoint is None else functools.partial(net.save, checkpoint)
    return MiniBatch(runner, pending=plan.pending, resumable=True, save=save,
                     checkpoint_every=plan.checkpoint_every, grad_norms=plan.grad_norms,
                     last_epoch=last_epoch)


class _ModelFront:
    """What ``Sequential.fit`` does around the epochs of the loop
    (``fastbp._loop.train``): the callbacks' hooks and printed lines (a
    ``FitReport``), the history, validation metrics, checkpoints after
    epochs, and what divergence and Ctrl-C raise; with ``ranks`` (a
    data-parallel fit) the same history and stopping decisions on every
    rank, Ctrl-C agreed on through ``agreed``."""

    def __init__(self, net, report, validation, loss, on_divergence, checkpoint, ranks=None,
                 agreed=None):
        self.net, self.report = net, report
        self.validation, self.loss = validation, loss
        self.on_divergence, self.checkpoint = on_divergence, checkpoint
        self.ranks, self.agreed = ranks, agreed
        # past diverged, _epochs, train, fit (and _fit_ranks), Sequential.fit
        # and its wrapper: the caller
        self.stacklevel = 7 if ranks is None else 8

    def begin(self):
        self.report.begin()

    def epoch_begin(self, epoch):
        self.report.epoch_begin(epoch)

    def epoch_end(self, epoch, result, seconds):
        """Record the epoch, run on_epoch_end, checkpoint; True: stop."""
        net, ranks = self.net, self.ranks
        rows = result.rows
        if ranks is not None:
            # the same history on every rank: the slowest rank's time,
            # every rank's rows (rank 0's BatchNorm statistics, as DDP)
            ranks.bcast(net._buffers)
            seconds = float(ranks.max([seconds])[0])
            if ranks.shard:
                rows = float(ranks.sum([rows])[0])
        metrics = {"loss": result.loss, "time": seconds,
                   "samples_per_s": rows / max(seconds, 1e-9), **result.metrics}
        if self.validation:
            metrics.update(_validation_metrics(net, *self.validation, self.loss))
        net.history.append(epoch, **metrics)
        stopping = self.report.epoch_end(epoch, metrics)
        if result.stop is not None:
            self.report.stop(result.stop.kind, result.stop.reason, epoch,
                             weights=result.stop.weights)
            stopping = True
        if ranks is not None:
            stopping = ranks.agree_stop(stopping, self.report, epoch)
            self.agreed.agree()
            ranks.check_in_step(net, net.optimizer)
        if self.checkpoint is not None:  # after the callbacks: holds e.g. a scheduled lr
            net.save(self.checkpoint)
        return stopping

    def diverged(self, epoch, divergence):
        """Record the divergence, then raise DivergenceError or warn."""
        self.report.stop("divergence", divergence.reason, epoch, ended=False,
                         weights=divergence.weights)
        if self.on_divergence == "raise":
            raise DivergenceError(divergence.message, epoch, divergence.batch)
        warnings.warn(divergence.message, RuntimeWarning, stacklevel=self.stacklevel)

    def interrupted_in(self, epoch, stop):
        self.report.stop(stop.kind, stop.reason, epoch, ended=False, weights=stop.weights)
        raise KeyboardInterrupt(stop.reason)

    def interrupted_after(self, epoch, reason):
        """Ctrl-C noticed after ``epoch``: recorded with ``reason`` (None:
        the stop already recorded stands), then KeyboardInterrupt."""
        if reason is not None:
            self.report.stop("interrupt", reason, epoch)
        raise KeyboardInterrupt(self.net.history.stop_reason)

    def interrupted(self):
        self.report.interrupted()

    def end(self):
        self.report.end()


def _validation_metrics(net, Xv, Yv, loss):
    Z = net.predict(Xv)
    out = {"val_loss": data_loss(loss, Z, Yv)}
    if not np.isfinite(out["val_loss"]):
        # recorded as it is (EarlyStopping never counts it an improvement),
        # but said: it was printed and recorded as NaN without a word, where
        # evaluate on the same data raises
        warnings.warn(f"val_loss is {out['val_loss']}: the network's outputs on "
                      f"validation_data overflow {net.dtype.name} with these weights; scale "
                      "the inputs" + (" or use dtype='float64'" if net.dtype == np.float32
                                      else ""), RuntimeWarning, stacklevel=2)
    if loss == "cross_entropy":
        out["val_accuracy"] = float(np.mean(Z.argmax(1) == Yv.argmax(1)))
    elif loss == "binary_cross_entropy":
        out["val_accuracy"] = float(np.mean((Z > 0) == (Yv > 0.5)))
    return out


