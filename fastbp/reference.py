"""The same math as the compiled kernels, in plain NumPy.

This module is the specification: each compiled kernel has a function here
of the same name and meaning, and the tests hold the two against each other
in float32 (rtol 1e-5) and float64 (1e-10).  It is written to be read: each
layer's forward stands beside its backward.  It is also the baseline the
benchmarks compare with.

Which name mirrors which kernel (module: function; the test that holds them
together):

* ``bias_activation``, ``activation_backward`` -- ``fastbp._ext.dense``:
  ``bias_activation_kernel``, ``activation_backward_db_kernel`` (the GEMM
  epilogues, csrc/epilogue.h, at every instruction-set level;
  tests/test_dense.py).
* ``gemm``, ``dense_forward``, ``dense_backward`` -- ``fastbp._ext.dense``:
  ``gemm`` (and ``gemm_small_kernel``, ``gemm_packed_kernel``),
  ``dense_forward``, ``dense_backward`` (tests/test_dense.py).
* ``dropout_forward``, ``dropout_backward``, ``residual_add``,
  ``activity_penalty``, ``batchnorm_forward``, ``batchnorm_backward``,
  ``penalize``, ``clip_and_measure`` -- ``fastbp._ext.engine_ops``, the
  same names: the per-layer ops outside the GEMMs that the engine's step
  applies (tests/test_engine.py).
* ``softmax_rows``, ``sk_log_loss_loss_grad``, ``cross_entropy_loss_grad``
  -- ``fastbp._ext.losses``, the same names (csrc/losses.h, at every
  instruction-set level; tests/test_engine.py, tests/test_losses.py).
* ``mse_loss_grad``, ``binary_cross_entropy_loss_grad``,
  ``sk_squared_error_loss_grad``, ``sk_binary_log_loss_loss_grad``,
  ``sk_poisson_loss_grad`` -- ``fastbp._numba.losses``, the same names (the
  Numba kernels behind the engine's loss addresses; tests/test_losses.py).
* ``sgd_step``, ``adam_step``, ``rmsprop_step``, ``rprop_step``,
  ``adagrad_step``, ``sk_sgd_step``, ``sk_adam_step`` --
  ``fastbp._numba.optim``, the same names (tests/test_optim.py).
* ``splitmix64``, ``dropout_mask`` -- the stream and mask rule inside
  ``fastbp._ext.engine_ops.dropout_forward`` (tests/test_dropout.py,
  tests/test_engine.py).
* ``forward_all`` / ``forward``, ``loss_grad``, ``train_batches`` -- the
  whole-network loops ``fastbp._ext.engine``: ``forward``, ``loss_grad``,
  ``train_batches``, which take the model's flat workspaces instead
  (tests/test_model.py, test_dropout.py, test_batchnorm.py,
  test_regularization.py, test_residual.py, test_interface.py).  The
  engine's other two modules have no twins of their own: a row-parallel
  step (``fastbp._ext.engine_rows``) computes bitwise what the
  layer-by-layer one does (tests/test_threads.py), and the threaded update
  (``fastbp._ext.engine_optim``) applies the ``*_step`` rules above to
  ranges of the parameter vector (tests/test_threads.py).

The helpers named with a leading underscore have no twin.

Shapes: X (m, n_in), W (n_in, n_out), b (n_out,), outputs and their
gradients (m, n_out).  Activations are given by their integer code
(``fastbp._ext.engine.Act``) or name.

Size: about 1,100 lines, most of them numpydoc with shapes: one twin for
each compiled kernel, kept in one module so that the whole specification
reads in one place, in the order a step runs (split by kernel, a reader
would follow imports to see one layer's forward beside its backward).
"""
import numpy as np

from . import activations as _act
from ._ext.engine import (ACT, ACTIVITY_L1, B_OFF, BUF_OFF, EPS, KIND, L1, L2, MOMENTUM, N_IN,
                          N_OUT, RATE, TRAINABLE, W_OFF, Act, Kind, Loss)

LEAKY_SLOPE, ELU_ALPHA, SOFTPLUS_THRESHOLD = 0.01, 1.0, 20.0


# --- activations: forward, and derivative in terms of the output a = f(x) ---

def activation(x, act):
    """f(x), elementwise.

    Parameters
    ----------
    x : ndarray, any shape
    act : int or str
        Activation code (``Act``) or name.

    Returns
    -------
    ndarray of x's shape
    """
    act = _act.code(act)
    if act == Act.IDENTITY:
        return x
    if act == Act.SIGMOID:
        return 0.5 * (1 + np.tanh(0.5 * x))  # = 1 / (1 + e^-x), without overflow
    if act == Act.TANH:
        return np.tanh(x)
    if act == Act.RELU:
        return np.maximum(x, 0)
    if act == Act.LEAKY_RELU:
        return np.where(x > 0, x, x.dtype.type(LEAKY_SLOPE) * x)
    if act == Act.ELU:
        return np.where(x > 0, x, ELU_ALPHA * np.expm1(np.minimum(x, 0)))
    if act == Act.SOFTPLUS:
        return np.where(x > SOFTPLUS_THRESHOLD, x, np.log1p(np.exp(np.minimum(x, SOFTPLUS_THRESHOLD))))
    raise ValueError(act)


