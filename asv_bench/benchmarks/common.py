"""Workloads, seeded data and the two training backends shared by the
benchmark modules.  Nothing here is a benchmark.

Workloads (float32, ReLU hidden layers, softmax cross-entropy, Adam(lr=1e-3),
shuffled mini-batches) are ``fastbp.bench.WORKLOADS``, those ``fastbp bench``
runs (S 20-64-64-2, M 784-256-128-10, L 1024-2048-2048-10), and D,
64-100-10 with batch 200 and 20000 samples: the shape of scikit-learn's
digits problem at its default batch (the drop-in comparison of the README),
for the row-parallel benchmark only.

Data are ``fastbp.bench.make_data``'s: standard-normal features with labels
from a fixed random linear "teacher" (argmax of X @ T), so a network has
something to learn and the final-loss track means something.  Everything is
seeded.

Backends: ``"fastbp"`` trains with ``Sequential.fit`` (compiled engine);
``"reference"`` runs ``fastbp.reference.train_batches`` (plain NumPy) with
``fastbp.reference.adam_step`` from the *same* initial parameters.
"""
import functools
import time

import numpy as np

import fastbp
from fastbp import reference
from fastbp.bench import WORKLOADS as BENCH_WORKLOADS
from fastbp.bench import make_data

from . import limit_threads

# fastbp loads scipy's OpenBLAS (its kernels' BLAS), a second library beside
# numpy's: make sure it runs with the pinned thread count too.
limit_threads()

#: name -> (layer sizes, batch size, samples)
WORKLOADS = {**BENCH_WORKLOADS, "D": ((64, 100, 10), 200, 20000)}
BACKENDS = ["fastbp", "reference"]
LOSS = "cross_entropy"
#: Adam hyperparameters (fastbp.optim.Adam's defaults, spelled out for the reference)
LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8
SEED = 0


@functools.lru_cache(maxsize=None)
def dataset(workload, n=None, dtype="float32", seed=SEED):
    """(X, y, Y): features (n, d), integer labels (n,), one-hot targets (n, k).

    Cached per process: asv re-runs ``setup`` before every sample, and
    generating M's 20000 x 784 matrix each time would dominate the run.
    Callers must not modify the arrays.
    """
    sizes, _, samples = WORKLOADS[workload]
    n = samples if n is None else n
    X, y = make_data(sizes, n, dtype, seed)
    Y = np.zeros((n, sizes[-1]), dtype=dtype)
    Y[np.arange(n), y] = 1
    return X, y, Y


def make_net(workload, dtype="float32", seed=SEED):
    """A built ``fastbp.Sequential`` for the workload (same seed, same weights)."""
    sizes, _, _ = WORKLOADS[workload]
    layers = [fastbp.Dense(units, activation="relu") for units in sizes[1:-1]]
    layers.append(fastbp.Dense(sizes[-1]))
    net = fastbp.Sequential(layers, dtype=dtype, seed=seed)
    net.build(sizes[0])
    return net


class ReferenceAdam:
    """``optimizer_step(params, grad)`` for ``reference.train_batches``:
    ``fastbp.reference.adam_step`` with its own state arrays."""

    def __init__(self, n_params, dtype):
        self.m = np.zeros(n_params, dtype=dtype)
        self.v = np.zeros(n_params, dtype=dtype)
        self.vmax = self.m[:0]  # amsgrad off: never read
        self.t = 0

    def __call__(self, params, grad):
        self.t += 1
        return reference.adam_step(params, grad, self.m, self.v, self.vmax, self.t,
                                   LR, BETA1, BETA2, EPS, 0.0, False, False)


class FastbpTrainer:
    """One epoch = one ``Sequential.fit(epochs=1)`` call (validation,
    shuffling and the compiled epoch loop included: what a user pays)."""

    def __init__(self, workload, dtype="float32", seed=SEED):
        self.net = make_net(workload, dtype, seed)
        self.opt = fastbp.optim.Adam(lr=LR, betas=(BETA1, BETA2), eps=EPS)
        _, self.batch_size, _ = WORKLOADS[workload]
        self.n_threads = None   # BLAS's (pinned to one by __init__.py)

    def epoch(self, X, y, Y):
        self.net.fit(X, y, loss=LOSS, optimizer=self.opt, epochs=1,
                     batch_size=self.batch_size, shuffle=True, verbose=0,
                     n_threads=self.n_threads)

    def loss(self, X, y, Y):
        return self.net.evaluate(X, y, loss=LOSS)


class ReferenceTrainer:
    """One epoch = ``fastbp.reference.train_batches`` over a fresh seeded
    permutation, starting from the same initial weights as FastbpTrainer."""

    def __init__(self, workload, dtype="float32", seed=SEED):
        net = make_net(workload, dtype, seed)
        self.program = net._program
        self.params = net.params.copy()
        self.opt = ReferenceAdam(self.params.shape[0], self.params.dtype)
        self.rng = np.random.default_rng(seed)
        _, self.batch_size, _ = WORKLOADS[workload]

    def epoch(self, X, y, Y):
        order = self.rng.permutation(X.shape[0])
        reference.train_batches(X, Y, order, self.batch_size, self.program, self.params,
                                LOSS, self.opt)

    def loss(self, X, y, Y):
        Z = reference.forward(X, self.program, self.params)
        return reference.cross_entropy_loss_grad(Z, Y, np.ones(len(Z), Z.dtype), np.empty_like(Z))


TRAINERS = {"fastbp": FastbpTrainer, "reference": ReferenceTrainer}


def warm_up(trainer, X, y, Y):
    """Train on two batches: compiles / loads the Numba kernels and allocates
    workspaces, so the timed call measures steady-state speed only."""
    rows = 2 * trainer.batch_size
    trainer.epoch(X[:rows], y[:rows], Y[:rows])


def interleaved_medians(funcs, runs):
    """Median wall time of each function, calling them in turn ``runs``
    times (interleaving spreads slow periods of a shared machine evenly)."""
    times = [[] for _ in funcs]
    for _ in range(runs):
        for f, ts in zip(funcs, times):
            start = time.perf_counter()
            f()
            ts.append(time.perf_counter() - start)
    return [float(np.median(ts)) for ts in times]
