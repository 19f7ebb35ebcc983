"""What each MPI rank runs for tests/test_distributed.py (not a test module).

Launched as ``mpiexec -n N python -P tests/mpi/ranks.py SCENARIO OUT_DIR
JSON_ARGS`` (not ``-m mpi4py``, which replaces sys.path[0], the first
PYTHONPATH entry under -P; ``main`` aborts the job on an exception as
``-m mpi4py`` would); every rank writes what it ended with to
``OUT_DIR/rank<r>.npz`` (weights, running statistics, optimizer state and
the history's losses), which the test compares across ranks and with one
process.  ``build`` and ``fit_args`` are imported by the test too, so the
single-process run it compares with is the same model and settings.
"""
import json
import os
import sys

import numpy as np

import fastbp


def data(n, d, k, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(dtype)
    y = rng.integers(0, k, n)
    w = rng.uniform(0.5, 2.0, n)
    return X, y, w


def build(kind, dtype):
    """The models the tests train: ``dense``, ``dropout_residual`` (Dropout,
    DropConnect, a residual block, L2 and activity penalties) and
    ``batchnorm``."""
    L = fastbp
    if kind == "dense":
        layers = [L.Dense(16, activation="tanh"), L.Dense(3)]
    elif kind == "dropout_residual":
        layers = [L.Dense(16, activation="relu", kernel_regularizer=L.regularizers.l2(1e-3)),
                  L.Dropout(0.25),
                  L.Residual([L.Dense(16, activation="tanh", dropconnect=0.2), L.Dense(16)]),
                  L.Dense(16, activation="relu",
                          activity_regularizer=L.regularizers.l1(1e-3)),
                  L.Dense(3)]
    elif kind == "batchnorm":
        layers = [L.Dense(16), L.BatchNorm(), L.Dense(16, activation="relu"), L.Dense(3)]
    elif kind == "everything":
        # Dropout, BatchNorm and a residual block together
        layers = [L.Dense(16, activation="relu"), L.BatchNorm(), L.Dropout(0.2),
                  L.Residual([L.Dense(16, activation="tanh"), L.BatchNorm(), L.Dense(16)]),
                  L.Dense(3)]
    else:
        raise ValueError(kind)
    return L.Sequential(layers, dtype=dtype, seed=3)


def optimizer(name):
    if name == "sgd":
        return fastbp.optim.SGD(0.05, momentum=0.9, nesterov=True)
    return fastbp.optim.Adam(1e-2)


def fit_args(a):
    return dict(loss="cross_entropy", epochs=a["epochs"], batch_size=a["batch"],
                shuffle=a.get("shuffle", True), verbose=0)


def _snapshot(net):
    opt = net.optimizer
    return dict(params=net._params, buffers=net._buffers,
                opt_state=opt._state_for(net.n_params, net.dtype), t=opt.t,
                loss=np.array(net.history["loss"] if "loss" in net.history else []),
                val_loss=np.array(net.history["val_loss"] if "val_loss" in net.history else []),
                stop=np.array([str(net.history.stopped_by), str(net.history.stop_reason)]))


def replicated(comm, a, out):
    dtype = np.dtype(a["dtype"])
    X, y, w = data(a["n"], 8, 3, dtype=dtype)
    net = build(a["model"], dtype)
    sw = w if a.get("weights") else None
    net.fit(X, y, optimizer=optimizer(a["opt"]), sample_weight=sw, comm=comm,
            sync_batchnorm=a.get("sync_batchnorm", False), n_threads=a.get("n_threads"),
            sync_every=a.get("sync_every", 1),
            validation_data=(X[:40], y[:40]), **fit_args(a))
    return net


def refused(comm, a, out):
    """``replicated``, returning the ValueError's message (every rank must
    refuse, before any collective)."""
    try:
        replicated(comm, a, out)
    except ValueError as exc:
        return str(exc)
    return "no error"


def sharded(comm, a, out):
    """Rank r's shard: rows r, r + size, ... of the data (or a_sizes[r]
    rows of its own), in order."""
    dtype = np.dtype(a["dtype"])
    X, y, w = data(a["n"], 8, 3, dtype=dtype)
    if a.get("sizes"):
        lo = sum(a["sizes"][:comm.rank])
        rows = np.arange(lo, lo + a["sizes"][comm.rank])
    else:
        rows = np.arange(comm.rank, a["n"], comm.size)
    net = build(a["model"], dtype)
    net.fit(X[rows], y[rows], optimizer=optimizer(a["opt"]), comm=comm, shard=True,
            sample_weight=w[rows] if a.get("weights") else None, **fit_args(a))
    return net


def checkpoint(comm, a, out):
    """Train ``epochs`` with a checkpoint; or, with ``resume``, load it and
    train ``epochs`` more."""
    dtype = np.dtype(a["dtype"])
    X, y, _ = data(a["n"], 8, 3, dtype=dtype)
    path = a["path"]
    if a.get("resume"):
        net = fastbp.load(path)
        net.fit(X, y, comm=comm, **fit_args(a))
    else:
        net = build(a["model"], dtype)
        net.fit(X, y, optimizer=optimizer(a["opt"]), comm=comm, checkpoint=path,
                checkpoint_every=a.get("every"), **fit_args(a))
    return net


class _Die(fastbp.callbacks.Callback):
    def __init__(self, how):
        self.how = how

    def on_epoch_end(self, net, epoch, logs):
        from mpi4py import MPI
        if epoch == 2 and MPI.COMM_WORLD.rank == 1:
            if self.how == "exit":
                os._exit(3)
            raise RuntimeError("rank 1 failed on purpose")


def dies(comm, a, out):
    X, y, _ = data(400, 8, 3)
    net = build("dense", np.float64)
    net.fit(X, y, optimizer=optimizer("adam"), comm=comm, callbacks=[_Die(a["how"])],
            **fit_args(dict(a, epochs=50, batch=8)))
    return net


def mismatch(comm, a, out):
    """Each rank passes different data without shard=True: every rank must
    get the ValueError (none may hang in a collective)."""
    X, y, _ = data(100 + comm.rank, 8, 3)
    net = build("dense", np.float64)
    try:
        net.fit(X[:100], y[:100] if comm.rank == 0 else y[::-1][:100], comm=comm,
                **fit_args(dict(a, epochs=1, batch=10)))
    except ValueError as exc:
        return str(exc)
    return "no error"


def mismatch_settings(comm, a, out):
    """Rank 1 asks for one more epoch (or another model): every rank must
    get the ValueError before any step (the extra epoch would wait forever)."""
    X, y, _ = data(100, 8, 3)
    kind = "dropout_residual" if a["what"] == "model" and comm.rank == 1 else "dense"
    net = build(kind, np.float64)
    epochs = 2 + (a["what"] == "epochs" and comm.rank == 1)
    try:
        net.fit(X, y, comm=comm, **fit_args(dict(a, epochs=epochs, batch=10)))
    except ValueError as exc:
        return str(exc)
    return "no error"


class _LrOnRankOne(fastbp.callbacks.Callback):
    def on_epoch_end(self, net, epoch, logs):
        from mpi4py import MPI
        if MPI.COMM_WORLD.rank == 1:
            net.optimizer.lr *= 0.5


def one_rank_callback(comm, a, out):
    """A callback changes the learning rate on rank 1 only: the ranks would
    drift apart silently; they must all stop with the RuntimeError."""
    X, y, _ = data(100, 8, 3)
    net = build("dense", np.float64)
    try:
        net.fit(X, y, comm=comm, callbacks=[_LrOnRankOne()],
                **fit_args(dict(a, epochs=3, batch=10)))
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def long_fit(comm, a, out):
    """Trains until Ctrl-C (tests send SIGINT to mpiexec): every rank must
    stop at the same batch, rank 0 having written the checkpoint."""
    X, y, _ = data(2000, 8, 3)
    net = build("dense", np.float64)
    open(os.path.join(out, f"started{comm.rank}"), "w").close()
    try:
        net.fit(X, y, optimizer=optimizer("adam"), comm=comm, checkpoint=a["path"],
                **fit_args(dict(a, epochs=100000, batch=4)))
    except KeyboardInterrupt:
        return net
    raise AssertionError("the fit ended without Ctrl-C")


def bad_handle(comm, a, out):
    """The engine's allreduce is given the null communicator: MPI returns
    an error code, and every rank must stop with MPI's message, not hang."""
    from fastbp import distributed

    attach = distributed.Ranks.attach

    def broken(self, engine_state):
        attach(self, engine_state)
        self._handles = dict(self._handles, comm=int(self.MPI.COMM_NULL.handle))
        engine_state.set_comm(rank=self.rank, n_ranks=self.size, sharded=self.shard,
                              **self._handles)

    distributed.Ranks.attach = broken
    X, y, _ = data(100, 8, 3)
    net = build("dense", np.float64)
    try:
        net.fit(X, y, comm=comm, **fit_args(dict(a, epochs=1, batch=10)))
    except RuntimeError as exc:
        return str(exc)
    return "no error"


class _StopOnRankOne(fastbp.callbacks.Callback):
    def on_epoch_end(self, net, epoch, logs):
        from mpi4py import MPI
        if epoch == 2 and MPI.COMM_WORLD.rank == 1:
            net.stop_training = True
            self.stop_reason = "rank 1 had seen enough"


def one_rank_stops(comm, a, out):
    """A callback stops the fit on rank 1 only: every rank stops after the
    same epoch, with the same history and stop reason."""
    X, y, _ = data(100, 8, 3)
    net = build("dense", np.float64)
    net.fit(X, y, comm=comm, callbacks=[_StopOnRankOne()], **fit_args(dict(a, epochs=5, batch=10)))
    return net


def main():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    scenario, out, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    try:
        result = globals()[scenario](comm, args, out)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        # also in a file: MPI_Abort may end the job before mpiexec forwards
        # this rank's stderr (an empty output was seen once, under load)
        with open(os.path.join(out, f"rank{comm.rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        comm.Abort(1)
    path = os.path.join(out, f"rank{comm.rank}.npz")
    if isinstance(result, str):
        np.savez(path, message=np.array(result))
    else:
        np.savez(path, **_snapshot(result))


if __name__ == "__main__":
    main()
