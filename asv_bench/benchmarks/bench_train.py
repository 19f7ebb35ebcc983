"""Training: one epoch per workload and backend, the speedup of the compiled
engine over the NumPy reference, the loss reached (so a change that makes
training faster but wrong is caught too), and peak memory of a fit.

Workloads and backends: see ``common.py``.
"""
from fastbp._ext import engine_rows

from .common import (BACKENDS, TRAINERS, FastbpTrainer, ReferenceTrainer, dataset,
                     interleaved_medians, warm_up)


class TrainEpoch:
    """Seconds per training epoch (S, M: 20000 samples; L: 4096 samples).

    Both backends get the same samples, so the rows of a workload compare
    directly.  Setup is cheap (data are generated once per process, the
    network is rebuilt, two batches warm it up); an L epoch takes seconds,
    hence the capped sample count and the long timeout.
    """

    params = (["S", "M", "L"], BACKENDS)
    param_names = ["workload", "backend"]
    number = 1
    repeat = (1, 5, 30.0)  # min samples, max samples, max seconds per round
    warmup_time = 0.0  # setup warms up explicitly
    timeout = 300

    def setup(self, workload, backend):
        self.data = dataset(workload)
        self.trainer = TRAINERS[backend](workload)
        warm_up(self.trainer, *self.data)

    def time_epoch(self, workload, backend):
        self.trainer.epoch(*self.data)


class TrainSpeedup:
    """reference time / fastbp time for one epoch: medians of ``runs``
    interleaved epochs, both from the same initial weights on the same
    data.  Higher is better; below 1 means the compiled engine lost."""

    params = ["S", "M"]
    param_names = ["workload"]
    unit = "speedup"
    runs = 3
    timeout = 300

    def setup(self, workload):
        self.data = dataset(workload)
        self.fast = FastbpTrainer(workload)
        self.ref = ReferenceTrainer(workload)
        warm_up(self.fast, *self.data)
        warm_up(self.ref, *self.data)

    def track_speedup_epoch(self, workload):
        t_fast, t_ref = interleaved_medians(
            [lambda: self.fast.epoch(*self.data), lambda: self.ref.epoch(*self.data)], self.runs)
        return t_ref / t_fast


class RowParallelSpeedup:
    """On two threads: the layer-by-layer step's epoch time / the
    row-parallel step's (csrc/engine_rows.pyx ``rows_parallel``: each thread
    takes its rows of the batch through every layer), medians of ``runs``
    interleaved epochs of the same network in the same process.  Above 1:
    cutting the batch's rows across threads pays.  The only benchmark that
    asks for two threads (``fit(n_threads=2)``): it compares two paths
    within one run, so the pinned single thread of the others is not
    needed to make it steady."""

    params = ["D", "M"]   # D in float64, as scikit-learn trains digits
    param_names = ["workload"]
    unit = "speedup"
    runs = 3
    timeout = 300

    def setup(self, workload):
        dtype = "float64" if workload == "D" else "float32"
        self.data = dataset(workload, dtype=dtype)
        self.trainer = FastbpTrainer(workload, dtype)
        self.trainer.n_threads = 2
        warm_up(self.trainer, *self.data)

    def _epoch(self, rows):
        previous = engine_rows._set_rows_parallel(rows)
        try:
            self.trainer.epoch(*self.data)
        finally:
            engine_rows._set_rows_parallel(previous)

    def track_rows_speedup(self, workload):
        t_layers, t_rows = interleaved_medians(
            [lambda: self._epoch(False), lambda: self._epoch(True)], self.runs)
        return t_layers / t_rows


class TrainFinalLoss:
    """Mean cross-entropy over S's 20000 training samples after 3 epochs
    from seed 0 (same initial weights for both backends; each backend
    shuffles with its own seeded generator, so the two agree closely but
    not bitwise).  Deterministic for a given thread count."""

    params = BACKENDS
    param_names = ["backend"]
    unit = "loss"
    epochs = 3
    timeout = 120

    def setup(self, backend):
        self.data = dataset("S")
        warm_up(TRAINERS[backend]("S"), *self.data)

    def track_final_loss(self, backend):
        trainer = TRAINERS[backend]("S")
        for _ in range(self.epochs):
            trainer.epoch(*self.data)
        return float(trainer.loss(*self.data))


class FitMemory:
    """Peak resident memory of the benchmark process around one epoch on M.

    asv reports the process's high-water mark, which includes the imports
    (numpy, scipy, numba) and M's data (about 63 MB): ``peakmem_baseline``
    is the same process without the epoch, so the difference is what
    training added."""

    params = BACKENDS
    param_names = ["backend"]
    timeout = 120

    def setup(self, backend):
        self.data = dataset("M")
        self.trainer = TRAINERS[backend]("M")
        warm_up(self.trainer, *self.data)

    def peakmem_fit_M(self, backend):
        self.trainer.epoch(*self.data)

    def peakmem_baseline(self, backend):
        pass
