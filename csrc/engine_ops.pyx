# cython: language_level=3
"""The engine's per-layer ops other than the dense products: dropout and
DropConnect's mask on W, the residual add, the L1 activity penalty,
BatchNorm's forward and backward, the weight penalties (``penalize``) and
gradient clipping (``clip_and_measure``).

Design
------
Two layers, as in dense.pyx:

* the ``*_op`` kernels: raw pointers (and the program, for the ops that run
  over every row), nogil, no checks.  The program interpreter
  (engine.pyx: ``forward_all``, ``backward_all``, ``_train_batches``) and
  the row-parallel step (engine_rows.pyx) call them through
  fastbp/_ext/engine_ops.pxd, where the ops that are one short loop are
  defined ``cdef inline`` so that their callers compile them in place.
* a ``def`` twin of each op, named like its twin in fastbp.reference
  (tests/test_engine.py holds the two to each other): it checks its
  arguments (fastbp/_ext/checks.py), then runs the very kernel a step runs.
  For tests and for reading; the engine never calls them.

Dropout masks come from a counter-based splitmix64 stream whose one uint64
counter is advanced in place (the model keeps it: reproducible from the
seed, saved in checkpoints; ``fastbp.reference.dropout_mask`` computes the
same masks).  What each program column means: engine.pyx's docstring.
"""
from libc.math cimport sqrt
from libc.stdint cimport int64_t, uint64_t

import numpy as np

from fastbp._ext.dense cimport floating
from fastbp._ext.engine cimport fbp_allreduce_sum
from fastbp._ext.engine cimport (BATCHNORM, DENSE, DROPOUT, KIND, L1, L2, N_COLS, N_IN,
                                 N_OUT, N_REG, TRAINABLE, W_OFF)

from fastbp._ext.checks import array, real


cdef inline uint64_t splitmix64(uint64_t* counter) noexcept nogil:
    cdef uint64_t z
    counter[0] += GOLDEN
    z = counter[0]
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)


cdef void dropout_forward_op(const floating* x, floating* out, floating* mask, int64_t size,
                             double rate, uint64_t* counter) noexcept nogil:
    """out = x * mask; an element is kept when the top 24 bits of its draw
    are below (1 - rate) 2^24."""
    cdef int64_t i
    cdef uint64_t keep = <uint64_t>((1.0 - rate) * 16777216.0)
    cdef floating scale = <floating>(1.0 / (1.0 - rate))
    for i in range(size):
        mask[i] = scale if (splitmix64(counter) >> 40) < keep else 0
        out[i] = x[i] * mask[i]


cdef void batchnorm_forward_op(const floating* x, floating* out, floating* xhat,
                               floating* inv_std, const floating* gamma, const floating* beta,
                               floating* buf, int64_t m, int64_t w, double momentum,
                               double eps, bint training, BNSync* sync=NULL) noexcept nogil:
    """out = gamma x_hat + beta, x_hat = (x - mean) / sqrt(var + eps), with
    the batch's (biased) statistics in training, updating the running ones
    (unbiased variance), else with the running ones.  ``sync`` (training
    only): the batch is the ranks' rows together (sync.rows of them)."""
    cdef int64_t i, j
    cdef double mean, var, d
    cdef floating mu, inv
    if training and sync != NULL:
        _batchnorm_sync_stats(x, inv_std, buf, m, w, momentum, eps, sync)
        for j in range(w):
            mu = <floating>sync.scratch[j]
            inv = inv_std[j]
            for i in range(m):
                xhat[i * w + j] = (x[i * w + j] - mu) * inv
                out[i * w + j] = gamma[j] * xhat[i * w + j] + beta[j]
        return
    for j in range(w):
        if training:
            mean = 0.0
            for i in range(m):
                mean += x[i * w + j]
            mean /= m
            var = 0.0
            for i in range(m):
                d = x[i * w + j] - mean
                var += d * d
            var /= m
            buf[j] = <floating>((1 - momentum) * buf[j] + momentum * mean)
            buf[w + j] = <floating>((1 - momentum) * buf[w + j] + momentum * var * m / (m - 1))
        else:
            mean = buf[j]
            var = buf[w + j]
        mu = <floating>mean
        inv = <floating>(1.0 / sqrt(var + eps))
        inv_std[j] = inv
        for i in range(m):
            xhat[i * w + j] = (x[i * w + j] - mu) * inv
            out[i * w + j] = gamma[j] * xhat[i * w + j] + beta[j]


