"""One place for compiled-code settings: Numba flags and its cache location.

Numba options used by every kernel (never hard-coded per function):

* ``error_model="numpy"``: division follows IEEE rules instead of raising, which
  lets loops vectorize (7x on the fused Adam loop, shared/PERF_NOTES.md).
* no ``fastmath``: NaN and inf keep their meaning, so divergence checks work.
* ``cache=True`` when a writable cache location exists.  An installed package
  caches beside its modules; where site-packages is read-only we point
  ``NUMBA_CACHE_DIR`` at a per-user folder, and if nothing is writable we
  compile without caching rather than fail at import.
"""
import os
import tempfile


def _writable(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".fastbp-probe-")
        probe.close()
        return True
    except OSError:
        return False


def _choose_cache():
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_numba")
    if _writable(os.path.join(here, "__pycache__")):
        return True
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for candidate in (os.path.join(base, "fastbp", "numba"),
                      os.path.join(tempfile.gettempdir(), f"fastbp-numba-{os.getuid()}")):
        if _writable(candidate):
            import numba

            numba.config.CACHE_DIR = candidate
            return True
    return False


CACHE = _choose_cache()

#: keyword arguments of every ``numba.njit`` / ``numba.cfunc`` in fastbp.
NJIT = dict(cache=CACHE, error_model="numpy", nogil=True)
