"""The engine runner: workspaces, scratch, and the only caller of the
compiled engine's train entry (``fastbp._ext.engine.train_batches``).

``_EpochRunner`` drives one fit's epochs through the engine: it allocates
everything once per fit (index order, per-batch losses, snapshots), shuffles
once per epoch, runs batches in calls of about ``_CALL_SECONDS``, densifies
a sparse X a piece at a time, and on a non-finite weight rolls the model
back to the epoch's snapshot and replays the finite steps.  ``_Workspace``
holds a fit's buffers for one mini-batch; ``_ScratchPool`` lends inference
calls (predict, loss_and_grad) scratch of their own, so calls in several
Python threads never share a buffer.

It reads the model's engine tables (``net._program``, ``net._params``, ...)
but imports neither ``fastbp.model`` nor the fit driver (``fastbp._fit``):
both import it.
"""
from __future__ import annotations

import math
import threading
import time

import numpy as np

from ._ext import engine as _engine
from ._ext.engine import Status
from ._numba.losses import loss_cfunc
from ._numba.optim import step_cfunc
from ._optimizer import Optimizer
from ._threads import _BLAS
from .layers import BatchNorm

#: target duration of one call into the engine during fit; between calls
#: Python handles Ctrl-C and nothing else, so this only bounds its latency.
_CALL_SECONDS = 0.05
#: elements of activation workspace used by predict / evaluate per chunk
_PREDICT_ELEMENTS = 1 << 22
#: values of a sparse X made dense at a time by fit (at least one batch)
_SPARSE_ELEMENTS = 1 << 22

STATUS_OK, STATUS_LOSS_NONFINITE, STATUS_PARAMS_NONFINITE, STATUS_COMM_FAILED = (
    Status.OK, Status.LOSS_NONFINITE, Status.PARAMS_NONFINITE, Status.COMM_FAILED)



class _Workspace:
    """Buffers for ``rows`` samples: every layer's output, two delta buffers,
    and the gathered batch.  Allocated once and reused for any m <= rows."""

    def __init__(self, rows, program, n_out, dtype):
        self.rows = rows
        self.acts = np.empty(rows * program.act_width, dtype=dtype)
        self.deltas = np.empty(2 * rows * program.delta_width, dtype=dtype)
        self.xb = np.empty(rows * program.n_features, dtype=dtype)
        self.yb = np.empty(rows * n_out, dtype=dtype)
        self.wb = np.empty(rows, dtype=dtype)


class _Scratch:
    """Buffers of one inference call (predict, loss_and_grad) for up to
    ``rows`` rows: every layer's output, the two delta buffers if the call
    goes backward, and the aux values an inference pass writes."""

    def __init__(self, rows, pool, deltas):
        self.rows = rows
        self.acts = np.empty(rows * pool.width, dtype=pool.dtype)
        self.deltas = np.empty(2 * rows * pool.delta_width, dtype=pool.dtype) if deltas else None
        # Without the GIL, an inference pass writes only its acts, deltas and
        # BatchNorm's 1/std in aux (DropConnect's aux is training's alone):
        # a model without BatchNorm lends its own aux, which no call writes.
        self.aux = np.empty(pool.aux_size, dtype=pool.dtype) if pool.private_aux else pool.aux