cdef void _batchnorm_sync_stats(const floating* x, floating* inv_std, floating* buf,
                                int64_t m, int64_t w, double momentum, double eps,
                                BNSync* sync) noexcept nogil:
    """The global batch's mean (into sync.scratch[0:w]) and 1/std (into
    inv_std), each rank's column sums added by two allreduces (as one
    process: the mean, then the squared deviations from it); the running
    statistics updated with them.  An MPI error is kept in sync.comm.error
    (the step then stops)."""
    cdef int64_t i, j, n = sync.rows
    cdef double* s = sync.scratch
    cdef double* sq = sync.scratch + w
    cdef double d, mean, var
    for j in range(w):
        s[j] = 0.0
        for i in range(m):
            s[j] += x[i * w + j]
    fbp_allreduce_sum(sync.comm, s, w, 1)
    for j in range(w):
        s[j] /= n
        sq[j] = 0.0
        for i in range(m):
            d = x[i * w + j] - s[j]
            sq[j] += d * d
    fbp_allreduce_sum(sync.comm, sq, w, 1)
    for j in range(w):
        mean = s[j]
        var = sq[j] / n
        buf[j] = <floating>((1 - momentum) * buf[j] + momentum * mean)
        buf[w + j] = <floating>((1 - momentum) * buf[w + j] + momentum * var * n / (n - 1))
        inv_std[j] = <floating>(1.0 / sqrt(var + eps))


cdef void batchnorm_backward_op(floating* g, const floating* xhat, const floating* inv_std,
                                const floating* gamma, floating* dgamma, floating* dbeta,
                                floating* dx, int64_t m, int64_t w, bint training,
                                BNSync* sync=NULL) noexcept nogil:
    """dgamma = sum g x_hat, dbeta = sum g; dx = gamma inv/m (m g - dbeta -
    x_hat dgamma) with batch statistics, gamma inv g with running ones.
    ``sync`` (training only): dx with the global batch's sums and rows;
    dgamma and dbeta stay this rank's sums (the step's allreduce adds them)."""
    cdef int64_t i, j
    cdef double sg, sgx
    cdef floating c
    if training and sync != NULL:
        for j in range(w):
            sg = 0.0
            sgx = 0.0
            for i in range(m):
                sg += g[i * w + j]
                sgx += g[i * w + j] * xhat[i * w + j]
            dgamma[j] = <floating>sgx
            dbeta[j] = <floating>sg
            sync.scratch[j] = sg
            sync.scratch[w + j] = sgx
        fbp_allreduce_sum(sync.comm, sync.scratch, 2 * w, 1)
        if dx != NULL:
            for j in range(w):
                sg = sync.scratch[j]
                sgx = sync.scratch[w + j]
                c = gamma[j] * inv_std[j]
                for i in range(m):
                    dx[i * w + j] = <floating>(c / sync.rows * (sync.rows * g[i * w + j] - sg
                                                               - xhat[i * w + j] * sgx))
        return
    for j in range(w):
        sg = 0.0
        sgx = 0.0
        for i in range(m):
            sg += g[i * w + j]
            sgx += g[i * w + j] * xhat[i * w + j]
        dgamma[j] = <floating>sgx
        dbeta[j] = <floating>sg
        if dx == NULL:
            continue
        c = gamma[j] * inv_std[j]
        # the test outside the loop: inlined into its caller (before the
        # engine was split by module) the compiler hoisted it; called across
        # modules it did not, and BatchNorm's backward ran 6% more
        # instructions
        if training:
            for i in range(m):
                dx[i * w + j] = <floating>(c / m * (m * g[i * w + j] - sg - xhat[i * w + j] * sgx))
        else:
            for i in range(m):
                dx[i * w + j] = c * g[i * w + j]


