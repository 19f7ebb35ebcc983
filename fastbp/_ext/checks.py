"""Argument checks of the compiled modules' Python entry points.

The engine's kernels index raw pointers without bounds checks, so each
``def`` of ``fastbp._ext.engine`` (``EngineState`` and ``Network``, checked
once, then ``train_batches``, ``forward`` and ``loss_grad``, which check
only what varies per call) and of ``fastbp._ext.engine_ops`` (the per-layer
ops' checked twins) passes its arrays through one of these first.  Each returns what it was given (never a
converted copy: the kernels write into the caller's arrays) or raises a
ValueError that names the argument and says what to pass.
"""
import numpy as np

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def field(name, a, dtype, shape=None, size=None, writable=False):
    """a itself if it is a C-contiguous ndarray of ``dtype`` with ``shape``
    (if given; None in it: any length) or at least ``size`` elements (if
    given), writable if ``writable``; else a ValueError saying what to pass."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, not {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name} is {a.dtype}; it must be {dtype}")
    if shape is not None and (a.ndim != len(shape) or any(
            s is not None and a.shape[i] != s for i, s in enumerate(shape))):
        want = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {a.shape}; it must be {want}")
    if size is not None and (a.ndim != 1 or a.shape[0] < size):
        raise ValueError(f"{name} has shape {a.shape}; it must be 1-D with at least "
                         f"{size} elements")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} is written in place and must be writable")
    return a


def array(name, a, dtype=None, ndim=None, like=None, writable=False):
    """a itself if it is a C-contiguous ndarray of a float dtype (``dtype``
    if given), with ``ndim`` dimensions (if given) and ``like``'s shape (if
    given); else a ValueError that says what to pass."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, not {type(a).__name__}")
    if dtype is None and a.dtype not in FLOATS:
        raise ValueError(f"{name} must be float32 or float64, not {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{name} is {a.dtype}; pass it as {np.dtype(dtype)} "
                         f"(the dtype of the other arrays)")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), not shape {a.shape}")
    if like is not None and a.shape != like.shape:
        raise ValueError(f"{name} has shape {a.shape}; it must be {like.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (np.ascontiguousarray({name}))")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} is written in place and must be writable")
    return a


def real(name, value, lo, hi, hi_open=False):
    """value as a float in [lo, hi] ([lo, hi) if hi_open); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, not {type(value).__name__}")
    v = float(value)
    if not (lo <= v and (v < hi if hi_open else v <= hi)):
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, not {value!r}")
    return v
