"""Loss kernels (Numba): mean loss of a batch and its gradient wrt the outputs.

Each ``<name>_loss_grad(Z, Y, w, G)`` takes the network outputs Z (m, k),
the targets Y (m, k) and the sample weights w (m,), writes G = dL/dZ (m, k)
and returns the weighted mean loss as a float64 (accumulated in float64 for
both dtypes).  The fastbp losses follow torch.nn with ``reduction="mean"``
(with weights: sum_i w_i l_i / sum_i w_i, which is the plain mean when every
w_i is 1); the ``sk_`` losses are scikit-learn's MLP losses.
``fastbp.reference`` has the same names.

``loss_cfunc(name, dtype)`` returns the C address of a cached ``cfunc`` with
signature ``double(T* z, T* y, T* w, T* g, int64 m, int64 k)`` that wraps the
same kernel; the training engine (csrc/engine.pyx) calls it once per batch.

The softmax losses (``cross_entropy``, ``sk_log_loss``) are not here but in C
(csrc/losses.h, ``fastbp._ext.losses``), whose vector exp is several times
faster than Numba's one libm call per logit; ``KERNELS`` and ``loss_cfunc``
list them with the others, so callers need one registry.
"""
import numpy as np
from numba import carray, njit, types

from .._config import NJIT, pin_module
from .._ext import losses as _softmax
from .._ext.losses import cross_entropy_loss_grad, sk_log_loss_loss_grad
from .._validation import check_dtype
from . import c_entry_point, register_address


@njit(**NJIT)
def _weight_sum(w):
    total = 0.0
    for i in range(w.shape[0]):
        total += w[i]
    return total


@njit(**NJIT)
def _check_shapes(Z, Y, w, G):
    """Python can call the kernels too: Y and G must have Z's shape and w a
    weight per row (the loops index them without bounds checks)."""
    if Y.shape != Z.shape or G.shape != Z.shape or w.shape[0] != Z.shape[0]:
        raise ValueError("a loss kernel's Y and G must have Z's shape (m, k) and w the "
                         "shape (m,)")


@njit(**NJIT)
def mse_loss_grad(Z, Y, w, G):
    _check_shapes(Z, Y, w, G)
    m, k = Z.shape
    scale = 1.0 / (_weight_sum(w) * k)
    total = 0.0
    for i in range(m):
        wi = np.float64(w[i])
        for j in range(k):
            d = Z[i, j] - Y[i, j]
            # The loss term in float64, from the exact difference: a float32
            # residual of 2e19 (or a weight of 3e38) must not overflow it.
            d64 = np.float64(Z[i, j]) - np.float64(Y[i, j])
            total += wi * d64 * d64
            G[i, j] = 2 * scale * (wi * d)
    return total * scale


@njit(**NJIT)
def binary_cross_entropy_loss_grad(Z, Y, w, G):
    _check_shapes(Z, Y, w, G)
    m, k = Z.shape
    scale = 1.0 / (_weight_sum(w) * k)
    total = 0.0
    for i in range(m):
        for j in range(k):
            z = Z[i, j]
            y = Y[i, j]
            # log(1 + e^{-|z|}) never overflows; max(z, 0) - z y is exact.
            e = np.exp(-abs(z))
            wi = np.float64(w[i])  # a float32 weight of 3e38 times 2 must not overflow
            total += wi * (max(z, 0) - np.float64(z) * y + np.log1p(e))
            s = 1 / (1 + e) if z >= 0 else e / (1 + e)
            G[i, j] = scale * (wi * (s - y))
    return total * scale


# scikit-learn's losses (sklearn/neural_network/_base.py), in terms of the
# last layer's pre-activation Z, with its output activation applied inside.
# The gradient is sklearn's delta, w (act(Z) - Y) / sum(w), which is the exact
# gradient of the loss for log losses and single-output squared error.

@njit(**NJIT)
def sk_squared_error_loss_grad(Z, Y, w, G):
    _check_shapes(Z, Y, w, G)
    """0.5 * mean over outputs of the weighted mean of (Z - Y)^2; identity output."""
    m, k = Z.shape
    scale = 1.0 / _weight_sum(w)
    total = 0.0
    for i in range(m):
        wi = np.float64(w[i])
        for j in range(k):
            d = Z[i, j] - Y[i, j]
            d64 = np.float64(Z[i, j]) - np.float64(Y[i, j])  # as mse_loss_grad
            total += wi * d64 * d64
            G[i, j] = scale * (wi * d)
    return 0.5 * total * scale / k


