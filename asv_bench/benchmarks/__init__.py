"""asv benchmarks for fastbp.

Thread counts are pinned here, before this package imports anything else:
OpenBLAS and OpenMP read these variables once, when their libraries are
loaded, so a variable set later has no effect on a library already loaded.
Subprocesses started by the benchmarks (bench_import.py) inherit them.

Why one thread: the project machine has 2 cores and is shared.  With two
BLAS threads every implementation has slow periods, a medium network is
sometimes slower on 2 threads than on 1, and a 2x regression once hid in
that noise; with one thread the numbers are steady enough for
``asv continuous`` to flag real changes, and the compiled engine and the
NumPy reference are compared on equal terms.  ``setdefault`` keeps a value
you export yourself (``OPENBLAS_NUM_THREADS=2 asv run ...`` measures
threaded BLAS); never compare results taken with different thread counts.

The variables alone are not enough under asv 0.6: its benchmark runner
imports pympler, which imports numpy, before it imports this package, so
numpy's OpenBLAS is already loaded with one thread per core.
``limit_threads`` therefore also sets the limit of every BLAS / OpenMP
library already loaded, through threadpoolctl (a fastbp dependency).
``bench_threads.py`` records the thread count the benchmarks really ran with.
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
del _var


def limit_threads():
    """Apply the variables above to the BLAS and OpenMP libraries loaded so
    far (call again after importing code that may load another one)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=int(os.environ["OPENBLAS_NUM_THREADS"]), user_api="blas")
    threadpool_limits(limits=int(os.environ["OMP_NUM_THREADS"]), user_api="openmp")


limit_threads()
