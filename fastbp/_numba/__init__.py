"""Numba kernels.  Each kernel module also exposes cached C entry points
(``cfunc``s) for the engine, built lazily by ``c_entry_point``."""
import platform

import numpy as np
from llvmlite import binding
from numba import config, types

from .._config import NJIT, pinned_cfunc
from .._validation import check_dtype

_CFUNCS = {}

#: every C address handed out by loss_cfunc and step_cfunc: address ->
#: (kind "loss" or "step", name, dtype name).  The engine calls what an
#: address points at, so it takes only these (engine.EngineState, loss_grad).
ADDRESSES = {}


def register_address(address, kind, name, dtype):
    """Record ``address`` as the C entry point of ``kind`` ``name`` for ``dtype``."""
    ADDRESSES[int(address)] = (kind, name, np.dtype(dtype).name)
    return address


_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def target_features():
    """The CPU features Numba compiles for, as a set of names ("fma",
    "avx2", ...): NUMBA_CPU_FEATURES where set (Numba sets none for
    NUMBA_CPU_NAME=generic), else the host's.  Numba's own rule
    (numba.core.codegen), so what this says is what the kernels use."""
    features = config.CPU_FEATURES
    if features is None:
        features = binding.get_host_cpu_features().flatten()
    return {f[1:] for f in features.split(",") if f.startswith("+")}


def target_level():
    """The vector level of the code Numba generates on x86-64, in
    fastbp._isa's names: "avx512" (AVX-512F and FMA), "avx2" (AVX2 and FMA)
    or "baseline"; None on other CPUs."""
    if platform.machine().lower() not in _X86:
        return None
    have = target_features()
    if "fma" not in have or "avx2" not in have:
        return "baseline"
    return "avx512" if "avx512f" in have else "avx2"


def c_entry_point(wrapper, dtype, make_signature):
    """C address of a cached cfunc of ``wrapper`` for ``dtype``.

    Compiled (or loaded from Numba's cache) on first use only, so importing
    fastbp compiles nothing.  ``make_signature(T)`` gives the signature for
    the Numba scalar type T (float32 or float64).
    """
    key = (wrapper, check_dtype(dtype).name)
    if key not in _CFUNCS:
        t = types.float32 if key[1] == "float32" else types.float64
        # Created now, long after import: Numba picks its cache folder again
        # (fastbp._config.pinned_cfunc keeps it in the one checked at import).
        _CFUNCS[key] = pinned_cfunc(wrapper, make_signature(t), NJIT)
    return _CFUNCS[key].address
