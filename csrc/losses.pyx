# cython: language_level=3
"""Softmax losses in C (csrc/losses.h): sk_log_loss and cross_entropy.

Design
------
The training engine calls a loss through its C address once per batch
(``loss(z, y, w, g, m, k)``, engine.pyx ``call_loss``); most losses are Numba
cfuncs (fastbp/_numba/losses.py), but the softmax ones spend their time in
exp, which libm computes one value at a time.  csrc/losses.h computes the
exps of a whole batch with vector instructions (the best level the CPU has,
like the small GEMMs) and is otherwise the Numba kernels' arithmetic.

``loss_address(name, dtype)`` gives the engine's entry points; the ``def``
functions below are the same kernels for Python callers and tests (the
``_numba.losses`` registry lists them beside the Numba ones), and mirror
``fastbp.reference`` name for name.  ``exp`` exposes the vector exp itself
so that tests can measure its error at every instruction-set level.
"""
import numpy as np

from libc.stdint cimport int64_t

from fastbp._ext.dense cimport floating
from fastbp._ext.engine cimport CROSS_ENTROPY, SK_LOG_LOSS


cdef extern from "losses.h" nogil:
    int FBP_LOSS_SK_LOG
    int FBP_LOSS_CROSS_ENTROPY
    int fbp_isa_best()
    void fbp_exp_isa_f32(int isa, float* x, int64_t n)
    void fbp_exp_isa_f64(int isa, double* x, int64_t n)
    double fbp_softmax_loss_isa_f32(int isa, int which, float* z, float* y, float* w,
                                    float* g, int64_t m, int64_t k)
    double fbp_softmax_loss_isa_f64(int isa, int which, double* z, double* y, double* w,
                                    double* g, int64_t m, int64_t k)
    double fbp_sk_log_loss_f32(float*, float*, float*, float*, int64_t, int64_t)
    double fbp_sk_log_loss_f64(double*, double*, double*, double*, int64_t, int64_t)
    double fbp_cross_entropy_f32(float*, float*, float*, float*, int64_t, int64_t)
    double fbp_cross_entropy_f64(double*, double*, double*, double*, int64_t, int64_t)
    double fbp_softmax_rows_isa_f32(int isa, int which, float* z, float* y, float* w,
                                    float* g, int64_t lo, int64_t hi, int64_t k, double scale,
                                    double* terms)
    double fbp_softmax_rows_isa_f64(int isa, int which, double* z, double* y, double* w,
                                    double* g, int64_t lo, int64_t hi, int64_t k, double scale,
                                    double* terms)


# losses.h's loss ids are engine.pxd's (a build error otherwise).
cdef extern from "interface.h":
    void FBP_SAME(int c_value, int pxd_value)
FBP_SAME(FBP_LOSS_SK_LOG, SK_LOG_LOSS)
FBP_SAME(FBP_LOSS_CROSS_ENTROPY, CROSS_ENTROPY)


_ADDRESSES = {
    ("sk_log_loss", "float32"): <size_t>&fbp_sk_log_loss_f32,
    ("sk_log_loss", "float64"): <size_t>&fbp_sk_log_loss_f64,
    ("cross_entropy", "float32"): <size_t>&fbp_cross_entropy_f32,
    ("cross_entropy", "float64"): <size_t>&fbp_cross_entropy_f64,
}

#: Loss names this module computes.
NAMES = ("sk_log_loss", "cross_entropy")


cdef int softmax_which(size_t loss_addr, bint dbl) noexcept nogil:
    """Which softmax loss (``Loss``, engine.pxd) an engine entry point of
    this module computes, for the dtype (dbl: float64); -1 if it is none of
    them."""
    if loss_addr == (<size_t>&fbp_sk_log_loss_f64 if dbl else <size_t>&fbp_sk_log_loss_f32):
        return SK_LOG_LOSS
    if loss_addr == (<size_t>&fbp_cross_entropy_f64 if dbl
                     else <size_t>&fbp_cross_entropy_f32):
        return CROSS_ENTROPY
    return -1


cdef void softmax_rows_op(int which, floating* z, floating* y, floating* w, floating* g,
                       int64_t lo, int64_t hi, int64_t k, double scale,
                       double* terms) noexcept nogil:
    """Rows lo .. hi - 1 of loss ``which``: their rows of g = dL/dz, given
    scale = 1 / (sum of every row's weight), and terms[i] = row i's term of
    the weighted loss sum (the loss is scale times their sum in row
    order)."""
    if floating is float:
        fbp_softmax_rows_isa_f32(-1, which, z, y, w, g, lo, hi, k, scale, terms)
    else:
        fbp_softmax_rows_isa_f64(-1, which, z, y, w, g, lo, hi, k, scale, terms)


