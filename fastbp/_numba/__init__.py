"""Numba kernels.  Each kernel module also exposes cached C entry points
(``cfunc``s) for the engine, built lazily by ``c_entry_point``."""
import numpy as np
from numba import cfunc, types

from .._config import NJIT

_CFUNCS = {}


def c_entry_point(wrapper, dtype, make_signature):
    """C address of a cached cfunc of ``wrapper`` for ``dtype``.

    Compiled (or loaded from Numba's cache) on first use only, so importing
    fastbp compiles nothing.  ``make_signature(T)`` gives the signature for
    the Numba scalar type T (float32 or float64).
    """
    key = (wrapper, np.dtype(dtype).name)
    if key not in _CFUNCS:
        t = types.float32 if key[1] == "float32" else types.float64
        _CFUNCS[key] = cfunc(make_signature(t), **NJIT)(wrapper)
    return _CFUNCS[key].address