@njit(**NJIT)
def sk_binary_log_loss_loss_grad(Z, Y, w, G):
    _check_shapes(Z, Y, w, G)
    """-sum over outputs of the weighted mean of y log p + (1-y) log(1-p),
    p = logistic(Z) clipped to [eps, 1-eps]."""
    m, k = Z.shape
    scale = 1.0 / _weight_sum(w)
    eps = np.finfo(Z.dtype).eps
    total = 0.0
    for i in range(m):
        row = 0.0
        for j in range(k):
            z = Z[i, j]
            e = np.exp(-abs(z))
            p = 1 / (1 + e) if z >= 0 else e / (1 + e)
            y = Y[i, j]
            G[i, j] = scale * (np.float64(w[i]) * (p - y))
            pc = min(max(p, eps), 1 - eps)
            if y != 0:
                row += y * np.log(pc)
            if y != 1:
                row += (1 - y) * np.log(1 - pc)
        total -= np.float64(w[i]) * row
    return total * scale


@njit(**NJIT)
def sk_poisson_loss_grad(Z, Y, w, G):
    _check_shapes(Z, Y, w, G)
    """sum over outputs of the weighted mean of y log(y / p) - y + p, p = exp(Z)."""
    m, k = Z.shape
    scale = 1.0 / _weight_sum(w)
    total = 0.0
    for i in range(m):
        row = 0.0
        for j in range(k):
            p = np.exp(Z[i, j])
            y = Y[i, j]
            G[i, j] = scale * (np.float64(w[i]) * (p - y))
            row += (y * np.log(y / p) if y != 0 else 0.0) - y + p
        total += np.float64(w[i]) * row
    return total * scale


# C entry points: thin wrappers that view raw pointers as arrays.
def _mse_c(z, y, w, g, m, k):
    return mse_loss_grad(carray(z, (m, k)), carray(y, (m, k)), carray(w, (m,)), carray(g, (m, k)))


def _bce_c(z, y, w, g, m, k):
    return binary_cross_entropy_loss_grad(carray(z, (m, k)), carray(y, (m, k)), carray(w, (m,)),
                                          carray(g, (m, k)))


def _sk_se_c(z, y, w, g, m, k):
    return sk_squared_error_loss_grad(carray(z, (m, k)), carray(y, (m, k)), carray(w, (m,)),
                                      carray(g, (m, k)))


def _sk_blog_c(z, y, w, g, m, k):
    return sk_binary_log_loss_loss_grad(carray(z, (m, k)), carray(y, (m, k)), carray(w, (m,)),
                                        carray(g, (m, k)))


def _sk_poisson_c(z, y, w, g, m, k):
    return sk_poisson_loss_grad(carray(z, (m, k)), carray(y, (m, k)), carray(w, (m,)),
                                carray(g, (m, k)))


KERNELS = {
    "mse": mse_loss_grad,
    "binary_cross_entropy": binary_cross_entropy_loss_grad,
    "cross_entropy": cross_entropy_loss_grad,
    "sk_squared_error": sk_squared_error_loss_grad,
    "sk_log_loss": sk_log_loss_loss_grad,
    "sk_binary_log_loss": sk_binary_log_loss_loss_grad,
    "sk_poisson": sk_poisson_loss_grad,
}
_C_WRAPPERS = {"mse": _mse_c, "binary_cross_entropy": _bce_c,
               "sk_squared_error": _sk_se_c, "sk_binary_log_loss": _sk_blog_c,
               "sk_poisson": _sk_poisson_c}


def _signature(t):
    p = types.CPointer(t)
    return types.float64(p, p, p, p, types.int64, types.int64)


def loss_cfunc(name, dtype):
    """C address of loss ``name`` in ``dtype``: the C kernel's for the softmax
    losses, else the cached cfunc's."""
    dtype = check_dtype(dtype)
    if name in _softmax.NAMES:
        address = _softmax.loss_address(name, dtype)
    else:
        address = c_entry_point(_C_WRAPPERS[name], dtype, _signature)
    return register_address(address, "loss", name, dtype)


# Each kernel keeps its cache only in the folder fastbp checked (fastbp._config).
pin_module(globals())
