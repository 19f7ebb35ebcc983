"""Guard: the thread count the benchmarks actually run with.

Not a speed: if this track changes, the timings of the same run are not
comparable with earlier ones (see ``benchmarks/__init__.py``).
"""
from threadpoolctl import threadpool_info

from . import common  # noqa: F401  (loads fastbp, numpy and scipy's BLAS as the benchmarks do)


class Threads:
    unit = "threads"

    def track_blas_threads(self):
        """Largest thread count among the loaded BLAS libraries (numpy's and
        scipy's OpenBLAS: the reference uses the first, fastbp's BLAS calls
        the second; fastbp's own kernels take the same count)."""
        return max(info["num_threads"] for info in threadpool_info()
                   if info["user_api"] == "blas")
