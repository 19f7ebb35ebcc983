"""The fit driver: ``Sequential.fit``'s argument checks, its epoch loop, and
what happens between calls into the engine.

``fit`` resolves the settings (``fastbp._resume``), checks them, and either
hands a full-batch solver (Levenberg-Marquardt) the whole data or builds an
``_EpochRunner`` (``fastbp._runner``) and runs ``_train_epochs``: per epoch,
the callbacks' hooks (through a ``FitReport``), runs of batches until the
epoch ends, a checkpoint is due or Ctrl-C was pressed, then the epoch's
metrics into the history.  Divergence and Ctrl-C stop the fit with the model
consistent and recorded (``_diverged``, ``_interrupted``).

It works on a ``Sequential`` passed in as ``net`` and imports neither
``fastbp.model`` (which imports it) nor anything that imports the model.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
import warnings

import numpy as np

from . import _reporting, _resume
from . import optim as _optim
from ._reporting import DivergenceError
from ._runner import STATUS_LOSS_NONFINITE, STATUS_OK, _dense_rows, _EpochRunner
from ._threads import _blas_threads, _DeferredInterrupt
from ._validation import check_n_threads, check_positive_int
from .layers import BatchNorm, Dense
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
        clip_value, grad_norms, callbacks, comm=None, shard=False):
    """``Sequential.fit``'s work (its docstring says what each argument
    means); the caller holds the model."""
    ranks = _ranks(comm, shard)
    plan = _plan(net, X, y, loss, optimizer, epochs, batch_size, shuffle, validation_data,
                 n_threads, on_divergence, checkpoint, checkpoint_every, sample_weight,
                 clip_norm, clip_value, grad_norms, ranks)
    callbacks = list(callbacks or [])
    if getattr(plan.opt, "full_batch_solver", False):
        if ranks is not None:
            raise ValueError(f"{type(plan.opt).__name__} trains on the whole data in one "
                             "process: it does not support comm")
        return _fit_full_batch(net, plan, verbose, callbacks)
    if ranks is not None and ranks.rank != 0:
        # rank 0 prints and writes; every rank runs the rest, so that
        # histories and stopping decisions agree
        verbose, checkpoint = 0, None
        callbacks = [c for c in callbacks if ranks.keeps(c)]
    return _fit_steps(net, plan, verbose, callbacks, checkpoint)


def _ranks(comm, shard):
    """A ``fastbp.distributed.Ranks`` for ``comm`` (importing MPI only
    then), or None."""
    if comm is None:
        if shard is not False:
            raise ValueError("shard=True needs comm (the ranks the shards belong to)")
        return None
    from .distributed import Ranks
    return Ranks(comm, shard)


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
    plan = _Plan()
    plan.epochs = check_positive_int(epochs, "epochs")
    if on_divergence not in ("raise", "warn"):
        raise ValueError(f"on_divergence must be 'raise' or 'warn', got {on_divergence!r}")
    plan.checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every",
                                               allow_none=True)
    if plan.checkpoint_every and checkpoint is None:
        raise ValueError("checkpoint_every needs a checkpoint path")
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
    plan.opt = (net.optimizer if optimizer is None and net.optimizer is not None
                else _optim.get(optimizer))
    plan.loss, plan.shuffle = loss, shuffle
    plan.on_divergence, plan.grad_norms = on_divergence, grad_norms
    # What a full-batch solver cannot do, if asked for in this call (settings
    # recorded by an earlier fit, not passed now, do not apply).
    plan.ignored = [name for name, value in (
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
    comm in each rank's part of it (its statistics are the rank's own)."""
    sizes = {batch, n % batch or batch}
    if ranks is not None and not ranks.shard:
        sizes = {m * (r + 1) // ranks.size - m * r // ranks.size
                 for m in sizes for r in range(ranks.size)}
    elif ranks is not None:
        sizes |= {0} if ranks.any(n < batch * ranks.n_batches(n, batch)) else set()
    if min(sizes) < 2:
        raise ValueError(f"BatchNorm needs at least 2 rows in every batch"
                         f"{' on every rank' if ranks is not None else ''}: {n} samples in "
                         f"batches of {batch} leave a batch of {min(sizes)} (as torch, which "
                         "refuses one-row batches in training); change batch_size")