def isa_level():
    """Instruction-set level this module's kernels run at (as
    ``dense.small_gemm_isa``; each compiled module finds it once)."""
    return fbp_isa_best()


def loss_address(name, dtype):
    """C address of loss ``name`` for ``dtype`` (float32 or float64), with the
    engine's signature ``double(T* z, T* y, T* w, T* g, int64 m, int64 k)``."""
    return _ADDRESSES[name, np.dtype(dtype).name]


cdef double _softmax_loss(int which, const floating[:, ::1] Z, const floating[:, ::1] Y,
                          const floating[::1] w, floating[:, ::1] G, int isa) except? -1:
    cdef int64_t m = Z.shape[0], k = Z.shape[1]
    cdef double value
    if (Y.shape[0] != m or Y.shape[1] != k or G.shape[0] != m or G.shape[1] != k
            or w.shape[0] != m):
        raise ValueError("shapes of Z, Y, w, G do not agree")
    if m == 0:
        return float("nan")  # 0 / (sum of no weights), as the Numba losses give
    if k == 0:
        raise ValueError("Z has no columns")
    with nogil:
        if floating is float:
            value = fbp_softmax_loss_isa_f32(isa, which, <float*>&Z[0, 0], <float*>&Y[0, 0],
                                             <float*>&w[0], &G[0, 0], m, k)
        else:
            value = fbp_softmax_loss_isa_f64(isa, which, <double*>&Z[0, 0], <double*>&Y[0, 0],
                                             <double*>&w[0], &G[0, 0], m, k)
    return value


def sk_log_loss_loss_grad(const floating[:, ::1] Z, const floating[:, ::1] Y,
                          const floating[::1] w, floating[:, ::1] G, int isa=-1):
    """scikit-learn's log loss on softmax(Z) and its gradient.

    Parameters
    ----------
    Z, Y : ndarray of shape (m, k)
        Logits and targets (one-hot, or probabilities).
    w : ndarray of shape (m,)
        Sample weights.
    G : ndarray of shape (m, k)
        Output: ``w (softmax(Z) - Y) / sum(w)``.
    isa : int, default=-1
        Instruction-set level of the exp (0 baseline, 1 AVX2, 2 AVX-512; -1
        the best this machine has).  For tests.

    Returns
    -------
    float
        ``-sum_j`` of the weighted mean of ``y log p``, p = softmax(Z)
        clipped to [eps, 1 - eps].
    """
    return _softmax_loss(SK_LOG_LOSS, Z, Y, w, G, isa)


def cross_entropy_loss_grad(const floating[:, ::1] Z, const floating[:, ::1] Y,
                            const floating[::1] w, floating[:, ::1] G, int isa=-1):
    """torch.nn.CrossEntropyLoss (weighted mean over rows) and its gradient.

    Parameters
    ----------
    Z, Y : ndarray of shape (m, k)
        Logits and targets (one-hot, or probabilities).
    w : ndarray of shape (m,)
        Sample weights.
    G : ndarray of shape (m, k)
        Output: ``w (softmax(Z) sum_j Y_j - Y) / sum(w)``.
    isa : int, default=-1
        Instruction-set level of the exp, as for ``sk_log_loss_loss_grad``.

    Returns
    -------
    float
        ``sum_i w_i sum_j y_ij (logsumexp(z_i) - z_ij) / sum(w)``.
    """
    return _softmax_loss(CROSS_ENTROPY, Z, Y, w, G, isa)


def exp(x, int isa=-1):
    """exp of a float32 or float64 array through the losses' vector exp, at
    instruction-set level ``isa`` (-1: the best this machine has).

    Parameters
    ----------
    x : ndarray
        float32 or float64, any shape.
    isa : int, default=-1

    Returns
    -------
    ndarray
        A new array of x's dtype and shape.
    """
    out = np.array(x, order="C", copy=True)
    if out.dtype not in (np.float32, np.float64):
        raise TypeError("exp: x must be float32 or float64")
    cdef float[::1] f
    cdef double[::1] d
    cdef int64_t n = out.size
    if n == 0:
        return out
    if out.dtype == np.float32:
        f = out.reshape(-1)
        with nogil:
            fbp_exp_isa_f32(isa, &f[0], n)
    else:
        d = out.reshape(-1)
        with nogil:
            fbp_exp_isa_f64(isa, &d[0], n)
    return out