cdef double penalize_op(const int64_t[:, ::1] prog, const double[:, ::1] reg,
                        bint per_weight, double wsum, floating* params,
                        floating* grad) noexcept nogil:
    """Add the weight penalties of every trainable layer to ``grad``; return
    their value (0 when no layer has one).  With ``per_weight`` they are
    divided by ``wsum``, the batch's weight sum."""
    cdef int64_t l, i, size, size4
    cdef double s = 1.0 / wsum if per_weight else 1.0, total = 0.0, l2, l1, sq, ab
    cdef double sq0, sq1, sq2, sq3, ab0, ab1, ab2, ab3
    cdef floating* W
    cdef floating* dW
    cdef floating c2, c1, v, v0, v1, v2, v3
    for l in range(prog.shape[0]):
        l2 = reg[l, L2]
        l1 = reg[l, L1]
        if (l2 == 0 and l1 == 0) or not prog[l, TRAINABLE]:
            continue
        size = prog[l, N_IN] * prog[l, N_OUT]
        W = params + prog[l, W_OFF]
        dW = grad + prog[l, W_OFF]
        c2 = <floating>(s * l2)
        c1 = <floating>(s * l1)
        # Four independent partial sums (i mod 4), then the tail: one serial
        # chain of adds would wait on each add's latency.  dW is computed
        # element by element as before; only the penalty's value depends on
        # the summation order.
        sq0 = 0.0
        sq1 = 0.0
        sq2 = 0.0
        sq3 = 0.0
        ab0 = 0.0
        ab1 = 0.0
        ab2 = 0.0
        ab3 = 0.0
        size4 = size - size % 4
        if l1 == 0:  # L2 alone (scikit-learn's alpha): no sign, no |W|
            for i in range(0, size4, 4):
                v0 = W[i]
                v1 = W[i + 1]
                v2 = W[i + 2]
                v3 = W[i + 3]
                sq0 += v0 * v0
                sq1 += v1 * v1
                sq2 += v2 * v2
                sq3 += v3 * v3
                dW[i] += c2 * v0
                dW[i + 1] += c2 * v1
                dW[i + 2] += c2 * v2
                dW[i + 3] += c2 * v3
            for i in range(size4, size):
                v = W[i]
                sq0 += v * v
                dW[i] += c2 * v
        else:
            for i in range(0, size4, 4):
                v0 = W[i]
                v1 = W[i + 1]
                v2 = W[i + 2]
                v3 = W[i + 3]
                sq0 += v0 * v0
                sq1 += v1 * v1
                sq2 += v2 * v2
                sq3 += v3 * v3
                ab0 += v0 if v0 >= 0 else -v0
                ab1 += v1 if v1 >= 0 else -v1
                ab2 += v2 if v2 >= 0 else -v2
                ab3 += v3 if v3 >= 0 else -v3
                dW[i] += c2 * v0 + (c1 if v0 > 0 else (-c1 if v0 < 0 else 0))
                dW[i + 1] += c2 * v1 + (c1 if v1 > 0 else (-c1 if v1 < 0 else 0))
                dW[i + 2] += c2 * v2 + (c1 if v2 > 0 else (-c1 if v2 < 0 else 0))
                dW[i + 3] += c2 * v3 + (c1 if v3 > 0 else (-c1 if v3 < 0 else 0))
            for i in range(size4, size):
                v = W[i]
                sq0 += v * v
                ab0 += v if v >= 0 else -v
                dW[i] += c2 * v + (c1 if v > 0 else (-c1 if v < 0 else 0))
        sq = (sq0 + sq1) + (sq2 + sq3)
        ab = (ab0 + ab1) + (ab2 + ab3)
        total += s * (0.5 * l2 * sq + l1 * ab)
    return total


cdef inline int64_t _n_row_params(const int64_t[:, ::1] prog, int64_t l) noexcept nogil:
    if prog[l, KIND] == BATCHNORM:
        return 2 * prog[l, N_OUT]
    return prog[l, N_IN] * prog[l, N_OUT] + prog[l, N_OUT]


cdef void clip_and_measure_op(const int64_t[:, ::1] prog, floating* grad, double clip_value,
                              double clip_norm, double* norms) noexcept nogil:
    """Clip the trainable gradients: each element to [-clip_value, clip_value]
    (if > 0), then the whole vector to global L2 norm clip_norm (if > 0) as
    torch.nn.utils.clip_grad_norm_ does (scale by clip_norm / (norm + 1e-6)
    when that is below 1).  Adds each layer's gradient norm (after value
    clipping, before norm clipping) to norms[l] if norms is not NULL."""
    cdef int64_t l, i, start, size
    cdef double total = 0.0, layer, coef
    cdef floating v, hi = <floating>clip_value
    for l in range(prog.shape[0]):
        if prog[l, KIND] == DROPOUT or not prog[l, TRAINABLE]:
            continue
        start = prog[l, W_OFF]
        size = _n_row_params(prog, l)  # W then b (gamma then beta), contiguous
        layer = 0.0
        for i in range(start, start + size):
            v = grad[i]
            if clip_value > 0:
                v = hi if v > hi else (-hi if v < -hi else v)
                grad[i] = v
            layer += v * v
        total += layer
        if norms != NULL:
            norms[l] += sqrt(layer)
    if clip_norm > 0:
        coef = clip_norm / (sqrt(total) + 1e-6)
        if coef < 1.0:
            for l in range(prog.shape[0]):
                if prog[l, KIND] == DROPOUT or not prog[l, TRAINABLE]:
                    continue
                start = prog[l, W_OFF]
                size = _n_row_params(prog, l)
                for i in range(start, start + size):
                    grad[i] = <floating>(grad[i] * coef)


