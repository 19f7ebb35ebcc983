"""Data-parallel training over MPI ranks: ``fit(..., comm=MPI.COMM_WORLD)``.

Every rank holds the whole model and the whole optimizer state (as torch's
DistributedDataParallel and Horovod do).  Each step, each rank computes its
share of the global batch's gradient and loss, and one ``MPI_Allreduce``
inside the compiled step (``EngineState.set_comm``, ``csrc/comm.h``) adds
the shares; every rank then applies the same update, so the ranks' weights
stay bitwise identical without being sent again.

* **Replicated data** (the default): every rank passes the same X and y (a
  ``numpy.memmap`` of one file costs no memory per rank).  ``batch_size``
  is the global batch; every rank draws the same permutation (rank 0's
  generator); rank r trains the contiguous slice
  ``[m r // size, m (r + 1) // size)`` of each batch of m rows (a slice may
  be empty).  Each rank scales its slice's weighted-mean gradient by its
  share of the batch's weight sum, so the sum is the batch's exact weighted
  mean: the same training as one process, up to rounding.
* **Sharded data** (``shard=True``): each rank passes its own rows.  A
  global batch is every rank's next ``batch_size // size`` rows (each rank
  shuffles its shard with a generator seeded from rank 0's draw and its
  rank), and an epoch ends when the largest shard is done; a rank whose
  rows are done contributes nothing (as torch's ``Join``).  This is the
  single-process training on the rows the ranks contribute, batch by batch:
  batch b is rank 0's rows of its local batch b, then rank 1's, and so on.

Dropout masks follow the global batch's rows: rank r's rows draw the masks
those rows get in one process (sharded: each rank owns a slot of
``batch_size // size`` rows of the stream).  BatchNorm normalises with each
rank's own batch statistics by default, as torch DDP does without
SyncBatchNorm (so a model with BatchNorm trains like one process only on one
rank); rank 0's running statistics are sent to every rank at the end of each
epoch, as DDP broadcasts its buffers.  With ``sync_batchnorm=True``
(replicated data) the statistics are the global batch's, as torch's
SyncBatchNorm: two allreduces of each BatchNorm's column sums in the forward
pass and one in the backward, and the training is one process's again.

``sync_every=H`` (H > 1) is local SGD (periodic model averaging), for
networks too slow for an allreduce of the gradient every step: each rank
steps on its own rows (its slice, or its shard) with its own optimizer
state, and the ranks average their weights every H steps and at the end of
each run of batches (so between runs, and after fit, every rank holds the
same weights).  Per step only two numbers cross the network (the loss and a
finite flag).  It is a different algorithm, with no equivalence to one
process: convergence only (the README compares its accuracy on digits
with synchronous training).  The history's loss is the ranks' losses
weighted by their share of each batch's weight.  Checkpoints hold rank 0's
optimizer state.

The MPI library is the one mpi4py loaded: ``MPI_Allreduce`` is looked up in
it (ctypes, ``RTLD_NOLOAD``), and every handle and constant comes from
mpi4py, so fastbp builds without ``mpi.h`` and runs on MPICH and Open MPI
(both tested; int or pointer handles, chosen at run time; Intel MPI shares
MPICH's handles, untried).  Nothing here is imported unless ``comm`` is
given.
"""
from __future__ import annotations

import ctypes
import math
import os
import zlib

import numpy as np

from ._numba import register_address

__all__ = ["Ranks"]


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - the message is the point
        raise ImportError("fit(comm=...) needs mpi4py: pip install 'fastbp[mpi]' (a cluster's "
                          "own MPI) or 'fastbp[mpich]' (a self-contained MPI)") from exc
    return MPI


def _allreduce_address(MPI):
    """C address of MPI_Allreduce in the MPI library mpi4py loaded (mpi4py
    opens it RTLD_LOCAL, so it is not in the global namespace: look it up
    through mpi4py's own extension module, which links it)."""
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0)
    try:
        lib = ctypes.CDLL(MPI.__file__, mode=mode)
        address = ctypes.cast(lib.MPI_Allreduce, ctypes.c_void_p).value
        # the engine calls only addresses fastbp handed out (EngineState.set_comm)
        return register_address(address, "allreduce", "MPI_Allreduce", "float64")
    except (OSError, AttributeError) as exc:
        raise RuntimeError(f"could not find MPI_Allreduce in the MPI library mpi4py loaded "
                           f"({MPI.Get_library_version().splitlines()[0]}): {exc}") from None