def activation_derivative(a, act):
    """f'(x) written in terms of the output a = f(x), elementwise.

    Parameters
    ----------
    a : ndarray, any shape
        The activation's output.
    act : int or str
        Activation code (``Act``) or name.

    Returns
    -------
    ndarray of a's shape and dtype
    """
    act = _act.code(act)
    if act == Act.IDENTITY:
        return np.ones_like(a)
    if act == Act.SIGMOID:
        return a * (1 - a)
    if act == Act.TANH:
        return 1 - a * a
    if act == Act.RELU:
        return (a > 0).astype(a.dtype)
    if act == Act.LEAKY_RELU:
        return np.where(a > 0, 1, LEAKY_SLOPE).astype(a.dtype)
    if act == Act.ELU:
        return np.where(a > 0, 1, a + ELU_ALPHA).astype(a.dtype)
    if act == Act.SOFTPLUS:
        return np.where(a > SOFTPLUS_THRESHOLD, 1, -np.expm1(-a)).astype(a.dtype)
    raise ValueError(act)


def bias_activation(z, b, act):
    """f(z + b): the epilogue that follows the GEMM in the forward pass.

    Parameters
    ----------
    z : ndarray of shape (m, n)
    b : ndarray of shape (n,)
    act : int or str

    Returns
    -------
    ndarray of shape (m, n), z's dtype
    """
    return activation(z + b, act).astype(z.dtype, copy=False)


def activation_backward(g, a, act):
    """dL/d(pre-activation) from g = dL/d(output) and the output a.

    Parameters
    ----------
    g, a : ndarray of shape (m, n)
    act : int or str

    Returns
    -------
    ndarray of shape (m, n)
    """
    return g * activation_derivative(a, act)


# --- one dense layer ---------------------------------------------------------