# ---------------------------------------------------------------------------
# The checked twins: each ``def`` below checks its arguments, then runs the
# very ``*_op`` a training step runs (its ``_kernel_*`` holds the GIL-free
# call).

def _counter(counter):
    if (not isinstance(counter, np.ndarray) or counter.dtype != np.uint64
            or counter.shape != (1,) or not counter.flags.writeable):
        raise ValueError("counter must be a writable uint64 array of shape (1,) "
                         "(np.zeros(1, np.uint64)); it is advanced in place")
    return counter


# Each _kernel_* runs one op on raw pointers for its checked twin below.
# They are Python-callable too, so each refuses arrays too short for what
# it touches (the twins' checks say more; these only keep memory safe).

def _too_short(what):
    raise ValueError(f"{what}: an array is too short for the op (call the checked function "
                     "without the _kernel_ prefix)")


def _kernel_dropout_forward(const floating[::1] x, floating[::1] out, floating[::1] mask,
                            double rate, uint64_t[::1] counter):
    if out.shape[0] < x.shape[0] or mask.shape[0] < x.shape[0] or counter.shape[0] < 1:
        _too_short("dropout_forward")
    if x.shape[0] == 0:
        return
    with nogil:
        dropout_forward_op(&x[0], &out[0], &mask[0], x.shape[0], rate, &counter[0])


def dropout_forward(x, rate, counter):
    """Inverted dropout in training: ``x * mask`` (the engine's DROPOUT row,
    and DropConnect's mask on W).

    Parameters
    ----------
    x : ndarray of float32 or float64, any shape, C-contiguous
    rate : float in [0, 1)
        The fraction dropped.
    counter : ndarray of uint64, shape (1,)
        The splitmix64 stream's counter; advanced in place by ``x.size``.

    Returns
    -------
    out, mask : ndarray of x's shape and dtype
        mask is 1/(1 - rate) where the top 24 bits of an element's draw are
        below (1 - rate) 2^24, else 0.
    """
    x = array("x", x)
    rate = real("rate", rate, 0.0, 1.0, hi_open=True)
    counter = _counter(counter)
    out, mask = np.empty_like(x), np.empty_like(x)
    if x.size:
        _kernel_dropout_forward(x.reshape(-1), out.reshape(-1), mask.reshape(-1), rate, counter)
    return out, mask


def _elementwise(kernel, a_name, a, b_name, b):
    """A new array like ``a``, written by ``kernel(a, b, out)`` on flat views
    of two arrays of one shape and dtype (checked first)."""
    a = array(a_name, a)
    b = array(b_name, b, a.dtype, like=a)
    out = np.empty_like(a)
    if a.size:
        kernel(a.reshape(-1), b.reshape(-1), out.reshape(-1))
    return out


def _kernel_dropout_backward(const floating[::1] g, const floating[::1] mask,
                             floating[::1] out):
    if mask.shape[0] < g.shape[0] or out.shape[0] < g.shape[0]:
        _too_short("dropout_backward")
    if g.shape[0] == 0:
        return
    with nogil:
        dropout_backward_op(&g[0], &mask[0], &out[0], g.shape[0])


def dropout_backward(g, mask):
    """The gradient through a dropout mask, ``g * mask`` (a DROPOUT row's
    backward; a DropConnect row's dW scaled by its mask).

    Parameters
    ----------
    g, mask : ndarray, same shape and dtype (float32 or float64)

    Returns
    -------
    ndarray of g's shape and dtype
    """
    return _elementwise(_kernel_dropout_backward, "g", g, "mask", mask)