class Ranks:
    """One fit's view of its MPI communicator: its rank and size, the C
    call the engine makes, and the few Python-level collectives that keep
    the ranks' decisions the same (broadcasts at the start, agreement on
    each run of batches and on stopping).

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm
        The ranks that train together (e.g. ``MPI.COMM_WORLD``).
    shard : bool
        Each rank passes its own rows (True) or every rank the same (False).
    sync_batchnorm : bool
        BatchNorm normalises with the global batch's statistics (replicated
        data only), as torch's SyncBatchNorm, instead of each rank's own.
    sync_every : int
        1: one step on the global batch's gradient (synchronous, the
        default).  H > 1: local SGD, each rank steps on its own rows and the
        ranks average their weights every H steps and at each call's end.
    """

    def __init__(self, comm, shard=False, sync_batchnorm=False, sync_every=1):
        MPI = _mpi()
        if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
            raise TypeError(f"comm must be an mpi4py intracommunicator such as "
                            f"MPI.COMM_WORLD, not {comm!r}")
        for name, flag in (("shard", shard), ("sync_batchnorm", sync_batchnorm)):
            if not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, not {flag!r}")
        if shard and sync_batchnorm:
            raise ValueError("sync_batchnorm needs replicated data (shard=False): a rank whose "
                             "shard is done would miss the statistics' sums")
        self.MPI, self.comm, self.shard = MPI, comm, bool(shard)
        self.sync_batchnorm = bool(sync_batchnorm)
        if isinstance(sync_every, bool) or not isinstance(sync_every, (int, np.integer)) or \
                not 1 <= sync_every < 2 ** 62:
            raise ValueError(f"sync_every must be a positive int (1: every step), not "
                             f"{sync_every!r}")
        self.sync_every = int(sync_every)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._handles = None

    # -- the engine's collective --------------------------------------------
    def attach(self, engine_state):
        """Make ``engine_state`` (an ``EngineState``) add its steps' shares
        over these ranks."""
        if self._handles is None:
            MPI = self.MPI
            self._handles = dict(
                allreduce=_allreduce_address(MPI),
                ptr_handles=MPI._sizeof(MPI.Comm) == ctypes.sizeof(ctypes.c_void_p)
                and MPI._sizeof(MPI.Comm) != ctypes.sizeof(ctypes.c_int),
                comm=int(self.comm.handle), op_sum=int(MPI.SUM.handle),
                type_float=int(MPI.FLOAT.handle), type_double=int(MPI.DOUBLE.handle),
                in_place=int(MPI.IN_PLACE) % 2 ** 64, success=int(MPI.SUCCESS))
        engine_state.set_comm(rank=self.rank, n_ranks=self.size, sharded=self.shard,
                              sync_batchnorm=self.sync_batchnorm, sync_every=self.sync_every,
                              **self._handles)

    def error(self, code):
        """The RuntimeError for a failed MPI call of the engine."""
        try:
            text = self.MPI.Get_error_string(code)
        except Exception:  # noqa: BLE001 - the code alone still says something
            text = "unknown error"
        return RuntimeError(f"MPI_Allreduce failed on rank {self.rank} of {self.size} "
                            f"(error {code}: {text}); training stopped")

    # -- agreement ------------------------------------------------------------
    def _reduce(self, values, op):
        a = np.asarray(values, dtype=np.float64).copy()
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=op)
        return a

    def min(self, values):
        return self._reduce(values, self.MPI.MIN)

    def max(self, values):
        return self._reduce(values, self.MPI.MAX)

    def sum(self, values):
        return self._reduce(values, self.MPI.SUM)

    def any(self, flag):
        """True on every rank if ``flag`` is true on one."""
        return bool(self.max([bool(flag)])[0])

    def agree_stop(self, stopping, report, epoch):
        """True on every rank if a callback stopped the fit on one; a rank
        that did not stop records the lowest stopping rank's reason, so the
        histories say the same (a ``FitReport``'s ``stop``)."""
        first = int(self.min([self.rank if stopping else self.size])[0])
        if first == self.size:
            return False
        history = report.net.history
        why = self.comm.bcast((history.stopped_by, history.stop_reason), root=first)
        if not stopping and why[0] is not None:
            report.stop(why[0], why[1], epoch)
        return True

    def bcast(self, array):
        """Rank 0's ``array`` into every rank's (in place)."""
        if array.size:
            self.comm.Bcast(np.ascontiguousarray(array) if array.flags.c_contiguous
                            else array, root=0)

    def common_seed(self, rng):
        """A draw from rank 0's ``rng``, the same on every rank."""
        seed = np.array([rng.integers(2 ** 62) if self.rank == 0 else 0], dtype=np.int64)
        self.comm.Bcast(seed, root=0)
        return int(seed[0])

    # -- the fit ----------------------------------------------------------------
    def check_data(self, X, Y, W, batch):
        """ValueError on every rank unless the ranks' data and batch agree:
        replicated, the same rows (shape and sums); sharded, the same
        widths.  Returns the global batch's rows."""
        local = [X.shape[1], Y.shape[1], batch]
        if not self.shard:
            local += [X.shape[0], _checksum(X), _checksum(Y), _checksum(W)]
        lo, hi = self.min(local), self.max(local)
        if not np.array_equal(lo, hi, equal_nan=True):
            if self.shard or lo[2] != hi[2] or not np.array_equal(lo[:2], hi[:2]):
                raise ValueError("the ranks passed data of different widths or batch sizes: "
                                 "every rank must call fit with the same model, settings "
                                 "and columns")
            raise ValueError("the ranks passed different data: with comm and shard=False "
                             "every rank must pass the same X, y and sample_weight (e.g. a "
                             "numpy.memmap of one file); pass shard=True if each rank holds "
                             "its own rows")
        return batch

    def check_settings(self, net, plan, opt):
        """ValueError on every rank unless every rank fits the same model
        (parameter count, dtype) with the same settings and optimizer: a
        rank that ran more epochs or steps than another would wait forever
        in a collective the others never call."""
        text = repr((net.dtype.str, plan.loss, plan.shuffle, plan.clip, plan.grad_norms,
                     type(opt).__name__, opt.kernel, self.shard, self.sync_batchnorm,
                     self.sync_every))
        local = [net.n_params, plan.epochs, zlib.crc32(text.encode()),
                 _checksum(np.asarray(opt._hyper(), dtype=np.float64))]
        if not np.array_equal(self.min(local), self.max(local), equal_nan=True):
            raise ValueError("the ranks fit different models, settings or optimizers: every "
                             "rank must call fit with the same model, epochs, loss, "
                             "batch_size, shuffle, clipping and optimizer")

    def check_in_step(self, net, opt):
        """RuntimeError on every rank if the ranks' weights or optimizer
        settings no longer agree (a callback that changed them on one rank)."""
        local = [_checksum(net._params), _checksum(np.asarray(opt._hyper(), dtype=np.float64))]
        if not np.array_equal(self.min(local), self.max(local), equal_nan=True):
            raise RuntimeError("the ranks' weights or optimizer settings differ after an "
                               "epoch: a callback changed them on some ranks only; change them "
                               "the same way on every rank")

    def local_batch(self, batch):
        """A rank's rows of a global batch of ``batch`` rows when sharded."""
        if batch < self.size:
            raise ValueError(f"shard=True splits each global batch over the {self.size} "
                             f"ranks: batch_size must be at least {self.size}, not {batch}")
        return batch // self.size

    def n_batches(self, n_local, batch_local):
        """Global batches of an epoch when sharded: the largest shard's."""
        return int(self.max([math.ceil(n_local / batch_local)])[0])

    def broadcast_model(self, net, opt_state, opt):
        """Every rank starts from rank 0's model: weights, running
        statistics, dropout stream, shuffle generator, and optimizer state
        and step count."""
        for a in (net._params, net._buffers, net._dropout_rng, opt_state):
            self.bcast(a)
        t = np.array([opt.t], dtype=np.int64)
        self.comm.Bcast(t, root=0)
        opt.t = int(t[0])
        state = self.comm.bcast(net._shuffle_rng.bit_generator.state, root=0)
        net._shuffle_rng.bit_generator.state = state

    def keeps(self, callback):
        """Whether ``callback`` runs on this rank: all do on rank 0; on the
        others, those that write files or the terminal (``root_only``:
        ModelCheckpoint, CSVLogger, ProgressBar by default) do not."""
        if self.rank == 0:
            return True
        from .callbacks import CSVLogger, ModelCheckpoint, ProgressBar
        default = isinstance(callback, (ModelCheckpoint, CSVLogger, ProgressBar))
        return not getattr(callback, "root_only", default)


