"""Check a model's backpropagated gradient against central differences."""
from __future__ import annotations

import numpy as np

from . import losses as _losses
from ._typing import ArrayLike, MatrixLike
from ._validation import check_X
from .model import Sequential


def gradcheck(net: Sequential, X: MatrixLike, y: ArrayLike, loss: str = "mse", eps: float = 1e-5,
              indices: ArrayLike | None = None, sample_weight: ArrayLike | None = None) -> float:
    """Largest relative error between the compiled gradient and central
    finite differences, computed in float64.

    A float32 model is checked through a float64 copy of itself (same
    architecture and weights), since float32 differences are too coarse.

    Parameters
    ----------
    net : Sequential
    X : array-like of shape (n, n_features)
    y : array-like, targets for ``loss``
    loss : str, default "mse"
    eps : float, default 1e-5
        Step of the central difference (L(p + eps) - L(p - eps)) / (2 eps);
        1e-5 is near the optimum (machine epsilon)^(1/3) for float64.
    indices : array-like of int or None
        Parameters to check (default: all trainable ones).  A frozen
        layer's (``trainable=False``) gradient is zero by design, not the
        loss's derivative, so its parameters are not checked (ValueError if
        asked for).
    sample_weight : array-like of shape (n,), optional

    Returns
    -------
    float
        max_i |a_i - n_i| / max(|a_i|, |n_i|, floor), where a is the
        analytic and n the numeric gradient, and floor = 1e-3 * max_j |n_j|:
        central differences carry a rounding error of about 1e-16 L / eps,
        so entries a thousand times smaller than the largest are judged
        relative to that floor instead of their own (tiny) size.

    Notes
    -----
    Where a pre-activation lies within ``eps`` of a kink (relu, leaky_relu,
    elu at 0) the finite difference straddles two slopes and the check is
    meaningless there.
    """
    loss = _losses.resolve(loss)
    X = check_X(X, np.float64, net.n_features if net.built else None, accept_sparse=True)
    if not isinstance(X, np.ndarray):
        X = X.toarray()  # loss_and_grad runs on all rows at once: densified once, not per call
    if not net.built:
        net.build(X.shape[1])
    with net._state_lock:
        net._sync_layout()  # settings changed since the build: net._reg is copied below
    twin = Sequential([type(l)(**{k: v for k, v in l.get_config().items() if k != "type"})
                       for l in net.layers], dtype="float64")
    twin.build(net.n_features)
    twin.set_params(net.params.astype(np.float64))
    twin._reg[...] = net._reg
    twin._reg_per_weight = net._reg_per_weight

    def value(p):
        return twin.loss_and_grad(X, y, loss=loss, sample_weight=sample_weight)[0]
    _, analytic = twin.loss_and_grad(X, y, loss=loss, sample_weight=sample_weight)
    params = twin.params
    trainable = np.zeros(params.size, dtype=bool)
    for start, length in twin._segments():
        trainable[start:start + length] = True
    if indices is None:
        idx = np.flatnonzero(trainable)
        if idx.size == 0:
            raise ValueError("the model has no trainable parameters to check (every layer "
                             "is frozen)")
    else:
        idx = _checked_indices(indices, params.size)
        if not trainable[idx].all():
            frozen = int(idx[~trainable[idx]][0])
            raise ValueError(f"parameter {frozen} belongs to a frozen layer (trainable=False): "
                             "its gradient is zero by design, not the loss's derivative; "
                             "check trainable parameters")
    numeric = np.empty(idx.size)
    for j, i in enumerate(idx):
        saved = params[i]
        params[i] = saved + eps
        up = value(params)
        params[i] = saved - eps
        down = value(params)
        params[i] = saved
        numeric[j] = (up - down) / (2 * eps)
    a = analytic[idx]
    floor = 1e-3 * max(np.abs(numeric).max(), np.finfo(np.float64).tiny)
    denom = np.maximum(np.maximum(np.abs(a), np.abs(numeric)), floor)
    return float(np.max(np.abs(a - numeric) / denom))


def _checked_indices(indices, n):
    """``indices`` as a 1-D int64 array of parameter positions in [0, n), at
    least one; a ValueError otherwise (a 2-D index moved two parameters at
    once and reported a wrong gradient; 1.5 was cut to 1)."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError(f"indices must be a non-empty 1-D list of parameter positions, got "
                         f"shape {idx.shape}")
    if idx.dtype.kind not in "iu":
        raise ValueError(f"indices must be integers, got {idx.dtype}")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"indices must lie in [0, {n}) (the model's parameters), got "
                         f"{idx.min()} .. {idx.max()}")
    return idx.astype(np.int64)