def _kernel_residual_add(const floating[::1] x, const floating[::1] skip, floating[::1] out):
    if skip.shape[0] < x.shape[0] or out.shape[0] < x.shape[0]:
        _too_short("residual_add")
    if x.shape[0] == 0:
        return
    with nogil:
        residual_add_op(&x[0], &skip[0], &out[0], x.shape[0])


def residual_add(x, skip):
    """``x + skip``: a RES_END row's output (block(x) + x), and in the
    backward pass the skip path's gradient joining the block's at RES_BEGIN.

    Parameters
    ----------
    x, skip : ndarray, same shape and dtype (float32 or float64)

    Returns
    -------
    ndarray of x's shape and dtype
    """
    return _elementwise(_kernel_residual_add, "x", x, "skip", skip)


def _kernel_activity_penalty(const floating[::1] a, floating[::1] g, int64_t m, double c):
    cdef double value
    if g.shape[0] < a.shape[0] or m < 1:
        _too_short("activity_penalty")
    if a.shape[0] == 0:
        return 0.0
    with nogil:
        value = activity_penalty_op(&a[0], &g[0], m, a.shape[0], c)
    return value


def activity_penalty(a, g, c):
    """The L1 activity penalty of a layer's output: adds ``c/m sign(a)`` to
    g in place and returns ``c/m sum |a|``.

    Parameters
    ----------
    a : ndarray of shape (m, n), float32 or float64
        The layer's output, m >= 1 rows.
    g : ndarray of shape (m, n), a's dtype
        dL/da, updated in place.
    c : float >= 0
        The penalty's coefficient (``reg[l, ACTIVITY_L1]``).

    Returns
    -------
    float
    """
    a = array("a", a, ndim=2)
    g = array("g", g, a.dtype, like=a, writable=True)
    c = real("c", c, 0.0, float("inf"), hi_open=True)
    if a.shape[0] < 1:
        raise ValueError("a must have at least one row")
    if a.size == 0:
        return 0.0
    return _kernel_activity_penalty(a.reshape(-1), g.reshape(-1), a.shape[0], c)


def _kernel_batchnorm_forward(const floating[:, ::1] x, floating[:, ::1] out,
                              floating[:, ::1] xhat, floating[::1] inv_std,
                              const floating[::1] gamma, const floating[::1] beta,
                              floating[::1] buf, double momentum, double eps, bint training):
    cdef int64_t m = x.shape[0], w = x.shape[1]
    if (out.shape[0] != m or out.shape[1] != w or xhat.shape[0] != m or xhat.shape[1] != w
            or inv_std.shape[0] < w or gamma.shape[0] < w or beta.shape[0] < w
            or buf.shape[0] < 2 * w or m < 1):
        _too_short("batchnorm_forward")
    if w == 0:
        return
    with nogil:
        batchnorm_forward_op(&x[0, 0], &out[0, 0], &xhat[0, 0], &inv_std[0], &gamma[0], &beta[0],
                             &buf[0], x.shape[0], x.shape[1], momentum, eps, training)


def batchnorm_forward(x, gamma, beta, running_mean, running_var, eps, momentum, training):
    """A BATCHNORM row's forward (torch.nn.BatchNorm1d).

    Parameters
    ----------
    x : ndarray of shape (m, w), float32 or float64
        m >= 2 rows in training, m >= 1 otherwise.
    gamma, beta : ndarray of shape (w,), x's dtype
    running_mean, running_var : ndarray of shape (w,), x's dtype
        Updated in place in training (momentum-weighted, the variance
        unbiased); used instead of the batch's statistics otherwise.
    eps : float >= 0
        Added to the variance.
    momentum : float in [0, 1]
    training : bool

    Returns
    -------
    y, x_hat : ndarray of shape (m, w)
        ``y = gamma x_hat + beta``, ``x_hat = (x - mean) / sqrt(var + eps)``.
    inv_std : ndarray of shape (w,)
        ``1 / sqrt(var + eps)``.
    """
    x = array("x", x, ndim=2)
    vectors = [array(name, v, x.dtype, ndim=1, writable=name.startswith("running"))
               for name, v in (("gamma", gamma), ("beta", beta),
                               ("running_mean", running_mean), ("running_var", running_var))]
    m, w = x.shape
    for name, v in zip(("gamma", "beta", "running_mean", "running_var"), vectors):
        if v.shape != (w,):
            raise ValueError(f"{name} has shape {v.shape}; it must be ({w},), x's width")
    eps = real("eps", eps, 0.0, float("inf"), hi_open=True)
    momentum = real("momentum", momentum, 0.0, 1.0)
    if m < (2 if training else 1):
        raise ValueError(f"batchnorm_forward needs at least {2 if training else 1} rows "
                         f"{'in training' if training else ''}, got {m}")
    out, xhat = np.empty_like(x), np.empty_like(x)
    inv_std = np.empty(w, x.dtype)
    if w == 0:
        return out, xhat, inv_std
    buf = np.concatenate([running_mean, running_var])   # the engine's layout
    _kernel_batchnorm_forward(x, out, xhat, inv_std, vectors[0], vectors[1], buf, momentum,
                              eps, bool(training))
    if training:
        running_mean[...] = buf[:w]
        running_var[...] = buf[w:]
    return out, xhat, inv_std