def _checked_clip(name, value):
    """clip_value or clip_norm as the engine takes it (0.0: off)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not value > 0 or not np.isfinite(value)):
        raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    return 0.0 if value is None else float(value)


def _fit_full_batch(net, plan, verbose, callbacks):
    """A solver that needs the whole data at once (Levenberg-Marquardt): it
    runs its own iterations, one per epoch, and records the history."""
    opt = plan.opt
    if plan.ignored:
        raise ValueError(f"{type(opt).__name__} trains on the whole data at once and "
                         f"does not support {', '.join(plan.ignored)}")
    net.optimizer = opt
    net._last_loss, net._fit_settings = plan.loss, plan.fitted
    X = _dense_rows(plan.X)  # its Jacobian holds all rows anyway
    validation = plan.validation
    if validation is not None:
        validation = (_dense_rows(validation[0]), validation[1])
    return opt._fit(net, X, plan.Y, plan.W, loss=plan.loss, epochs=plan.epochs, verbose=verbose,
                    validation=validation, callbacks=callbacks,
                    on_divergence=plan.on_divergence)


def _fit_steps(net, plan, verbose, callbacks, checkpoint):
    """Mini-batch training: bind the optimizer, make the runner, and run the
    epochs with on_train_end called however they end."""
    opt = plan.opt
    state = opt._bind(net.n_params, net.dtype)
    net.optimizer = opt
    net._last_loss, net._fit_settings = plan.loss, plan.fitted

    if plan.ranks is None:
        return _run_steps(net, plan, verbose, callbacks, checkpoint, opt, state, None)
    # From the first collective on, Ctrl-C is held (and agreed on) so that
    # no rank leaves a collective the others are in.
    with _DeferredInterrupt() as interrupt:
        plan.ranks.check_data(plan.X, plan.Y, plan.W, plan.batch)
        plan.ranks.check_settings(net, plan, opt)
        plan.ranks.broadcast_model(net, state, opt)
        return _run_steps(net, plan, verbose, callbacks, checkpoint, opt, state, interrupt)


def _run_steps(net, plan, verbose, callbacks, checkpoint, opt, state, interrupt):
    run = _EpochRunner(net, plan.X, plan.Y, plan.W, plan.batch, plan.shuffle, plan.loss, opt,
                       state, clip=plan.clip, grad_norms=plan.grad_norms, ranks=plan.ranks)
    first_epoch = net.history.n_epochs + 1
    last_epoch = first_epoch + plan.epochs - 1
    net.stop_training = False
    # What callbacks may want to know about this fit.
    net.fit_params = {"epochs": plan.epochs, "first_epoch": first_epoch, "last_epoch": last_epoch,
                      "n_samples": plan.n, "batch_size": plan.batch,
                      "n_batches": run.n_batches}
    report = _reporting.FitReport(net, callbacks, last_epoch, verbose)
    run.after_batches = report.batches_hook()
    report.begin()
    # on_train_end also after a divergence or Ctrl-C, so callbacks can
    # clean up (EarlyStopping restores its best weights, ProgressBar
    # closes), then the line saying why the fit stopped
    with report.ending():
        return _train_epochs(net, run, report, first_epoch, last_epoch, plan.n_threads,
                             checkpoint, plan.checkpoint_every, plan.validation, plan.loss,
                             plan.grad_norms, plan.on_divergence, plan.pending, interrupt)


def _train_epochs(net, run, report, first_epoch, last_epoch, n_threads, checkpoint,
                  checkpoint_every, validation, loss, grad_norms, on_divergence, pending,
                  held=None):
    """The epoch loop; ``held``: the _DeferredInterrupt already holding
    Ctrl-C (data-parallel fits hold it from their first collective)."""
    ranks = run.ranks
    with _blas_threads(n_threads), (nullcontext(held) if held else _DeferredInterrupt()) \
            as interrupt:
        if ranks is not None:
            from .distributed import AgreedInterrupt
            interrupt = AgreedInterrupt(interrupt, ranks)
        for e in range(first_epoch, last_epoch + 1):
            report.epoch_begin(e)
            run.refresh_optimizer()  # a callback may have changed it
            start = time.perf_counter()
            net._position = None
            b = run.start_epoch(pending)
            pending = None
            while b < run.n_batches:
                stop = run.n_batches
                if checkpoint_every:
                    stop = min(stop, (b // checkpoint_every + 1) * checkpoint_every)
                status, b = run.run(b, stop, interrupt)
                if status != STATUS_OK:
                    _diverged(report, status, e, b, on_divergence)
                    return net.history
                if b < run.n_batches and (interrupt.requested or b == stop):
                    net._position = run.position(e, b)
                    if checkpoint is not None:
                        net.save(checkpoint)
                    if interrupt.requested:
                        return _interrupted(report, e, b, run.n_batches)
                    net._position = None
            seconds = time.perf_counter() - start
            rows = run.rows_run()
            if ranks is not None:
                # the same history on every rank: the slowest rank's time,
                # every rank's rows (rank 0's BatchNorm statistics, as DDP)
                ranks.bcast(net._buffers)
                seconds = float(ranks.max([seconds])[0])
                if ranks.shard:
                    rows = float(ranks.sum([rows])[0])
            # a resumed epoch ran only its batches from the saved position on
            metrics = {"loss": run.epoch_loss(), "time": seconds,
                       "samples_per_s": rows / max(seconds, 1e-9)}
            if grad_norms:
                dense = [i for i, l in enumerate(net.layers) if isinstance(l, Dense)]
                metrics["grad_norm"] = [float(run.grad_norms[i]) / max(run.steps, 1)
                                        for i in dense]
            if validation:
                metrics.update(_validation_metrics(net, *validation, loss))
            net.history.append(e, **metrics)
            stopping = report.epoch_end(e, metrics)
            if ranks is not None:
                stopping = ranks.any(stopping)
                interrupt.agree()
                ranks.check_in_step(net, run.opt)
            if checkpoint is not None:  # after the callbacks: holds e.g. a scheduled lr
                net.save(checkpoint)
            if interrupt.requested and e < last_epoch:
                return _interrupted(report, e, run.n_batches, run.n_batches)
            if stopping:
                break
        if interrupt.requested:  # during the last epoch's last call, or after it
            _interrupted_at_end(report, e)
    return net.history


def _interrupted(report, epoch, batch, n_batches):
    """Ctrl-C stopped the fit after ``batch`` batches of ``epoch`` (all of
    them: at the epoch's end): record it and raise KeyboardInterrupt."""
    if batch == n_batches:
        reason = (f"interrupted by Ctrl-C before batch 1 of epoch {epoch + 1}; fit again "
                  "to continue")
        report.stop("interrupt", reason, epoch)
    else:
        reason = (f"interrupted by Ctrl-C before batch {batch + 1} of epoch {epoch}; fit "
                  "again to continue")
        held = (f"the weights after batch {batch} of {n_batches} of epoch {epoch}" if batch
                else f"the weights epoch {epoch} started with")
        report.stop("interrupt", reason, epoch, ended=False, weights=held)
    raise KeyboardInterrupt(reason)

def _interrupted_at_end(report, epoch):
    reason = (f"interrupted by Ctrl-C as epoch {epoch} ended, the last this fit had to "
              "train: the fit is complete")
    report.stop("interrupt", reason, epoch)
    raise KeyboardInterrupt(reason)


def _validation_metrics(net, Xv, Yv, loss):
    Z = net.predict(Xv)
    out = {"val_loss": data_loss(loss, Z, Yv)}
    if loss == "cross_entropy":
        out["val_accuracy"] = float(np.mean(Z.argmax(1) == Yv.argmax(1)))
    elif loss == "binary_cross_entropy":
        out["val_accuracy"] = float(np.mean((Z > 0) == (Yv > 0.5)))
    return out


def _diverged(report, status, epoch, failed, on_divergence):
    """Batch ``failed`` (0-based) of ``epoch`` made the loss or a weight
    non-finite; the model holds the weights from before it."""
    what = "the loss" if status == STATUS_LOSS_NONFINITE else "an updated weight"
    batch = failed + 1
    message = (f"training diverged at epoch {epoch}, batch {batch}: {what} became NaN or "
               "infinite; training stopped and the weights of the last finite step were kept "
               "(try a smaller learning rate)")
    held = (f"the weights of the last finite step, after batch {failed} of epoch {epoch}"
            if failed else f"the weights epoch {epoch} started with")
    report.stop("divergence", f"training diverged in batch {batch} of epoch {epoch}: {what} "
                "became NaN or infinite (try a smaller learning rate)", epoch, ended=False,
                weights=held)
    if on_divergence == "raise":
        raise DivergenceError(message, epoch, batch)
    # past _train_epochs, _fit_steps, fit, Sequential.fit and its wrapper: the caller
    warnings.warn(message, RuntimeWarning, stacklevel=7)