class _ScratchPool:
    """The scratch of a built model's inference calls, which may run at the
    same time in several Python threads: each call takes a ``_Scratch`` for
    itself and gives it back, so no two calls write the same buffer and
    back-to-back calls (a web server's one-row predicts) allocate nothing.
    There are never more of them than calls that ran at once: a call that
    finds none large enough replaces the largest free one.  Sizes are
    rounded up to a power of two of rows (at most a predict chunk), so
    growing calls reallocate a few times, not every time."""

    def __init__(self, net):
        self.width = net._compiled.act_width
        self.delta_width = net._compiled.delta_width
        self.dtype = net.dtype
        self.aux = net._aux
        self.aux_size = net._compiled.n_aux
        self.private_aux = any(isinstance(layer, BatchNorm) for layer in net.layers)
        #: rows of one predict chunk (its activations take _PREDICT_ELEMENTS)
        self.chunk_rows = max(1, _PREDICT_ELEMENTS // self.width)
        self._free = []
        self._lock = threading.Lock()

    def take(self, rows, deltas=False):
        """A scratch for ``rows`` rows (with delta buffers if ``deltas``),
        the calling thread's own until ``give``."""
        with self._lock:
            last = self._free[-1] if self._free else None
            if last is not None and last.rows >= rows and (last.deltas is not None or not deltas):
                return self._free.pop()  # the usual case: calls of one size
            fits = [s for s in self._free
                    if s.rows >= rows and (s.deltas is not None or not deltas)]
            if fits:
                scratch = min(fits, key=lambda s: s.rows)
                self._free.remove(scratch)
                return scratch
            if self._free:
                self._free.remove(max(self._free, key=lambda s: s.rows))
        if rows < self.chunk_rows:
            rows = min(self.chunk_rows, 1 << (rows - 1).bit_length())
        return _Scratch(rows, self, deltas)

    def give(self, scratch):
        with self._lock:
            self._free.append(scratch)


def _dense_rows(X):
    """X as a dense array: a checked CSR matrix made dense, an array as is."""
    return X if isinstance(X, np.ndarray) else X.toarray()


def _forward_sparse(X, network, ws, out, chunk):
    """``engine.forward`` of a CSR matrix through ``network`` (engine.Network),
    made dense in pieces of ``chunk`` rows (the workspace's; predict keeps
    it to _SPARSE_ELEMENTS values) in one buffer, so that each call of the
    kernels takes the rows a dense X's would; the caller holds BLAS, as for
    a dense X."""
    rows_at_once = chunk
    block = np.empty((rows_at_once, X.shape[1]), dtype=out.dtype)
    for start in range(0, X.shape[0], rows_at_once):
        stop = min(start + rows_at_once, X.shape[0])
        rows = block[:stop - start]
        X[start:stop].toarray(out=rows)
        _engine.forward(network, rows, ws.acts, out[start:stop], chunk, ws.aux)



def _checked_hyper(opt):
    """The optimizer's packed hyperparameters, refused if a callback made
    them non-finite or the learning rate negative."""
    hyper = opt._hyper()
    if not np.isfinite(hyper).all() or getattr(opt, "lr", 0.0) < 0:
        raise ValueError(f"invalid hyperparameters for {type(opt).__name__} (set between "
                         f"epochs?): {opt!r}")
    return hyper



def _batch_weight_sums(w, batch):
    """Each batch's sum of the weights ``w`` (in batch order), added left to
    right in float64 exactly as the engine adds them (np.add.reduceat may
    add pairwise: with negative weights, its zero is not the engine's)."""
    w = w.astype(np.float64)
    n_full = len(w) // batch
    sums = np.empty(math.ceil(len(w) / batch))
    if n_full:
        sums[:n_full] = np.add.accumulate(w[:n_full * batch].reshape(n_full, batch), axis=1)[:, -1]
    if len(w) % batch:
        sums[-1] = np.add.accumulate(w[n_full * batch:])[-1]
    return sums


class _EpochRunner:
    """Drives the engine through epochs: everything allocated here is
    allocated once per fit, none of it per step."""

    def __init__(self, net, X, Y, W, batch, shuffle, loss, opt, state, *, clip=(0.0, 0.0),
                 grad_norms=False, count_by_samples=False, ranks=None):
        """``clip``: (clip_value, clip_norm), 0.0 for off; ``grad_norms``:
        record each layer's summed batch gradient norms; ``count_by_samples``:
        weigh each batch's loss in the epoch's mean by its sample count even
        with sample weights (scikit-learn's bookkeeping); ``ranks``: a
        ``fastbp.distributed.Ranks`` to train data-parallel (sharded: ``batch``
        is this rank's share of a global batch)."""
        self.net, self.X, self.Y, self.W = net, X, Y, W
        self.batch, self.shuffle = batch, bool(shuffle)
        self.opt = opt
        self.state = state.reshape(-1)
        self.ranks = ranks
        self.sharded = ranks is not None and ranks.shard
        self.n_batches = (ranks.n_batches(X.shape[0], batch) if self.sharded
                          else math.ceil(X.shape[0] / batch))
        self.identity = np.arange(X.shape[0], dtype=np.int64)
        self.order = self.identity.copy()
        self.batch_loss = np.zeros(self.n_batches)
        # Weight of each batch in the epoch's mean loss: its sample count, or
        # its sum of sample weights (recomputed per epoch when shuffled).
        self.sizes = np.clip(X.shape[0] - batch * np.arange(self.n_batches), 0,
                             batch).astype(np.float64)
        self.uniform = bool(np.all(W == 1))
        self.total = float(X.shape[0]) if self.uniform else float(W.sum(dtype=np.float64))
        if self.sharded:   # a global batch's rows are every rank's
            self.sizes = ranks.sum(self.sizes)
            self.uniform = ranks.min([self.uniform])[0] == 1
            self.total = float(ranks.sum([self.total])[0])
        self.counts = self.sizes.copy()
        self.count_by_samples = bool(count_by_samples)
        self.clip_value, self.clip_norm = clip
        # per-layer sums of batch gradient norms, if recorded
        self.grad_norms = np.zeros(len(net.layers) if grad_norms else 0)
        self.ws = net._workspace(batch)
        # A sparse X is densified a piece at a time (_train_sparse_batches):
        # whole batches, about _SPARSE_ELEMENTS values or one batch.
        self.sparse_rows = 0
        if not isinstance(X, np.ndarray):
            self.sparse_rows = batch * max(1, _SPARSE_ELEMENTS // (X.shape[1] * batch))
            self.sparse_block = np.empty((min(self.sparse_rows, X.shape[0]), X.shape[1]),
                                         dtype=net.dtype)
        self.segments = net._segments()
        self.loss_addr = loss_cfunc(loss, net.dtype)
        self.step_addr = step_cfunc(opt.kernel, net.dtype)
        self.hyper = opt._hyper()
        self.engine_state = self._engine_state()
        # Snapshot at the start of each epoch (or resume point): lets a
        # divergence be rolled back to the last finite step by replaying.
        if self.sharded:
            # each rank shuffles its shard: seeded by the ranks' common
            # generator (the same state on every rank) and its rank
            seed = int(net._shuffle_rng.integers(2 ** 62))
            self.shard_rng = np.random.default_rng([seed, ranks.rank])
        self.snap_params = np.empty_like(net._params)
        self.snap_state = np.empty_like(self.state)
        self.snap_first = self.snap_steps = 0
        # a model's fit follows net.optimizer (a callback may replace it);
        # the estimators' optimizer is their own (``MiniBatch`` sets it)
        self.follow_model = False
        # the optimizer's settings were just taken up (at the epoch's start,
        # with no callback since): the next call need not read them again
        self.settings_current = False
        self.chunk = 1
        self.steps = 0
        self.steps_before = 0  # a resumed epoch's updates before its position
        self.first = 0
        # Called with the epoch's batch count after each run of batches (a
        # progress bar's within-epoch steps), or None: once per call into the
        # engine, not per batch.
        self.after_batches = None

    def refresh_optimizer(self):
        """Take up what changed on the optimizer since the last call into the
        engine: its hyperparameters (checked), its state if it was reset or
        replaced, or the optimizer itself when ``follow_model`` and a
        callback set ``net.optimizer`` to another (checked and bound as fit
        binds its optimizer).  Returns whether anything changed."""
        opt = self._replacement()
        replaced = opt is not None
        if replaced:   # its state (bound as fit binds it) is taken up just below
            opt._bind(self.net.n_params, self.net.dtype)
            self.step_addr = step_cfunc(opt.kernel, self.net.dtype)
            self.opt, self.hyper = opt, opt._hyper()
        state = self.opt._state_for(self.net.n_params, self.net.dtype).reshape(-1)
        # (a new engine state for a replacement even if it shares the old
        # one's state array: the update and its hyperparameters are new)
        changed = replaced or state.ctypes.data != self.state.ctypes.data
        if changed:
            self.state = state
            self.snap_state = np.empty_like(state)
            self.engine_state = self._engine_state()
        hyper = _checked_hyper(self.opt)  # checked against the state's dtype
        if not np.array_equal(hyper, self.hyper):
            changed = True
            self.hyper[...] = hyper
        return changed

    def _replacement(self):
        """The optimizer a callback put in ``net.optimizer`` in place of this
        run's, or None; ValueError for anything but an optimizer instance."""
        replaced = self.net.optimizer
        if not self.follow_model or replaced is self.opt:
            return None
        if not isinstance(replaced, Optimizer):
            raise ValueError(
                f"net.optimizer was set to {replaced!r} during fit; a mini-batch fit can go "
                "on with an optimizer instance (e.g. fastbp.optim.SGD(lr=0.01)), not a name, "
                "a class, None or a full-batch solver: set one, or stop the fit and call "
                "fit(optimizer=...)")
        return replaced

    def _take_up_layout(self):
        """Rebuild the engine's view if the model's program changed since it
        was made: a layer setting changed from a callback (or anywhere)
        takes effect at the next call into the engine, as it does for a
        run resumed from a checkpoint saved then (the file holds the new
        settings), rather than at the next fit.  Returns whether it did."""
        net = self.net
        with net._state_lock:
            net._sync_layout()
        if net._program is not self.engine_state_program:
            self.segments = net._segments()
            self.engine_state = self._engine_state()
            return True
        return False

    def _snapshot(self, b):
        """Record the model and optimizer at batch ``b`` of the epoch: a
        divergence rolls back to it and replays the finite steps from it,
        with the settings they ran with (taken again wherever a setting
        changed within the epoch)."""
        self.snap_first, self.snap_steps = b, self.steps
        self.snap_params[...] = self.net._params
        self.snap_state[...] = self.state
        self.snap_t = self.opt.t
        self.snap_dropout = self.net._dropout_rng.copy()
        self.snap_buffers = self.net._buffers.copy()

    def _engine_state(self):
        """The engine's view of this fit (checked once): the model's tables
        and flat arrays, the workspace, the loss, the optimizer's update,
        state and hyperparameters (updated in place between calls)."""
        net, ws, opt = self.net, self.ws, self.opt
        self.engine_state_program = net._program
        state = _engine.EngineState(
            program=net._program, floats=net._floats, reg=net._reg,
            reg_per_weight=net._reg_per_weight, params=net._params, grad=net._grad,
            acts=ws.acts, deltas=ws.deltas, xb=ws.xb, yb=ws.yb, wb=ws.wb, aux=net._aux,
            buffers=net._buffers, rng=net._dropout_rng, opt_state=self.state,
            n_slots=len(opt.slot_names), hyper=self.hyper, n_hyper=self.hyper.shape[0],
            segments=self.segments, loss_addr=self.loss_addr, step_addr=self.step_addr,
            batch_size=self.batch, clip_value=self.clip_value, clip_norm=self.clip_norm,
            grad_norms=self.grad_norms)
        if self.ranks is not None:
            self.ranks.attach(state)
        return state

    def start_epoch(self, resume=None, order=None):
        """Shuffle for a new epoch (or use ``order``), or rebuild the order of
        an unfinished one from its saved RNG state; returns the first batch."""
        rng = self.shard_rng if self.sharded else self.net._shuffle_rng
        if resume is not None:
            rng.bit_generator.state = resume["rng_state"]
        self.rng_state = rng.bit_generator.state  # before this epoch's shuffle
        self.gather = self.shuffle or order is not None
        if order is not None:
            self.order[...] = order
        elif self.shuffle:
            # Each epoch's order depends only on the RNG, not on earlier
            # epochs' orders, so fit(2 epochs) twice == fit(4 epochs).
            self.order[...] = self.identity
            rng.shuffle(self.order)
        if not self.uniform:
            w = self.W[self.order] if (self.shuffle or order is not None) else self.W
            if self.count_by_samples:
                # A batch whose weights sum to zero is skipped by the engine:
                # it has no weight in the mean either.
                self.sizes[...] = self.counts
                self.sizes[_batch_weight_sums(w, self.batch) == 0] = 0
            else:
                sums = np.add.reduceat(w.astype(np.float64), np.arange(0, len(w), self.batch))
                if self.sharded:
                    local = np.zeros(self.n_batches)
                    local[:len(sums)] = sums
                    sums = self.ranks.sum(local)
                self.sizes[...] = sums
        self.steps = 0  # updates applied in this epoch (this run of it)
        self.first = 0 if resume is None else resume["batch"]
        self.grad_norms[...] = 0
        self.steps_before = 0
        sums = None if resume is None else resume.get("grad_norm_sums")
        if sums is not None and len(sums) == self.grad_norms.shape[0]:
            # the per-layer norms summed before the position, so that the
            # epoch's mean covers all of it, as in an uninterrupted run
            self.grad_norms[...] = sums
            self.steps_before = resume["steps"]
        self.loss_before = 0.0 if resume is None else resume["loss_sum"]
        self._snapshot(self.first)
        return self.first

    def rows_run(self):
        """Rows of this epoch trained by this run of it: all, or a resumed
        epoch's from its first batch on."""
        return self.X.shape[0] - self.first * self.batch

    def position(self, epoch, batch):
        """Where an unfinished epoch stands (saved in checkpoints)."""
        position = {"epoch": epoch, "batch": batch, "rng_state": self.rng_state,
                    "loss_sum": self._loss_sum(batch), "n_samples": self.X.shape[0],
                    "batch_size": self.batch, "shuffle": self.shuffle}
        if self.grad_norms.shape[0]:  # (only then: files without stay as before)
            position["grad_norm_sums"] = [float(v) for v in self.grad_norms]
            position["steps"] = self.steps_before + self.steps
        return position

    def _loss_sum(self, upto):
        # Summed strictly left to right (add.accumulate, not dot's blocked
        # sum), so an epoch resumed from a checkpoint at batch j gives the
        # same last bit as one run straight through.
        done = slice(self.first, upto)
        terms = np.empty(upto - self.first + 1)
        terms[0] = self.loss_before
        np.multiply(self.batch_loss[done], self.sizes[done], out=terms[1:])
        return float(np.add.accumulate(terms)[-1])

    def epoch_loss(self):
        """Mean training loss over the epoch's samples (weighted)."""
        total = self.total
        if self.count_by_samples:
            total = float(self.X.shape[0]) if self.uniform else float(self.sizes.sum())
        return self._loss_sum(self.n_batches) / total

    def _call(self, first, count):
        # What a callback changed since the last call (layer settings, the
        # optimizer's settings, state or the optimizer itself) takes effect
        # now, as in a run resumed from a checkpoint or Ctrl-C's position
        # saved here, which holds the new settings: both give the same bits.
        changed = self._take_up_layout()
        if not self.settings_current:   # (refresh_optimizer costs ~10 us: once a call)
            changed = self.refresh_optimizer() or changed
        self.settings_current = False   # callbacks may run once the call returns
        # (t set by a callback: 3.5 failed in the engine's argument
        # conversion, naming its "step0")
        self.opt._check_step_count()
        if changed and first > self.snap_first:
            self._snapshot(first)
        with _BLAS:  # BLAS at this fit's thread count (whatever other threads run)
            return self._train_batches(first, count)

    def _train_batches(self, first, count):
        if self.sparse_rows:
            return self._train_sparse_batches(first, count)
        done, steps, status = _engine.train_batches(
            self.engine_state, self.X, self.Y, self.W, self.order, first, count, self.gather,
            self.opt.t, self.batch_loss)
        # Batches whose weights sum to zero were skipped: t counts updates.
        self.opt.t += steps
        self.steps += steps
        return done, status

    def _train_sparse_batches(self, first, count):
        """``_train_batches`` on a sparse X: each piece of at most
        ``sparse_rows`` rows (whole batches) is made dense in ``sparse_block``
        in batch order (so the engine takes its rows in place, as it would
        have gathered them) and run as batches 0, 1, ... of that piece."""
        batch = self.batch
        per_call = self.sparse_rows // batch
        done, b, end = 0, first, first + count
        while b < end:
            k = min(per_call, end - b)
            lo, hi = b * batch, min((b + k) * batch, self.X.shape[0])
            rows = self.order[lo:hi] if self.gather else slice(lo, hi)
            block = self.sparse_block[:hi - lo]
            self.X[rows].toarray(out=block)
            got, steps, status = _engine.train_batches(
                self.engine_state, block, self.Y[rows], self.W[rows], self.order[:0], 0, k,
                False, self.opt.t, self.batch_loss[b:b + k])
            self.opt.t += steps
            self.steps += steps
            done += got
            if status != STATUS_OK:
                break
            b += k
        return done, status

    def run(self, b, stop, interrupt):
        """Run batches b .. stop-1 in calls of about _CALL_SECONDS, stopping
        early at a call boundary if Ctrl-C was pressed.  Returns (status, b)
        with b the next batch to run (on divergence: the failing batch, with
        the model rolled back to the step before it)."""
        while b < stop and not interrupt.requested:
            count = min(self.chunk, stop - b)
            if self.ranks is not None:
                # every rank runs the same batches per call, and all stop at
                # the same call if Ctrl-C reached any
                count = interrupt.agree(count)
                if not count:
                    break
            start = time.perf_counter()
            done, status = self._call(b, count)
            elapsed = time.perf_counter() - start
            if status == STATUS_COMM_FAILED:
                raise self.ranks.error(self.engine_state.comm_error)
            if status != STATUS_OK:
                if status == STATUS_PARAMS_NONFINITE or (status == STATUS_LOSS_NONFINITE
                                                         and self.net._buffers.size):
                    # Roll back to the snapshot and replay the finite steps
                    # (a non-finite loss leaves the weights as they were, but
                    # the failing batch's forward pass had already moved
                    # BatchNorm's running statistics).
                    self.net._params[...] = self.snap_params
                    self.state[...] = self.snap_state
                    self.opt.t = self.snap_t
                    self.net._dropout_rng[...] = self.snap_dropout
                    self.net._buffers[...] = self.snap_buffers
                    self.steps = self.snap_steps
                    self._call(self.snap_first, b + done - self.snap_first)
                return status, b + done
            b += done
            # Grow the run of batches per call towards _CALL_SECONDS.
            per_batch = elapsed / max(done, 1)
            self.chunk = max(1, min(self.n_batches, int(_CALL_SECONDS / max(per_batch, 1e-7))))
            if self.after_batches is not None:
                self.after_batches(b)
        return STATUS_OK, b