def _kernel_batchnorm_backward(const floating[:, ::1] g, const floating[:, ::1] xhat,
                               const floating[::1] inv_std, const floating[::1] gamma,
                               floating[::1] dgamma, floating[::1] dbeta, floating[:, ::1] dx,
                               bint training):
    cdef int64_t m = g.shape[0], w = g.shape[1]
    if (xhat.shape[0] != m or xhat.shape[1] != w or dx.shape[0] != m or dx.shape[1] != w
            or inv_std.shape[0] < w or gamma.shape[0] < w or dgamma.shape[0] < w
            or dbeta.shape[0] < w or m < 1):
        _too_short("batchnorm_backward")
    if w == 0:
        return
    with nogil:
        batchnorm_backward_op(<floating*>&g[0, 0], &xhat[0, 0], &inv_std[0], &gamma[0], &dgamma[0],
                              &dbeta[0], &dx[0, 0], g.shape[0], g.shape[1], training)


def batchnorm_backward(g, xhat, inv_std, gamma, training):
    """A BATCHNORM row's backward.

    Parameters
    ----------
    g : ndarray of shape (m, w), float32 or float64
        dL/dy, m >= 1.
    xhat : ndarray of shape (m, w)
        The forward pass's x_hat.
    inv_std : ndarray of shape (w,)
        The forward pass's 1 / sqrt(var + eps).
    gamma : ndarray of shape (w,)
    training : bool
        Whether the forward pass used the batch's statistics (then they
        depend on x) or the running ones.

    Returns
    -------
    dgamma, dbeta : ndarray of shape (w,)
    dx : ndarray of shape (m, w)
    """
    g = array("g", g, ndim=2)
    xhat = array("xhat", xhat, g.dtype, like=g)
    m, w = g.shape
    for name, v in (("inv_std", inv_std), ("gamma", gamma)):
        array(name, v, g.dtype, ndim=1)
        if v.shape != (w,):
            raise ValueError(f"{name} has shape {v.shape}; it must be ({w},), g's width")
    if m < 1:
        raise ValueError("g must have at least one row")
    dgamma, dbeta, dx = np.empty(w, g.dtype), np.empty(w, g.dtype), np.empty_like(g)
    if w:
        _kernel_batchnorm_backward(g, xhat, inv_std, gamma, dgamma, dbeta, dx, bool(training))
    return dgamma, dbeta, dx


def _program(program, n_rows=None):
    if (not isinstance(program, np.ndarray) or program.dtype != np.int64 or program.ndim != 2
            or program.shape[1] != N_COLS or not program.flags.c_contiguous):
        raise ValueError(f"program must be a C-contiguous int64 array of shape (n_layers, "
                         f"{N_COLS}) (net.program.rows)")
    return program


def _check_span(program, l, start, size, n, what):
    """Rows l's ``size`` values from ``start`` lie inside a vector of n."""
    if program[l, N_IN] < 0 or program[l, N_OUT] < 0 or start < 0 or start + size > n:
        raise ValueError(f"program row {l}: its {what} ({size} values from {start}) do not "
                         f"fit in the {n} parameters")


def _check_penalized_rows(program, reg, int64_t n):
    """The rows penalize_op reads lie inside n parameters."""
    for l in range(program.shape[0]):
        if (reg[l, L2] != 0 or reg[l, L1] != 0) and program[l, TRAINABLE]:
            if program[l, KIND] != DENSE:
                raise ValueError(f"program row {l}: weight penalties apply to DENSE rows only")
            _check_span(program, l, int(program[l, W_OFF]),
                        int(program[l, N_IN]) * int(program[l, N_OUT]), n, "W")


