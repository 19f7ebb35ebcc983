"""Start-up latency, timed in a fresh interpreter (numpy's bench_import
style): what a user waits for before the first epoch finishes.

* ``time_import``: ``import fastbp`` (pulls in numpy, scipy's BLAS, numba).
* ``time_first_fit``: import plus building and fitting a small network for
  one epoch, with the Numba cache already filled (the usual case after the
  first run; setup fills it).
* ``time_first_fit_cold_cache``: the same with an empty ``NUMBA_CACHE_DIR``,
  i.e. including the JIT compilation of the loss and optimizer kernels (the
  first run after installing).

The thread variables set in ``benchmarks/__init__.py`` are inherited by the
subprocesses.  Python's own start-up (~20 ms) is included.
"""
import os
import shutil
import subprocess
import sys
import tempfile

FIRST_FIT = """
import numpy as np
import fastbp
rng = np.random.default_rng(0)
X = rng.standard_normal((256, 8)).astype(np.float32)
y = (X[:, 0] > 0).astype(np.int64)
net = fastbp.Sequential([fastbp.Dense(16, activation="relu"), fastbp.Dense(2)], seed=0)
net.fit(X, y, loss="cross_entropy", optimizer=fastbp.optim.Adam(lr=1e-3), epochs=1,
        batch_size=32, verbose=0)
"""


def _execute(code, env=None):
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


class Import:
    number = 1
    repeat = (2, 5, 20.0)
    warmup_time = 0.0
    timeout = 120

    def setup(self):
        _execute(FIRST_FIT)  # fills the Numba cache, warms the file system cache

    def time_import(self):
        _execute("import fastbp")

    def time_first_fit(self):
        _execute(FIRST_FIT)


class ImportColdCache:
    number = 1
    repeat = (2, 3, 30.0)
    warmup_time = 0.0
    timeout = 180

    def setup(self):
        _execute("import fastbp")  # warms the file system cache only
        self.cache_dir = tempfile.mkdtemp(prefix="fastbp-bench-numba-")
        self.env = dict(os.environ, NUMBA_CACHE_DIR=self.cache_dir)

    def teardown(self):
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def time_first_fit_cold_cache(self):
        _execute(FIRST_FIT, env=self.env)