def gemm(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b), op the transpose where asked.

    Parameters
    ----------
    a : ndarray of shape (m, k), or (k, m) with trans_a
    b : ndarray of shape (k, n), or (n, k) with trans_b
    trans_a, trans_b : bool, default=False

    Returns
    -------
    ndarray of shape (m, n)
    """
    return (a.T if trans_a else a) @ (b.T if trans_b else b)


def dense_forward(x, w, b, act):
    """out = f(x @ w + b).

    Parameters
    ----------
    x : ndarray of shape (m, n_in)
    w : ndarray of shape (n_in, n_out)
    b : ndarray of shape (n_out,)
    act : int or str

    Returns
    -------
    ndarray of shape (m, n_out)
    """
    return bias_activation(x @ w, b, act)


def dense_backward(x, w, a, g, act):
    """A dense layer's backward pass.

    Parameters
    ----------
    x : ndarray of shape (m, n_in)
        The layer's input.
    w : ndarray of shape (n_in, n_out)
    a, g : ndarray of shape (m, n_out)
        The layer's output and dL/d(output).
    act : int or str

    Returns
    -------
    dW : ndarray of shape (n_in, n_out)
    db : ndarray of shape (n_out,)
    dX : ndarray of shape (m, n_in)
    """
    d = activation_backward(g, a, act)   # dL / d(x @ w + b)
    return x.T @ d, d.sum(axis=0), d @ w.T


# --- losses; write G = dL/dZ, return the weighted mean loss -------------------
# w: sample weights (m,).  fastbp's losses: torch.nn definitions with mean
# reduction, a weighted mean when weights are given.

def mse_loss_grad(Z, Y, w, G):
    """torch.nn.MSELoss (weighted mean over the m k entries).

    Parameters
    ----------
    Z, Y : ndarray of shape (m, k)
        Predictions and targets.
    w : ndarray of shape (m,)
        Sample weights.
    G : ndarray of shape (m, k)
        Output: dL/dZ, written in place.

    Returns
    -------
    float
        sum w_i (Z - Y)^2 / (sum(w) k).
    """
    wc = w[:, None]
    G[...] = 2 * wc * (Z - Y) / (w.sum(dtype=np.float64) * Z.shape[1])
    return float(np.sum(wc * (Z.astype(np.float64) - Y) ** 2) / (w.sum(dtype=np.float64) * Z.shape[1]))


def binary_cross_entropy_loss_grad(Z, Y, w, G):
    """torch.nn.BCEWithLogitsLoss on logits Z (weighted mean over the m k entries).

    Parameters
    ----------
    Z, Y : ndarray of shape (m, k)
        Logits and targets.
    w : ndarray of shape (m,)
        Sample weights.
    G : ndarray of shape (m, k)
        Output: dL/dZ, written in place.

    Returns
    -------
    float
        sum w_i (max(z, 0) - z y + log(1 + e^-|z|)) / (sum(w) k).
    """
    wc = w[:, None]
    sigmoid = 0.5 * (1 + np.tanh(0.5 * Z))
    G[...] = wc * (sigmoid - Y) / (w.sum(dtype=np.float64) * Z.shape[1])
    z = Z.astype(np.float64)
    per = np.maximum(z, 0) - z * Y + np.log1p(np.exp(-np.abs(z)))
    return float(np.sum(wc * per) / (w.sum(dtype=np.float64) * Z.shape[1]))


def _softmax(Z):
    e = np.exp(Z - Z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy_loss_grad(Z, Y, w, G):
    """torch.nn.CrossEntropyLoss on logits Z (weighted mean over rows).

    Parameters
    ----------
    Z, Y : ndarray of shape (m, k)
        Logits and targets.
    w : ndarray of shape (m,)
        Sample weights.
    G : ndarray of shape (m, k)
        Output: dL/dZ, written in place.

    Returns
    -------
    float
        sum_i w_i sum_j y_ij (logsumexp(z_i) - z_ij) / sum(w).
    """
    wc = w[:, None]
    G[...] = wc * (_softmax(Z) * Y.sum(axis=1, keepdims=True) - Y) / w.sum(dtype=np.float64)
    shifted = Z.astype(np.float64) - Z.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-np.sum(wc * Y * log_softmax) / w.sum(dtype=np.float64))


def softmax_rows(which, Z, Y, w, G, lo, hi, scale):
    """Rows lo .. hi - 1 of a softmax loss, as a step whose rows are split
    across threads computes it.

    Parameters
    ----------
    which : Loss
        ``Loss.SK_LOG_LOSS`` (sk_log_loss_loss_grad) or
        ``Loss.CROSS_ENTROPY`` (cross_entropy_loss_grad).
    Z, Y : ndarray of shape (m, k)
        Logits and targets.
    w : ndarray of shape (m,)
        Sample weights.
    G : ndarray of shape (m, k)
        Its rows lo .. hi - 1 become those of dL/dZ.
    lo, hi : int
    scale : float
        1 / (the sum of every row's weight).

    Returns
    -------
    ndarray of float64, shape (hi - lo,)
        Each row's term of the loss sum; the loss is scale times the sum
        of all rows' terms.
    """
    z, y = Z[lo:hi].astype(np.float64), Y[lo:hi].astype(np.float64)
    wc = w[lo:hi, None].astype(np.float64)
    p = _softmax(z)
    if which == Loss.SK_LOG_LOSS:
        eps = np.finfo(Z.dtype).eps
        logp = np.log(np.clip(p, eps, 1 - eps))
        G[lo:hi] = scale * (wc * (p - y))
        return -wc[:, 0] * np.where(y != 0, y * logp, 0.0).sum(axis=1)
    if which == Loss.CROSS_ENTROPY:
        lse = z.max(axis=1, keepdims=True) + np.log(np.exp(z - z.max(axis=1, keepdims=True))
                                                    .sum(axis=1, keepdims=True))
        G[lo:hi] = scale * (wc * (p * y.sum(axis=1, keepdims=True) - y))
        return wc[:, 0] * (y * (lse - z)).sum(axis=1)
    raise ValueError(which)


# scikit-learn's MLP losses (sklearn/neural_network/_base.py) on the last
# layer's pre-activation Z; G is sklearn's delta w (act(Z) - Y) / sum(w).

def _sk(Z, Y, w, G, prob):
    G[...] = w[:, None] * (prob - Y) / w.sum(dtype=np.float64)


def sk_squared_error_loss_grad(Z, Y, w, G):
    """scikit-learn's squared error on the identity output Z.

    Parameters
    ----------
    Z, Y : ndarray of shape (m, k)
        Outputs and targets.
    w : ndarray of shape (m,)
        Sample weights.
    G : ndarray of shape (m, k)
        Output: dL/dZ, written in place.

    Returns
    -------
    float
        Half the weighted mean of (Y - Z)^2, averaged over the k columns.
    """
    _sk(Z, Y, w, G, Z)
    return float(0.5 * np.average((Y.astype(np.float64) - Z) ** 2, weights=w, axis=0).mean())


def sk_log_loss_loss_grad(Z, Y, w, G):
    """scikit-learn's log loss on softmax(Z).

    Parameters
    ----------
    Z, Y : ndarray of shape (m, k)
        Logits and targets.
    w : ndarray of shape (m,)
        Sample weights.
    G : ndarray of shape (m, k)
        Output: dL/dZ, written in place.

    Returns
    -------
    float
        -sum_j of the weighted mean of y log p, p = softmax(Z) clipped to [eps, 1 - eps].
    """
    p = _softmax(Z)
    _sk(Z, Y, w, G, p)
    eps = np.finfo(Z.dtype).eps
    logp = np.log(np.clip(p, eps, 1 - eps).astype(np.float64))
    return float(-np.average(np.where(Y != 0, Y * logp, 0.0), weights=w, axis=0).sum())


def sk_binary_log_loss_loss_grad(Z, Y, w, G):
    """scikit-learn's binary log loss on sigmoid(Z).

    Parameters
    ----------
    Z, Y : ndarray of shape (m, k)
        Logits and targets.
    w : ndarray of shape (m,)
        Sample weights.
    G : ndarray of shape (m, k)
        Output: dL/dZ, written in place.

    Returns
    -------
    float
        -sum_j of the weighted mean of y log p + (1 - y) log(1 - p), p = sigmoid(Z) clipped.
    """
    p = 0.5 * (1 + np.tanh(0.5 * Z))
    _sk(Z, Y, w, G, p)
    eps = np.finfo(Z.dtype).eps
    pc = np.clip(p, eps, 1 - eps).astype(np.float64)
    per = np.where(Y != 0, Y * np.log(pc), 0.0) + np.where(Y != 1, (1 - Y) * np.log(1 - pc), 0.0)
    return float(-np.average(per, weights=w, axis=0).sum())


def sk_poisson_loss_grad(Z, Y, w, G):
    """scikit-learn's Poisson deviance-like loss on exp(Z).

    Parameters
    ----------
    Z, Y : ndarray of shape (m, k)
        Log-means and targets.
    w : ndarray of shape (m,)
        Sample weights.
    G : ndarray of shape (m, k)
        Output: dL/dZ, written in place.

    Returns
    -------
    float
        sum_j of the weighted mean of y log(y / p) - y + p, p = exp(Z).
    """
    p = np.exp(Z)
    _sk(Z, Y, w, G, p)
    y = Y.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ylogy = np.where(y != 0, y * np.log(y / p), 0.0)
    return float(np.average(ylogy - y + p, weights=w, axis=0).sum())


LOSS_KERNELS = {"mse": mse_loss_grad, "binary_cross_entropy": binary_cross_entropy_loss_grad,
                "cross_entropy": cross_entropy_loss_grad,
                "sk_squared_error": sk_squared_error_loss_grad,
                "sk_log_loss": sk_log_loss_loss_grad,
                "sk_binary_log_loss": sk_binary_log_loss_loss_grad,
                "sk_poisson": sk_poisson_loss_grad}


# --- optimizers (torch.optim equations; update p and state in place) -----------

def _lerp(start, end, weight):
    return start + weight * (end - start) if weight < 0.5 else end - (end - start) * (1 - weight)


def sgd_step(p, g, buf, t, lr, momentum, dampening, nesterov, weight_decay, momentum_start=1):
    """torch.optim.SGD's update.

    Updates p and the state arrays in place.

    Parameters
    ----------
    p, g : ndarray of shape (n,)
        Parameters and their gradient.
    buf : ndarray of shape (n,) or None
        The momentum buffer (unused without momentum).
    t : int
        The step number, from 1.
    lr, momentum, dampening, weight_decay : float
    nesterov : bool
    momentum_start : int, default=1
        The step at which the buffer is born as a copy of that step's gradient.

    Returns
    -------
    bool
        True if every updated parameter is finite.
    """
    T = p.dtype.type
    d = g + T(weight_decay) * p if weight_decay else g.copy()
    if momentum:  # the buffer is born at step momentum_start, a copy of that gradient
        buf[...] = d if t == momentum_start else buf * T(momentum) + T(1 - dampening) * d
        d = d + T(momentum) * buf if nesterov else buf.copy()
    p -= T(lr) * d
    return bool(np.isfinite(p).all())


def adam_step(p, g, m, v, vmax, t, lr, beta1, beta2, eps, weight_decay, amsgrad, decoupled):
    """torch.optim.Adam's update (AdamW's with ``decoupled``).

    Updates p and the state arrays in place.

    Parameters
    ----------
    p, g : ndarray of shape (n,)
        Parameters and their gradient.
    m, v : ndarray of shape (n,)
        First and second moments.
    vmax : ndarray of shape (n,) or None
        The running maximum of v (amsgrad only).
    t : int
        The step number, from 1.
    lr, beta1, beta2, eps, weight_decay : float
    amsgrad, decoupled : bool

    Returns
    -------
    bool
        True if every updated parameter is finite.
    """
    T = p.dtype.type
    d = g
    if weight_decay:
        if decoupled:
            p *= T(1 - lr * weight_decay)
        else:
            d = g + T(weight_decay) * p
    m[...] = _lerp(m, d, T(1 - beta1))
    v[...] = v * T(beta2) + T(1 - beta2) * d * d
    if amsgrad:
        np.maximum(vmax, v, out=vmax)
    vhat = vmax if amsgrad else v
    denom = np.sqrt(vhat) / T((1 - beta2 ** t) ** 0.5) + T(eps)
    p -= (T(lr / (1 - beta1 ** t)) * m) / denom
    return bool(np.isfinite(p).all())


def rmsprop_step(p, g, square_avg, grad_avg, buf, lr, alpha, eps, weight_decay, momentum, centered):
    """torch.optim.RMSprop's update.

    Updates p and the state arrays in place.

    Parameters
    ----------
    p, g : ndarray of shape (n,)
        Parameters and their gradient.
    square_avg, grad_avg, buf : ndarray of shape (n,)
        The mean square, the mean (centered only), the momentum buffer.
    lr, alpha, eps, weight_decay, momentum : float
    centered : bool

    Returns
    -------
    bool
        True if every updated parameter is finite.
    """
    T = p.dtype.type
    d = g + T(weight_decay) * p if weight_decay else g
    square_avg[...] = square_avg * T(alpha) + T(1 - alpha) * d * d
    if centered:
        grad_avg[...] = _lerp(grad_avg, d, T(1 - alpha))
        avg = np.sqrt(square_avg - grad_avg * grad_avg) + T(eps)
    else:
        avg = np.sqrt(square_avg) + T(eps)
    if momentum > 0:
        buf[...] = buf * T(momentum) + d / avg
        p -= T(lr) * buf
    else:
        p -= (T(lr) * d) / avg
    return bool(np.isfinite(p).all())


def rprop_step(p, g, prev, step_size, etaminus, etaplus, step_min, step_max):
    """torch.optim.Rprop's update.

    Updates p and the state arrays in place.

    Parameters
    ----------
    p, g : ndarray of shape (n,)
        Parameters and their gradient.
    prev, step_size : ndarray of shape (n,)
        The previous step's gradient, each parameter's step size.
    etaminus, etaplus, step_min, step_max : float

    Returns
    -------
    bool
        True if every updated parameter is finite.
    """
    T = p.dtype.type
    s = g * prev
    factor = np.where(s > 0, T(etaplus), np.where(s < 0, T(etaminus), T(1)))
    step_size[...] = np.clip(step_size * factor, T(step_min), T(step_max))
    d = np.where(factor == T(etaminus), T(0), g)
    p -= np.where(np.isnan(d), T(0), np.sign(d)) * step_size   # torch.sign(nan) is 0
    prev[...] = d
    return bool(np.isfinite(p).all())


def adagrad_step(p, g, state_sum, t, lr, lr_decay, weight_decay, eps):
    """torch.optim.Adagrad's update.

    Updates p and the state arrays in place.

    Parameters
    ----------
    p, g : ndarray of shape (n,)
        Parameters and their gradient.
    state_sum : ndarray of shape (n,)
        The sum of squared gradients.
    t : int
        The step number, from 1.
    lr, lr_decay, weight_decay, eps : float

    Returns
    -------
    bool
        True if every updated parameter is finite.
    """
    T = p.dtype.type
    d = g + T(weight_decay) * p if weight_decay else g
    state_sum += d * d
    p -= (T(lr / (1 + (t - 1) * lr_decay)) * d) / (np.sqrt(state_sum) + T(eps))
    return bool(np.isfinite(p).all())


# scikit-learn's optimizers (sklearn/neural_network/_stochastic_optimizers.py)

def sk_sgd_step(p, g, velocity, lr, momentum, nesterov):
    """scikit-learn's SGDOptimizer update.

    Updates p and the state arrays in place.

    Parameters
    ----------
    p, g : ndarray of shape (n,)
        Parameters and their gradient.
    velocity : ndarray of shape (n,)
    lr, momentum : float
    nesterov : bool

    Returns
    -------
    bool
        True if every updated parameter is finite.
    """
    T = p.dtype.type
    velocity[...] = T(momentum) * velocity - T(lr) * g
    update = T(momentum) * velocity - T(lr) * g if nesterov else velocity
    p += update
    return bool(np.isfinite(p).all())


def sk_adam_step(p, g, m, v, t, lr, beta1, beta2, eps):
    """scikit-learn's AdamOptimizer update.

    Updates p and the state arrays in place.

    Parameters
    ----------
    p, g : ndarray of shape (n,)
        Parameters and their gradient.
    m, v : ndarray of shape (n,)
        First and second moments.
    t : int
        The step number, from 1.
    lr, beta1, beta2, eps : float

    Returns
    -------
    bool
        True if every updated parameter is finite.
    """
    T = p.dtype.type
    m[...] = T(beta1) * m + T(1 - beta1) * g
    v[...] = T(beta2) * v + T(1 - beta2) * (g * g)
    rate = lr * np.sqrt(np.float64(1 - beta2 ** t)) / (1 - beta1 ** t)  # a float64 scalar
    p += (-rate * m) / (np.sqrt(v) + T(eps))
    return bool(np.isfinite(p).all())


# --- dropout: masks from a counter-based splitmix64 stream ---------------------

_GOLDEN, _MIX1, _MIX2 = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9),
                         np.uint64(0x94D049BB133111EB))


def splitmix64(counter, n):
    """The next n draws of the counter-based splitmix64 stream.

    Parameters
    ----------
    counter : int or numpy.uint64
        The stream's state before the draws.
    n : int

    Returns
    -------
    draws : ndarray of uint64, shape (n,)
    counter : numpy.uint64
        The state after them (``counter + n * golden``, wrapping).
    """
    z = np.uint64(counter) + _GOLDEN * np.arange(1, n + 1, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    after = (int(counter) + 0x9E3779B97F4A7C15 * n) % 2 ** 64  # wraps like the uint64 in C
    return z ^ (z >> np.uint64(31)), np.uint64(after)


def dropout_mask(counter, shape, rate, dtype):
    """Inverted-dropout mask: 1/(1 - rate) where the top 24 bits of a draw are
    below (1 - rate) 2^24, else 0.

    Parameters
    ----------
    counter : int or numpy.uint64
    shape : tuple of int
    rate : float in [0, 1)
    dtype : float32 or float64

    Returns
    -------
    mask : ndarray of the shape and dtype
    counter : numpy.uint64
        The stream's state after prod(shape) draws.
    """
    draws, counter = splitmix64(counter, int(np.prod(shape)))
    keep = np.uint64(int((1.0 - rate) * 16777216.0))
    scale = np.dtype(dtype).type(1.0 / (1.0 - rate))
    mask = np.where((draws >> np.uint64(40)) < keep, scale, 0).astype(dtype).reshape(shape)
    return mask, counter


def dropout_forward(x, rate, counter):
    """Inverted dropout in training: ``x * mask``.

    Parameters
    ----------
    x : ndarray, any shape
    rate : float in [0, 1)
    counter : ndarray of uint64, shape (1,)
        Advanced in place by ``x.size`` draws.

    Returns
    -------
    out, mask : ndarray of x's shape and dtype
    """
    mask, counter[0] = dropout_mask(counter[0], x.shape, rate, x.dtype)
    return x * mask, mask


def dropout_backward(g, mask):
    """The gradient through a dropout mask (and DropConnect's dW): g * mask.

    Parameters
    ----------
    g, mask : ndarray, same shape

    Returns
    -------
    ndarray of g's shape
    """
    return g * mask


# --- residual blocks and the activity penalty ----------------------------------

def residual_add(x, skip):
    """x + skip: a residual block's output block(x) + x, and in the backward
    pass the skip path's gradient joining the block's.

    Parameters
    ----------
    x, skip : ndarray, same shape

    Returns
    -------
    ndarray of x's shape
    """
    return x + skip


def activity_penalty(a, g, c):
    """The L1 activity penalty c/m sum |a| of a layer's output: adds its
    gradient c/m sign(a) to g in place and returns its value.

    Parameters
    ----------
    a : ndarray of shape (m, n)
        The layer's output.
    g : ndarray of shape (m, n)
        dL/da, updated in place.
    c : float
        The coefficient (``reg[l, ACTIVITY_L1]``).

    Returns
    -------
    float
    """
    g += a.dtype.type(c / a.shape[0]) * np.sign(a)
    return c / a.shape[0] * float(np.abs(a.astype(np.float64)).sum())


# --- batch normalization (torch.nn.BatchNorm1d) --------------------------------

def batchnorm_forward(x, gamma, beta, running_mean, running_var, eps, momentum, training):
    """y = gamma (x - mean) / sqrt(var + eps) + beta with the batch's mean and
    biased variance (training: also updates the running statistics, with the
    unbiased variance) or the running ones.

    Parameters
    ----------
    x : ndarray of shape (m, w)
    gamma, beta : ndarray of shape (w,)
    running_mean, running_var : ndarray of shape (w,)
        Updated in place in training.
    eps, momentum : float
    training : bool

    Returns
    -------
    y, x_hat : ndarray of shape (m, w)
    inv_std : ndarray of shape (w,)
        1 / sqrt(var + eps).
    """
    if training:
        m = x.shape[0]
        mean = x.mean(axis=0, dtype=np.float64)
        var = ((x - mean) ** 2).mean(axis=0)
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        running_var[...] = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    inv = (1.0 / np.sqrt(var + float(eps))).astype(x.dtype)
    xhat = (x - mean.astype(x.dtype)) * inv
    return gamma * xhat + beta, xhat, inv


def batchnorm_backward(g, xhat, inv, gamma, training):
    """Batch normalization's backward pass.

    Parameters
    ----------
    g, xhat : ndarray of shape (m, w)
        dL/dy and the forward pass's x_hat.
    inv, gamma : ndarray of shape (w,)
        The forward pass's 1 / sqrt(var + eps), and gamma.
    training : bool
        Whether the forward pass used the batch's statistics.

    Returns
    -------
    dgamma, dbeta : ndarray of shape (w,)
    dx : ndarray of shape (m, w)
    """
    dgamma, dbeta = (g * xhat).sum(axis=0), g.sum(axis=0)
    if training:
        m = g.shape[0]
        dx = gamma * inv / m * (m * g - dbeta - xhat * dgamma)
    else:
        dx = gamma * inv * g
    return dgamma, dbeta, dx


# --- a whole network, driven by the engine's program table ----------------------
# One row per layer; columns (KIND, N_IN, ...) and kinds (Kind) as declared in
# fastbp/_ext/engine.pxd and described in csrc/engine.pyx; ``floats`` the
# per-row RATE, MOMENTUM and EPS (``Sequential._floats``, fastbp.program).

def _bn(row, params, buffers):
    w, g_off, b_off, buf = row[N_OUT], row[W_OFF], row[B_OFF], row[BUF_OFF]
    return (params[g_off:g_off + w], params[b_off:b_off + w], buffers[buf:buf + w],
            buffers[buf + w:buf + 2 * w])

def _dense(row, params):
    n_in, n_out, w_off, b_off = row[N_IN], row[N_OUT], row[W_OFF], row[B_OFF]
    return (params[w_off:w_off + n_in * n_out].reshape(n_in, n_out),
            params[b_off:b_off + n_out], row[ACT])


def forward_all(program, X, params, floats=None, counter=None, buffers=None):
    """Outputs of every layer, and the masks by layer (dropout: on the
    activations; DropConnect: on W).

    With ``counter`` both are on, as in training, at the rates of
    ``floats``; without, dropout passes through and dense layers use W.
    BatchNorm rows use ``buffers`` (running statistics, updated in
    training) and ``floats`` (momentum, eps); their masks entry is
    (x_hat, 1/std).

    Parameters
    ----------
    program : ndarray of int64, shape (n_layers, N_COLS)
    X : ndarray of shape (m, n_in)
    params : ndarray of shape (n_params,)
    floats : ndarray of float64, shape (n_layers, N_FLOATS), optional
    counter : ndarray of uint64, shape (1,), optional
        The dropout stream's counter, advanced in place.
    buffers : ndarray, optional
        BatchNorm's running statistics.

    Returns
    -------
    outs : list of ndarray
        [X, A_1, ..., A_L], A_l of shape (m, program[l, N_OUT]).
    masks : dict
        Row index -> its mask (or BatchNorm's (x_hat, 1/std)).
    """
    outs, masks = [X], {}
    for l, row in enumerate(program):
        if row[KIND] == Kind.RES_BEGIN:  # remember x
            outs.append(outs[-1])
        elif row[KIND] == Kind.RES_END:  # block(x) + x; W_OFF holds the begin row
            outs.append(residual_add(outs[-1], outs[row[W_OFF] + 1]))
        elif row[KIND] == Kind.BATCHNORM:
            gamma, beta, rm, rv = _bn(row, params, buffers)
            y, xhat, inv = batchnorm_forward(outs[-1], gamma, beta, rm, rv, floats[l][EPS],
                                             floats[l][MOMENTUM], counter is not None)
            masks[l] = (xhat, inv)
            outs.append(y)
        elif row[KIND] == Kind.DROPOUT:
            if counter is None:
                outs.append(outs[-1])
            else:
                out, masks[l] = dropout_forward(outs[-1], floats[l][RATE], counter)
                outs.append(out)
        else:
            W, b, act = _dense(row, params)
            if counter is not None and floats[l][RATE] > 0:  # DropConnect: W_eff = W * M
                W, masks[l] = dropout_forward(W, floats[l][RATE], counter)
            outs.append(dense_forward(outs[-1], W, b, act))
    return outs, masks


def forward(X, program, params):
    """The network's output for X, in predict mode.

    Parameters
    ----------
    X : ndarray of shape (m, n_in)
    program : ndarray of int64, shape (n_layers, N_COLS)
    params : ndarray of shape (n_params,)

    Returns
    -------
    ndarray of shape (m, n_out of the last row)
    """
    return forward_all(program, X, params)[0][-1]


def penalize(program, reg, per_weight, w, params, grad):
    """Add each trainable dense row's s (l2 W + l1 sign W) to grad in place;
    return the penalty s sum (l2/2 ||W||^2 + l1 |W|_1).

    Parameters
    ----------
    program : ndarray of int64, shape (n_layers, N_COLS)
    reg : ndarray of float64, shape (n_layers, N_REG)
    per_weight : bool
        s = 1 / sum(w) if true, else 1.
    w : ndarray of shape (m,)
        Sample weights.
    params, grad : ndarray of shape (n_params,)

    Returns
    -------
    float
    """
    s = 1.0 / w.sum(dtype=np.float64) if per_weight else 1.0
    total = 0.0
    for row, penalties in zip(program, reg):
        l2, l1 = penalties[L2], penalties[L1]
        if (l2 or l1) and row[TRAINABLE] and row[KIND] == Kind.DENSE:
            W = _dense(row, params)[0]
            dW = grad[row[W_OFF]:row[W_OFF] + W.size].reshape(W.shape)
            dW += W.dtype.type(s * l2) * W + W.dtype.type(s * l1) * np.sign(W)
            W64 = W.astype(np.float64)
            total += s * (0.5 * l2 * np.sum(W64 * W64) + l1 * np.sum(np.abs(W64)))
    return total


def clip_and_measure(program, grad, clip_value=0.0, clip_norm=0.0):
    """Clip trainable gradients in place: elements to [-clip_value, clip_value]
    (if > 0), then the global norm to clip_norm (if > 0) like
    torch.nn.utils.clip_grad_norm_.

    Parameters
    ----------
    program : ndarray of int64, shape (n_layers, N_COLS)
    grad : ndarray of shape (n_params,)
    clip_value, clip_norm : float, default=0.0

    Returns
    -------
    ndarray of float64, shape (n_layers,)
        Each row's gradient norm after value clipping (0 for rows without
        trainable parameters).
    """
    def size(r):  # W then b, or gamma then beta, from W_OFF on
        return 2 * r[N_OUT] if r[KIND] == Kind.BATCHNORM else r[N_IN] * r[N_OUT] + r[N_OUT]
    spans = [(r[W_OFF], r[W_OFF] + size(r)) for r in program
             if r[KIND] != Kind.DROPOUT and r[TRAINABLE]]
    norms = np.zeros(len(program))
    for l, r in enumerate(program):
        if r[KIND] != Kind.DROPOUT and r[TRAINABLE]:
            g = grad[r[W_OFF]:r[W_OFF] + size(r)]
            if clip_value > 0:
                np.clip(g, -g.dtype.type(clip_value), g.dtype.type(clip_value), out=g)
            norms[l] = np.sqrt(np.sum(g.astype(np.float64) ** 2))
    if clip_norm > 0:
        coef = clip_norm / (np.sqrt(np.sum(norms ** 2)) + 1e-6)
        if coef < 1:
            for a, b in spans:
                grad[a:b] = grad[a:b] * coef
    return norms


def loss_grad(X, Y, program, params, loss, w=None, reg=None, reg_per_weight=False,
              floats=None, counter=None, buffers=None):
    """Weighted mean loss over (X, Y) plus the penalties, and its gradient.

    With ``counter`` dropout is on (training), at the rates of ``floats``
    (as ``forward_all``).

    Parameters
    ----------
    X : ndarray of shape (m, n_in)
    Y : ndarray of shape (m, k)
    program : ndarray of int64, shape (n_layers, N_COLS)
    params : ndarray of shape (n_params,)
    loss : str
        A key of ``LOSS_KERNELS``.
    w : ndarray of shape (m,), optional
        Sample weights (default ones).
    reg : ndarray of float64, shape (n_layers, N_REG), optional
        Columns L2, L1, ACTIVITY_L1.
    reg_per_weight : bool, default=False
        As ``penalize``'s per_weight.
    floats, counter, buffers : optional
        As ``forward_all``.

    Returns
    -------
    value : float
    grad : ndarray of shape (n_params,)
        The flat gradient, in params' layout.
    """
    outs, masks = forward_all(program, X, params, floats, counter, buffers)
    G = np.empty_like(outs[-1])
    w = np.ones(X.shape[0], dtype=X.dtype) if w is None else w
    value = LOSS_KERNELS[loss](outs[-1], Y, w, G)
    grad = np.zeros_like(params)
    skips = {}
    for l in range(len(program) - 1, -1, -1):
        row = program[l]
        if row[KIND] == Kind.RES_END:  # the skip path gets the same gradient
            skips[row[W_OFF]] = G
            continue
        if row[KIND] == Kind.RES_BEGIN:
            G = residual_add(G, skips.pop(l))
            continue
        if row[KIND] == Kind.BATCHNORM:
            xhat, inv = masks[l]
            dgamma, dbeta, G = batchnorm_backward(G, xhat, inv, _bn(row, params, buffers)[0],
                                                  counter is not None)
            if row[TRAINABLE]:
                grad[row[W_OFF]:row[W_OFF] + row[N_OUT]] = dgamma
                grad[row[B_OFF]:row[B_OFF] + row[N_OUT]] = dbeta
            continue
        if row[KIND] == Kind.DROPOUT:
            G = dropout_backward(G, masks[l]) if l in masks else G
            continue
        W, b, act = _dense(row, params)
        if l in masks:  # DropConnect: this batch used W * M
            W = W * masks[l]
        if reg is not None and reg[l][ACTIVITY_L1] > 0:  # L1 penalty on this layer's output
            G = G.copy()  # G may also be a residual block's stashed gradient
            value += activity_penalty(outs[l + 1], G, reg[l][ACTIVITY_L1])
        dW, db, G = dense_backward(outs[l], W, outs[l + 1], G, act)
        if l in masks:
            dW = dropout_backward(dW, masks[l])
        if row[TRAINABLE]:
            grad[row[W_OFF]:row[W_OFF] + dW.size] = dW.ravel()
            grad[row[B_OFF]:row[B_OFF] + db.size] = db
    if reg is not None:
        value += penalize(program, reg, reg_per_weight, w, params, grad)
    return value, grad


def train_batches(X, Y, order, batch_size, program, params, loss, optimizer_step,
                  floats=None, counter=None, reg=None, clip_value=0.0, clip_norm=0.0,
                  measure=False, buffers=None):
    """One epoch of mini-batch training.

    With ``counter`` dropout is on (rates in ``floats``); ``reg`` adds
    weight penalties; gradients are clipped as ``clip_and_measure``.

    Parameters
    ----------
    X : ndarray of shape (n, n_in)
    Y : ndarray of shape (n, k)
    order : ndarray of int, shape (n,)
        Row order; batch b holds rows order[b B : (b + 1) B].
    batch_size : int
    program : ndarray of int64, shape (n_layers, N_COLS)
    params : ndarray of shape (n_params,)
        Updated in place.
    loss : str
    optimizer_step : callable
        ``optimizer_step(params, grad)`` updates params in place (e.g.
        ``fastbp.optim.Adam().step``).
    floats, counter, buffers : optional
        As ``forward_all``.
    reg : ndarray, optional
        As ``loss_grad``.
    clip_value, clip_norm : float, default=0.0
    measure : bool, default=False
        Sum the per-row gradient norms over batches.

    Returns
    -------
    losses : ndarray of shape (n_batches,)
    norms : ndarray of float64, shape (n_layers,)
    """
    losses, norms = [], np.zeros(len(program))
    for start in range(0, X.shape[0], batch_size):
        rows = order[start:start + batch_size]
        value, grad = loss_grad(X[rows], Y[rows], program, params, loss, reg=reg,
                                floats=floats, counter=counter, buffers=buffers)
        if clip_value > 0 or clip_norm > 0 or measure:
            norms += clip_and_measure(program, grad, clip_value, clip_norm)
        optimizer_step(params, grad)
        losses.append(value)
    return np.array(losses), norms