def _check_trainable_rows(program, int64_t n):
    """The rows clip_and_measure_op reads lie inside n gradients."""
    for l in range(program.shape[0]):
        if program[l, KIND] != DROPOUT and program[l, TRAINABLE]:
            size = (2 * int(program[l, N_OUT]) if program[l, KIND] == BATCHNORM
                    else int(program[l, N_IN]) * int(program[l, N_OUT]) + int(program[l, N_OUT]))
            _check_span(program, l, int(program[l, W_OFF]), size, n, "parameters")


def _kernel_penalize(const int64_t[:, ::1] program, const double[:, ::1] reg, bint per_weight,
                     const floating[::1] w, floating[::1] params, floating[::1] grad):
    cdef double value
    prog = np.asarray(program)
    if (reg.shape[0] != program.shape[0] or reg.shape[1] != N_REG or program.shape[1] != N_COLS
            or grad.shape[0] < params.shape[0] or w.shape[0] < 1):
        _too_short("penalize")
    _check_penalized_rows(prog, np.asarray(reg), params.shape[0])
    with nogil:
        value = penalize_op(program, reg, per_weight, weight_sum(&w[0], w.shape[0]),
                            ptr_or_null(params), ptr_or_null(grad))
    return value


def penalize(program, reg, per_weight, w, params, grad):
    """Adds every trainable dense row's weight penalty's gradient
    ``s (l2 W + l1 sign W)`` to grad in place; returns the penalty
    ``s sum (l2/2 ||W||^2 + l1 |W|_1)``.

    Parameters
    ----------
    program : ndarray of int64, shape (n_layers, N_COLS)
    reg : ndarray of float64, shape (n_layers, N_REG)
        Columns L2, L1 (ACTIVITY_L1 is not read here).
    per_weight : bool
        s = 1 / sum(w) if true (scikit-learn's alpha), else 1.
    w : ndarray of shape (m,), m >= 1
        The batch's sample weights.
    params, grad : ndarray of shape (n_params,), w's dtype
        grad is updated in place.

    Returns
    -------
    float
    """
    program = _program(program)
    if (not isinstance(reg, np.ndarray) or reg.dtype != np.float64
            or reg.shape != (program.shape[0], N_REG) or not reg.flags.c_contiguous):
        raise ValueError(f"reg must be a C-contiguous float64 array of shape "
                         f"({program.shape[0]}, {N_REG})")
    w = array("w", w, ndim=1)
    params = array("params", params, w.dtype, ndim=1)
    grad = array("grad", grad, w.dtype, like=params, writable=True)
    if w.shape[0] < 1:
        raise ValueError("w must hold at least one sample weight")
    return _kernel_penalize(program, reg, bool(per_weight), w, params, grad)


def _kernel_clip_and_measure(const int64_t[:, ::1] program, floating[::1] grad,
                             double clip_value, double clip_norm, double[::1] norms):
    if program.shape[1] != N_COLS or norms.shape[0] < program.shape[0] or norms.shape[0] < 1:
        _too_short("clip_and_measure")
    _check_trainable_rows(np.asarray(program), grad.shape[0])
    with nogil:
        clip_and_measure_op(program, ptr_or_null(grad), clip_value, clip_norm, &norms[0])


def clip_and_measure(program, grad, clip_value=0.0, clip_norm=0.0):
    """Clips the trainable rows' gradients in place: each element to
    [-clip_value, clip_value] (if > 0), then the whole to global L2 norm
    clip_norm (if > 0) like torch.nn.utils.clip_grad_norm_.

    Parameters
    ----------
    program : ndarray of int64, shape (n_layers, N_COLS)
    grad : ndarray of shape (n_params,), float32 or float64
        Updated in place.
    clip_value, clip_norm : float >= 0
        0 turns that clipping off.

    Returns
    -------
    ndarray of float64, shape (n_layers,)
        Each row's gradient norm after value clipping, before norm clipping
        (0 for rows without trainable parameters).
    """
    program = _program(program)
    grad = array("grad", grad, ndim=1, writable=True)
    clip_value = real("clip_value", clip_value, 0.0, float("inf"))
    clip_norm = real("clip_norm", clip_norm, 0.0, float("inf"))
    norms = np.zeros(max(program.shape[0], 1))
    _kernel_clip_and_measure(program, grad, clip_value, clip_norm, norms)
    return norms[:program.shape[0]]