def _kernel_softmax_rows(int which, const floating[:, ::1] Z, const floating[:, ::1] Y,
                         const floating[::1] w, floating[:, ::1] G, int64_t lo, int64_t hi,
                         double scale, double[::1] terms, int isa):
    cdef int64_t k = Z.shape[1], m = Z.shape[0]
    # Python-callable: it refuses what would reach outside an array (the
    # checked softmax_rows says more)
    if (which not in (SK_LOG_LOSS, CROSS_ENTROPY) or k < 1 or Y.shape[0] != m
            or Y.shape[1] != k or G.shape[0] != m or G.shape[1] != k or w.shape[0] < m
            or terms.shape[0] < m or not 0 <= lo <= hi <= m):
        raise ValueError("_kernel_softmax_rows: arrays or rows that do not fit (call "
                         "softmax_rows)")
    if hi == lo:
        return
    with nogil:
        if floating is float:
            fbp_softmax_rows_isa_f32(isa, which, <float*>&Z[0, 0], <float*>&Y[0, 0],
                                     <float*>&w[0], &G[0, 0], lo, hi, k, scale, &terms[0])
        else:
            fbp_softmax_rows_isa_f64(isa, which, <double*>&Z[0, 0], <double*>&Y[0, 0],
                                     <double*>&w[0], &G[0, 0], lo, hi, k, scale, &terms[0])


def softmax_rows(which, Z, Y, w, G, lo, hi, scale, int isa=-1):
    """Rows lo .. hi - 1 of softmax loss ``which``: the row-parallel step's
    form of the loss (each thread computes its rows).

    Parameters
    ----------
    which : Loss
        ``Loss.SK_LOG_LOSS`` or ``Loss.CROSS_ENTROPY`` (fastbp._ext.engine).
    Z, Y : ndarray of shape (m, k), float32 or float64, k >= 1
        Logits and targets.
    w : ndarray of shape (m,)
        Sample weights.
    G : ndarray of shape (m, k)
        Output: its rows lo .. hi - 1 become those of dL/dZ,
        ``scale w_i (p_i - y_i)`` (sk_log_loss) or
        ``scale w_i (p_i sum_j y_ij - y_i)`` (cross_entropy), p = softmax.
    lo, hi : int, 0 <= lo <= hi <= m
    scale : float
        1 / (the sum of every row's sample weight).
    isa : int, default=-1
        Instruction-set level of the exp, as for ``sk_log_loss_loss_grad``.

    Returns
    -------
    ndarray of float64, shape (hi - lo,)
        Each row's term of the loss sum (the loss is scale times the sum of
        all rows' terms): ``-w_i sum_j y_ij log clip(p_ij)`` or
        ``w_i sum_j y_ij (logsumexp(z_i) - z_ij)``.
    """
    if which not in (SK_LOG_LOSS, CROSS_ENTROPY):
        raise ValueError(f"which must be Loss.SK_LOG_LOSS or Loss.CROSS_ENTROPY, not {which!r}")
    for name, a in (("Z", Z), ("Y", Y), ("w", w), ("G", G)):
        if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous numpy array")
        if a.dtype not in (np.float32, np.float64) or a.dtype != Z.dtype:
            raise ValueError(f"{name} is {a.dtype}; Z, Y, w and G must all be float32 "
                             f"or all float64")
    if Z.ndim != 2 or Y.shape != Z.shape or G.shape != Z.shape or w.shape != (Z.shape[0],):
        raise ValueError("Z, Y and G must have one shape (m, k) and w the shape (m,)")
    if not G.flags.writeable:
        raise ValueError("G is written in place and must be writable")
    lo, hi = int(lo), int(hi)
    if not 0 <= lo <= hi <= Z.shape[0]:
        raise ValueError(f"need 0 <= lo <= hi <= m = {Z.shape[0]}, got lo={lo}, hi={hi}")
    if Z.shape[1] < 1:
        raise ValueError("Z has no columns")
    terms = np.zeros(Z.shape[0], np.float64)
    if hi > lo:
        _kernel_softmax_rows(which, Z, Y, w, G, lo, hi, float(scale), terms, isa)
    return terms[lo:hi].copy()