class AgreedInterrupt:
    """A ``_DeferredInterrupt`` whose ``requested`` is the same on every
    rank: it changes only at ``agree``, to true if Ctrl-C reached any rank
    (mpiexec forwards it to each, at slightly different moments)."""

    def __init__(self, inner, ranks):
        self.inner, self.ranks, self.requested = inner, ranks, False

    def agree(self, count=0):
        """One collective: the smallest ``count`` of the ranks (0 if any was
        interrupted), updating ``requested``."""
        got = self.ranks.min([count, -float(self.inner.requested or self.requested)])
        self.requested = bool(got[1] < 0)
        return 0 if self.requested else int(got[0])


def _checksum(a, rows=4096):
    """A cheap fingerprint of an array's values (NaN-safe): sum_ij a_ij u_i
    v_j with irregular row and column weights u, v over at most ``rows``
    rows spread evenly (the first and last included), so that other data, a
    relabelled one-hot target or a shuffled X change it, at a cost that does
    not grow with the data (a memmap reads only those rows)."""
    if not isinstance(a, np.ndarray):  # sparse: its stored values
        a = a.data
    a = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
    picked = np.unique(np.linspace(0, a.shape[0] - 1, min(a.shape[0], rows)).astype(np.int64))
    v = 1.0 + np.modf(np.arange(1, a.shape[1] + 1) * 0.7548776662466927)[0]
    u = 1.0 + np.modf((picked + 1) * 0.5698402909980532)[0]
    with np.errstate(all="ignore"):
        block = np.nan_to_num(np.asarray(a[picked], dtype=np.float64))
        return float(u @ block @ v) if block.size else 0.0
