"""Loss kernels (Numba): mean loss of a batch and its gradient wrt the outputs.

Each ``<name>_loss_grad(Z, Y, G)`` takes the network outputs Z (m, k), the
targets Y (m, k) and writes G = dL/dZ (m, k); it returns the mean loss as a
float64 (accumulated in float64 for both dtypes).  Definitions follow
torch.nn with ``reduction="mean"``; ``fastbp.reference`` has the same names.

``loss_cfunc(name, dtype)`` returns the C address of a cached ``cfunc`` with
signature ``double(T* z, T* y, T* g, int64 m, int64 k)`` that wraps the same
kernel; the training engine (csrc/engine.pyx) calls it once per mini-batch.
"""
import numpy as np
from numba import carray, njit, types

from .._config import NJIT
from . import c_entry_point


@njit(**NJIT)
def mse_loss_grad(Z, Y, G):
    m, k = Z.shape
    scale = 1.0 / (m * k)
    total = 0.0
    for i in range(m):
        for j in range(k):
            d = Z[i, j] - Y[i, j]
            total += d * d
            G[i, j] = 2 * scale * d
    return total * scale


@njit(**NJIT)
def binary_cross_entropy_loss_grad(Z, Y, G):
    m, k = Z.shape
    scale = 1.0 / (m * k)
    total = 0.0
    for i in range(m):
        for j in range(k):
            z = Z[i, j]
            y = Y[i, j]
            # log(1 + e^{-|z|}) never overflows; max(z, 0) - z y is exact.
            e = np.exp(-abs(z))
            total += max(z, 0) - z * y + np.log1p(e)
            s = 1 / (1 + e) if z >= 0 else e / (1 + e)
            G[i, j] = scale * (s - y)
    return total * scale


@njit(**NJIT)
def cross_entropy_loss_grad(Z, Y, G):
    m, k = Z.shape
    scale = 1.0 / m
    total = 0.0
    for i in range(m):
        zmax = Z[i, 0]
        for j in range(1, k):
            zmax = max(zmax, Z[i, j])
        s = 0.0
        for j in range(k):
            e = np.exp(Z[i, j] - zmax)
            G[i, j] = e
            s += e
        lse = zmax + np.log(s)
        ysum = 0.0
        for j in range(k):
            y = Y[i, j]
            ysum += y
            total += y * (lse - Z[i, j])
        # d/dz of -sum_j y_j log softmax(z)_j = softmax(z) * sum(y) - y
        for j in range(k):
            G[i, j] = scale * (G[i, j] / s * ysum - Y[i, j])
    return total * scale


# C entry points: thin wrappers that view raw pointers as arrays.
def _mse_c(z, y, g, m, k):
    return mse_loss_grad(carray(z, (m, k)), carray(y, (m, k)), carray(g, (m, k)))


def _bce_c(z, y, g, m, k):
    return binary_cross_entropy_loss_grad(carray(z, (m, k)), carray(y, (m, k)),
                                          carray(g, (m, k)))


def _ce_c(z, y, g, m, k):
    return cross_entropy_loss_grad(carray(z, (m, k)), carray(y, (m, k)), carray(g, (m, k)))


KERNELS = {
    "mse": mse_loss_grad,
    "binary_cross_entropy": binary_cross_entropy_loss_grad,
    "cross_entropy": cross_entropy_loss_grad,
}
_C_WRAPPERS = {"mse": _mse_c, "binary_cross_entropy": _bce_c, "cross_entropy": _ce_c}


def _signature(t):
    p = types.CPointer(t)
    return types.float64(p, p, p, types.int64, types.int64)


def loss_cfunc(name, dtype):
    """C address of the cached cfunc for loss ``name`` in ``dtype``."""
    return c_entry_point(_C_WRAPPERS[name], dtype, _signature)
